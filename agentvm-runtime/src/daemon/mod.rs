//! The pool daemon: one warm pool shared by many test processes.
//!
//! `cargo nextest run` runs every test in a process of its own; without the
//! daemon each process would boot (or restore) a VM and throw it away. The
//! daemon ([`server::serve`], `agentvm pool serve`) owns the VMs — one
//! [`VmPool`](crate::pool::VmPool) per VM shape, created on the first lease
//! of that shape — and leases them over a UNIX socket
//! ([`DaemonPaths::socket`], in `target/agentvm/` by default):
//!
//! * a lease is a connection ([`client::lease`]): when it ends — test done,
//!   panicked, process killed — the daemon reverts the VM and puts it back;
//! * the test process gets an ordinary [`Vm`](crate::vm::Vm) whose machine
//!   operations (revert, snapshots, state, ...) are calls on the lease
//!   connection and whose control channel is a second connection the daemon
//!   splices to the guest's ([`splice`]), so exec, files and tunnels work
//!   unchanged;
//! * the first process that finds no daemon starts one ([`client::ensure_daemon`]:
//!   one winner under a file lock, the others wait for its socket); the
//!   daemon exits after an idle period without connections, shutting its
//!   pools down.
//!
//! One concern per module: [`protocol`] (messages and their framing),
//! [`splice`] (lending a VM's channel), [`server`] (the daemon), [`client`]
//! (the test process's side).

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::AgentVmConfig;

pub mod client;
pub mod protocol;
pub mod server;
pub mod splice;

/// Default idle timeout: the daemon exits this long after its last connection closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variable that chooses where a test binary's VMs come from:
/// `daemon` (the pool daemon) or `local` (a pool in the test process).
/// Unset: `daemon` under cargo-nextest's process-per-test mode, else `local`.
pub const POOL_ENV: &str = "AGENTVM_POOL";

/// Environment variable with the idle timeout of a daemon the harness starts
/// (a duration, e.g. `60s`; default [`DEFAULT_IDLE_TIMEOUT`]).
pub const IDLE_TIMEOUT_ENV: &str = "AGENTVM_POOL_IDLE_TIMEOUT";

/// Longest UNIX socket path the kernel takes (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where a daemon's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonPaths {
    /// The socket test processes connect to.
    pub socket: PathBuf,
    /// Held (flock) by the running daemon; holds its pid.
    pub lock: PathBuf,
    /// Held by the process starting a daemon, so only one does.
    pub start_lock: PathBuf,
    /// The log of a daemon started by a test process (its stdout and stderr).
    pub log: PathBuf,
}

impl DaemonPaths {
    /// The paths of the workspace's daemon: `<artifacts_dir>/pool.sock`
    /// and its siblings, so every process of the workspace agrees. When the
    /// socket path is too long for the kernel, the socket goes to the
    /// temporary directory under a name derived from the artifacts
    /// directory (the other files stay).
    pub fn for_config(config: &AgentVmConfig) -> Self {
        let dir = absolute(&config.artifacts_dir);
        let socket = dir.join("pool.sock");
        let socket = if socket.as_os_str().len() <= MAX_SOCKET_PATH {
            socket
        } else {
            let digest = Sha256::digest(dir.as_os_str().as_encoded_bytes());
            std::env::temp_dir().join(format!("agentvm-pool-{}.sock", hex16(&digest)))
        };
        Self::with_socket(&dir, socket)
    }

    /// The paths with `socket` given (`agentvm pool serve --socket`); the
    /// lock files sit next to the socket, the log in `dir`.
    pub fn with_socket(dir: &Path, socket: PathBuf) -> Self {
        Self {
            lock: socket.with_extension("lock"),
            start_lock: socket.with_extension("start.lock"),
            log: dir.join("pool-daemon.log"),
            socket,
        }
    }
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

fn hex16(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The configuration a test process and its daemon must share.
pub fn fingerprint(config: &AgentVmConfig) -> protocol::Fingerprint {
    protocol::Fingerprint {
        protocol: protocol::DAEMON_PROTOCOL_VERSION,
        version: env!("CARGO_PKG_VERSION").to_string(),
        backend: config.backend.name().to_string(),
        image_dir: absolute(&config.image_dir),
        accel: format!("{:?}", config.accel).to_lowercase(),
        libvirt_uri: config.libvirt_uri.clone(),
    }
}

/// Why the daemon or a client of it failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon serves this socket.
    #[error("a pool daemon already serves {} (pid {pid}): use it, or stop it with `agentvm pool stop`", .socket.display())]
    AlreadyRunning {
        /// The socket.
        socket: PathBuf,
        /// The other daemon's pid (0 when unknown).
        pid: u32,
    },
    /// No daemon listens on the socket.
    #[error("no pool daemon listens on {}: {source}", .socket.display())]
    NotRunning {
        /// The socket.
        socket: PathBuf,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon runs with another configuration than this process.
    #[error("the pool daemon at {} (pid {daemon_pid}) runs with another configuration than this process: {}; stop it with `agentvm pool stop` (or `kill {daemon_pid}`; its socket is {}), or run without it: AGENTVM_POOL=local", .socket.display(), describe_differences(.differences), .socket.display())]
    Mismatch {
        /// The socket.
        socket: PathBuf,
        /// The daemon's pid.
        daemon_pid: u32,
        /// `(what, daemon's, ours)`.
        differences: Vec<(String, String, String)>,
    },
    /// The daemon refused the request.
    #[error("the pool daemon at {} refused: {message}", .socket.display())]
    Refused {
        /// The socket.
        socket: PathBuf,
        /// Why.
        message: String,
    },
    /// The daemon could not be started.
    #[error("could not start the pool daemon for {}: {message} (its log: {})", .socket.display(), .log.display())]
    Start {
        /// The socket it was to serve.
        socket: PathBuf,
        /// Its log file.
        log: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Talking to the daemon failed.
    #[error("pool daemon at {}: {source}", .socket.display())]
    Wire {
        /// The socket.
        socket: PathBuf,
        /// The wire error.
        #[source]
        source: protocol::WireError,
    },
    /// The leased VM could not be attached.
    #[error(transparent)]
    Attach(#[from] crate::vm::VmError),
    /// Host I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn describe_differences(differences: &[(String, String, String)]) -> String {
    differences
        .iter()
        .map(|(what, daemon, ours)| format!("{what}: daemon {daemon}, this process {ours}"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_artifacts_dir() {
        let config = AgentVmConfig::defaults_for(Path::new("/ws"));
        let paths = DaemonPaths::for_config(&config);
        assert_eq!(paths.socket, Path::new("/ws/target/agentvm/pool.sock"));
        assert_eq!(paths.lock, Path::new("/ws/target/agentvm/pool.lock"));
        assert_eq!(
            paths.start_lock,
            Path::new("/ws/target/agentvm/pool.start.lock")
        );
        assert_eq!(paths.log, Path::new("/ws/target/agentvm/pool-daemon.log"));
    }

    #[test]
    fn a_long_socket_path_moves_to_the_temporary_directory() {
        let deep = format!("/ws/{}", "d".repeat(120));
        let config = AgentVmConfig::defaults_for(Path::new(&deep));
        let paths = DaemonPaths::for_config(&config);
        assert!(paths.socket.starts_with(std::env::temp_dir()));
        assert!(paths.socket.as_os_str().len() <= MAX_SOCKET_PATH);
        // Deterministic: every process of the workspace agrees.
        assert_eq!(DaemonPaths::for_config(&config), paths);
        let other = AgentVmConfig::defaults_for(Path::new(&format!("{deep}x")));
        assert_ne!(DaemonPaths::for_config(&other).socket, paths.socket);
        assert!(paths.log.starts_with(&deep));
    }

    #[test]
    fn mismatch_names_what_differs_and_how_to_stop() {
        let e = DaemonError::Mismatch {
            socket: "/ws/target/agentvm/pool.sock".into(),
            daemon_pid: 77,
            differences: vec![("backend".into(), "qemu".into(), "libvirt".into())],
        };
        let text = e.to_string();
        assert!(
            text.contains("backend: daemon qemu, this process libvirt"),
            "{text}"
        );
        assert!(text.contains("agentvm pool stop"), "{text}");
        assert!(text.contains("kill 77"), "{text}");
        assert!(text.contains("/ws/target/agentvm/pool.sock"), "{text}");
    }
}
