//! QEMU backend: runs `qemu-system-x86_64 -M microvm` directly, one process per VM.
//!
//! * [`argv`]: the command line (pure functions).
//! * [`accel`]: KVM vs TCG (`AGENT_VM_ACCEL`).
//! * [`transport`]: virtio-serial vs vsock (`AGENT_VM_TRANSPORT`).
//! * [`qmp`]: the QMP client (savevm/loadvm via HMP, stop/cont, status, events).
//! * [`process`]: spawning QEMU so it never outlives us, reaping it.
//! * [`rundir`]: per-VM directories, pid files, the stale sweep.
//!
//! A VM's life: [`QemuBackend::launch`] creates `<runtime>/vms/<id>/`, a
//! 32 MiB qcow2 for snapshot state, spawns QEMU and connects QMP; it returns
//! as soon as the monitor answers (the guest is still booting, the caller
//! waits for the guest agent on [`Machine::connect_channel`]). Revert is HMP
//! `loadvm golden`, which keeps the host end of the channel connected
//! ([`RevertOutcome::ChannelKept`]). With the golden cache ([`golden`],
//! `QemuConfig::golden_cache`) the first VM of a configuration shares its
//! golden snapshot and later ones start paused, connect the channel, `loadvm`
//! it and continue: [`Backend::launch_restored`]. A guest kernel panic reboots (`panic=1`),
//! `-no-reboot` makes QEMU exit, and [`Machine::check_alive`] reports
//! [`BackendError::Crashed`] with the end of the serial console.

pub mod accel;
pub mod argv;
pub mod golden;
pub mod jail;
pub mod process;
pub mod qmp;
pub mod rundir;
pub mod state_io;
pub mod transport;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;
use tokio::net::UnixStream;

use self::accel::{AccelDecision, ResolvedAccel};
use self::argv::{ChannelConfig, LaunchArgs};
use self::golden::{FileIdentity, GoldenCache};
use self::jail::{CgroupLimits, Jail};
use self::process::{describe_exit, QemuProcess};
use self::qmp::{QmpClient, QmpError};
use self::rundir::VmPaths;
use self::state_io::StateIo;
use self::transport::{Transport, TransportDecision};
use super::{
    Backend, BackendError, BoxedChannel, FromConfig, Machine, MachineState, RestoredMachine,
    RevertOutcome,
};
use crate::config::AgentVmConfig;
use crate::protocol::{Hello, PROTOCOL_VERSION};
use crate::spec::{Accel, VmSpec};

pub use super::GOLDEN_SNAPSHOT;
/// Serial console lines put into [`BackendError::Crashed`]: at least the
/// last 30, back to the panic message if it is within the last 150.
const CRASH_TAIL_LINES: (usize, usize) = (30, 150);
/// Serial console lines kept in memory when the VM directory is removed.
const KEPT_TAIL_LINES: usize = 400;
/// At most this much of the end of a log file is read for a tail.
const TAIL_BYTES: u64 = 256 * 1024;
/// How often launch/connect retries while a socket is not there yet.
const RETRY: Duration = Duration::from_millis(10);

/// Deadlines of the backend's operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuTimeouts {
    /// From spawn until QMP answers.
    pub monitor: Duration,
    /// `connect_channel` retrying while the socket is not accepting.
    pub channel_connect: Duration,
    /// `stop`, `cont`, `query-status`.
    pub control: Duration,
    /// `savevm` / `loadvm` (grow with guest memory).
    pub snapshot: Duration,
    /// SIGKILL until the process is reaped.
    pub kill: Duration,
}

impl Default for QemuTimeouts {
    fn default() -> Self {
        Self {
            monitor: Duration::from_secs(15),
            channel_connect: Duration::from_secs(5),
            control: Duration::from_secs(10),
            snapshot: Duration::from_secs(120),
            kill: Duration::from_secs(10),
        }
    }
}

/// Configuration of [`QemuBackend`]. `Default` finds everything on `PATH`
/// and under the default runtime directory.
#[derive(Debug, Clone, Default)]
pub struct QemuConfig {
    /// `qemu-system-x86_64` (default: found on `PATH`).
    pub qemu_binary: Option<PathBuf>,
    /// `qemu-img` (default: found on `PATH`).
    pub qemu_img_binary: Option<PathBuf>,
    /// Runtime root (default: [`rundir::default_root`]).
    pub runtime_dir: Option<PathBuf>,
    /// If set, a destroyed VM's `serial.log` is moved here as `<vm-id>.serial.log`
    /// instead of being deleted (and [`Machine::serial_log_path`] points there).
    pub keep_logs_in: Option<PathBuf>,
    /// Virtual size of the snapshot-state qcow2 in MiB (default 32). The
    /// file grows beyond it with the saved VM state; the size only bounds
    /// what a guest could write, and no guest device sees it.
    pub state_disk_mib: Option<u32>,
    /// Keep golden snapshots in `<runtime dir>/golden/` and start VMs from
    /// them ([`golden`]; virtio-serial transport only). Off by default here;
    /// the harness's configuration (`golden_cache`) turns it on.
    pub golden_cache: bool,
    /// Deadlines.
    pub timeouts: QemuTimeouts,
}

/// The QEMU backend.
#[derive(Debug)]
pub struct QemuBackend {
    qemu: PathBuf,
    qemu_img: PathBuf,
    root: PathBuf,
    keep_logs_in: Option<PathBuf>,
    state_disk_mib: u32,
    auto_accel: AccelDecision,
    host_tsc_khz: Option<u32>,
    state_io: StateIo,
    transport: TransportDecision,
    timeouts: QemuTimeouts,
    golden: Option<GoldenCache>,
    jail: Jail,
    warned_root: std::sync::Once,
}

static VM_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The QEMU backend's settings from the run's configuration: its own key
/// `golden_cache`; the programs are found on `PATH`, the runtime directory is
/// the default, and the accelerator comes from each VM's spec.
impl From<&AgentVmConfig> for QemuConfig {
    fn from(config: &AgentVmConfig) -> Self {
        Self {
            golden_cache: config.golden_cache,
            ..Self::default()
        }
    }
}

impl FromConfig for QemuBackend {
    fn from_config(config: &AgentVmConfig) -> Result<Self, BackendError> {
        Self::new(QemuConfig::from(config))
    }
}

impl QemuBackend {
    /// Finds the programs, prepares the runtime directory, sweeps VMs left
    /// behind by dead processes, and resolves the automatic accelerator and
    /// transport (once).
    pub fn new(config: QemuConfig) -> Result<Self, BackendError> {
        let qemu = match config.qemu_binary {
            Some(p) => p,
            None => find_program(
                "qemu-system-x86_64",
                "install it: apt-get install qemu-system-x86",
            )?,
        };
        let qemu_img = match config.qemu_img_binary {
            Some(p) => p,
            None => find_program("qemu-img", "install it: apt-get install qemu-utils")?,
        };
        let root = config.runtime_dir.unwrap_or_else(rundir::default_root);
        rundir::ensure_root(&root).map_err(|source| {
            io_error(
                format!("creating runtime directory {}", root.display()),
                source,
            )
        })?;
        let swept = rundir::sweep_stale(&root);
        if !swept.removed.is_empty() {
            tracing::info!(killed = ?swept.killed, removed = swept.removed.len(), "swept stale VMs");
        }
        let transport = transport::detect_transport();
        let golden = (config.golden_cache && transport.transport == Transport::VirtioSerial)
            .then(|| GoldenCache::new(root.join("golden")));
        let state_io = state_io::detect(&qemu_img, &root);
        Ok(Self {
            qemu,
            qemu_img,
            root,
            keep_logs_in: config.keep_logs_in,
            state_disk_mib: config.state_disk_mib.unwrap_or(32),
            auto_accel: accel::detect(Accel::Auto),
            host_tsc_khz: accel::detect_host_tsc_khz(),
            state_io,
            transport,
            timeouts: config.timeouts,
            golden,
            jail: Jail::detect(),
            warned_root: std::sync::Once::new(),
        })
    }

    /// The jail QEMU runs in on this host (seccomp, user, cgroup).
    pub fn jail(&self) -> &Jail {
        &self.jail
    }

    /// The user to run a VM's QEMU as, after handing its directory over;
    /// root (with a one-time warning) when the QEMU user cannot read the image.
    fn prepare_jail(
        &self,
        machine: &QemuMachine,
        spec: &VmSpec,
    ) -> Result<Option<(u32, u32)>, BackendError> {
        let Some(user) = &self.jail.user else {
            return Ok(None);
        };
        if let Err(path) = self.jail.check_readable(&spec.image.files()) {
            self.warned_root.call_once(|| {
                tracing::warn!(
                    user = %user.name,
                    path = %path.display(),
                    "QEMU runs as root: its user cannot read the guest image here \
                     (make the image directory and its parents world-readable)"
                );
            });
            return Ok(None);
        }
        let hand_over = || -> std::io::Result<()> {
            jail::allow_traversal(&self.root)?;
            jail::allow_traversal(&self.root.join("vms"))?;
            jail::hand_over(&machine.paths.dir, user)
        };
        hand_over().map_err(|e| {
            io_error(
                format!(
                    "handing {} to user {}",
                    machine.paths.dir.display(),
                    user.name
                ),
                e,
            )
        })?;
        Ok(Some((user.uid, user.gid)))
    }

    /// [`QemuBackend::new`] with the default configuration.
    pub fn from_env() -> Result<Self, BackendError> {
        Self::new(QemuConfig::default())
    }

    /// The accelerator used for specs that say [`Accel::Auto`], and why.
    pub fn auto_accel(&self) -> &AccelDecision {
        &self.auto_accel
    }

    /// The control-channel transport, and why.
    pub fn transport(&self) -> &TransportDecision {
        &self.transport
    }

    /// The runtime root.
    pub fn runtime_dir(&self) -> &Path {
        &self.root
    }

    fn resolve_accel(&self, requested: Accel) -> ResolvedAccel {
        match requested {
            Accel::Kvm => ResolvedAccel::Kvm,
            Accel::Tcg => ResolvedAccel::Tcg,
            Accel::Auto => self.auto_accel.accel,
        }
    }

    /// The golden cache, when it is on.
    pub fn golden_cache(&self) -> Option<&GoldenCache> {
        self.golden.as_ref()
    }

    /// The golden-cache key of `spec` (`None` without a cache, or when the
    /// files it depends on cannot be read): the command line with neutral
    /// per-VM paths and id, the QEMU binary, the kernel, the initramfs and
    /// the root file system disk, if any.
    pub fn golden_key(&self, spec: &VmSpec) -> Option<String> {
        self.golden.as_ref()?;
        let paths = VmPaths::new("/agentvm-golden");
        let argv = argv::build_argv(&LaunchArgs {
            vm_id: "golden",
            spec,
            accel: self.resolve_accel(spec.accel),
            paths: &paths,
            channel: ChannelConfig::VirtioSerial,
            host_tsc_khz: self.host_tsc_khz,
            start_paused: false,
            state_io: self.state_io,
        })
        .ok()?;
        let files = [&self.qemu, &spec.image.kernel, &spec.image.initramfs]
            .into_iter()
            .chain(spec.image.rootfs.as_ref())
            .map(|path| FileIdentity::of(path))
            .collect::<std::io::Result<Vec<_>>>()
            .ok()?;
        Some(golden::cache_key(&argv, &files))
    }

    /// Like [`Backend::launch`], returning the concrete machine type.
    pub async fn launch_qemu(&self, spec: &VmSpec) -> Result<QemuMachine, BackendError> {
        let mut machine = self.start(spec, StateDisk::Create, false).await?;
        if let (Some(cache), Some(key)) = (&self.golden, self.golden_key(spec)) {
            if cache.lookup(&key).is_none() {
                machine.golden_slot = Some((cache.clone(), key));
            }
        }
        Ok(machine)
    }

    /// Like [`Backend::launch_restored`], returning the concrete machine type.
    pub async fn launch_restored_qemu(
        &self,
        spec: &VmSpec,
    ) -> Result<Option<(QemuMachine, BoxedChannel, Hello)>, BackendError> {
        let (Some(cache), Some(key)) = (&self.golden, self.golden_key(spec)) else {
            return Ok(None);
        };
        let Some(entry) = cache.lookup(&key) else {
            return Ok(None);
        };
        if entry.meta.hello.protocol_version != PROTOCOL_VERSION {
            cache.remove(&key);
            return Ok(None);
        }
        let started = Instant::now();
        let mut machine = self
            .start(spec, StateDisk::CopyOf(&entry.state_disk), true)
            .await?;
        // Connected before the load: the restored virtio-serial port was
        // host-connected when saved, so the guest sees no hang-up.
        let channel = machine.connect_channel().await?;
        machine.hmp(&format!("loadvm {GOLDEN_SNAPSHOT}")).await?;
        machine.resume().await?;
        tracing::info!(vm = %machine.id, elapsed = ?started.elapsed(), "VM restored from the golden cache");
        Ok(Some((machine, channel, entry.meta.hello)))
    }

    /// Creates the VM directory and state disk, spawns QEMU and connects QMP.
    async fn start(
        &self,
        spec: &VmSpec,
        state_disk: StateDisk<'_>,
        start_paused: bool,
    ) -> Result<QemuMachine, BackendError> {
        for path in [&spec.image.kernel, &spec.image.initramfs]
            .into_iter()
            .chain(spec.image.rootfs.as_ref())
        {
            if !path.is_file() {
                return Err(BackendError::MissingImage {
                    name: spec.image.name.clone(),
                    path: path.clone(),
                });
            }
        }
        let counter = VM_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{counter}", std::process::id());
        let paths = rundir::create_vm_dir(&self.root, &id)
            .map_err(|source| io_error(format!("creating VM directory for {id}"), source))?;
        // From here on, dropping `machine` cleans up (kills QEMU, removes the directory).
        let mut machine = QemuMachine {
            id: id.clone(),
            paths,
            process: None,
            qmp: None,
            timeouts: self.timeouts,
            keep_logs_in: self.keep_logs_in.clone(),
            dead: None,
            destroyed: false,
            final_tail: None,
            kept_log: None,
            golden_slot: None,
            cgroup: None,
            vsock_cid: None,
        };
        let started = Instant::now();
        match state_disk {
            StateDisk::Create => self.create_state_disk(&machine).await?,
            StateDisk::CopyOf(source) => {
                let (from, to) = (source.to_path_buf(), machine.paths.state_disk.clone());
                tokio::task::spawn_blocking(move || std::fs::copy(&from, &to))
                    .await
                    .map_err(|e| {
                        io_error("copying the golden state".into(), std::io::Error::other(e))
                    })?
                    .map_err(|e| io_error(format!("copying {}", source.display()), e))?;
            }
        }
        let channel = match self.transport.transport {
            Transport::VirtioSerial => ChannelConfig::VirtioSerial,
            Transport::Vsock => ChannelConfig::Vsock {
                guest_cid: transport::guest_cid(std::process::id(), counter),
            },
        };
        if let ChannelConfig::Vsock { guest_cid } = channel {
            machine.vsock_cid = Some(guest_cid);
        }
        let accel = self.resolve_accel(spec.accel);
        let launch = LaunchArgs {
            vm_id: &id,
            spec,
            accel,
            paths: &machine.paths,
            channel,
            host_tsc_khz: self.host_tsc_khz,
            start_paused,
            state_io: self.state_io,
        };
        let args = argv::build_argv(&launch)
            .map_err(|e| control(&id, "building the QEMU command line", e.to_string()))?;
        tracing::debug!(vm = %id, qemu = %self.qemu.display(), argv = ?args, "starting QEMU");
        let run_as = self.prepare_jail(&machine, spec)?;
        let process = QemuProcess::spawn(&self.qemu, &args, &machine.paths.qemu_log, run_as)
            .await
            .map_err(|e| BackendError::Spawn {
                what: format!("{} for VM {id}", self.qemu.display()),
                source: match e {
                    process::ProcessError::Spawn { source, .. } => source,
                    other => std::io::Error::other(other),
                },
            })?;
        let pid = process.pid();
        machine.process = Some(process);
        if let Ok(parent) = &self.jail.cgroup {
            let limits = CgroupLimits {
                guest_memory_mib: spec.profile.memory_mib(),
                vcpus: spec.profile.vcpus(),
            };
            let dir = parent
                .confine(&id, &limits, pid)
                .map_err(|e| io_error(format!("putting VM {id} into its cgroup"), e))?;
            machine.cgroup = Some(dir);
        }
        rundir::write_qemu_pid(&machine.paths, pid).map_err(|source| {
            io_error(
                format!("writing {}", machine.paths.qemu_pid.display()),
                source,
            )
        })?;
        machine.qmp = Some(machine.connect_monitor().await?);
        tracing::info!(
            vm = %id,
            pid,
            %accel,
            transport = %self.transport.transport,
            elapsed = ?started.elapsed(),
            "QEMU VM launched"
        );
        Ok(machine)
    }

    async fn create_state_disk(&self, machine: &QemuMachine) -> Result<(), BackendError> {
        create_state_disk(
            &self.qemu_img,
            &machine.paths.state_disk,
            self.state_disk_mib,
            &machine.id,
        )
        .await
    }
}

#[async_trait]
impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Machine>, BackendError> {
        Ok(Box::new(self.launch_qemu(spec).await?))
    }

    async fn launch_restored(
        &self,
        spec: &VmSpec,
    ) -> Result<Option<RestoredMachine>, BackendError> {
        Ok(self
            .launch_restored_qemu(spec)
            .await?
            .map(|(machine, channel, hello)| RestoredMachine {
                machine: Box::new(machine),
                channel,
                hello,
            }))
    }

    async fn forget_restored(&self, spec: &VmSpec) {
        if let (Some(cache), Some(key)) = (&self.golden, self.golden_key(spec)) {
            tracing::warn!(key = %key, "dropping a golden cache entry that did not restore");
            cache.remove(&key);
        }
    }
}

/// Where a new VM's state disk comes from.
enum StateDisk<'a> {
    /// A fresh, empty qcow2.
    Create,
    /// A copy of a golden cache entry's.
    CopyOf(&'a Path),
}

/// One QEMU process and its files. Dropping it kills QEMU and removes its
/// directory (like [`Machine::destroy`], without waiting for the reap).
#[derive(Debug)]
pub struct QemuMachine {
    id: String,
    paths: VmPaths,
    process: Option<QemuProcess>,
    qmp: Option<QmpClient>,
    timeouts: QemuTimeouts,
    keep_logs_in: Option<PathBuf>,
    /// Why the VM is known to be dead (set once, reported by every later call).
    dead: Option<String>,
    destroyed: bool,
    /// The serial tail captured when the directory was removed.
    final_tail: Option<String>,
    /// Where the serial log was moved to (`keep_logs_in`).
    kept_log: Option<PathBuf>,
    /// The golden cache and key this VM's golden snapshot goes to
    /// ([`Machine::share_golden`]); `None` when there is nothing to share.
    golden_slot: Option<(GoldenCache, String)>,
    /// The VM's cgroup, removed with the VM.
    cgroup: Option<PathBuf>,
    /// The guest CID, when the channel is vsock.
    vsock_cid: Option<u32>,
}

impl QemuMachine {
    /// Connects to the guest agent's vsock port, retrying while the guest
    /// boots (nothing listens yet) until the channel-connect deadline.
    async fn connect_vsock(&mut self, cid: u32) -> Result<BoxedChannel, BackendError> {
        let addr = tokio_vsock::VsockAddr::new(cid, argv::VSOCK_PORT);
        let deadline = Instant::now() + self.timeouts.channel_connect;
        loop {
            if let Some(e) = self.exited_error() {
                return Err(e);
            }
            match tokio_vsock::VsockStream::connect(addr).await {
                Ok(stream) => return Ok(Box::pin(stream)),
                Err(_) if Instant::now() < deadline => tokio::time::sleep(RETRY).await,
                Err(e) => {
                    return Err(io_error(
                        format!("connecting to vsock CID {cid} port {}", argv::VSOCK_PORT),
                        e,
                    ))
                }
            }
        }
    }

    /// The QEMU pid (`None` before spawn).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(QemuProcess::pid)
    }

    /// The VM's runtime directory (removed by `destroy`).
    pub fn dir(&self) -> &Path {
        &self.paths.dir
    }

    /// The file paths of this VM.
    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// Runs an arbitrary QMP command (diagnostics, experiments).
    pub async fn qmp_execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, BackendError> {
        let timeout = self.timeouts.control;
        let name = command.to_owned();
        self.qmp_call(command, timeout, move |q| {
            Box::pin(async move { q.execute(&name, arguments).await })
        })
        .await
    }

    fn qemu_log_tail(&self, lines: usize) -> String {
        rundir::last_lines(
            &rundir::read_file_tail(&self.paths.qemu_log, TAIL_BYTES),
            lines,
        )
    }

    fn crashed(&self, reason: String) -> BackendError {
        let (min, max) = CRASH_TAIL_LINES;
        let serial_tail = rundir::crash_excerpt(&self.serial_tail(max), min, max);
        BackendError::Crashed {
            vm: self.id.clone(),
            reason,
            serial_tail,
        }
    }

    /// Records that the VM is dead and builds the error.
    fn mark_dead(&mut self, reason: String) -> BackendError {
        tracing::warn!(vm = %self.id, %reason, "VM is dead");
        self.dead = Some(reason.clone());
        self.qmp = None;
        self.crashed(reason)
    }

    /// `Some(error)` if the process has exited (the reason names the exit and QEMU's own messages).
    fn exited_error(&mut self) -> Option<BackendError> {
        if let Some(reason) = &self.dead {
            return Some(self.crashed(reason.clone()));
        }
        if self.destroyed {
            return Some(self.crashed("the VM was destroyed".into()));
        }
        let status = match self.process.as_mut()?.try_exit_status() {
            Ok(Some(status)) => status,
            Ok(None) => return None,
            Err(e) => return Some(self.mark_dead(format!("cannot wait for QEMU: {e}"))),
        };
        let mut reason = format!("QEMU exited ({})", describe_exit(status));
        if let Some(hint) = rundir::guest_end_hint(&self.serial_tail(KEPT_TAIL_LINES)) {
            reason = format!("{hint}; {reason}");
        }
        let log = self.qemu_log_tail(10);
        if !log.is_empty() {
            reason.push_str(": ");
            reason.push_str(&log);
        }
        Some(self.mark_dead(reason))
    }

    /// After the monitor broke: wait briefly for the process to exit, then report.
    async fn monitor_lost(&mut self, operation: &str, error: QmpError) -> BackendError {
        if let Some(p) = self.process.as_mut() {
            let _ = p.wait_exit(Duration::from_secs(2)).await;
        }
        match self.exited_error() {
            Some(e) => e,
            None => self.mark_dead(format!(
                "QMP connection lost during {operation} ({error}) while QEMU still runs"
            )),
        }
    }

    async fn connect_monitor(&mut self) -> Result<QmpClient, BackendError> {
        let deadline = Instant::now() + self.timeouts.monitor;
        loop {
            if let Some(e) = self.exited_error() {
                return Err(e);
            }
            match UnixStream::connect(&self.paths.qmp_socket).await {
                Ok(stream) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    return match tokio::time::timeout(remaining, QmpClient::handshake(stream)).await
                    {
                        Ok(Ok(client)) => Ok(client),
                        Ok(Err(e)) => Err(self.monitor_lost("QMP handshake", e).await),
                        Err(_) => Err(self.timeout("QMP handshake", self.timeouts.monitor)),
                    };
                }
                Err(e) if is_not_ready(&e) => {}
                Err(e) => {
                    return Err(io_error(
                        format!("connecting to {}", self.paths.qmp_socket.display()),
                        e,
                    ))
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout("waiting for the QMP socket", self.timeouts.monitor));
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    fn timeout(&self, operation: &str, after: Duration) -> BackendError {
        BackendError::Timeout {
            vm: self.id.clone(),
            operation: operation.into(),
            after,
        }
    }

    /// Runs one QMP operation with a deadline, mapping failures: a dead
    /// process → `Crashed`, a QMP error reply → `Control`, no answer → `Timeout`.
    async fn qmp_call<T, F>(
        &mut self,
        operation: &str,
        after: Duration,
        f: F,
    ) -> Result<T, BackendError>
    where
        F: for<'a> FnOnce(&'a mut QmpClient) -> futures::future::BoxFuture<'a, Result<T, QmpError>>,
    {
        if let Some(e) = self.exited_error() {
            return Err(e);
        }
        let Some(qmp) = self.qmp.as_mut() else {
            return Err(control(&self.id, operation, "QMP is not connected".into()));
        };
        let result = tokio::time::timeout(after, f(qmp)).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e @ (QmpError::Command { .. } | QmpError::Hmp { .. }))) => {
                Err(control(&self.id, operation, e.to_string()))
            }
            Ok(Err(e)) => Err(self.monitor_lost(operation, e).await),
            Err(_) => Err(match self.exited_error() {
                Some(e) => e,
                None => self.timeout(operation, after),
            }),
        }
    }

    async fn hmp(&mut self, command_line: &str) -> Result<String, BackendError> {
        let started = Instant::now();
        let after = self.timeouts.snapshot;
        let line = command_line.to_owned();
        let output = self
            .qmp_call(command_line, after, move |q| {
                Box::pin(async move { q.hmp(&line).await })
            })
            .await?;
        tracing::debug!(vm = %self.id, command = command_line, elapsed = ?started.elapsed(), "HMP done");
        Ok(output)
    }

    /// Moves or deletes the serial log and removes the directory; keeps a tail in memory.
    fn remove_files(&mut self) -> Result<(), BackendError> {
        if !self.paths.dir.exists() {
            return Ok(());
        }
        self.final_tail = Some(rundir::last_lines(
            &rundir::read_file_tail(&self.paths.serial_log, TAIL_BYTES),
            KEPT_TAIL_LINES,
        ));
        if let Some(keep) = &self.keep_logs_in {
            let target = keep.join(format!("{}.serial.log", self.id));
            let moved = std::fs::create_dir_all(keep)
                .and_then(|()| std::fs::rename(&self.paths.serial_log, &target))
                .or_else(|_| std::fs::copy(&self.paths.serial_log, &target).map(drop));
            match moved {
                Ok(()) => self.kept_log = Some(target),
                Err(e) => {
                    tracing::warn!(vm = %self.id, error = %e, "could not keep the serial log")
                }
            }
        }
        std::fs::remove_dir_all(&self.paths.dir)
            .map_err(|source| io_error(format!("removing {}", self.paths.dir.display()), source))
    }
}

#[async_trait]
impl Machine for QemuMachine {
    fn id(&self) -> &str {
        &self.id
    }

    fn host_pid(&self) -> Option<u32> {
        self.pid()
    }

    async fn connect_channel(&mut self) -> Result<BoxedChannel, BackendError> {
        if let Some(cid) = self.vsock_cid {
            return self.connect_vsock(cid).await;
        }
        let deadline = Instant::now() + self.timeouts.channel_connect;
        loop {
            if let Some(e) = self.exited_error() {
                return Err(e);
            }
            match UnixStream::connect(&self.paths.ctl_socket).await {
                Ok(stream) => return Ok(Box::pin(stream)),
                Err(e) if is_not_ready(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(RETRY).await
                }
                Err(e) if is_not_ready(&e) => {
                    return Err(self.timeout(
                        "connecting the control channel",
                        self.timeouts.channel_connect,
                    ));
                }
                Err(e) => {
                    return Err(io_error(
                        format!("connecting to {}", self.paths.ctl_socket.display()),
                        e,
                    ))
                }
            }
        }
    }

    async fn snapshot_golden(&mut self) -> Result<(), BackendError> {
        self.save_snapshot(GOLDEN_SNAPSHOT).await
    }

    async fn save_snapshot(&mut self, name: &str) -> Result<(), BackendError> {
        self.hmp(&format!("savevm {name}")).await.map(drop)
    }

    async fn load_snapshot(&mut self, name: &str) -> Result<RevertOutcome, BackendError> {
        // loadvm restores the run state the VM had before the command: a
        // paused VM stays paused. A failed loadvm leaves QEMU in `restore-vm`
        // (unusable): check_alive then reports it as dead — so look first.
        if name != GOLDEN_SNAPSHOT && !self.snapshot_names().await?.iter().any(|n| n == name) {
            return Err(control(
                &self.id,
                "loadvm",
                format!("no snapshot named {name:?}"),
            ));
        }
        self.hmp(&format!("loadvm {name}")).await?;
        Ok(RevertOutcome::ChannelKept)
    }

    async fn delete_snapshot(&mut self, name: &str) -> Result<(), BackendError> {
        if !self.snapshot_names().await?.iter().any(|n| n == name) {
            return Err(control(
                &self.id,
                "delvm",
                format!("no snapshot named {name:?}"),
            ));
        }
        self.hmp(&format!("delvm {name}")).await.map(drop)
    }

    async fn snapshot_names(&mut self) -> Result<Vec<String>, BackendError> {
        let listing = self.hmp("info snapshots").await?;
        Ok(qmp::snapshot_tags(&listing))
    }

    async fn state(&mut self) -> Result<MachineState, BackendError> {
        if self.destroyed {
            return Ok(MachineState::ShutOff);
        }
        if self.exited_error().is_some() {
            let hint = rundir::guest_end_hint(&self.serial_tail(KEPT_TAIL_LINES));
            return Ok(match hint {
                Some("guest powered off") => MachineState::ShutOff,
                _ => MachineState::Crashed,
            });
        }
        let after = self.timeouts.control;
        let status = self
            .qmp_call("query-status", after, |q| Box::pin(q.query_status()))
            .await?;
        Ok(qmp::machine_state(&status.status))
    }

    async fn share_golden(&mut self, hello: &Hello) -> Result<(), BackendError> {
        let Some((cache, key)) = self.golden_slot.take() else {
            return Ok(());
        };
        if cache.lookup(&key).is_some() {
            return Ok(());
        }
        // Stopped, QEMU has flushed the qcow2 and does not write to it.
        self.pause().await?;
        let meta = golden::Meta {
            format: golden::FORMAT,
            key,
            hello: hello.clone(),
            created_unix: golden::now_unix(),
            source_vm: self.id.clone(),
        };
        let source = self.paths.state_disk.clone();
        let stored = tokio::task::spawn_blocking(move || cache.store(&source, &meta))
            .await
            .map_err(|e| io_error("storing the golden state".into(), std::io::Error::other(e)));
        let resumed = self.resume().await;
        let stored = stored?.map_err(|e| io_error("storing the golden state".into(), e))?;
        resumed?;
        tracing::info!(vm = %self.id, stored, "golden snapshot shared");
        Ok(())
    }

    async fn revert_golden(&mut self) -> Result<RevertOutcome, BackendError> {
        self.load_snapshot(GOLDEN_SNAPSHOT).await
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        let after = self.timeouts.control;
        self.qmp_call("stop", after, |q| Box::pin(q.stop())).await
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        let after = self.timeouts.control;
        self.qmp_call("cont", after, |q| Box::pin(q.cont())).await
    }

    async fn check_alive(&mut self) -> Result<(), BackendError> {
        if let Some(e) = self.exited_error() {
            return Err(e);
        }
        let polled = match self.qmp.as_mut() {
            Some(q) => q.poll_events().map(|()| q.take_events()),
            None => {
                return Err(control(
                    &self.id,
                    "check_alive",
                    "QMP is not connected".into(),
                ))
            }
        };
        match polled {
            Ok(events) => {
                if let Some(ev) = events.iter().find(|e| qmp::event_is_fatal(e)) {
                    let reason = format!("QMP event {} {}", ev.name, ev.data);
                    // The process exits right after such an event; reap it if it did.
                    if let Some(p) = self.process.as_mut() {
                        let _ = p.wait_exit(Duration::from_millis(500)).await;
                    }
                    return Err(self.mark_dead(reason));
                }
            }
            Err(e) => return Err(self.monitor_lost("check_alive", e).await),
        }
        let after = self.timeouts.control;
        let status = self
            .qmp_call("query-status", after, |q| Box::pin(q.query_status()))
            .await?;
        if qmp::status_is_dead(&status.status) {
            return Err(self.mark_dead(format!("VM run state is {}", status.status)));
        }
        Ok(())
    }

    async fn wait_stopped(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        let Some(process) = self.process.as_mut() else {
            return Ok(true);
        };
        match process.wait_exit(timeout).await {
            Ok(exited) => Ok(exited.is_some()),
            Err(e) => Err(io_error(
                format!("waiting for QEMU of VM {} to exit", self.id),
                std::io::Error::other(e),
            )),
        }
    }

    async fn destroy(&mut self) -> Result<(), BackendError> {
        if self.destroyed {
            return Ok(());
        }
        self.qmp = None;
        let mut result = Ok(());
        if let Some(p) = self.process.as_mut() {
            match p.kill_and_wait(self.timeouts.kill).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    result =
                        Err(self
                            .timeout("waiting for QEMU to exit after SIGKILL", self.timeouts.kill))
                }
                Err(e) => {
                    result = Err(io_error(
                        format!("killing QEMU of VM {}", self.id),
                        std::io::Error::other(e),
                    ))
                }
            }
        }
        let removed = self.remove_files();
        if let Some(dir) = self.cgroup.take() {
            jail::remove_cgroup(&dir);
        }
        self.destroyed = true;
        tracing::debug!(vm = %self.id, "VM destroyed");
        result.and(removed)
    }

    fn serial_tail(&self, lines: usize) -> String {
        match &self.final_tail {
            Some(tail) => rundir::last_lines(tail, lines),
            None => rundir::last_lines(
                &rundir::read_file_tail(&self.paths.serial_log, TAIL_BYTES),
                lines,
            ),
        }
    }

    fn serial_log_path(&self) -> Option<PathBuf> {
        if self.final_tail.is_some() {
            self.kept_log.clone()
        } else {
            Some(self.paths.serial_log.clone())
        }
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        if self.destroyed {
            return;
        }
        self.qmp = None;
        // QemuProcess's Drop sends SIGKILL and hands the child to the reaper.
        self.process = None;
        if let Err(e) = self.remove_files() {
            tracing::warn!(vm = %self.id, error = %e, "cleanup on drop failed");
        }
    }
}

fn is_not_ready(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

fn control(vm: &str, operation: &str, message: String) -> BackendError {
    BackendError::Control {
        vm: vm.to_owned(),
        operation: operation.to_owned(),
        message,
    }
}

fn io_error(context: String, source: std::io::Error) -> BackendError {
    BackendError::Io { context, source }
}

/// Creates VM `vm`'s snapshot-state qcow2 at `path` with `qemu_img` (both
/// backends keep their local VMs' snapshots in one).
pub(crate) async fn create_state_disk(
    qemu_img: &Path,
    path: &Path,
    size_mib: u32,
    vm: &str,
) -> Result<(), BackendError> {
    let args = argv::state_disk_create_args(path, size_mib)
        .map_err(|e| control(vm, "creating the state disk", e.to_string()))?;
    let output = tokio::process::Command::new(qemu_img)
        .args(&args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| BackendError::Spawn {
            what: qemu_img.display().to_string(),
            source,
        })?;
    if !output.status.success() {
        return Err(control(
            vm,
            "qemu-img create",
            format!(
                "{}: {}",
                describe_exit(output.status),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Finds `program` on `PATH` (an executable regular file).
pub fn find_program(program: &str, hint: &str) -> Result<PathBuf, BackendError> {
    find_in_path(program, std::env::var_os("PATH").as_deref()).ok_or_else(|| {
        BackendError::MissingProgram {
            program: program.to_owned(),
            hint: hint.to_owned(),
        }
    })
}

/// Pure-ish part of [`find_program`]: searches the directories of a `PATH` value.
pub fn find_in_path(program: &str, path_var: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path_var?)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_on_path() {
        let path = std::ffi::OsString::from("/nonexistent:/bin:/usr/bin");
        assert!(find_in_path("sh", Some(&path)).is_some());
        assert_eq!(
            find_in_path("definitely-not-a-program-xyz", Some(&path)),
            None
        );
        assert_eq!(find_in_path("sh", None), None);
        let err = find_program("definitely-not-a-program-xyz", "apt-get install it").unwrap_err();
        assert!(matches!(err, BackendError::MissingProgram { .. }));
        assert!(err.to_string().contains("apt-get install it"), "{err}");
    }
}
