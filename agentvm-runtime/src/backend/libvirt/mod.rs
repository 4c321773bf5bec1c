//! libvirt backend (cargo feature `libvirt`): one persistent libvirt domain
//! per VM, driven through the `virt` crate (blocking calls, run in
//! `spawn_blocking`).
//!
//! * [`connection`]: the connection (URI from the configuration,
//!   `LIBVIRT_DEFAULT_URI` or `qemu:///system`; reopened once when broken).
//! * [`domain_xml`]: the domain XML (pure function, unit-tested).
//!
//! The daemon must be running: `scripts/start-libvirtd.sh` (as root, no
//! systemd needed). The accelerator decision and the kernel command line
//! (incl. the `tsc_early_khz` hint under TCG) are the QEMU backend's
//! ([`crate::backend::qemu::accel`], [`crate::backend::qemu::argv::kernel_cmdline`]).
//!
//! # Revert
//!
//! The golden snapshot is a libvirt internal domain snapshot (memory + disk,
//! stored in the VM's small qcow2, with libvirt metadata: name, description,
//! creation time — see [`LibvirtMachine::create_snapshot`] and friends).
//! Three ways to go back to it were measured on the development machine
//! (libvirt 11.3 from bookworm-backports, QEMU 10.0, TCG, 256 MiB `pc`
//! guest, daemon under `tini -s`; each figure a `virsh` command, n = 5):
//!
//! | path | time | channel |
//! |---|---|---|
//! | `virDomainRevertToSnapshot` (`virsh snapshot-revert`) | 0.66–0.70 s | QEMU is restarted (new pid): socket reset |
//! | `virsh save` + `virsh restore` | 0.33 s + 0.37 s | new QEMU: socket reset |
//! | HMP `loadvm <name>` via `virDomainQemuMonitorCommand` | 0.10–0.16 s | same QEMU: socket kept |
//!
//! (Measured earlier on libvirt 9.0 on the same machines: snapshot-revert ≈ 1.0 s, loadvm 0.13–0.21 s.)
//! Through this backend, in one run with the QEMU backend
//! (`vm_libvirt::compare_backends`, n = 10 reverts / 50 execs each, TCG):
//!
//! | backend | boot → Hello + golden | golden snapshot | revert + resync p50 | exec `true` p50 |
//! |---|---|---|---|---|
//! | QEMU direct (microvm) | 2.04 s | 107 ms | 81 ms | 8.0 ms |
//! | libvirt, HMP `loadvm` | 2.23 s | 119 ms | 90 ms | 9.6 ms |
//! | libvirt, snapshot API | 2.39 s | 83 ms | 724 ms | 12.2 ms |
//!
//! The API path needs one more step: the restored guest still holds the port
//! it had open at snapshot time, sees the hang-up, and re-opens it; a Ping
//! the host sends before that is lost (every second revert's resync timed
//! out). So after `virDomainRevertToSnapshot` the backend waits (≤ 5 s) until
//! the guest agent logged `disconnected` on the serial console.
//!
//! `loadvm` of the snapshot libvirt created is the fastest and keeps the host
//! end of the control channel connected ([`RevertOutcome::ChannelKept`]), so
//! it is the default. It is correct here because the domain has exactly one
//! disk (the state qcow2 holding the snapshot) and the snapshot was taken of
//! this very QEMU configuration; libvirt only marks the domain "tainted"
//! (custom monitor command). `AGENT_VM_LIBVIRT_REVERT=snapshot` selects the
//! libvirt API path instead ([`RevertOutcome::ChannelReset`]); if `loadvm`
//! fails the API path is tried before giving up.
//!
//! # Memory limit
//!
//! The domain gets `<memtune><hard_limit>` (guest RAM + QEMU overhead).
//! libvirt then also raises QEMU's RLIMIT_MEMLOCK, which fails without
//! CAP_SYS_RESOURCE (containers): the backend then redefines the domain with
//! `<soft_limit>` and uses that for the rest of its life (logged once).
//!
//! # Leftovers
//!
//! Every domain is named `agentvm-<pid>-<n>`, titled `agentvm`, and carries
//! its owner's pid + start time and its directory in `<metadata>`.
//! [`LibvirtBackend::new`] sweeps domains whose owner is gone (destroy,
//! undefine with snapshot metadata, remove the directory).

pub mod connection;
pub mod domain_xml;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::net::UnixStream;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState, DomainStateEnum, DomainStateReasonEnum};
use virt::enumutil::Enum;
use virt::error::Error as VirtError;

use self::connection::{is_no_domain, is_not_running, Connection};
use self::domain_xml::{DomainParams, Owner, DOMAIN_PREFIX, EGRESS_FILTER, NAT_NETWORK};
use super::qemu::accel::{self, AccelDecision, ResolvedAccel};
use super::qemu::rundir::{self, ProcessStamp, VmPaths};
use super::qemu::{argv, find_program};
use super::{
    Backend, BackendError, BoxedChannel, FromConfig, Machine, MachineState, RevertOutcome,
};
use crate::config::AgentVmConfig;
use crate::spec::{Accel, NetworkMode, VmSpec};

pub use super::GOLDEN_SNAPSHOT;
/// Selects the revert path: `loadvm` (default) or `snapshot`.
pub const REVERT_ENV: &str = "AGENT_VM_LIBVIRT_REVERT";
const RETRY: Duration = Duration::from_millis(10);
const TAIL_BYTES: u64 = 256 * 1024;
const KEPT_TAIL_LINES: usize = 400;
const CRASH_TAIL_LINES: (usize, usize) = (30, 150);
/// What the guest agent prints on the serial console when the host end of
/// its port goes away (`agentvm-guest/src/main.rs`).
const GUEST_DISCONNECTED: &str = "agentvm-guest: disconnected";

/// What is missing for `network = "nat-filtered"` (`None`: nothing), given
/// whether the network and the nwfilter exist at `uri`.
pub fn missing_network_objects(network: bool, filter: bool, uri: &str) -> Option<String> {
    let missing = match (network, filter) {
        (true, true) => return None,
        (false, true) => format!("network {NAT_NETWORK:?} is"),
        (true, false) => format!("nwfilter {EGRESS_FILTER:?} is"),
        (false, false) => format!("network {NAT_NETWORK:?} and nwfilter {EGRESS_FILTER:?} are"),
    };
    Some(format!(
        "libvirt {missing} not defined at {uri}: run `agentvm setup-network` \
         (`cargo xtask setup-network` in the agentvm repository)"
    ))
}

/// How [`Machine::revert_golden`] goes back to the golden snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevertPath {
    /// HMP `loadvm` through the monitor (fast, channel kept).
    Loadvm,
    /// `virDomainRevertToSnapshot` (restarts QEMU, channel reset).
    SnapshotApi,
}

impl RevertPath {
    /// From [`REVERT_ENV`]'s value: `loadvm`, `snapshot` (or `api`); unset
    /// or empty is `loadvm`. `None` for anything else.
    pub fn from_env_value(value: Option<&str>) -> Option<Self> {
        match value.map(str::trim) {
            None | Some("") | Some("loadvm") => Some(Self::Loadvm),
            Some("snapshot") | Some("api") => Some(Self::SnapshotApi),
            Some(_) => None,
        }
    }
}

/// Deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibvirtTimeouts {
    /// `connect_channel` retrying while the socket is not there.
    pub channel_connect: Duration,
}

impl Default for LibvirtTimeouts {
    fn default() -> Self {
        Self {
            channel_connect: Duration::from_secs(10),
        }
    }
}

/// Configuration of [`LibvirtBackend`].
#[derive(Debug, Clone, Default)]
pub struct LibvirtConfig {
    /// Connection URI (default: `LIBVIRT_DEFAULT_URI`, else `qemu:///system`).
    pub uri: Option<String>,
    /// Runtime root (default: `<rundir::default_root()>/libvirt`).
    pub runtime_dir: Option<PathBuf>,
    /// `qemu-img` (default: found on `PATH`).
    pub qemu_img_binary: Option<PathBuf>,
    /// Virtual size of the state qcow2 in MiB (default 32).
    pub state_disk_mib: Option<u32>,
    /// Revert path (default: from [`REVERT_ENV`]).
    pub revert_path: Option<RevertPath>,
    /// Deadlines.
    pub timeouts: LibvirtTimeouts,
}

/// The libvirt backend.
#[derive(Debug)]
pub struct LibvirtBackend {
    conn: Arc<Connection>,
    root: PathBuf,
    qemu_img: PathBuf,
    state_disk_mib: u32,
    auto_accel: AccelDecision,
    host_tsc_khz: Option<u32>,
    revert_path: RevertPath,
    timeouts: LibvirtTimeouts,
    /// Cleared once libvirt could not apply a `<hard_limit>` (no CAP_SYS_RESOURCE).
    hard_memory_limit: AtomicBool,
}

static VM_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The libvirt backend's settings from the run's configuration: its own key
/// `libvirt_uri` (else `LIBVIRT_DEFAULT_URI`, else `qemu:///system`), defaults
/// for the rest.
impl From<&AgentVmConfig> for LibvirtConfig {
    fn from(config: &AgentVmConfig) -> Self {
        Self {
            uri: config.libvirt_uri.clone(),
            ..Self::default()
        }
    }
}

impl FromConfig for LibvirtBackend {
    fn from_config(config: &AgentVmConfig) -> Result<Self, BackendError> {
        Self::new(LibvirtConfig::from(config))
    }
}

impl LibvirtBackend {
    /// Connects (blocking, a few ms), prepares the runtime directory and
    /// sweeps leftover domains of dead owners.
    pub fn new(config: LibvirtConfig) -> Result<Self, BackendError> {
        let env = std::env::var(connection::URI_ENV).ok();
        let uri = connection::resolve_uri(config.uri.as_deref(), env.as_deref());
        let conn = Connection::open(&uri)?;
        let qemu_img = match config.qemu_img_binary {
            Some(p) => p,
            None => find_program("qemu-img", "install it: apt-get install qemu-utils")?,
        };
        let root = config
            .runtime_dir
            .unwrap_or_else(|| rundir::default_root().join("libvirt"));
        rundir::ensure_root(&root).map_err(|source| BackendError::Io {
            context: format!("creating runtime directory {}", root.display()),
            source,
        })?;
        match sweep_blocking(&conn, &root) {
            Ok(swept) if !swept.is_empty() => {
                tracing::info!(domains = ?swept, "swept leftover libvirt domains")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweeping leftover libvirt domains failed"),
        }
        let revert_path = match config.revert_path {
            Some(path) => path,
            None => {
                let value = std::env::var(REVERT_ENV).ok();
                RevertPath::from_env_value(value.as_deref()).ok_or_else(|| {
                    BackendError::InvalidSetting {
                        setting: REVERT_ENV.into(),
                        value: value.unwrap_or_default(),
                        expected: "\"loadvm\" (default) or \"snapshot\"".into(),
                    }
                })?
            }
        };
        Ok(Self {
            conn,
            root,
            qemu_img,
            state_disk_mib: config.state_disk_mib.unwrap_or(32),
            auto_accel: accel::detect(Accel::Auto),
            host_tsc_khz: accel::detect_host_tsc_khz(),
            revert_path,
            timeouts: config.timeouts,
            hard_memory_limit: AtomicBool::new(true),
        })
    }

    /// [`LibvirtBackend::new`] with the default configuration.
    pub fn from_env() -> Result<Self, BackendError> {
        Self::new(LibvirtConfig::default())
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        self.conn.uri()
    }

    /// The accelerator used for `Accel::Auto`, and why.
    pub fn auto_accel(&self) -> &AccelDecision {
        &self.auto_accel
    }

    /// The revert path machines use.
    pub fn revert_path(&self) -> RevertPath {
        self.revert_path
    }

    /// Destroys domains of dead owners; returns their names.
    pub async fn sweep(&self) -> Result<Vec<String>, BackendError> {
        let conn = Arc::clone(&self.conn);
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || sweep_blocking(&conn, &root))
            .await
            .map_err(|e| BackendError::Io {
                context: "sweep".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    fn resolve_accel(&self, requested: Accel) -> ResolvedAccel {
        match requested {
            Accel::Kvm => ResolvedAccel::Kvm,
            Accel::Tcg => ResolvedAccel::Tcg,
            Accel::Auto => self.auto_accel.accel,
        }
    }

    async fn check_network(&self, id: &str, network: &NetworkMode) -> Result<(), BackendError> {
        if *network != NetworkMode::NatFiltered {
            return Ok(());
        }
        let found = self
            .conn
            .with(|c| {
                let net = c.lookup_network_by_name(NAT_NETWORK).is_ok();
                let filter = c.lookup_nwfilter_by_name(EGRESS_FILTER).is_ok();
                Ok((net, filter))
            })
            .await?
            .map_err(|e| control(id, "looking up the network", e.to_string()))?;
        match missing_network_objects(found.0, found.1, self.conn.uri()) {
            None => Ok(()),
            Some(message) => Err(control(id, "network nat-filtered", message)),
        }
    }

    /// Like [`Backend::launch`], returning the concrete machine type.
    pub async fn launch_libvirt(&self, spec: &VmSpec) -> Result<LibvirtMachine, BackendError> {
        for path in [&spec.image.kernel, &spec.image.initramfs] {
            if !path.is_file() {
                return Err(BackendError::MissingImage {
                    name: spec.image.name.clone(),
                    path: path.clone(),
                });
            }
        }
        let counter = VM_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{counter}", std::process::id());
        let name = format!("{DOMAIN_PREFIX}{id}");
        self.check_network(&id, &spec.network).await?;
        let paths = rundir::create_vm_dir(&self.root, &id).map_err(|source| BackendError::Io {
            context: format!("creating VM directory for {id}"),
            source,
        })?;
        let stamp = ProcessStamp::current().ok_or_else(|| BackendError::Io {
            context: "reading /proc/self/stat".into(),
            source: std::io::Error::other("no start time"),
        })?;
        let mut machine = LibvirtMachine {
            id: id.clone(),
            name: name.clone(),
            conn: Arc::clone(&self.conn),
            paths,
            revert_path: self.revert_path,
            timeouts: self.timeouts,
            defined: false,
            destroyed: false,
            dead: None,
            final_tail: None,
        };
        let started = Instant::now();
        let args = argv::state_disk_create_args(&machine.paths.state_disk, self.state_disk_mib)
            .map_err(|e| control(&id, "creating the state disk", e.to_string()))?;
        let output = tokio::process::Command::new(&self.qemu_img)
            .args(&args)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| BackendError::Spawn {
                what: self.qemu_img.display().to_string(),
                source,
            })?;
        if !output.status.success() {
            return Err(control(
                &id,
                "qemu-img create",
                String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            ));
        }
        let accel = self.resolve_accel(spec.accel);
        let owner = Owner {
            pid: stamp.pid,
            start_time: stamp.start_time,
        };
        loop {
            let hard = self.hard_memory_limit.load(Ordering::Relaxed);
            let xml = domain_xml::domain_xml(&DomainParams {
                name: &name,
                spec,
                accel,
                host_tsc_khz: self.host_tsc_khz,
                owner,
                dir: &machine.paths.dir,
                serial_log: &machine.paths.serial_log,
                ctl_socket: &machine.paths.ctl_socket,
                state_disk: &machine.paths.state_disk,
                hard_memory_limit: hard,
            })
            .map_err(|e| control(&id, "building the domain XML", e.to_string()))?;
            tracing::debug!(vm = %id, %xml, "defining libvirt domain");
            let defined = self
                .conn
                .with(move |c| c.define_domain_xml(&xml).map(drop))
                .await?;
            defined.map_err(|e| control(&id, "virDomainDefineXML", e.to_string()))?;
            machine.defined = true;
            let n = name.clone();
            let started_dom = self
                .conn
                .with(move |c| c.lookup_domain_by_name(&n)?.create().map(drop))
                .await?;
            match started_dom {
                Ok(()) => break,
                Err(e) if hard && e.message().contains("cannot limit locked memory") => {
                    tracing::warn!(vm = %id, error = %e, "libvirt cannot apply a memory hard_limit here (no CAP_SYS_RESOURCE): using soft_limit");
                    self.hard_memory_limit.store(false, Ordering::Relaxed);
                    let n = name.clone();
                    self.conn
                        .with(move |c| destroy_domain_blocking(c, &n))
                        .await?
                        .map_err(|e| control(&id, "virDomainUndefine", e.to_string()))?;
                    machine.defined = false;
                }
                Err(e) => return Err(control(&id, "virDomainCreate", e.to_string())),
            }
        }
        tracing::info!(vm = %id, domain = %name, %accel, uri = %self.conn.uri(), elapsed = ?started.elapsed(), "libvirt VM launched");
        Ok(machine)
    }
}

#[async_trait]
impl Backend for LibvirtBackend {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Machine>, BackendError> {
        Ok(Box::new(self.launch_libvirt(spec).await?))
    }
}

/// A snapshot's libvirt metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// The domain state it captured (`running`, `paused`, ...).
    pub state: String,
}

impl SnapshotInfo {
    /// From a `virDomainSnapshotGetXMLDesc` document.
    pub fn from_xml(xml: &str) -> Self {
        let text = |tag| domain_xml::element_text(xml, tag).unwrap_or_default();
        Self {
            name: text("name"),
            description: text("description"),
            created: text("creationTime").trim().parse().unwrap_or(0),
            state: text("state"),
        }
    }
}

/// One libvirt domain and its files. Dropping it destroys and undefines the
/// domain (blocking) and removes its directory.
#[derive(Debug)]
pub struct LibvirtMachine {
    id: String,
    name: String,
    conn: Arc<Connection>,
    paths: VmPaths,
    revert_path: RevertPath,
    timeouts: LibvirtTimeouts,
    defined: bool,
    destroyed: bool,
    dead: Option<String>,
    final_tail: Option<String>,
}

impl LibvirtMachine {
    /// The libvirt domain name.
    pub fn domain_name(&self) -> &str {
        &self.name
    }

    /// The VM directory.
    pub fn dir(&self) -> &Path {
        &self.paths.dir
    }

    /// Runs `f` on this machine's domain.
    async fn on_domain<T, F>(&self, operation: &str, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: Fn(&Domain) -> Result<T, VirtError> + Send + 'static,
    {
        let name = self.name.clone();
        let result = self
            .conn
            .with(move |c: &Connect| f(&c.lookup_domain_by_name(&name)?))
            .await?;
        result.map_err(|e| {
            if is_no_domain(&e) || is_not_running(&e) {
                self.crashed(format!("{operation}: {}", e.message()))
            } else {
                control(&self.id, operation, e.to_string())
            }
        })
    }

    fn crashed(&self, reason: String) -> BackendError {
        let (min, max) = CRASH_TAIL_LINES;
        BackendError::Crashed {
            vm: self.id.clone(),
            reason,
            serial_tail: rundir::crash_excerpt(&self.serial_tail(max), min, max),
        }
    }

    fn mark_dead(&mut self, reason: String) -> BackendError {
        tracing::warn!(vm = %self.id, %reason, "VM is dead");
        self.dead = Some(reason.clone());
        self.crashed(reason)
    }

    /// The domain's state and why (`virDomainGetState`).
    async fn domain_state(
        &self,
    ) -> Result<Result<(DomainStateEnum, DomainStateReasonEnum), VirtError>, BackendError> {
        let name = self.name.clone();
        self.conn
            .with(move |c| c.lookup_domain_by_name(&name)?.state())
            .await
    }

    fn known_dead(&self) -> Option<BackendError> {
        if self.destroyed {
            return Some(self.crashed("the VM was destroyed".into()));
        }
        self.dead.as_ref().map(|r| self.crashed(r.clone()))
    }

    /// Creates an internal snapshot (memory + disk) with libvirt metadata.
    pub async fn create_snapshot(
        &mut self,
        name: &str,
        description: &str,
    ) -> Result<SnapshotInfo, BackendError> {
        if let Some(e) = self.known_dead() {
            return Err(e);
        }
        let xml = domain_xml::snapshot_xml(name, description);
        let started = Instant::now();
        let desc = self
            .on_domain("virDomainSnapshotCreateXML", move |d| {
                d.create_snapshot_xml(&xml, 0)?.xml_desc(0)
            })
            .await?;
        tracing::debug!(vm = %self.id, snapshot = name, elapsed = ?started.elapsed(), "snapshot created");
        Ok(SnapshotInfo::from_xml(&desc))
    }

    /// The domain's snapshots with their metadata.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, BackendError> {
        let xmls = self
            .on_domain("virDomainListAllSnapshots", |d| {
                d.list_all_snapshots(0)?
                    .iter()
                    .map(|s| s.xml_desc(0))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let mut list: Vec<SnapshotInfo> = xmls.iter().map(|x| SnapshotInfo::from_xml(x)).collect();
        list.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        Ok(list)
    }

    /// Reverts to a snapshot by the given path.
    pub async fn revert_to_snapshot(
        &mut self,
        name: &str,
        path: RevertPath,
    ) -> Result<RevertOutcome, BackendError> {
        if let Some(e) = self.known_dead() {
            return Err(e);
        }
        let started = Instant::now();
        let n = name.to_owned();
        let outcome = match path {
            RevertPath::Loadvm => {
                let reply = self
                    .on_domain("HMP loadvm", move |d| {
                        d.qemu_monitor_command(
                            &format!("loadvm {n}"),
                            virt::sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
                        )
                    })
                    .await?;
                if hmp_reply_is_error(&reply) {
                    tracing::warn!(vm = %self.id, reply = %reply.trim(), "loadvm failed: reverting through the libvirt API");
                    return Box::pin(self.revert_to_snapshot(name, RevertPath::SnapshotApi)).await;
                }
                RevertOutcome::ChannelKept
            }
            RevertPath::SnapshotApi => {
                let disconnects_before = self.guest_disconnects();
                self.on_domain("virDomainRevertToSnapshot", move |d| {
                    Domain::lookup_snapshot_by_name(d, &n, 0)?.revert(0)
                })
                .await?;
                self.wait_for_guest_hangup(disconnects_before).await;
                RevertOutcome::ChannelReset
            }
        };
        tracing::debug!(vm = %self.id, snapshot = name, ?path, elapsed = ?started.elapsed(), "reverted");
        Ok(outcome)
    }

    /// How often the guest agent logged that the host went away.
    fn guest_disconnects(&self) -> usize {
        std::fs::read_to_string(&self.paths.serial_log)
            .map(|log| log.matches(GUEST_DISCONNECTED).count())
            .unwrap_or(0)
    }

    /// After `virDomainRevertToSnapshot` the guest runs from the snapshot
    /// instant, still holding the port it had open when the host was
    /// connected; it sees the hang-up, closes and re-opens the port. Bytes
    /// the host sends before that close are lost with the old descriptor
    /// (measured: the resync Ping of every second revert went unanswered),
    /// so wait until the guest reported the hang-up (bounded: a guest that
    /// never says so is left to the caller's resync timeout).
    async fn wait_for_guest_hangup(&self, before: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.guest_disconnects() <= before {
            if Instant::now() >= deadline {
                tracing::debug!(vm = %self.id, "guest did not report the hang-up after the revert");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The guest closes the old descriptor right after logging.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    /// The pid of the domain's QEMU (from libvirt's pid file).
    fn qemu_pid(&self) -> Option<u32> {
        let uri = self.conn.uri();
        let dir = if uri.contains("/session") {
            return None;
        } else {
            "/run/libvirt/qemu"
        };
        std::fs::read_to_string(format!("{dir}/{}.pid", self.name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn remove_files(&mut self) -> Result<(), BackendError> {
        if !self.paths.dir.exists() {
            return Ok(());
        }
        self.final_tail = Some(rundir::last_lines(
            &rundir::read_file_tail(&self.paths.serial_log, TAIL_BYTES),
            KEPT_TAIL_LINES,
        ));
        std::fs::remove_dir_all(&self.paths.dir).map_err(|source| BackendError::Io {
            context: format!("removing {}", self.paths.dir.display()),
            source,
        })
    }
}

/// Whether an HMP reply reports a failure (success replies are empty).
pub fn hmp_reply_is_error(reply: &str) -> bool {
    let r = reply.trim();
    !r.is_empty() && (r.contains("Error") || r.contains("error") || r.contains("not found"))
}

/// Destroys (if running) and undefines a domain with its snapshot metadata.
fn destroy_domain_blocking(c: &Connect, name: &str) -> Result<(), VirtError> {
    let d = match c.lookup_domain_by_name(name) {
        Ok(d) => d,
        Err(e) if is_no_domain(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    match d.destroy() {
        Ok(()) => {}
        Err(e) if is_not_running(&e) || is_no_domain(&e) => {}
        Err(e) => return Err(e),
    }
    match d.undefine_flags(
        virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM,
    ) {
        Ok(()) => Ok(()),
        Err(e) if is_no_domain(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Destroys domains titled/prefixed `agentvm` whose owner process is gone and
/// removes their directories (only below `root`).
fn sweep_blocking(conn: &Arc<Connection>, root: &Path) -> Result<Vec<String>, BackendError> {
    let root = root.to_path_buf();
    let swept = conn.with_blocking(move |c| {
        let mut swept = Vec::new();
        for d in c.list_all_domains(0)? {
            let Ok(name) = d.name() else { continue };
            if !name.starts_with(DOMAIN_PREFIX) {
                continue;
            }
            // The persistent definition (the live one carries the same metadata).
            let Ok(xml) = d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE) else {
                continue;
            };
            let Some(owner) = domain_xml::parse_owner(&xml) else {
                continue;
            };
            let stamp = ProcessStamp {
                pid: owner.pid,
                start_time: owner.start_time,
            };
            if stamp.is_alive() {
                continue;
            }
            if let Err(e) = destroy_domain_blocking(c, &name) {
                tracing::warn!(domain = %name, error = %e, "could not remove leftover domain");
                continue;
            }
            if let Some(dir) = domain_xml::parse_dir(&xml).map(PathBuf::from) {
                let id = &name[DOMAIN_PREFIX.len()..];
                if dir.starts_with(&root) && dir.file_name().is_some_and(|f| f == id) {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
            swept.push(name);
        }
        Ok(swept)
    })?;
    swept.map_err(|e| control("-", "sweeping leftover domains", e.to_string()))
}

#[async_trait]
impl Machine for LibvirtMachine {
    fn id(&self) -> &str {
        &self.id
    }

    fn host_pid(&self) -> Option<u32> {
        self.qemu_pid()
    }

    async fn connect_channel(&mut self) -> Result<BoxedChannel, BackendError> {
        let deadline = Instant::now() + self.timeouts.channel_connect;
        let mut last_check = Instant::now();
        loop {
            if let Some(e) = self.known_dead() {
                return Err(e);
            }
            match UnixStream::connect(&self.paths.ctl_socket).await {
                Ok(stream) => return Ok(Box::pin(stream)),
                Err(e) if is_not_ready(&e) && Instant::now() < deadline => {
                    if last_check.elapsed() > Duration::from_millis(500) {
                        self.check_alive().await?;
                        last_check = Instant::now();
                    }
                    tokio::time::sleep(RETRY).await
                }
                Err(e) if is_not_ready(&e) => {
                    self.check_alive().await?;
                    return Err(BackendError::Timeout {
                        vm: self.id.clone(),
                        operation: "connecting the control channel".into(),
                        after: self.timeouts.channel_connect,
                    });
                }
                Err(source) => {
                    return Err(BackendError::Io {
                        context: format!("connecting to {}", self.paths.ctl_socket.display()),
                        source,
                    })
                }
            }
        }
    }

    async fn snapshot_golden(&mut self) -> Result<(), BackendError> {
        self.create_snapshot(
            GOLDEN_SNAPSHOT,
            "agentvm golden state: booted, guest agent said Hello",
        )
        .await
        .map(drop)
    }

    async fn revert_golden(&mut self) -> Result<RevertOutcome, BackendError> {
        self.revert_to_snapshot(GOLDEN_SNAPSHOT, self.revert_path)
            .await
    }

    async fn save_snapshot(&mut self, name: &str) -> Result<(), BackendError> {
        // libvirt refuses a second snapshot of one name: replace it.
        if self.snapshot_names().await?.iter().any(|n| n == name) {
            self.delete_snapshot(name).await?;
        }
        self.create_snapshot(name, "agentvm snapshot taken by a test")
            .await
            .map(drop)
    }

    async fn load_snapshot(&mut self, name: &str) -> Result<RevertOutcome, BackendError> {
        if !self.snapshot_names().await?.iter().any(|n| n == name) {
            return Err(control(
                &self.id,
                "revert",
                format!("no snapshot named {name:?}"),
            ));
        }
        self.revert_to_snapshot(name, self.revert_path).await
    }

    /// Deletes a snapshot (its state in the qcow2 and its metadata).
    async fn delete_snapshot(&mut self, name: &str) -> Result<(), BackendError> {
        let n = name.to_owned();
        self.on_domain("virDomainSnapshotDelete", move |d| {
            Domain::lookup_snapshot_by_name(d, &n, 0)?.delete(0)
        })
        .await
    }

    async fn snapshot_names(&mut self) -> Result<Vec<String>, BackendError> {
        Ok(self
            .list_snapshots()
            .await?
            .into_iter()
            .map(|s| s.name)
            .collect())
    }

    async fn state(&mut self) -> Result<MachineState, BackendError> {
        if self.destroyed {
            return Ok(MachineState::ShutOff);
        }
        Ok(match self.domain_state().await? {
            Ok((Enum::Known(DomainState::Running | DomainState::Blocked), _)) => {
                MachineState::Running
            }
            Ok((Enum::Known(DomainState::Shutoff | DomainState::Shutdown), _)) => {
                MachineState::ShutOff
            }
            Ok((Enum::Known(DomainState::Crashed), _)) => MachineState::Crashed,
            Ok(_) => MachineState::Paused,
            Err(e) if is_no_domain(&e) => MachineState::ShutOff,
            Err(e) => return Err(control(&self.id, "virDomainGetState", e.to_string())),
        })
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        if let Some(e) = self.known_dead() {
            return Err(e);
        }
        self.on_domain("virDomainSuspend", |d| d.suspend()).await
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        if let Some(e) = self.known_dead() {
            return Err(e);
        }
        self.on_domain("virDomainResume", |d| d.resume()).await
    }

    async fn check_alive(&mut self) -> Result<(), BackendError> {
        if let Some(e) = self.known_dead() {
            return Err(e);
        }
        let reason = match self.domain_state().await? {
            Ok((
                Enum::Known(DomainState::Running | DomainState::Blocked | DomainState::Paused),
                _,
            )) => return Ok(()),
            Ok((state, why)) => format!("domain state {state:?} ({why:?})"),
            Err(e) if is_no_domain(&e) => "the domain no longer exists".to_owned(),
            Err(e) => return Err(control(&self.id, "virDomainGetState", e.to_string())),
        };
        let mut reason = reason;
        if let Some(hint) = rundir::guest_end_hint(&self.serial_tail(KEPT_TAIL_LINES)) {
            reason = format!("{hint}; {reason}");
        }
        Err(self.mark_dead(reason))
    }

    async fn wait_stopped(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.domain_state().await? {
                Ok((Enum::Known(DomainState::Shutoff | DomainState::Crashed), _)) => {
                    return Ok(true)
                }
                Err(e) if is_no_domain(&e) => return Ok(true),
                Err(e) => return Err(control(&self.id, "virDomainGetState", e.to_string())),
                Ok(_) if Instant::now() >= deadline => return Ok(false),
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn destroy(&mut self) -> Result<(), BackendError> {
        if self.destroyed {
            return Ok(());
        }
        let name = self.name.clone();
        let result = if self.defined {
            match self
                .conn
                .with(move |c| destroy_domain_blocking(c, &name))
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(control(&self.id, "destroying the domain", e.to_string())),
                Err(e) => Err(e),
            }
        } else {
            Ok(())
        };
        let removed = self.remove_files();
        self.destroyed = true;
        tracing::debug!(vm = %self.id, "libvirt VM destroyed");
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
            None
        } else {
            Some(self.paths.serial_log.clone())
        }
    }
}

impl Drop for LibvirtMachine {
    fn drop(&mut self) {
        if self.destroyed {
            return;
        }
        if self.defined {
            let name = self.name.clone();
            let conn = Arc::clone(&self.conn);
            // Blocking (a few ms); a thread so that a runtime worker is not blocked.
            let joined = std::thread::spawn(move || {
                conn.with_blocking(|c| destroy_domain_blocking(c, &name))
            })
            .join();
            if !matches!(joined, Ok(Ok(Ok(())))) {
                tracing::warn!(vm = %self.id, "destroying the domain on drop failed");
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revert_path_from_env() {
        for (value, path) in [
            (None, Some(RevertPath::Loadvm)),
            (Some(""), Some(RevertPath::Loadvm)),
            (Some("loadvm"), Some(RevertPath::Loadvm)),
            (Some(" snapshot "), Some(RevertPath::SnapshotApi)),
            (Some("api"), Some(RevertPath::SnapshotApi)),
            (Some("snapshots"), None),
        ] {
            assert_eq!(RevertPath::from_env_value(value), path, "{value:?}");
        }
    }

    #[test]
    fn missing_network_objects_name_what_is_missing_and_the_fix() {
        assert_eq!(missing_network_objects(true, true, "qemu:///system"), None);
        let fix =
            ": run `agentvm setup-network` (`cargo xtask setup-network` in the agentvm repository)";
        for (net, filter, what) in [
            (false, true, "network \"agentvm-nat\" is not defined at qemu:///system"),
            (true, false, "nwfilter \"agentvm-egress\" is not defined at qemu:///system"),
            (
                false,
                false,
                "network \"agentvm-nat\" and nwfilter \"agentvm-egress\" are not defined at qemu:///system",
            ),
        ] {
            assert_eq!(
                missing_network_objects(net, filter, "qemu:///system"),
                Some(format!("libvirt {what}{fix}"))
            );
        }
    }

    #[test]
    fn hmp_errors() {
        assert!(!hmp_reply_is_error(""));
        assert!(!hmp_reply_is_error("\r\n"));
        assert!(hmp_reply_is_error(
            "Error: Snapshot 'golden' does not exist in one or more devices\r\n"
        ));
    }

    #[test]
    fn snapshot_info_from_libvirt_xml() {
        let xml = "<domainsnapshot>\n  <name>golden</name>\n  <description>after boot</description>\n  <state>running</state>\n  <creationTime>1764178123</creationTime>\n  <memory snapshot='internal'/>\n  <domain type='qemu'><name>agentvm-1-0</name></domain>\n</domainsnapshot>";
        assert_eq!(
            SnapshotInfo::from_xml(xml),
            SnapshotInfo {
                name: "golden".into(),
                description: "after boot".into(),
                created: 1_764_178_123,
                state: "running".into(),
            }
        );
    }
}
