//! Tunnelled TCP streams through the real guest agent binary (run on the
//! host over a UNIX socket) and the real host client: a process connecting
//! to the agent's loopback port reaches whatever the host serves on the
//! `TunnelListener`. Ports are taken fresh from the host's loopback.

mod common;

use std::time::{Duration, Instant};

use agentvm_runtime::client::GuestClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(agent: &common::Agent) -> GuestClient {
    common::connect_client(agent).await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Serves every accepted stream by echoing it back, then half-closing.
fn echo_server(mut listener: agentvm_runtime::tunnel::TunnelListener) {
    tokio::spawn(async move {
        while let Ok(mut stream) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(&mut stream);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

#[tokio::test]
async fn a_connection_in_the_guest_reaches_the_host_and_half_closes() {
    let agent = common::Agent::start();
    let client = connect(&agent).await;
    let port = free_port();
    echo_server(client.tunnel_listen(port).await.unwrap());
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    socket
        .write_all(b"hello through the channel")
        .await
        .unwrap();
    socket.shutdown().await.unwrap();
    let mut back = Vec::new();
    socket.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hello through the channel");
    // Both directions ended: nothing stays open on either side.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.tunnel_streams() > 0 {
        assert!(Instant::now() < deadline, "host stream not forgotten");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The channel still serves requests beside the tunnel.
    client.ping().await.unwrap();
}

#[tokio::test]
async fn large_transfers_respect_flow_control_both_ways() {
    let agent = common::Agent::start();
    let client = connect(&agent).await;
    let port = free_port();
    echo_server(client.tunnel_listen(port).await.unwrap());
    const LEN: usize = 64 << 20;
    let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = socket.into_split();
    let started = Instant::now();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(LEN);
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    let elapsed = started.elapsed();
    assert!(
        back == data,
        "64 MiB came back intact ({} bytes)",
        back.len()
    );
    eprintln!(
        "64 MiB each way through guest agent + host client: {:.2} s ({:.0} MiB/s each way)",
        elapsed.as_secs_f64(),
        64.0 / elapsed.as_secs_f64()
    );
    client.ping().await.unwrap();
}

#[tokio::test]
async fn a_thousand_connections_neither_hang_nor_break_the_channel() {
    let agent = common::Agent::start();
    let client = connect(&agent).await;
    let port = free_port();
    // The host accepts nothing: connections pile up against the limits.
    let _listener = client.tunnel_listen(port).await.unwrap();
    let mut sockets = Vec::new();
    let started = Instant::now();
    for _ in 0..1000 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            sockets.push(s);
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    // Beyond the caps, connections are closed at once: reading gives EOF or reset.
    let mut closed = 0;
    for s in sockets.iter_mut() {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(20), s.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert!(closed >= 1000 - 256, "only {closed} of 1000 were closed");
    drop(sockets);
    // Exec and ping still work, and a new listener serves again.
    client.ping().await.unwrap();
    let port2 = free_port();
    echo_server(client.tunnel_listen(port2).await.unwrap());
    let mut socket = TcpStream::connect(("127.0.0.1", port2)).await.unwrap();
    socket.write_all(b"still").await.unwrap();
    let mut five = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), socket.read_exact(&mut five))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert_eq!(&five, b"still");
}

#[tokio::test]
async fn listening_on_a_taken_port_is_a_clear_error() {
    let agent = common::Agent::start();
    let client = connect(&agent).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = client.tunnel_listen(port).await.unwrap_err().to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}
