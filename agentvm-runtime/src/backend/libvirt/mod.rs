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
//! # Several hosts
//!
//! [`LibvirtConfig::hosts`] (`[libvirt] hosts` in the configuration file,
//! `AGENT_VM_LIBVIRT_HOSTS`) lists connection URIs; each new VM goes to the
//! reachable host with the fewest running `agentvm-*` domains per CPU that
//! has the memory for it ([`placement::place`]). A host whose URI has no
//! transport, host name or query (`qemu:///system`) shares this machine's
//! files and is used as above. Every other host is *remote*
//! ([`placement::is_local_uri`]): the image files are uploaded into a
//! storage pool of agentvm's own there, once per content hash
//! ([`upload`]); the state disk is a volume of that pool; the serial console
//! and the control channel are libvirt streams bridged to the same local
//! files and sockets a local VM has ([`remote_io`]); `accel = "auto"` means
//! TCG there (this machine cannot probe the remote CPU; set `accel = "kvm"`
//! where KVM works).
//!
//! A host that stops answering (its daemon or the machine is gone) loses
//! its VMs: every operation on one fails with [`BackendError::HostLost`]
//! naming the host, the pool replaces the VM, and new VMs go to the other
//! hosts. A lost host is tried again by the placement of a VM launched
//! [`LibvirtTimeouts::host_retry`] (30 s) or more after it was lost, and
//! rejoins if it answers.
//!
//! # Leftovers
//!
//! Every domain is named `agentvm-<pid>-<n>`, titled `agentvm`, and carries
//! its owner's pid + start time and its directory in `<metadata>`.
//! [`LibvirtBackend::new`] sweeps domains whose owner is gone (destroy,
//! undefine with snapshot metadata, remove the directory).

pub mod connection;
pub mod domain_xml;
pub mod placement;
pub mod remote_io;
pub mod upload;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::net::UnixStream;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState, DomainStateEnum, DomainStateReasonEnum};
use virt::enumutil::Enum;
use virt::error::Error as VirtError;

use self::connection::{is_connection_error, is_no_domain, is_not_running, Connection};
use self::domain_xml::{DomainParams, Owner, DOMAIN_PREFIX, EGRESS_FILTER, NAT_NETWORK};
use self::placement::HostLoad;
use self::remote_io::{ChannelProxy, ConsolePump};
use super::qemu::accel::{self, AccelDecision, ResolvedAccel};
use super::qemu::rundir::{self, ProcessStamp, VmPaths};
use super::qemu::{create_state_disk, find_program};
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
    /// How long a host that went away is skipped before a launch tries it again.
    pub host_retry: Duration,
}

impl Default for LibvirtTimeouts {
    fn default() -> Self {
        Self {
            channel_connect: Duration::from_secs(10),
            host_retry: Duration::from_secs(30),
        }
    }
}

/// Configuration of [`LibvirtBackend`].
#[derive(Debug, Clone, Default)]
pub struct LibvirtConfig {
    /// Connection URI (default: `LIBVIRT_DEFAULT_URI`, else `qemu:///system`),
    /// used when [`LibvirtConfig::hosts`] is empty.
    pub uri: Option<String>,
    /// Connection URIs of several hosts to spread the VMs over (see the
    /// module docs); empty: the one host of [`LibvirtConfig::uri`].
    pub hosts: Vec<String>,
    /// Directory of agentvm's storage pool on remote hosts (default
    /// [`upload::DEFAULT_POOL_DIR`]).
    pub pool_dir: Option<String>,
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

/// One libvirt host of the backend.
#[derive(Debug)]
struct Host {
    uri: String,
    conn: Arc<Connection>,
    /// Shares this machine's files ([`placement::is_local_uri`]).
    local: bool,
    /// When it was last found unreachable (`None`: it answers).
    lost_at: Mutex<Option<Instant>>,
    /// VMs this process is placing there and has not defined yet.
    placing: AtomicU32,
    /// Remote paths of image files already uploaded there (local path → volume path).
    images: Mutex<HashMap<PathBuf, String>>,
    /// One upload at a time to this host from this process.
    upload_lock: tokio::sync::Mutex<()>,
}

impl Host {
    fn new(uri: String, conn: Arc<Connection>) -> Self {
        Self {
            local: placement::is_local_uri(&uri),
            uri,
            conn,
            lost_at: Mutex::new(None),
            placing: AtomicU32::new(0),
            images: Mutex::new(HashMap::new()),
            upload_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn mark_lost(&self, reason: &str) {
        let mut lost = self.lost_at.lock().expect("host state");
        if lost.is_none() {
            tracing::warn!(host = %self.uri, %reason, "libvirt host went away: new VMs go to the other hosts");
            eprintln!(
                "agentvm: libvirt host {} went away ({reason}); new VMs go to the other hosts",
                self.uri
            );
        }
        *lost = Some(Instant::now());
    }

    fn mark_found(&self) {
        let mut lost = self.lost_at.lock().expect("host state");
        if lost.take().is_some() {
            tracing::info!(host = %self.uri, "libvirt host answers again");
        }
    }

    /// Whether placement should skip it (lost less than `retry` ago).
    fn skipped(&self, retry: Duration) -> bool {
        self.lost_at
            .lock()
            .expect("host state")
            .is_some_and(|at| !placement::due_for_retry(at.elapsed(), retry))
    }

    /// Its load for [`placement::place`] (blocking); `Err` (why) when it does not answer.
    fn load(&self) -> Result<HostLoad, String> {
        let found = self
            .conn
            .with_blocking(|c| {
                let info = c.node_info()?;
                let free = c.free_memory()?;
                let running = c
                    .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)?
                    .iter()
                    .filter(|d| d.name().is_ok_and(|n| n.starts_with(DOMAIN_PREFIX)))
                    .count();
                Ok((info.cpus, free, running))
            })
            .map_err(|e| e.to_string())?
            .map_err(|e| e.message().to_owned())?;
        let (cpus, free_bytes, running) = found;
        Ok(HostLoad {
            reachable: true,
            running: running as u32 + self.placing.load(Ordering::SeqCst),
            cpus,
            free_mib: free_bytes / (1024 * 1024),
        })
    }
}

/// Decrements [`Host::placing`] when the launch is over, however it ends.
struct Placing(Arc<Host>);

impl Drop for Placing {
    fn drop(&mut self) {
        self.0.placing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The libvirt backend.
#[derive(Debug)]
pub struct LibvirtBackend {
    hosts: Vec<Arc<Host>>,
    /// Serialises placements, so that concurrent launches see each other.
    placement_lock: Arc<Mutex<()>>,
    pool_dir: String,
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
            hosts: config.libvirt_hosts.clone(),
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
    /// Connects (blocking, a few ms per host), prepares the runtime
    /// directory and sweeps leftover domains of dead owners. With several
    /// hosts, one that does not answer is left out until it does (see the
    /// module docs); if none answers, the first one's error is returned.
    pub fn new(config: LibvirtConfig) -> Result<Self, BackendError> {
        let uris = if config.hosts.is_empty() {
            let env = std::env::var(connection::URI_ENV).ok();
            vec![connection::resolve_uri(
                config.uri.as_deref(),
                env.as_deref(),
            )]
        } else {
            config.hosts.clone()
        };
        let mut hosts = Vec::new();
        let mut first_error = None;
        for uri in uris {
            match Connection::open(&uri) {
                Ok(conn) => hosts.push(Arc::new(Host::new(uri, conn))),
                Err(e) => {
                    let host = Host::new(uri.clone(), Connection::unopened(&uri));
                    host.mark_lost(&e.to_string());
                    hosts.push(Arc::new(host));
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            if hosts.iter().all(|h| h.skipped(Duration::MAX)) {
                return Err(e);
            }
        }
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
        for host in hosts.iter().filter(|h| !h.skipped(Duration::MAX)) {
            match sweep_blocking(&host.conn, &root, !host.local) {
                Ok(swept) if !swept.is_empty() => {
                    tracing::info!(host = %host.uri, domains = ?swept, "swept leftover libvirt domains")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(host = %host.uri, error = %e, "sweeping leftover libvirt domains failed")
                }
            }
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
            hosts,
            placement_lock: Arc::new(Mutex::new(())),
            pool_dir: config
                .pool_dir
                .unwrap_or_else(|| upload::DEFAULT_POOL_DIR.to_owned()),
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

    /// The connection URI (of the first host).
    pub fn uri(&self) -> &str {
        &self.hosts[0].uri
    }

    /// The connection URIs of every host, in the configured order.
    pub fn host_uris(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.uri.clone()).collect()
    }

    /// The URIs of the hosts currently left out because they went away.
    pub fn lost_hosts(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|h| h.lost_at.lock().expect("host state").is_some())
            .map(|h| h.uri.clone())
            .collect()
    }

    /// The accelerator used for `Accel::Auto`, and why.
    pub fn auto_accel(&self) -> &AccelDecision {
        &self.auto_accel
    }

    /// The revert path machines use.
    pub fn revert_path(&self) -> RevertPath {
        self.revert_path
    }

    /// Destroys domains of dead owners on every reachable host; returns their names.
    pub async fn sweep(&self) -> Result<Vec<String>, BackendError> {
        let hosts: Vec<Arc<Host>> = self.hosts.clone();
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut swept = Vec::new();
            for host in hosts.iter().filter(|h| !h.skipped(Duration::MAX)) {
                swept.extend(sweep_blocking(&host.conn, &root, !host.local)?);
            }
            Ok(swept)
        })
        .await
        .map_err(|e| BackendError::Io {
            context: "sweep".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    /// Picks the host for a VM of `memory_mib` and counts the VM as being
    /// placed there (see [`placement::place`]).
    async fn place(&self, memory_mib: u64) -> Result<Placing, BackendError> {
        let hosts = self.hosts.clone();
        let lock = Arc::clone(&self.placement_lock);
        let retry = self.timeouts.host_retry;
        tokio::task::spawn_blocking(move || {
            let _guard = lock.lock().expect("placement lock");
            let mut why = Vec::new();
            let loads: Vec<HostLoad> = hosts
                .iter()
                .map(|h| {
                    let unreachable = HostLoad {
                        reachable: false,
                        running: 0,
                        cpus: 0,
                        free_mib: 0,
                    };
                    if h.skipped(retry) {
                        why.push(format!("{}: went away, not retried yet", h.uri));
                        return unreachable;
                    }
                    match h.load() {
                        Ok(load) => {
                            h.mark_found();
                            load
                        }
                        Err(reason) => {
                            h.mark_lost(&reason);
                            why.push(format!("{}: {reason}", h.uri));
                            unreachable
                        }
                    }
                })
                .collect();
            match placement::place(&loads, memory_mib) {
                Some(i) => {
                    tracing::debug!(host = %hosts[i].uri, ?loads, "placed VM");
                    hosts[i].placing.fetch_add(1, Ordering::SeqCst);
                    Ok(Placing(Arc::clone(&hosts[i])))
                }
                None => {
                    for (h, l) in hosts.iter().zip(&loads) {
                        if l.reachable {
                            why.push(format!(
                                "{}: {} MiB free, {} MiB + {} MiB reserve needed",
                                h.uri,
                                l.free_mib,
                                memory_mib,
                                placement::MEMORY_RESERVE_MIB
                            ));
                        }
                    }
                    Err(BackendError::NoHost {
                        details: why.join("; "),
                    })
                }
            }
        })
        .await
        .map_err(|e| BackendError::Io {
            context: "placing a VM".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    /// The remote paths of `spec`'s image files on `host`, uploading what
    /// it lacks.
    async fn remote_image(
        &self,
        host: &Arc<Host>,
        image: &crate::spec::ImagePaths,
    ) -> Result<crate::spec::ImagePaths, BackendError> {
        let _one_at_a_time = host.upload_lock.lock().await;
        let mut files: Vec<(&'static str, PathBuf)> = vec![
            ("kernel", image.kernel.clone()),
            ("initramfs", image.initramfs.clone()),
        ];
        if let Some(rootfs) = &image.rootfs {
            files.push(("rootfs", rootfs.clone()));
        }
        let known = host.images.lock().expect("image cache").clone();
        let missing: Vec<_> = files
            .iter()
            .filter(|(_, p)| !known.contains_key(p))
            .cloned()
            .collect();
        if !missing.is_empty() {
            let (h, dir, lock_dir) = (
                Arc::clone(host),
                self.pool_dir.clone(),
                self.root.join("uploads"),
            );
            let uploaded = tokio::task::spawn_blocking(move || {
                let found = h.conn.with_blocking(|c| Ok(c.clone()))?;
                let c = found.map_err(|e| upload_error(&h.uri, &e))?;
                let pool = upload::ensure_pool(&c, &h.uri, &dir)?;
                let mut done = Vec::new();
                for (kind, path) in missing {
                    let remote = upload::ensure_file(&pool, &c, &h.uri, &path, kind, &lock_dir)?;
                    done.push((path, remote));
                }
                Ok::<_, BackendError>(done)
            })
            .await
            .map_err(|e| BackendError::Io {
                context: "uploading the image".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
            host.images.lock().expect("image cache").extend(uploaded);
        }
        let known = host.images.lock().expect("image cache");
        let remote = |p: &PathBuf| PathBuf::from(&known[p]);
        Ok(crate::spec::ImagePaths {
            kernel: remote(&image.kernel),
            initramfs: remote(&image.initramfs),
            rootfs: image.rootfs.as_ref().map(remote),
            ..image.clone()
        })
    }

    fn resolve_accel(&self, requested: Accel) -> ResolvedAccel {
        match requested {
            Accel::Kvm => ResolvedAccel::Kvm,
            Accel::Tcg => ResolvedAccel::Tcg,
            Accel::Auto => self.auto_accel.accel,
        }
    }

    async fn check_network(
        &self,
        host: &Host,
        id: &str,
        network: &NetworkMode,
    ) -> Result<(), BackendError> {
        if *network != NetworkMode::NatFiltered {
            return Ok(());
        }
        let found = host
            .conn
            .with(|c| {
                let net = c.lookup_network_by_name(NAT_NETWORK).is_ok();
                let filter = c.lookup_nwfilter_by_name(EGRESS_FILTER).is_ok();
                Ok((net, filter))
            })
            .await?
            .map_err(|e| control(id, "looking up the network", e.to_string()))?;
        match missing_network_objects(found.0, found.1, &host.uri) {
            None => Ok(()),
            Some(message) => Err(control(id, "network nat-filtered", message)),
        }
    }

    /// Like [`Backend::launch`], returning the concrete machine type.
    pub async fn launch_libvirt(&self, spec: &VmSpec) -> Result<LibvirtMachine, BackendError> {
        for path in spec.image.files() {
            if !path.is_file() {
                return Err(BackendError::MissingImage {
                    name: spec.image.name.clone(),
                    path: path.to_path_buf(),
                });
            }
        }
        let counter = VM_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{counter}", std::process::id());
        let name = format!("{DOMAIN_PREFIX}{id}");
        let placing = self.place(u64::from(spec.profile.memory_mib())).await?;
        let host = Arc::clone(&placing.0);
        self.check_network(&host, &id, &spec.network).await?;
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
            conn: Arc::clone(&host.conn),
            host: Arc::clone(&host),
            paths,
            revert_path: self.revert_path,
            timeouts: self.timeouts,
            defined: false,
            destroyed: false,
            dead: None,
            lost: None,
            final_tail: None,
            remote: None,
        };
        let started = Instant::now();
        // What the domain XML points at: this machine's files for a local
        // host; volumes of agentvm's pool (uploaded when missing) for a remote one.
        let (remote_spec, state_disk) = if host.local {
            create_state_disk(
                &self.qemu_img,
                &machine.paths.state_disk,
                self.state_disk_mib,
                &id,
            )
            .await?;
            (None, machine.paths.state_disk.clone())
        } else {
            let image = self
                .remote_image(&host, &spec.image)
                .await
                .map_err(|e| machine.host_error(e))?;
            let (h, dir, vol, mib) = (
                Arc::clone(&host),
                self.pool_dir.clone(),
                upload::state_volume_name(&name),
                u64::from(self.state_disk_mib),
            );
            let state = tokio::task::spawn_blocking(move || {
                let found = h.conn.with_blocking(|c| Ok(c.clone()))?;
                let c = found.map_err(|e| upload_error(&h.uri, &e))?;
                let pool = upload::ensure_pool(&c, &h.uri, &dir)?;
                upload::create_state_volume(&pool, &h.uri, &vol, mib)
            })
            .await
            .map_err(|e| control(&id, "creating the state disk", e.to_string()))?
            .map_err(|e| machine.host_error(e))?;
            machine.remote = Some(RemoteParts {
                state_volume: upload::state_volume_name(&name),
                console: None,
                channel: None,
            });
            let mut remote_spec = spec.clone();
            remote_spec.image = image;
            (Some(remote_spec), PathBuf::from(state))
        };
        let run_spec = remote_spec.as_ref().unwrap_or(spec);
        let accel = if host.local {
            self.resolve_accel(spec.accel)
        } else {
            // This machine's probe says nothing about a remote host's CPU.
            match spec.accel {
                Accel::Kvm => ResolvedAccel::Kvm,
                Accel::Tcg | Accel::Auto => ResolvedAccel::Tcg,
            }
        };
        let owner = Owner {
            pid: stamp.pid,
            start_time: stamp.start_time,
        };
        loop {
            let hard = self.hard_memory_limit.load(Ordering::Relaxed);
            let xml = domain_xml::domain_xml(&DomainParams {
                name: &name,
                spec: run_spec,
                accel,
                host_tsc_khz: if host.local { self.host_tsc_khz } else { None },
                owner,
                machine: &domain_xml::this_machine(),
                dir: &machine.paths.dir,
                serial_log: host.local.then_some(machine.paths.serial_log.as_path()),
                ctl_socket: host.local.then_some(machine.paths.ctl_socket.as_path()),
                state_disk: &state_disk,
                hard_memory_limit: hard,
            })
            .map_err(|e| control(&id, "building the domain XML", e.to_string()))?;
            tracing::debug!(vm = %id, %xml, "defining libvirt domain");
            let defined = host
                .conn
                .with(move |c| c.define_domain_xml(&xml).map(drop))
                .await
                .map_err(|e| machine.host_error(e))?;
            defined.map_err(|e| control(&id, "virDomainDefineXML", e.to_string()))?;
            machine.defined = true;
            let n = name.clone();
            // A remote VM starts paused until its console is attached, so
            // that the serial log has the whole boot.
            let flags = if host.local {
                0
            } else {
                virt::sys::VIR_DOMAIN_START_PAUSED
            };
            let started_dom = host
                .conn
                .with(move |c| {
                    c.lookup_domain_by_name(&n)?
                        .create_with_flags(flags)
                        .map(drop)
                })
                .await
                .map_err(|e| machine.host_error(e))?;
            match started_dom {
                Ok(()) => break,
                Err(e) if hard && e.message().contains("cannot limit locked memory") => {
                    tracing::warn!(vm = %id, error = %e, "libvirt cannot apply a memory hard_limit here (no CAP_SYS_RESOURCE): using soft_limit");
                    self.hard_memory_limit.store(false, Ordering::Relaxed);
                    let n = name.clone();
                    host.conn
                        .with(move |c| destroy_domain_blocking(c, &n))
                        .await?
                        .map_err(|e| control(&id, "virDomainUndefine", e.to_string()))?;
                    machine.defined = false;
                }
                Err(e) => return Err(control(&id, "virDomainCreate", e.to_string())),
            }
        }
        drop(placing);
        if !host.local {
            let (uri, n, log, socket) = (
                host.uri.clone(),
                name.clone(),
                machine.paths.serial_log.clone(),
                machine.paths.ctl_socket.clone(),
            );
            let (console, channel) = tokio::task::spawn_blocking(move || {
                let console = ConsolePump::start(&uri, &n, &log)?;
                let channel = ChannelProxy::start(&uri, &n, &socket)?;
                Ok::<_, String>((console, channel))
            })
            .await
            .map_err(|e| control(&id, "attaching console and channel", e.to_string()))?
            .map_err(|e| control(&id, "attaching console and channel", e))?;
            if let Some(remote) = machine.remote.as_mut() {
                remote.console = Some(console);
                remote.channel = Some(channel);
            }
            machine.on_domain("virDomainResume", |d| d.resume()).await?;
        }
        tracing::info!(vm = %id, domain = %name, %accel, host = %host.uri, elapsed = ?started.elapsed(), "libvirt VM launched");
        Ok(machine)
    }
}

/// A storage-API failure on host `uri`.
fn upload_error(uri: &str, e: &VirtError) -> BackendError {
    BackendError::Io {
        context: format!("libvirt host {uri}"),
        source: std::io::Error::other(e.message().to_owned()),
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
    host: Arc<Host>,
    paths: VmPaths,
    revert_path: RevertPath,
    timeouts: LibvirtTimeouts,
    defined: bool,
    destroyed: bool,
    dead: Option<String>,
    /// Why its host is gone, once found so.
    lost: Option<String>,
    final_tail: Option<String>,
    /// What a VM on a remote host has beyond a local one.
    remote: Option<RemoteParts>,
}

/// A remote VM's state volume and the bridges of its console and channel.
#[derive(Debug)]
struct RemoteParts {
    state_volume: String,
    console: Option<ConsolePump>,
    channel: Option<ChannelProxy>,
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

    /// The connection URI of the host the VM runs on.
    pub fn host_uri(&self) -> &str {
        &self.host.uri
    }

    /// Turns the failure of a call that could not reach the host (the
    /// connection broke and could not be reopened) into
    /// [`BackendError::HostLost`], and remembers it: the host is skipped by
    /// new launches, and this VM fails fast from now on.
    fn host_error(&mut self, e: BackendError) -> BackendError {
        let reason = e.to_string();
        self.host.mark_lost(&reason);
        self.lost = Some(reason);
        self.lost_error()
    }

    fn lost_error(&self) -> BackendError {
        BackendError::HostLost {
            host: self.host.uri.clone(),
            vm: self.id.clone(),
            reason: self.lost.clone().unwrap_or_default(),
        }
    }

    /// Runs `f` on this machine's domain.
    async fn on_domain<T, F>(&mut self, operation: &str, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: Fn(&Domain) -> Result<T, VirtError> + Send + 'static,
    {
        if self.lost.is_some() {
            return Err(self.lost_error());
        }
        let name = self.name.clone();
        let result = match self
            .conn
            .with(move |c: &Connect| f(&c.lookup_domain_by_name(&name)?))
            .await
        {
            Ok(result) => result,
            Err(e) => return Err(self.host_error(e)),
        };
        result.map_err(|e| {
            if is_connection_error(&e) {
                self.host_error(control(&self.id, operation, e.to_string()))
            } else if is_no_domain(&e) || is_not_running(&e) {
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

    /// The domain's state and why (`virDomainGetState`); a host that does
    /// not answer is [`BackendError::HostLost`].
    async fn domain_state(
        &mut self,
    ) -> Result<Result<(DomainStateEnum, DomainStateReasonEnum), VirtError>, BackendError> {
        if self.lost.is_some() {
            return Err(self.lost_error());
        }
        let name = self.name.clone();
        match self
            .conn
            .with(move |c| c.lookup_domain_by_name(&name)?.state())
            .await
        {
            Ok(Err(e)) if is_connection_error(&e) => {
                Err(self.host_error(control(&self.id, "virDomainGetState", e.to_string())))
            }
            Ok(result) => Ok(result),
            Err(e) => Err(self.host_error(e)),
        }
    }

    fn known_dead(&self) -> Option<BackendError> {
        if self.lost.is_some() {
            return Some(self.lost_error());
        }
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
    pub async fn list_snapshots(&mut self) -> Result<Vec<SnapshotInfo>, BackendError> {
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
                if self.remote.is_some() {
                    self.reattach_console().await?;
                }
                self.wait_for_guest_hangup(disconnects_before).await;
                RevertOutcome::ChannelReset
            }
        };
        tracing::debug!(vm = %self.id, snapshot = name, ?path, elapsed = ?started.elapsed(), "reverted");
        Ok(outcome)
    }

    /// A remote VM's console stream ends when libvirt restarts its QEMU
    /// (`virDomainRevertToSnapshot`): open a new one. What the guest printed
    /// in between is not in the log (the hang-up wait may then run out).
    async fn reattach_console(&mut self) -> Result<(), BackendError> {
        let (uri, name, log) = (
            self.host.uri.clone(),
            self.name.clone(),
            self.paths.serial_log.clone(),
        );
        let pump = tokio::task::spawn_blocking(move || ConsolePump::start(&uri, &name, &log))
            .await
            .map_err(|e| control(&self.id, "reattaching the console", e.to_string()))?
            .map_err(|e| control(&self.id, "reattaching the console", e))?;
        if let Some(remote) = self.remote.as_mut() {
            remote.console = Some(pump);
        }
        Ok(())
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
        let dir = if uri.contains("/session") || !self.host.local {
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
        if let Some(remote) = self.remote.as_mut() {
            // Stops accepting on the local socket; the bridges end with the domain.
            remote.channel.take();
            remote.console.take();
        }
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

/// [`destroy_domain_blocking`], then deletes the remote VM's state volume.
fn destroy_blocking(c: &Connect, name: &str, state_volume: Option<&str>) -> Result<(), VirtError> {
    destroy_domain_blocking(c, name)?;
    match state_volume {
        Some(volume) => upload::delete_volume(c, volume),
        None => Ok(()),
    }
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

/// Destroys domains titled/prefixed `agentvm` whose owner process (on this
/// machine) is gone and removes their directories (only below `root`); on a
/// remote host (`remote`) also their state volumes. Domains of other
/// machines are left alone.
fn sweep_blocking(
    conn: &Arc<Connection>,
    root: &Path,
    remote: bool,
) -> Result<Vec<String>, BackendError> {
    let root = root.to_path_buf();
    let me = domain_xml::this_machine();
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
            if domain_xml::parse_machine(&xml).is_some_and(|m| m != me) {
                continue;
            }
            let stamp = ProcessStamp {
                pid: owner.pid,
                start_time: owner.start_time,
            };
            if stamp.is_alive() {
                continue;
            }
            let volume = remote.then(|| upload::state_volume_name(&name));
            if let Err(e) = destroy_blocking(c, &name, volume.as_deref()) {
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
        let volume = self.remote.as_ref().map(|r| r.state_volume.clone());
        let result = if self.lost.is_some() {
            // Nothing to reach: the VM went with its host.
            Ok(())
        } else if self.defined || volume.is_some() {
            match self
                .conn
                .with(move |c| destroy_blocking(c, &name, volume.as_deref()))
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) if is_connection_error(&e) => {
                    self.host_error(control(&self.id, "destroying the domain", e.to_string()));
                    Ok(())
                }
                Ok(Err(e)) => Err(control(&self.id, "destroying the domain", e.to_string())),
                Err(e) => {
                    self.host_error(e);
                    Ok(())
                }
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
        let volume = self.remote.as_ref().map(|r| r.state_volume.clone());
        if (self.defined || volume.is_some()) && self.lost.is_none() {
            let name = self.name.clone();
            let conn = Arc::clone(&self.conn);
            // Blocking (a few ms); a thread so that a runtime worker is not blocked.
            let joined = std::thread::spawn(move || {
                conn.with_blocking(|c| destroy_blocking(c, &name, volume.as_deref()))
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
