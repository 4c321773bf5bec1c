//! `agentvm-guest`: the agent inside the VM. It serves the agentvm control
//! protocol on a byte stream: runs commands, moves files, lists workspace changes.
//!
//! This file holds the command line and the outer loop: pick a transport,
//! serve one connection after another, and handle shutdown. When the agent is
//! PID 1 it must never exit (the kernel panics), so every failure is logged and
//! retried instead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser};

/// Logs one line to stderr (the serial console inside the VM).
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("agentvm-guest: {}", format_args!($($arg)*))
    };
}

mod cgroup;
mod changes;
mod counters;
mod exec;
mod files;
mod reaper;
mod reseed;
mod server;
mod spawn;
mod transport;
mod tree;
mod tunnel;

use transport::{Transport, TransportKind};

/// The agentvm guest agent: serves the control protocol inside the VM.
#[derive(Debug, Parser)]
#[command(name = "agentvm-guest", version)]
struct Cli {
    /// Workspace root: relative paths of requests are resolved under it, and
    /// workspace changes are listed for it.
    #[arg(long, value_name = "DIR", default_value = "/workspace")]
    workspace: PathBuf,

    /// Staging root: absolute paths under it are allowed too (agent binaries, task files).
    #[arg(long, value_name = "DIR", default_value = "/opt/agentvm")]
    staging: PathBuf,

    /// Root of the tree watched for changes outside the workspace and the
    /// staging root (without its `proc`, `sys` and `dev`).
    #[arg(long, value_name = "DIR", default_value = "/")]
    system_root: PathBuf,

    /// Run commands as this `uid:gid` unless a request names a user
    /// (the agent image passes its unprivileged `agent` user, 1000:1000).
    #[arg(long, value_name = "UID:GID", value_parser = parse_default_user)]
    default_user: Option<(u32, u32)>,

    #[command(flatten)]
    transport: TransportArgs,
}

fn parse_default_user(s: &str) -> Result<(u32, u32), String> {
    spawn::parse_user(s).ok_or_else(|| format!("expected UID:GID, got {s:?}"))
}

/// Exactly one transport.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct TransportArgs {
    /// Serve on the virtio-serial port with this name (e.g. `org.agentvm.ctl`).
    #[arg(long, value_name = "NAME")]
    virtio_port: Option<String>,

    /// Listen on this virtio-vsock port (any CID).
    #[arg(long, value_name = "PORT")]
    vsock_port: Option<u32>,

    /// Listen on a UNIX socket at this path, serving one connection after another.
    #[arg(long, value_name = "PATH")]
    listen: Option<PathBuf>,

    /// Connect to a UNIX socket at this path and serve that one connection.
    #[arg(long, value_name = "PATH")]
    connect: Option<PathBuf>,

    /// Serve on stdin/stdout.
    #[arg(long)]
    stdio: bool,
}

impl TransportArgs {
    fn kind(&self) -> TransportKind {
        if let Some(name) = &self.virtio_port {
            TransportKind::VirtioPort(name.clone())
        } else if let Some(port) = self.vsock_port {
            TransportKind::Vsock(port)
        } else if let Some(path) = &self.listen {
            TransportKind::Listen(path.clone())
        } else if let Some(path) = &self.connect {
            TransportKind::Connect(path.clone())
        } else {
            TransportKind::Stdio
        }
    }
}

fn main() -> ExitCode {
    // The run-as helper mode (spawned by the agent itself to run a command
    // as another user) never returns when it works.
    if let Some(code) = spawn::run_as_main() {
        return ExitCode::from(code as u8);
    }
    let pid1 = std::process::id() == 1;
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if pid1 => {
            log!("bad command line: {e}");
            reap_forever();
        }
        Err(e) => e.exit(),
    };
    set_child_subreaper();
    if let Some(user) = cli.default_user {
        let _ = exec::DEFAULT_USER.set(user);
    }
    if !pid1 {
        return match run(&cli, false) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                log!("{message}");
                ExitCode::FAILURE
            }
        };
    }
    // PID 1: never return.
    loop {
        match std::panic::catch_unwind(|| run(&cli, true)) {
            Ok(Ok(())) => log!("agent loop ended; PID 1 keeps running"),
            Ok(Err(message)) => log!("{message}; retrying"),
            Err(_) => log!("internal error (panic); restarting the agent loop"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs the agent until a shutdown (or a fatal error when not PID 1).
fn run(cli: &Cli, pid1: bool) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let result = runtime.block_on(serve_forever(cli, pid1));
    // Blocking threads (stdin reads, uploads) must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}

async fn serve_forever(cli: &Cli, pid1: bool) -> Result<(), String> {
    let reaper =
        reaper::Reaper::start().map_err(|e| format!("cannot install the SIGCHLD handler: {e}"))?;
    let roots = files::Roots::new(&cli.workspace, &cli.staging);
    let agent = server::Agent::start(roots, cli.system_root.clone(), reaper).await;
    let mut transport = Transport::new(cli.transport.kind());
    loop {
        let conn = match transport.next().await {
            Ok(Some(conn)) => conn,
            Ok(None) if pid1 => {
                log!("transport has no more connections; PID 1 stays up");
                std::future::pending::<()>().await;
                continue;
            }
            Ok(None) => return Ok(()),
            Err(e) if pid1 || e.retryable => {
                log!("{}; retrying", e.message);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.message),
        };
        log!("connected ({})", conn.peer);
        let peer = conn.peer.clone();
        let agent2 = Arc::clone(&agent);
        // A panic while serving must not take the agent down.
        let outcome = match tokio::spawn(async move { server::serve(&agent2, conn).await }).await {
            Ok(outcome) => outcome,
            Err(e) => {
                log!("internal error while serving {peer}: {e}");
                continue;
            }
        };
        match outcome {
            server::Outcome::Disconnected => log!("disconnected ({peer})"),
            server::Outcome::Shutdown { poweroff } => {
                log!("shutdown requested (poweroff: {poweroff})");
                if !pid1 {
                    return Ok(());
                }
                if poweroff {
                    power_off().await;
                } else {
                    log!("PID 1 does not exit; waiting for the next connection");
                }
            }
        }
    }
}

/// PID 1 without anything to serve: just reap orphans, forever.
fn reap_forever() -> ! {
    loop {
        // SAFETY: a null status pointer is allowed.
        if unsafe { libc::wait(std::ptr::null_mut()) } < 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Makes orphaned descendants of our commands our children, so we reap them
/// and can account for them, even when we are not PID 1.
fn set_child_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        log!(
            "cannot become a child subreaper: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// PID 1 only: stop every process, sync and power the machine off. Returns
/// only if powering off failed.
async fn power_off() {
    // SAFETY: kill(-1, sig) signals every process we may signal except ourselves.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // SAFETY: sync and reboot take no pointers.
    unsafe { libc::sync() };
    let rc = unsafe { libc::reboot(libc::RB_POWER_OFF) };
    if rc != 0 {
        log!("power off failed: {}", std::io::Error::last_os_error());
    }
}
