//! The egress proxy over loopback: an allowed CONNECT reaches an echo server (through an
//! injected resolver) and its bytes are counted; a denied host gets 403 and is logged; plain
//! HTTP is forwarded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentvm_gateway::egress::{
    Allowlist, ConnectionKind, ConnectionRecord, EgressProxy, StaticResolver,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A one-shot HTTP origin that answers every request with `hello from origin`.
async fn http_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                assert!(
                    head.starts_with("GET /path?q=1 HTTP/1.1\r\n"),
                    "origin-form request expected: {head}"
                );
                assert!(
                    head.to_lowercase().contains("host: allowed.example"),
                    "{head}"
                );
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\nconnection: close\r\n\r\nhello from origin")
                    .await
                    .unwrap();
            });
        }
    });
    addr
}

async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            r.read(&mut byte).await.unwrap(),
            1,
            "eof inside head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

async fn start(proxy: &EgressProxy) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    proxy.serve_listener(listener);
    addr
}

async fn wait_for_records(proxy: &EgressProxy, n: usize) -> Vec<ConnectionRecord> {
    for _ in 0..200 {
        let records = proxy.connections();
        if records.len() >= n {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "expected {n} connection records, got {:?}",
        proxy.connections()
    );
}

#[tokio::test]
async fn allowed_connect_tunnels_and_counts_bytes() {
    let echo = echo_server().await;
    let resolver = StaticResolver::new().with("allowed.example", 443, echo);
    let proxy = EgressProxy::with_resolver(
        Allowlist::parse(["allowed.example:443"]).unwrap(),
        Arc::new(resolver),
    );
    let addr = start(&proxy).await;

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"CONNECT allowed.example:443 HTTP/1.1\r\nHost: allowed.example:443\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"hello through the tunnel").await.unwrap();
    let mut buf = [0u8; 24];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello through the tunnel");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();

    let records = wait_for_records(&proxy, 1).await;
    let r = &records[0];
    assert_eq!(
        (r.host.as_str(), r.port, r.kind, r.allowed),
        ("allowed.example", 443, ConnectionKind::Connect, true)
    );
    assert_eq!((r.bytes_up, r.bytes_down, &r.error), (24, 24, &None));
}

#[tokio::test]
async fn denied_host_gets_403_naming_the_fix_and_is_logged() {
    let proxy = EgressProxy::with_resolver(
        Allowlist::parse(["allowed.example:443"]).unwrap(),
        Arc::new(StaticResolver::new()),
    );
    let addr = start(&proxy).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"CONNECT denied.example:443 HTTP/1.1\r\nHost: denied.example:443\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.contains("denied.example:443 is not on the allowlist"),
        "{body}"
    );
    assert!(body.contains("allow = [\"denied.example:443\"]"), "{body}");

    // An allowed name on a port its pattern does not cover: denied too.
    s.write_all(b"CONNECT allowed.example:22 HTTP/1.1\r\nHost: allowed.example:22\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 403"));

    let records = wait_for_records(&proxy, 2).await;
    assert_eq!(
        records
            .iter()
            .map(|r| (r.host.as_str(), r.port, r.allowed))
            .collect::<Vec<_>>(),
        [
            ("denied.example", 443, false),
            ("allowed.example", 22, false)
        ]
    );
    assert_eq!(records[0].error.as_deref(), Some("not on the allowlist"));
}

#[tokio::test]
async fn allowed_host_that_does_not_resolve_is_502_and_logged() {
    let proxy = EgressProxy::with_resolver(
        Allowlist::parse(["*.example"]).unwrap(),
        Arc::new(StaticResolver::new()),
    );
    let addr = start(&proxy).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"CONNECT nowhere.example:443 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 502"));
    let r = &wait_for_records(&proxy, 1).await[0];
    assert!(r.allowed);
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("not in the static resolver"),
        "{r:?}"
    );
}

#[tokio::test]
async fn plain_http_is_forwarded_in_origin_form() {
    let origin = http_origin().await;
    let resolver = StaticResolver::new().with("allowed.example", 80, origin);
    let proxy = EgressProxy::with_resolver(
        Allowlist::parse(["allowed.example"]).unwrap(),
        Arc::new(resolver),
    );
    let addr = start(&proxy).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET http://allowed.example/path?q=1 HTTP/1.1\r\nHost: allowed.example\r\nProxy-Connection: close\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("hello from origin"), "{out}");
    let r = &wait_for_records(&proxy, 1).await[0];
    assert_eq!(
        (r.host.as_str(), r.port, r.kind, r.allowed),
        ("allowed.example", 80, ConnectionKind::Http, true)
    );
    assert!(r.bytes_up > 0 && r.bytes_down >= 17, "{r:?}");
}

#[tokio::test]
async fn settle_waits_for_an_open_tunnel_to_be_logged() {
    let echo = echo_server().await;
    let resolver = StaticResolver::new().with("allowed.example", 443, echo);
    let proxy = EgressProxy::with_resolver(
        Allowlist::parse(["allowed.example"]).unwrap(),
        Arc::new(resolver),
    );
    let addr = start(&proxy).await;
    assert!(
        proxy.settle(Duration::from_millis(50)).await,
        "nothing in flight yet"
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"CONNECT allowed.example:443 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The tunnel is open: not settled, and not logged yet.
    assert!(!proxy.settle(Duration::from_millis(100)).await);
    assert!(proxy.connections().is_empty());
    drop(s);
    assert!(proxy.settle(Duration::from_secs(5)).await);
    let records = proxy.connections();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0].allowed);
}
