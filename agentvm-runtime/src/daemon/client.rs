//! The test process's side: start a daemon when none runs, lease a VM, and
//! the [`Machine`] whose operations are calls on the lease.

use std::ops::{Deref, DerefMut};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::net::UnixStream;

use super::protocol::{
    read_message, write_message, DaemonStatus, LeaseRequest, MachineAnswer, MachineCall, Refusal,
    Request, Response, WireError,
};
use super::{DaemonError, DaemonPaths};
use crate::backend::{BackendError, BoxedChannel, Machine, MachineState, RevertOutcome};
use crate::pool::ReleaseOutcome;
use crate::spec::VmSpec;
use crate::vm::Vm;

/// How long a starting daemon may take to listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a daemon listens on `socket` (a connection is accepted).
pub fn is_listening(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// Makes sure a daemon serves `paths.socket`: when none listens, takes the
/// start lock (one process starts the daemon, the others wait here), looks
/// again, and calls `start` to spawn one, then waits until it listens (at
/// most [`START_TIMEOUT`]). Blocking.
pub fn ensure_daemon(
    paths: &DaemonPaths,
    start: impl FnOnce() -> std::io::Result<Child>,
) -> Result<(), DaemonError> {
    if is_listening(&paths.socket) {
        return Ok(());
    }
    let failed = |message: String| DaemonError::Start {
        socket: paths.socket.clone(),
        log: paths.log.clone(),
        message,
    };
    if let Some(dir) = paths.start_lock.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
    }
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&paths.start_lock)
        .map_err(|e| failed(format!("cannot open {}: {e}", paths.start_lock.display())))?;
    // Blocks while another process starts the daemon (released when it
    // listens, or when that process dies).
    rustix::fs::flock(lock.as_fd(), rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| failed(format!("cannot lock {}: {e}", paths.start_lock.display())))?;
    if is_listening(&paths.socket) {
        return Ok(());
    }
    let mut child = start().map_err(|e| failed(format!("cannot spawn it: {e}")))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if is_listening(&paths.socket) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(failed(format!(
                "it exited ({status}) before listening: {}",
                log_tail(&paths.log)
            )));
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "it did not listen within {START_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Spawns `command` detached from the caller: in a process group of its
/// own (a signal to the test's group, e.g. cargo-nextest killing a test that
/// timed out, does not reach it), stdin from /dev/null and stdout and
/// stderr appended to `log` (no test runner waits for its pipes).
pub fn spawn_detached(mut command: Command, log: &Path) -> std::io::Result<Child> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
}

async fn connect(socket: &Path) -> Result<UnixStream, DaemonError> {
    UnixStream::connect(socket)
        .await
        .map_err(|source| DaemonError::NotRunning {
            socket: socket.to_path_buf(),
            source,
        })
}

fn wire(socket: &Path) -> impl Fn(WireError) -> DaemonError + '_ {
    move |source| DaemonError::Wire {
        socket: socket.to_path_buf(),
        source,
    }
}

fn refused(socket: &Path, refusal: Refusal) -> DaemonError {
    match refusal {
        Refusal::Mismatch {
            differences,
            daemon_pid,
        } => DaemonError::Mismatch {
            socket: socket.to_path_buf(),
            daemon_pid,
            differences,
        },
        other => DaemonError::Refused {
            socket: socket.to_path_buf(),
            message: describe_refusal(&other),
        },
    }
}

fn describe_refusal(refusal: &Refusal) -> String {
    match refusal {
        Refusal::Malformed(e) => format!("malformed request: {e}"),
        Refusal::Mismatch { differences, .. } => format!("other configuration: {differences:?}"),
        Refusal::Acquire(e) => e.clone(),
        Refusal::Unexpected(e) => e.clone(),
        Refusal::UnknownLease(id) => format!("no lease {id} (it ended)"),
        Refusal::Machine(e) => format!("{e:?}"),
        Refusal::ShuttingDown => "the daemon is shutting down".into(),
    }
}

/// One request on a fresh connection, one answer.
async fn one_shot(socket: &Path, request: &Request) -> Result<Response, DaemonError> {
    let mut stream = connect(socket).await?;
    write_message(&mut stream, request)
        .await
        .map_err(wire(socket))?;
    read_message(&mut stream).await.map_err(wire(socket))
}

/// The daemon's pools, leases and VMs.
pub async fn status(socket: &Path) -> Result<DaemonStatus, DaemonError> {
    match one_shot(socket, &Request::Status).await? {
        Response::Status(status) => Ok(*status),
        Response::Error(refusal) => Err(refused(socket, refusal)),
        other => Err(unexpected(socket, &other)),
    }
}

/// Asks the daemon to stop (it shuts its pools down, then exits).
pub async fn stop(socket: &Path) -> Result<(), DaemonError> {
    match one_shot(socket, &Request::Stop).await? {
        Response::Stopping => Ok(()),
        Response::Error(refusal) => Err(refused(socket, refusal)),
        other => Err(unexpected(socket, &other)),
    }
}

fn unexpected(socket: &Path, response: &Response) -> DaemonError {
    DaemonError::Refused {
        socket: socket.to_path_buf(),
        message: format!("unexpected answer {response:?}"),
    }
}

/// Leases a VM of `request.shape` from the daemon at `socket`. `spec` is
/// what the caller would have booted (the VM handle reports it).
pub async fn lease(
    socket: &Path,
    request: LeaseRequest,
    spec: VmSpec,
) -> Result<RemoteLease, DaemonError> {
    let started = Instant::now();
    let mut stream = connect(socket).await?;
    write_message(&mut stream, &Request::Lease(request))
        .await
        .map_err(wire(socket))?;
    let grant = match read_message(&mut stream).await.map_err(wire(socket))? {
        Response::Leased(grant) => *grant,
        Response::Error(refusal) => return Err(refused(socket, refusal)),
        other => return Err(unexpected(socket, &other)),
    };
    let conn = Arc::new(tokio::sync::Mutex::new(stream));
    let machine = RemoteMachine {
        id: grant.vm.clone(),
        socket: socket.to_path_buf(),
        lease: grant.lease,
        token: grant.token,
        conn: Arc::clone(&conn),
        serial_log: grant.serial_log.clone(),
        host_pid: grant.host_pid,
    };
    let vm = Vm::attach(Box::new(machine), grant.hello, spec, grant.boot.into()).await?;
    Ok(RemoteLease {
        vm: Some(vm),
        conn,
        socket: socket.to_path_buf(),
        waited: started.elapsed(),
        daemon_waited: grant.waited,
        uses: grant.uses,
        daemon_pid: grant.daemon_pid,
    })
}

/// A VM leased from the daemon. Dereferences to [`Vm`]; dropping it (or
/// the process dying) gives the VM back, [`RemoteLease::release`] does the
/// same and reports the revert.
pub struct RemoteLease {
    vm: Option<Vm>,
    conn: Arc<tokio::sync::Mutex<UnixStream>>,
    socket: PathBuf,
    waited: Duration,
    daemon_waited: Duration,
    uses: u64,
    daemon_pid: u32,
}

impl std::fmt::Debug for RemoteLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteLease")
            .field("vm", &self.vm.as_ref().map(Vm::id))
            .field("waited", &self.waited)
            .finish_non_exhaustive()
    }
}

impl RemoteLease {
    /// The whole acquire as this process saw it: connect, the daemon's
    /// wait for a VM, the channel connection.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// How long the daemon's pool waited for a free VM.
    pub fn daemon_waited(&self) -> Duration {
        self.daemon_waited
    }

    /// How many leases this VM has served, this one included.
    pub fn uses(&self) -> u64 {
        self.uses
    }

    /// The daemon's process id.
    pub fn daemon_pid(&self) -> u32 {
        self.daemon_pid
    }

    /// Gives the VM back and waits for the daemon's revert.
    pub async fn release(mut self) -> Result<ReleaseOutcome, DaemonError> {
        // The channel first, so the daemon gets the guest back at once.
        drop(self.vm.take());
        let socket = self.socket.clone();
        let mut conn = self.conn.lock().await;
        write_message(&mut *conn, &Request::Release)
            .await
            .map_err(wire(&socket))?;
        match read_message(&mut *conn).await.map_err(wire(&socket))? {
            Response::Released(report) => Ok(report.into_outcome()),
            Response::Error(refusal) => Err(refused(&socket, refusal)),
            other => Err(unexpected(&socket, &other)),
        }
    }
}

impl Deref for RemoteLease {
    type Target = Vm;

    fn deref(&self) -> &Vm {
        self.vm.as_ref().expect("lease holds a VM until released")
    }
}

impl DerefMut for RemoteLease {
    fn deref_mut(&mut self) -> &mut Vm {
        self.vm.as_mut().expect("lease holds a VM until released")
    }
}

/// A VM the daemon owns, seen from the test process: hypervisor operations
/// are calls on the lease connection; the channel is a connection the
/// daemon splices to the guest's.
struct RemoteMachine {
    id: String,
    socket: PathBuf,
    lease: u64,
    token: u64,
    conn: Arc<tokio::sync::Mutex<UnixStream>>,
    serial_log: Option<PathBuf>,
    host_pid: Option<u32>,
}

impl RemoteMachine {
    async fn call(&self, call: MachineCall) -> Result<MachineAnswer, BackendError> {
        let operation = format!("{call:?}");
        let gone = |e: WireError| BackendError::Control {
            vm: self.id.clone(),
            operation: operation.clone(),
            message: format!(
                "the pool daemon at {} did not answer: {e}",
                self.socket.display()
            ),
        };
        let mut conn = self.conn.lock().await;
        write_message(&mut *conn, &Request::Machine(call.clone()))
            .await
            .map_err(gone)?;
        match read_message(&mut *conn).await.map_err(gone)? {
            Response::Machine(answer) => Ok(answer),
            Response::Error(Refusal::Machine(e)) => Err(e.into_backend(&self.id, &operation)),
            other => Err(BackendError::Control {
                vm: self.id.clone(),
                operation,
                message: format!("unexpected answer from the pool daemon: {other:?}"),
            }),
        }
    }

    fn mismatch(&self, operation: &str, answer: MachineAnswer) -> BackendError {
        BackendError::Control {
            vm: self.id.clone(),
            operation: operation.to_string(),
            message: format!("unexpected answer from the pool daemon: {answer:?}"),
        }
    }

    async fn done(&self, call: MachineCall) -> Result<(), BackendError> {
        let operation = format!("{call:?}");
        match self.call(call).await? {
            MachineAnswer::Done => Ok(()),
            other => Err(self.mismatch(&operation, other)),
        }
    }

    async fn restore(&self, call: MachineCall) -> Result<RevertOutcome, BackendError> {
        let operation = format!("{call:?}");
        match self.call(call).await? {
            MachineAnswer::Restored { channel_reset } => Ok(if channel_reset {
                RevertOutcome::ChannelReset
            } else {
                RevertOutcome::ChannelKept
            }),
            other => Err(self.mismatch(&operation, other)),
        }
    }
}

#[async_trait]
impl Machine for RemoteMachine {
    fn id(&self) -> &str {
        &self.id
    }

    async fn connect_channel(&mut self) -> Result<BoxedChannel, BackendError> {
        let failed = |message: String| BackendError::Control {
            vm: self.id.clone(),
            operation: "connecting the control channel through the pool daemon".into(),
            message,
        };
        let mut stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| failed(format!("{}: {e}", self.socket.display())))?;
        let request = Request::Channel {
            lease: self.lease,
            token: self.token,
        };
        write_message(&mut stream, &request)
            .await
            .map_err(|e| failed(e.to_string()))?;
        match read_message(&mut stream)
            .await
            .map_err(|e| failed(e.to_string()))?
        {
            Response::ChannelReady => Ok(Box::pin(stream)),
            Response::Error(refusal) => Err(failed(describe_refusal(&refusal))),
            other => Err(failed(format!("unexpected answer {other:?}"))),
        }
    }

    async fn snapshot_golden(&mut self) -> Result<(), BackendError> {
        Err(BackendError::Control {
            vm: self.id.clone(),
            operation: "taking the golden snapshot".into(),
            message: "a leased VM's golden snapshot belongs to the pool daemon".into(),
        })
    }

    async fn revert_golden(&mut self) -> Result<RevertOutcome, BackendError> {
        self.restore(MachineCall::RevertGolden).await
    }

    async fn save_snapshot(&mut self, name: &str) -> Result<(), BackendError> {
        self.done(MachineCall::SaveSnapshot(name.to_string())).await
    }

    async fn load_snapshot(&mut self, name: &str) -> Result<RevertOutcome, BackendError> {
        self.restore(MachineCall::LoadSnapshot(name.to_string()))
            .await
    }

    async fn delete_snapshot(&mut self, name: &str) -> Result<(), BackendError> {
        self.done(MachineCall::DeleteSnapshot(name.to_string()))
            .await
    }

    async fn snapshot_names(&mut self) -> Result<Vec<String>, BackendError> {
        match self.call(MachineCall::SnapshotNames).await? {
            MachineAnswer::Names(names) => Ok(names),
            other => Err(self.mismatch("SnapshotNames", other)),
        }
    }

    async fn state(&mut self) -> Result<MachineState, BackendError> {
        match self.call(MachineCall::State).await? {
            MachineAnswer::State(state) => Ok(state.into()),
            other => Err(self.mismatch("State", other)),
        }
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        self.done(MachineCall::Pause).await
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        self.done(MachineCall::Resume).await
    }

    async fn check_alive(&mut self) -> Result<(), BackendError> {
        self.done(MachineCall::CheckAlive).await
    }

    /// The VM is the daemon's: ending the lease (dropping it) gives it back.
    async fn destroy(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    async fn wait_stopped(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        match self.call(MachineCall::WaitStopped(timeout)).await? {
            MachineAnswer::Stopped(stopped) => Ok(stopped),
            other => Err(self.mismatch("WaitStopped", other)),
        }
    }

    fn serial_tail(&self, lines: usize) -> String {
        let Some(path) = &self.serial_log else {
            return String::new();
        };
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn serial_log_path(&self) -> Option<PathBuf> {
        self.serial_log.clone()
    }

    fn host_pid(&self) -> Option<u32> {
        self.host_pid
    }
}
