//! Byte streams the protocol is served on: a virtio-serial port, a vsock
//! listener, a UNIX socket (listening or connecting) or stdin/stdout.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};

/// Which transport to serve on (from the command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportKind {
    /// The virtio-serial port with this name.
    VirtioPort(String),
    /// A vsock listener on this port.
    Vsock(u32),
    /// A UNIX socket server at this path.
    Listen(PathBuf),
    /// A UNIX socket client to this path (one connection).
    Connect(PathBuf),
    /// stdin/stdout (one connection).
    Stdio,
}

/// One connection: the two directions of a byte stream.
pub struct Connection {
    /// Bytes from the host.
    pub reader: Box<dyn AsyncRead + Unpin + Send>,
    /// Bytes to the host.
    pub writer: Box<dyn AsyncWrite + Unpin + Send>,
    /// What the connection is, for logs.
    pub peer: String,
}

/// A transport failure.
#[derive(Debug)]
pub struct TransportError {
    /// What failed.
    pub message: String,
    /// Trying again later may help.
    pub retryable: bool,
}

impl TransportError {
    fn fatal(message: String) -> Self {
        Self {
            message,
            retryable: false,
        }
    }

    fn retry(message: String) -> Self {
        Self {
            message,
            retryable: true,
        }
    }
}

enum State {
    Virtio {
        name: String,
        connections: u64,
    },
    Vsock {
        port: u32,
        listener: Option<tokio_vsock::VsockListener>,
    },
    Listen {
        path: PathBuf,
        listener: Option<UnixListener>,
    },
    Connect {
        path: PathBuf,
        used: bool,
    },
    Stdio {
        used: bool,
    },
}

/// Hands out connections one after another.
pub struct Transport {
    state: State,
}

/// How often to look for a virtio port that is not there (yet).
const PORT_RETRY: Duration = Duration::from_millis(500);
/// How often to check whether the host side of a virtio port is connected.
const HOST_POLL: Duration = Duration::from_millis(20);
/// Pause before reopening a virtio port after the host went away.
const REOPEN_DELAY: Duration = Duration::from_millis(50);

impl Transport {
    /// Prepares a transport; nothing is opened until [`Transport::next`].
    pub fn new(kind: TransportKind) -> Self {
        let state = match kind {
            TransportKind::VirtioPort(name) => State::Virtio {
                name,
                connections: 0,
            },
            TransportKind::Vsock(port) => State::Vsock {
                port,
                listener: None,
            },
            TransportKind::Listen(path) => State::Listen {
                path,
                listener: None,
            },
            TransportKind::Connect(path) => State::Connect { path, used: false },
            TransportKind::Stdio => State::Stdio { used: false },
        };
        Self { state }
    }

    /// The next connection; `Ok(None)` when this transport has no more.
    pub async fn next(&mut self) -> Result<Option<Connection>, TransportError> {
        match &mut self.state {
            State::Virtio { name, connections } => {
                if *connections > 0 {
                    tokio::time::sleep(REOPEN_DELAY).await;
                }
                let conn = open_virtio_port(name).await?;
                *connections += 1;
                Ok(Some(conn))
            }
            State::Vsock { port, listener } => {
                if listener.is_none() {
                    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port);
                    let bound = tokio_vsock::VsockListener::bind(addr).map_err(|e| {
                        TransportError::fatal(format!("cannot listen on vsock port {port}: {e}"))
                    })?;
                    log!("listening on vsock port {port}");
                    *listener = Some(bound);
                }
                let Some(bound) = listener.as_ref() else {
                    return Ok(None);
                };
                let (stream, addr) = bound
                    .accept()
                    .await
                    .map_err(|e| TransportError::retry(format!("vsock accept failed: {e}")))?;
                let (reader, writer) = stream.into_split();
                Ok(Some(Connection {
                    reader: Box::new(reader),
                    writer: Box::new(writer),
                    peer: format!("vsock {addr:?}"),
                }))
            }
            State::Listen { path, listener } => {
                if listener.is_none() {
                    *listener = Some(bind_unix(path)?);
                    log!("listening on {}", path.display());
                }
                let Some(bound) = listener.as_ref() else {
                    return Ok(None);
                };
                let (stream, _) = bound.accept().await.map_err(|e| {
                    TransportError::retry(format!("accept on {} failed: {e}", path.display()))
                })?;
                let (reader, writer) = stream.into_split();
                Ok(Some(Connection {
                    reader: Box::new(reader),
                    writer: Box::new(writer),
                    peer: format!("client of {}", path.display()),
                }))
            }
            State::Connect { path, used } => {
                if *used {
                    return Ok(None);
                }
                let stream = UnixStream::connect(&*path).await.map_err(|e| {
                    TransportError::fatal(format!("cannot connect to {}: {e}", path.display()))
                })?;
                *used = true;
                let (reader, writer) = stream.into_split();
                Ok(Some(Connection {
                    reader: Box::new(reader),
                    writer: Box::new(writer),
                    peer: path.display().to_string(),
                }))
            }
            State::Stdio { used } => {
                if *used {
                    return Ok(None);
                }
                *used = true;
                Ok(Some(Connection {
                    reader: Box::new(tokio::io::stdin()),
                    writer: Box::new(tokio::io::stdout()),
                    peer: "stdio".into(),
                }))
            }
        }
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener, TransportError> {
    // A stale socket from an earlier run would make bind fail.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path)
        .map_err(|e| TransportError::fatal(format!("cannot listen on {}: {e}", path.display())))
}

/// Finds `/dev/<vportNpM>` for the port whose sysfs name is `name`.
pub fn find_virtio_port(sys_class: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_class).ok()?;
    for entry in entries.flatten() {
        let Ok(port_name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if port_name.trim() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Opens the virtio port and waits until the host side is connected.
async fn open_virtio_port(name: &str) -> Result<Connection, TransportError> {
    let mut warned = false;
    let device = loop {
        match find_virtio_port(Path::new("/sys/class/virtio-ports"), name) {
            Some(device) => break device,
            None => {
                if !warned {
                    log!("virtio port {name:?} not found under /sys/class/virtio-ports; waiting for it");
                    warned = true;
                }
                tokio::time::sleep(PORT_RETRY).await;
            }
        }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&device)
        .map_err(|e| TransportError::retry(format!("cannot open {}: {e}", device.display())))?;
    // While the host is not connected the port polls as hung up and reads
    // return EOF; wait for it before registering the fd with the reactor.
    while host_hung_up(&file) {
        tokio::time::sleep(HOST_POLL).await;
    }
    let port = VirtioPort::new(file)
        .map_err(|e| TransportError::retry(format!("cannot register {}: {e}", device.display())))?;
    let (reader, writer) = tokio::io::split(port);
    Ok(Connection {
        reader: Box::new(reader),
        writer: Box::new(writer),
        peer: format!("virtio port {name} ({})", device.display()),
    })
}

fn host_hung_up(file: &std::fs::File) -> bool {
    let mut fds = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN | libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let rc = unsafe { libc::poll(&mut fds, 1, 0) };
    rc < 0 || fds.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// A virtio-serial port device in non-blocking mode. A read returns EOF when
/// the host disconnects; a write that would block while the host is gone
/// fails with `BrokenPipe` (tokio keeps reporting a hung-up fd as writable).
struct VirtioPort {
    fd: AsyncFd<std::fs::File>,
}

impl VirtioPort {
    fn new(file: std::fs::File) -> io::Result<Self> {
        // SAFETY: the File owns its fd, which stays open and unchanged until
        // the AsyncFd (and with it the File) is dropped.
        let fd = unsafe { AsyncFd::register(file) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }
}

impl AsyncRead for VirtioPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| inner.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VirtioPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let hung_up = guard.ready().is_write_closed();
            match guard.try_io(|inner| inner.get_ref().write(data)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) if hung_up => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "host disconnected",
                    )))
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_virtio_port_by_name() {
        let sys = tempfile::tempdir().unwrap();
        for (dir, name) in [
            ("vport0p1", "org.qemu.guest_agent.0\n"),
            ("vport1p1", "org.agentvm.ctl\n"),
        ] {
            std::fs::create_dir(sys.path().join(dir)).unwrap();
            std::fs::write(sys.path().join(dir).join("name"), name).unwrap();
        }
        std::fs::create_dir(sys.path().join("vport2p1")).unwrap(); // no name file
        assert_eq!(
            find_virtio_port(sys.path(), "org.agentvm.ctl"),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(find_virtio_port(sys.path(), "missing"), None);
        assert_eq!(
            find_virtio_port(&sys.path().join("nope"), "org.agentvm.ctl"),
            None
        );
    }

    /// The port stream over a socketpair standing in for the device: data
    /// both ways, EOF and hang-up detection when the other side goes away.
    #[tokio::test]
    async fn port_stream_reads_writes_and_sees_the_host_leave() {
        use std::io::{Read as _, Write as _};
        use std::os::fd::OwnedFd;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (ours, mut host) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let file = std::fs::File::from(OwnedFd::from(ours));
        assert!(!host_hung_up(&file));
        let probe = file.try_clone().unwrap();
        let mut port = VirtioPort::new(file).unwrap();

        host.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        port.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        port.write_all(b"pong").await.unwrap();
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");

        drop(host);
        assert!(host_hung_up(&probe));
        assert_eq!(
            port.read(&mut buf).await.unwrap(),
            0,
            "EOF once the host is gone"
        );
        assert!(port.write_all(b"x").await.is_err());
    }
}
