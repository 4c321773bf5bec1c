//! A remote host's VM is reached only through libvirt: its serial console
//! and its control channel are libvirt streams (`virDomainOpenConsole`,
//! `virDomainOpenChannel`) carried over the connection, not files or
//! sockets of this machine. Both are bridged to the same local paths a
//! local VM has, so the rest of the backend does not care where the VM runs:
//!
//! * [`ConsolePump`] appends the console stream to the VM's local serial log;
//! * [`ChannelProxy`] listens on the VM's local control socket and bridges
//!   each connection to a fresh channel stream (`VIR_DOMAIN_CHANNEL_FORCE`:
//!   a reconnect after a revert takes the channel over).
//!
//! Each stream has a connection of its own (its calls block), and a stream
//! is driven by blocking threads: one per direction.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virt::connect::Connect;
use virt::stream::Stream;

use crate::backend::qemu::argv::CTL_PORT_NAME;

const BUF: usize = 64 * 1024;

/// Opens a connection to `uri` and a stream on it, and lets `attach` attach
/// the stream to the domain `name` (blocking).
fn open_stream(
    uri: &str,
    name: &str,
    attach: impl FnOnce(&virt::domain::Domain, &Stream) -> Result<(), virt::error::Error>,
) -> Result<(Connect, Stream), virt::error::Error> {
    let conn = Connect::open(Some(uri))?;
    let stream = Stream::new(&conn, 0)?;
    let dom = conn.lookup_domain_by_name(name)?;
    attach(&dom, &stream)?;
    Ok((conn, stream))
}

/// Copies a domain's serial console into a local file until the console
/// ends (the domain stopped, or the host went away).
#[derive(Debug)]
pub struct ConsolePump {
    _thread: std::thread::JoinHandle<()>,
}

impl ConsolePump {
    /// Opens the console of domain `name` at `uri` (blocking) and starts
    /// appending it to `log`.
    pub fn start(uri: &str, name: &str, log: &Path) -> Result<Self, String> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("opening {}: {e}", log.display()))?;
        let (conn, stream) = open_stream(uri, name, |d, s| {
            d.open_console(None, s, virt::sys::VIR_DOMAIN_CONSOLE_FORCE)
        })
        .map_err(|e| format!("virDomainOpenConsole: {}", e.message()))?;
        let vm = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("console-{name}"))
            .spawn(move || {
                let _conn = conn;
                let mut buf = vec![0u8; BUF];
                loop {
                    match stream.recv(&mut buf) {
                        Ok(n) if n > 0 => {
                            if file.write_all(&buf[..n as usize]).is_err() {
                                break;
                            }
                        }
                        Ok(_) => break,
                        Err(e) => {
                            tracing::debug!(domain = %vm, error = %e.message(), "console stream ended");
                            break;
                        }
                    }
                }
                let _ = stream.abort();
            })
            .map_err(|e| format!("starting the console thread: {e}"))?;
        Ok(Self { _thread: thread })
    }
}

/// Serves the VM's local control socket: every connection to it is bridged
/// to a new channel stream of the domain. Dropping it stops accepting
/// (bridges already open end when either side closes).
#[derive(Debug)]
pub struct ChannelProxy {
    stop: Arc<AtomicBool>,
    socket: PathBuf,
}

impl ChannelProxy {
    /// Binds `socket` and starts accepting.
    pub fn start(uri: &str, name: &str, socket: &Path) -> Result<Self, String> {
        let listener =
            UnixListener::bind(socket).map_err(|e| format!("binding {}: {e}", socket.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (uri, name, flag) = (uri.to_owned(), name.to_owned(), Arc::clone(&stop));
        std::thread::Builder::new()
            .name(format!("channel-{name}"))
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(local) = conn else { continue };
                    match open_stream(&uri, &name, |d, s| {
                        d.open_channel(
                            Some(CTL_PORT_NAME),
                            s,
                            virt::sys::VIR_DOMAIN_CHANNEL_FORCE,
                        )
                    }) {
                        Ok((c, stream)) => bridge(c, stream, local, &name),
                        Err(e) => {
                            // Dropping `local` closes it: the caller sees EOF
                            // and asks the backend whether the VM is alive.
                            tracing::warn!(domain = %name, error = %e.message(), "virDomainOpenChannel failed");
                        }
                    }
                }
            })
            .map_err(|e| format!("starting the channel thread: {e}"))?;
        Ok(Self {
            stop,
            socket: socket.to_path_buf(),
        })
    }
}

impl Drop for ChannelProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = UnixStream::connect(&self.socket);
    }
}

/// Two threads: stream → socket and socket → stream. When one direction
/// ends, the socket is shut down and the stream aborted, which ends the
/// other.
fn bridge(conn: Connect, stream: Stream, local: UnixStream, name: &str) {
    let Ok(mut local_in) = local.try_clone() else {
        return;
    };
    let mut local_out = local;
    let (recv_stream, send_stream) = (stream.clone(), stream);
    let done = Arc::new(AtomicBool::new(false));
    let done_in = Arc::clone(&done);
    let vm = name.to_owned();
    let _ = std::thread::Builder::new()
        .name(format!("channel-rx-{name}"))
        .spawn(move || {
            let _conn = conn;
            let mut buf = vec![0u8; BUF];
            loop {
                match recv_stream.recv(&mut buf) {
                    Ok(n) if n > 0 => {
                        if local_out.write_all(&buf[..n as usize]).is_err() {
                            break;
                        }
                    }
                    Ok(_) => break,
                    Err(e) => {
                        if !done_in.load(Ordering::SeqCst) {
                            tracing::debug!(domain = %vm, error = %e.message(), "channel stream ended");
                        }
                        break;
                    }
                }
            }
            done_in.store(true, Ordering::SeqCst);
            let _ = local_out.shutdown(std::net::Shutdown::Both);
        });
    let _ = std::thread::Builder::new()
        .name(format!("channel-tx-{name}"))
        .spawn(move || {
            let mut buf = vec![0u8; BUF];
            // A read timeout lets this side notice that the stream ended
            // while the local end stays silent.
            let _ = local_in.set_read_timeout(Some(Duration::from_millis(500)));
            loop {
                match local_in.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if send_all(&send_stream, &buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if done.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            done.store(true, Ordering::SeqCst);
            let _ = local_in.shutdown(std::net::Shutdown::Both);
            let _ = send_stream.abort();
        });
}

fn send_all(stream: &Stream, mut data: &[u8]) -> Result<(), virt::error::Error> {
    while !data.is_empty() {
        let n = stream.send(data)?;
        if n <= 0 {
            return Err(virt::error::Error::last_error());
        }
        data = &data[n as usize..];
    }
    Ok(())
}
