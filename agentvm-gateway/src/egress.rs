//! The egress proxy: HTTP `CONNECT` tunnels and plain-HTTP forwarding, only to hosts on an
//! allowlist of `host[:port]` patterns. Every connection attempt, allowed or not, becomes a
//! [`ConnectionRecord`] in a shared [`ConnectionLog`] and a `tracing` event.
//!
//! Host names are resolved by a [`Resolver`] (the system's by default); tests inject a
//! [`StaticResolver`] so that e.g. `allowed.example:443` reaches a loopback port.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// An allowlist entry that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad allowlist entry {entry:?}: {reason}; write host, host:port or *.domain[:port]")]
pub struct PatternError {
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// One `host[:port]` pattern: `example.com`, `example.com:443`, `*.example.com` (any
/// subdomain, not the domain itself). No port means any port. Case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// The host, or the domain after `*.`.
    host: String,
    /// Whether it is a `*.` wildcard.
    wildcard: bool,
    /// The port, if restricted.
    port: Option<u16>,
}

impl FromStr for HostPattern {
    type Err = PatternError;

    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let err = |reason| PatternError {
            entry: entry.to_owned(),
            reason,
        };
        let s = entry.trim().to_ascii_lowercase();
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                Some(
                    p.parse::<u16>()
                        .map_err(|_| err("the port is not a number 0-65535"))?,
                ),
            ),
            None => (s, None),
        };
        let (wildcard, host) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, host),
        };
        let host = host.trim_end_matches('.').to_owned();
        if host.is_empty() {
            return Err(err("the host is empty"));
        }
        if host.contains('*') {
            return Err(err("`*` is only allowed as a leading `*.`"));
        }
        if host.contains(['/', ' ', '@']) {
            return Err(err("a host has no `/`, space or `@`"));
        }
        Ok(Self {
            host,
            wildcard,
            port,
        })
    }
}

impl HostPattern {
    /// Whether `host:port` matches.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let host_ok = if self.wildcard {
            host.strip_suffix(&self.host)
                .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.'))
        } else {
            host == self.host
        };
        host_ok && self.port.map_or(true, |p| p == port)
    }
}

/// The hosts the agent may reach. Empty means none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    patterns: Vec<HostPattern>,
}

impl Allowlist {
    /// Parses `host[:port]` patterns (see [`HostPattern`]).
    pub fn parse<I, S>(entries: I) -> Result<Self, PatternError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let patterns = entries
            .into_iter()
            .map(|e| e.as_ref().parse())
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    /// Whether it has no pattern (allows nothing).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// This list and `other`'s patterns.
    pub fn extended(mut self, other: Allowlist) -> Self {
        self.patterns.extend(other.patterns);
        self
    }

    /// Whether `host:port` may be reached.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.patterns.iter().any(|p| p.matches(host, port))
    }
}

/// Resolves host names to addresses for the proxy.
pub trait Resolver: Send + Sync + 'static {
    /// The addresses to try for `host:port`.
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;
}

/// The system resolver (`getaddrinfo` through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>> {
        let target = format!("{host}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
    }
}

/// A fixed table of `host:port` → address; every other name fails to resolve. For tests.
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    table: HashMap<(String, u16), SocketAddr>,
}

impl StaticResolver {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `host:port` to `addr`.
    pub fn with(mut self, host: &str, port: u16, addr: SocketAddr) -> Self {
        self.table.insert((host.to_ascii_lowercase(), port), addr);
        self
    }
}

impl Resolver for StaticResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>> {
        let found = self.table.get(&(host.to_ascii_lowercase(), port)).copied();
        let target = format!("{host}:{port}");
        Box::pin(async move {
            found.map(|a| vec![a]).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{target} is not in the static resolver"),
                )
            })
        })
    }
}

/// How the agent asked to reach the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionKind {
    /// An HTTP `CONNECT` tunnel (HTTPS and anything else).
    Connect,
    /// A plain-HTTP request in absolute form.
    Http,
}

impl ConnectionKind {
    /// `connect` or `http`, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Http => "http",
        }
    }
}

/// One connection through (or refused by) the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionRecord {
    /// Target host as the agent named it.
    pub host: String,
    /// Target port.
    pub port: u16,
    /// Tunnel or plain HTTP.
    pub kind: ConnectionKind,
    /// Whether the allowlist let it through.
    pub allowed: bool,
    /// Bytes from the agent to the host.
    pub bytes_up: u64,
    /// Bytes from the host to the agent.
    pub bytes_down: u64,
    /// How long it lasted.
    #[serde(serialize_with = "millis")]
    pub duration: Duration,
    /// What went wrong, if anything (denied, resolution or connection failure).
    pub error: Option<String>,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// The shared connection log; clones share it (give one to the runtime).
#[derive(Debug, Clone, Default)]
pub struct ConnectionLog {
    records: Arc<Mutex<Vec<ConnectionRecord>>>,
}

impl ConnectionLog {
    /// All records so far, in completion order.
    pub fn records(&self) -> Vec<ConnectionRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn push(&self, record: ConnectionRecord) {
        tracing::info!(
            target: "agentvm_egress",
            host = %record.host, port = record.port, allowed = record.allowed,
            bytes_up = record.bytes_up, bytes_down = record.bytes_down,
            duration_ms = record.duration.as_millis() as u64, error = ?record.error,
            "egress connection"
        );
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }
}

/// The body that a denied request gets.
pub fn denied_message(host: &str, port: u16) -> String {
    format!(
        "agentvm egress proxy: {host}:{port} is not on the allowlist, so the connection was refused.\n\
         To allow it, add allow = [\"{host}:{port}\"] to the test's attribute, or to \
         .config/agentvm.toml together with network = \"allowlist\".\n"
    )
}

struct Inner {
    allowlist: Allowlist,
    resolver: Arc<dyn Resolver>,
    log: ConnectionLog,
    connect_timeout: Duration,
    /// Requests whose record is not in the log yet.
    in_flight: AtomicUsize,
}

/// Counts a request as in flight until dropped (after its record is logged).
struct InFlight(Arc<Inner>);

impl InFlight {
    fn new(inner: &Arc<Inner>) -> Self {
        inner.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(inner))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The egress proxy. Cheap to clone; clones share the log.
#[derive(Clone)]
pub struct EgressProxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy")
            .field("allowlist", &self.inner.allowlist)
            .finish_non_exhaustive()
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl EgressProxy {
    /// A proxy with the system resolver.
    pub fn new(allowlist: Allowlist) -> Self {
        Self::with_resolver(allowlist, Arc::new(SystemResolver))
    }

    /// A proxy with the given resolver.
    pub fn with_resolver(allowlist: Allowlist, resolver: Arc<dyn Resolver>) -> Self {
        Self {
            inner: Arc::new(Inner {
                allowlist,
                resolver,
                log: ConnectionLog::default(),
                connect_timeout: Duration::from_secs(10),
                in_flight: AtomicUsize::new(0),
            }),
        }
    }

    /// Every connection so far.
    pub fn connections(&self) -> Vec<ConnectionRecord> {
        self.inner.log.records()
    }

    /// The shared log handle.
    pub fn log(&self) -> ConnectionLog {
        self.inner.log.clone()
    }

    /// Serves proxy requests on one client connection until it closes.
    pub async fn serve_connection<IO>(&self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        let service = service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(req).await) }
        });
        // No header timeout: an idle keep-alive client must not be cut off mid-test.
        let builder = http1::Builder::new();
        if let Err(e) = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await
        {
            tracing::warn!(target: "agentvm_egress", "proxy connection error: {e}");
        }
    }

    /// Accepts connections on `listener`, each served on its own task.
    pub fn serve_listener(&self, listener: TcpListener) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let this = this.clone();
                        tokio::spawn(async move { this.serve_connection(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!(target: "agentvm_egress", "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    }

    /// Waits until every request so far has its record in the log (a
    /// tunnel whose client went away ends shortly after), at most `limit`;
    /// whether it did.
    pub async fn settle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.inner.in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let in_flight = InFlight::new(&self.inner);
        let Some((host, port)) = target(&req) else {
            return text(
                StatusCode::BAD_REQUEST,
                "agentvm egress proxy: send CONNECT host:port or an absolute http:// URL\n".into(),
            );
        };
        let kind = if req.method() == Method::CONNECT {
            ConnectionKind::Connect
        } else {
            ConnectionKind::Http
        };
        let started = Instant::now();
        let record_host = host.clone();
        let record = move |allowed, up, down, error: Option<String>| ConnectionRecord {
            host: record_host.clone(),
            port,
            kind,
            allowed,
            bytes_up: up,
            bytes_down: down,
            duration: started.elapsed(),
            error,
        };
        if !self.inner.allowlist.allows(&host, port) {
            self.inner
                .log
                .push(record(false, 0, 0, Some("not on the allowlist".into())));
            return text(StatusCode::FORBIDDEN, denied_message(&host, port));
        }
        let upstream = match self.connect(&host, port).await {
            Ok(s) => s,
            Err(e) => {
                let message = format!("cannot connect to {host}:{port}: {e}");
                self.inner
                    .log
                    .push(record(true, 0, 0, Some(message.clone())));
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("agentvm egress proxy: {message}\n"),
                );
            }
        };
        let log = self.inner.log.clone();
        if kind == ConnectionKind::Connect {
            tokio::spawn(async move {
                let (up, down, error) = match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        let mut client = TokioIo::new(upgraded);
                        let mut upstream = upstream;
                        let mut counted = Counted::new(&mut upstream);
                        let result = tokio::io::copy_bidirectional(&mut client, &mut counted).await;
                        let (up, down) = counted.totals();
                        (up, down, result.err().map(|e| e.to_string()))
                    }
                    Err(e) => (0, 0, Some(format!("upgrade failed: {e}"))),
                };
                log.push(record(true, up, down, error));
                drop(in_flight);
            });
            return Response::new(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            );
        }
        self.forward(req, upstream, move |up, down, error| {
            log.push(record(true, up, down, error));
            drop(in_flight);
        })
        .await
    }

    async fn connect(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let addrs = self.inner.resolver.resolve(host, port).await?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no addresses");
        for addr in addrs {
            match tokio::time::timeout(self.inner.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connect to {addr} timed out"),
                    )
                }
            }
        }
        Err(last)
    }

    async fn forward<F>(
        &self,
        mut req: Request<Incoming>,
        upstream: TcpStream,
        done: F,
    ) -> Response<ProxyBody>
    where
        F: FnOnce(u64, u64, Option<String>) + Send + 'static,
    {
        let counted = Counted::new(upstream);
        let (up, down) = (counted.up.clone(), counted.down.clone());
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(counted)).await {
                Ok(x) => x,
                Err(e) => {
                    done(0, 0, Some(e.to_string()));
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!("agentvm egress proxy: {e}\n"),
                    );
                }
            };
        tokio::spawn(async move {
            let error = conn.await.err().map(|e| e.to_string());
            done(
                up.load(Ordering::Relaxed),
                down.load(Ordering::Relaxed),
                error,
            );
        });
        let origin = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if !req.headers().contains_key(header::HOST) {
            if let Some(authority) = req.uri().authority().and_then(|a| a.as_str().parse().ok()) {
                req.headers_mut().insert(header::HOST, authority);
            }
        }
        *req.uri_mut() = origin.parse().unwrap_or_else(|_| Uri::from_static("/"));
        for name in ["proxy-connection", "proxy-authorization"] {
            req.headers_mut().remove(name);
        }
        match sender.send_request(req).await {
            Ok(resp) => resp.map(BodyExt::boxed),
            Err(e) => text(
                StatusCode::BAD_GATEWAY,
                format!("agentvm egress proxy: upstream failed: {e}\n"),
            ),
        }
    }
}

/// The `host, port` a proxy request is for: CONNECT's authority (port 443 when absent) or an
/// absolute `http://` URL's (port 80 when absent).
fn target<B>(req: &Request<B>) -> Option<(String, u16)> {
    let uri = req.uri();
    let authority = uri.authority()?;
    let default_port = if req.method() == Method::CONNECT {
        443
    } else if uri.scheme_str() == Some("http") {
        80
    } else {
        return None;
    };
    Some((
        authority.host().trim_matches(['[', ']']).to_owned(),
        authority.port_u16().unwrap_or(default_port),
    ))
}

/// A stream that counts bytes read (down) and written (up).
struct Counted<T> {
    inner: T,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            up: Arc::default(),
            down: Arc::default(),
        }
    }

    fn totals(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.down.fetch_add(n as u64, Ordering::Relaxed);
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.up.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_wildcard_and_port_patterns() {
        let list =
            Allowlist::parse(["allowed.example:443", "*.pkg.example", "Any.Example"]).unwrap();
        assert!(list.allows("allowed.example", 443));
        assert!(!list.allows("allowed.example", 80));
        assert!(list.allows("a.pkg.example", 1));
        assert!(list.allows("a.b.pkg.example", 443));
        assert!(
            !list.allows("pkg.example", 443),
            "the wildcard does not cover the domain itself"
        );
        assert!(!list.allows("evilpkg.example", 443));
        assert!(list.allows("any.example.", 22));
        assert!(!list.allows("denied.example", 443));
        assert!(!Allowlist::default().allows("allowed.example", 443));
    }

    #[test]
    fn bad_patterns_say_what_to_write() {
        let err = Allowlist::parse(["a.example:http"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad allowlist entry \"a.example:http\": the port is not a number 0-65535; write host, host:port or *.domain[:port]"
        );
        assert_eq!(
            Allowlist::parse(["a.*.example"]).unwrap_err().reason,
            "`*` is only allowed as a leading `*.`"
        );
        assert_eq!(
            Allowlist::parse([":80"]).unwrap_err().reason,
            "the host is empty"
        );
    }

    #[test]
    fn targets_of_connect_and_absolute_requests() {
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("allowed.example:8443")
            .body(())
            .unwrap();
        assert_eq!(target(&connect), Some(("allowed.example".into(), 8443)));
        let get = Request::builder()
            .uri("http://allowed.example/x")
            .body(())
            .unwrap();
        assert_eq!(target(&get), Some(("allowed.example".into(), 80)));
        let origin = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(target(&origin), None);
    }

    #[test]
    fn denied_message_names_host_and_fix() {
        let m = denied_message("denied.example", 443);
        assert!(m.contains("denied.example:443 is not on the allowlist"));
        assert!(m.contains("allow = [\"denied.example:443\"]"));
    }
}
