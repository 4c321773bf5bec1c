//! The daemon: accepts connections on its socket, creates a pool per VM
//! shape on first use, runs leases, and exits after an idle period.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::protocol::{
    read_message, write_message, DaemonStatus, Fingerprint, LeaseGrant, LeaseRequest,
    MachineAnswer, MachineCall, PoolReport, PoolShape, Refusal, Request, Response,
    WireBackendError, WireError, WireRelease,
};
use super::splice::{SpliceHandle, SplicingBackend};
use super::{fingerprint, DaemonError, DaemonPaths};
use crate::backend::{
    create_backend, is_valid_snapshot_name, Backend, BoxedChannel, GOLDEN_SNAPSHOT,
};
use crate::config::AgentVmConfig;
use crate::image::locate_image;
use crate::pool::{Lease, VmPool};
use crate::vm::VmError;

/// How long a new connection may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon waits for each pool to shut down when it exits.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);
/// How often the idle timeout is checked.
const IDLE_TICK: Duration = Duration::from_millis(100);

/// How a daemon runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Its files (socket, locks, log).
    pub paths: DaemonPaths,
    /// Exit this long after the last connection closed.
    pub idle_timeout: Duration,
    /// Print a line per lease and release on stderr.
    pub log_leases: bool,
}

/// Serves the pools of `config` until the idle timeout passes or a client
/// sends Stop, then shuts every pool down (no VM outlives the daemon).
/// Refuses to start when another daemon holds the lock.
pub async fn serve(config: AgentVmConfig, options: ServeOptions) -> Result<(), DaemonError> {
    let paths = &options.paths;
    let io = |context: String| move |source: std::io::Error| DaemonError::Io { context, source };
    if let Some(dir) = paths.socket.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let lock = hold_lock(paths)?;
    // A socket file left by a daemon that died; we hold the lock, so no
    // daemon serves it.
    let _ = std::fs::remove_file(&paths.socket);
    let listener = UnixListener::bind(&paths.socket)
        .map_err(io(format!("listening on {}", paths.socket.display())))?;
    let backend = create_backend(&config).map_err(|e| DaemonError::Start {
        socket: paths.socket.clone(),
        log: paths.log.clone(),
        message: format!("cannot create the {} backend: {e}", config.backend.name()),
    })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let daemon = Arc::new(Daemon {
        fingerprint: fingerprint(&config),
        config,
        backend: Arc::new(SplicingBackend::new(backend)),
        pools: tokio::sync::Mutex::new(HashMap::new()),
        leases: Mutex::new(HashMap::new()),
        next_lease: AtomicU64::new(1),
        connections: AtomicUsize::new(0),
        last_active: Mutex::new(Instant::now()),
        stop: stop_tx,
        options: options.clone(),
        started: Instant::now(),
    });
    daemon.log(format!(
        "serving {} (pid {}, backend {}, idle timeout {:?})",
        paths.socket.display(),
        std::process::id(),
        daemon.fingerprint.backend,
        options.idle_timeout
    ));
    let mut stop = stop_rx.clone();
    let mut tick = tokio::time::interval(IDLE_TICK);
    let reason = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let guard = daemon.connection();
                    let daemon = Arc::clone(&daemon);
                    let stop = stop_rx.clone();
                    tokio::spawn(async move {
                        daemon.handle(stream, stop).await;
                        drop(guard);
                    });
                }
                Err(e) => daemon.log(format!("accept failed: {e}")),
            },
            _ = stop.changed() => break "asked to stop".to_string(),
            _ = tick.tick() => {
                if daemon.connections.load(Ordering::SeqCst) == 0 {
                    let idle = daemon.last_active.lock().expect("daemon lock").elapsed();
                    if idle >= options.idle_timeout {
                        break format!("idle for {idle:.1?}");
                    }
                }
            }
        }
    };
    // Nobody new gets in; open leases end (their VMs are destroyed).
    let _ = std::fs::remove_file(&paths.socket);
    drop(listener);
    let _ = daemon.stop.send(true);
    daemon.log(format!("stopping ({reason}): shutting the pools down"));
    let pools: Vec<(String, VmPool)> = daemon
        .pools
        .lock()
        .await
        .drain()
        .map(|(key, entry)| (key, entry.pool))
        .collect();
    let shutdowns = pools.iter().map(|(key, pool)| {
        let daemon = &daemon;
        async move {
            match tokio::time::timeout(SHUTDOWN_WAIT, pool.shutdown()).await {
                Ok(()) => daemon.log(format!("pool {key} shut down ({})", pool.status())),
                Err(_) => daemon.log(format!(
                    "pool {key} did not shut down within {SHUTDOWN_WAIT:?} ({})",
                    pool.status()
                )),
            }
        }
    });
    futures::future::join_all(shutdowns).await;
    daemon.log("stopped".to_string());
    drop(lock);
    Ok(())
}

/// Takes the daemon lock (non-blocking) and writes our pid into it.
fn hold_lock(paths: &DaemonPaths) -> Result<std::fs::File, DaemonError> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&paths.lock)
        .map_err(|source| DaemonError::Io {
            context: format!("opening {}", paths.lock.display()),
            source,
        })?;
    if rustix::fs::flock(
        file.as_fd(),
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .is_err()
    {
        let pid = std::fs::read_to_string(&paths.lock)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        return Err(DaemonError::AlreadyRunning {
            socket: paths.socket.clone(),
            pid,
        });
    }
    let _ = file.set_len(0);
    let _ = writeln!(file, "{}", std::process::id());
    Ok(file)
}

struct PoolEntry {
    pool: VmPool,
    leases: u64,
    vms: Vec<String>,
}

/// A lease's mailbox for the channel connections that join it.
struct LeaseSlot {
    token: u64,
    lend: mpsc::UnboundedSender<(BoxedChannel, oneshot::Sender<bool>)>,
}

struct Daemon {
    config: AgentVmConfig,
    fingerprint: Fingerprint,
    backend: Arc<SplicingBackend>,
    pools: tokio::sync::Mutex<HashMap<String, PoolEntry>>,
    leases: Mutex<HashMap<u64, LeaseSlot>>,
    next_lease: AtomicU64,
    connections: AtomicUsize,
    last_active: Mutex<Instant>,
    stop: watch::Sender<bool>,
    options: ServeOptions,
    started: Instant,
}

/// Counts a connection while it lives; its end restarts the idle clock.
struct ConnectionGuard<'a>(&'a Daemon);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        *self.0.last_active.lock().expect("daemon lock") = Instant::now();
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// [`ConnectionGuard`] for a spawned task (owns its daemon).
struct OwnedGuard(Arc<Daemon>);

impl Drop for OwnedGuard {
    fn drop(&mut self) {
        drop(ConnectionGuard(&self.0));
    }
}

impl Daemon {
    fn connection(self: &Arc<Self>) -> OwnedGuard {
        self.connections.fetch_add(1, Ordering::SeqCst);
        OwnedGuard(Arc::clone(self))
    }

    fn log(&self, line: String) {
        eprintln!(
            "agentvm pool [{:>8.3}s] {line}",
            self.started.elapsed().as_secs_f64()
        );
    }

    fn log_lease(&self, line: String) {
        if self.options.log_leases {
            self.log(line);
        }
    }

    async fn handle(self: Arc<Self>, mut stream: UnixStream, stop: watch::Receiver<bool>) {
        let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, read_message(&mut stream)).await;
        let request = match first {
            Err(_) | Ok(Err(WireError::Closed)) => return,
            Ok(Err(e)) => {
                self.log(format!("refused a malformed first message: {e}"));
                let refusal = Response::Error(Refusal::Malformed(e.to_string()));
                let _ = write_message(&mut stream, &refusal).await;
                return;
            }
            Ok(Ok(request)) => request,
        };
        let answer = match request {
            Request::Lease(request) => return self.lease(stream, request, stop).await,
            Request::Channel { lease, token } => return self.channel(stream, lease, token).await,
            Request::Status => Response::Status(Box::new(self.status().await)),
            Request::Stop => {
                let _ = self.stop.send(true);
                Response::Stopping
            }
            other @ (Request::Machine(_) | Request::Release) => {
                Response::Error(Refusal::Unexpected(format!(
                    "{other:?} needs a lease: send Lease first on the same connection"
                )))
            }
        };
        let _ = write_message(&mut stream, &answer).await;
    }

    async fn status(&self) -> DaemonStatus {
        let pools = self.pools.lock().await;
        let mut reports: Vec<PoolReport> = pools
            .iter()
            .map(|(key, entry)| {
                let status = entry.pool.status();
                PoolReport {
                    key: key.clone(),
                    available: status.available,
                    leased: status.leased,
                    booting: status.booting,
                    reverting: status.reverting,
                    destroyed: status.destroyed,
                    leases: entry.leases,
                    vms: entry.vms.clone(),
                }
            })
            .collect();
        reports.sort_by(|a, b| a.key.cmp(&b.key));
        DaemonStatus {
            pid: std::process::id(),
            fingerprint: self.fingerprint.clone(),
            idle_timeout: self.options.idle_timeout,
            pools: reports,
            open_leases: self.leases.lock().expect("daemon lock").len(),
            vm_pids: self.backend.host_pids(),
        }
    }

    /// The pool of `shape`, created on its first lease.
    async fn pool(&self, shape: &PoolShape) -> Result<VmPool, String> {
        let mut pools = self.pools.lock().await;
        if let Some(entry) = pools.get(&shape.key()) {
            return Ok(entry.pool.clone());
        }
        let image =
            locate_image(&shape.image, &self.config.image_dir).map_err(|e| e.to_string())?;
        let mut spec = self.config.vm_spec(image);
        spec.profile = shape.profile;
        spec.network = shape.network.clone();
        let backend: Arc<dyn Backend> = self.backend.clone();
        let pool =
            VmPool::new(backend, self.config.pool_config(spec)).map_err(|e| e.to_string())?;
        self.log(format!(
            "pool {} created ({}..{} VMs)",
            shape.key(),
            self.config.pool_min_size,
            self.config.pool_max_size
        ));
        pools.insert(
            shape.key(),
            PoolEntry {
                pool: pool.clone(),
                leases: 0,
                vms: Vec::new(),
            },
        );
        Ok(pool)
    }

    async fn lease(
        self: Arc<Self>,
        mut stream: UnixStream,
        request: LeaseRequest,
        mut stop: watch::Receiver<bool>,
    ) {
        let differences = self.fingerprint.differences(&request.fingerprint);
        if !differences.is_empty() {
            self.log(format!(
                "refused {}: other configuration ({differences:?})",
                request.client
            ));
            let refusal = Refusal::Mismatch {
                differences,
                daemon_pid: std::process::id(),
            };
            let _ = write_message(&mut stream, &Response::Error(refusal)).await;
            return;
        }
        let key = request.shape.key();
        let acquired = match self.pool(&request.shape).await {
            Ok(pool) => pool
                .acquire(request.acquire_timeout)
                .await
                .map_err(|e| format!("could not get a VM ({key}): {e}")),
            Err(e) => Err(e),
        };
        let mut lease = match acquired {
            Ok(lease) => lease,
            Err(message) => {
                self.log(format!("lease for {} failed: {message}", request.client));
                let refusal = Response::Error(Refusal::Acquire(message));
                let _ = write_message(&mut stream, &refusal).await;
                return;
            }
        };
        let vm_id = lease.id().to_string();
        let Some(handle) = self.backend.handle(&vm_id) else {
            // Cannot happen: every VM of the daemon's pools comes from its backend.
            let refusal = Refusal::Acquire(format!("VM {vm_id} has no splice handle"));
            let _ = write_message(&mut stream, &Response::Error(refusal)).await;
            return;
        };
        if let Some(entry) = self.pools.lock().await.get_mut(&key) {
            entry.leases += 1;
            if !entry.vms.contains(&vm_id) {
                entry.vms.push(vm_id.clone());
            }
        }
        let id = self.next_lease.fetch_add(1, Ordering::SeqCst);
        let token = random_token();
        let (lend_tx, mut lend_rx) = mpsc::unbounded_channel();
        self.leases.lock().expect("daemon lock").insert(
            id,
            LeaseSlot {
                token,
                lend: lend_tx,
            },
        );
        let grant = LeaseGrant {
            lease: id,
            token,
            vm: vm_id.clone(),
            hello: lease.guest_info().clone(),
            boot: lease.boot_timings().into(),
            waited: lease.waited(),
            uses: lease.uses(),
            serial_log: lease.serial_log_path(),
            host_pid: lease.host_pid(),
            daemon_pid: std::process::id(),
        };
        self.log_lease(format!(
            "lease {id}: vm {vm_id} to {} (waited {:.1?}, use {})",
            request.client,
            lease.waited(),
            lease.uses()
        ));
        let (read_half, mut writer) = stream.into_split();
        // Reads on their own task: a read cancelled half-way would lose bytes.
        let (requests_tx, mut requests) = mpsc::channel(4);
        let reader = tokio::spawn(async move {
            let mut read_half = read_half;
            loop {
                let message = read_message::<_, Request>(&mut read_half).await;
                let last = !matches!(message, Ok(_) | Err(WireError::Malformed(_)));
                if requests_tx.send(message).await.is_err() || last {
                    return;
                }
            }
        });
        let granted = write_message(&mut writer, &Response::Leased(Box::new(grant))).await;
        let mut report_to: Option<OwnedWriteHalf> = None;
        let end = if granted.is_err() {
            "the client went away before the grant".to_string()
        } else {
            loop {
                tokio::select! {
                    message = requests.recv() => match message {
                        Some(Ok(Request::Machine(call))) => {
                            let answer = match self.machine_call(&mut lease, call).await {
                                Ok(answer) => Response::Machine(answer),
                                Err(e) => Response::Error(Refusal::Machine(e)),
                            };
                            if write_message(&mut writer, &answer).await.is_err() {
                                break "the client went away".to_string();
                            }
                        }
                        Some(Ok(Request::Release)) => {
                            report_to = Some(writer);
                            break "released".to_string();
                        }
                        Some(Ok(other)) => {
                            let refusal = Refusal::Unexpected(format!(
                                "{other:?} is not a request of a lease connection"
                            ));
                            if write_message(&mut writer, &Response::Error(refusal)).await.is_err() {
                                break "the client went away".to_string();
                            }
                        }
                        Some(Err(WireError::Malformed(e))) => {
                            self.log(format!("lease {id}: malformed request: {e}"));
                            let refusal = Refusal::Malformed(e);
                            if write_message(&mut writer, &Response::Error(refusal)).await.is_err() {
                                break "the client went away".to_string();
                            }
                        }
                        Some(Err(WireError::Closed)) | None => break "connection closed".to_string(),
                        Some(Err(e)) => {
                            let refusal = Refusal::Malformed(e.to_string());
                            let _ = write_message(&mut writer, &Response::Error(refusal)).await;
                            break format!("connection dropped: {e}");
                        }
                    },
                    Some((peer, ack)) = lend_rx.recv() => {
                        let _ = ack.send(lend(&mut lease, &handle, peer).await);
                    }
                    _ = stop.changed() => break "the daemon stops".to_string(),
                }
            }
        };
        reader.abort();
        self.leases.lock().expect("daemon lock").remove(&id);
        handle.lease_ended();
        let started = Instant::now();
        let outcome = lease.release();
        let report = match outcome.await {
            Ok(outcome) => WireRelease::from(outcome),
            Err(_) => WireRelease::Unknown("the pool dropped the release".into()),
        };
        self.log_lease(format!(
            "lease {id}: vm {vm_id} back ({end}): {} in {:.1?}",
            describe_release(&report),
            started.elapsed()
        ));
        if let Some(mut writer) = report_to {
            let _ = write_message(&mut writer, &Response::Released(report)).await;
        }
    }

    async fn machine_call(
        &self,
        lease: &mut Lease,
        call: MachineCall,
    ) -> Result<MachineAnswer, WireBackendError> {
        let vm = &mut **lease;
        let backend = |e: crate::backend::BackendError| WireBackendError::from(&e);
        let vm_error = |e: VmError| match e {
            VmError::Backend(e) => WireBackendError::from(&e),
            other => WireBackendError::Other(other.to_string()),
        };
        Ok(match call {
            MachineCall::RevertGolden => {
                MachineAnswer::restored(vm.machine_mut().revert_golden().await.map_err(backend)?)
            }
            // Through the VM handle: it checks the name and remembers to
            // delete the snapshot when the lease ends.
            MachineCall::SaveSnapshot(name) => {
                vm.snapshot(&name).await.map_err(vm_error)?;
                MachineAnswer::Done
            }
            MachineCall::DeleteSnapshot(name) => {
                vm.delete_snapshot(&name).await.map_err(vm_error)?;
                MachineAnswer::Done
            }
            MachineCall::LoadSnapshot(name) => {
                if name != GOLDEN_SNAPSHOT && !is_valid_snapshot_name(&name) {
                    return Err(WireBackendError::Other(format!(
                        "invalid snapshot name {name:?}"
                    )));
                }
                let machine = vm.machine_mut();
                MachineAnswer::restored(machine.load_snapshot(&name).await.map_err(backend)?)
            }
            MachineCall::SnapshotNames => {
                MachineAnswer::Names(vm.machine_mut().snapshot_names().await.map_err(backend)?)
            }
            MachineCall::State => {
                MachineAnswer::State(vm.machine_mut().state().await.map_err(backend)?.into())
            }
            MachineCall::Pause => {
                vm.machine_mut().pause().await.map_err(backend)?;
                MachineAnswer::Done
            }
            MachineCall::Resume => {
                vm.machine_mut().resume().await.map_err(backend)?;
                MachineAnswer::Done
            }
            MachineCall::CheckAlive => {
                vm.machine_mut().check_alive().await.map_err(backend)?;
                MachineAnswer::Done
            }
            MachineCall::WaitStopped(timeout) => MachineAnswer::Stopped(
                vm.machine_mut()
                    .wait_stopped(timeout)
                    .await
                    .map_err(backend)?,
            ),
        })
    }

    /// A channel connection: hands it to its lease, which splices it to the guest.
    async fn channel(self: Arc<Self>, mut stream: UnixStream, lease: u64, token: u64) {
        let lend = {
            let leases = self.leases.lock().expect("daemon lock");
            leases
                .get(&lease)
                .filter(|slot| slot.token == token)
                .map(|slot| slot.lend.clone())
        };
        let Some(lend) = lend else {
            let refusal = Response::Error(Refusal::UnknownLease(lease));
            let _ = write_message(&mut stream, &refusal).await;
            return;
        };
        // Ready first: once spliced, the guest's bytes follow on this stream.
        if write_message(&mut stream, &Response::ChannelReady)
            .await
            .is_err()
        {
            return;
        }
        let (ack_tx, ack_rx) = oneshot::channel();
        if lend.send((Box::pin(stream), ack_tx)).is_err() {
            return;
        }
        if !ack_rx.await.unwrap_or(false) {
            self.log(format!("lease {lease}: its VM's channel could not be lent"));
        }
    }
}

/// Splices `peer` to the leased VM's channel, opening the host end first
/// when it must be (re)opened.
async fn lend(lease: &mut Lease, handle: &SpliceHandle, peer: BoxedChannel) -> bool {
    if handle.needs_connect() {
        match lease.machine_mut().connect_channel().await {
            Ok(pipe) => drop(pipe),
            Err(_) => return false,
        }
    }
    handle.lend(peer)
}

fn describe_release(report: &WireRelease) -> String {
    match report {
        WireRelease::Reverted(t) => format!("reverted ({:.1?})", t.total),
        WireRelease::Recycled => "recycled".into(),
        WireRelease::Destroyed(reason) => format!("destroyed: {reason}"),
        WireRelease::Unknown(reason) => format!("unknown: {reason}"),
    }
}

fn random_token() -> u64 {
    let mut bytes = [0u8; 8];
    // Without randomness the token is still unique per lease, only guessable.
    if getrandom::fill(&mut bytes).is_err() {
        bytes = (Instant::now().elapsed().as_nanos() as u64).to_le_bytes();
    }
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    //! The daemon end to end on the mock backend (no VM): leases, the
    //! spliced channel, release and reuse, refusals. The real-VM behaviour
    //! (SIGKILL, concurrency, idle exit) is tested in
    //! `agentvm-test/tests/pool_daemon.rs`.
    use std::path::Path;

    use futures::FutureExt;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::backend::MachineState;
    use crate::config::BackendKind;
    use crate::daemon::client;
    use crate::pool::ReleaseOutcome;
    use crate::spec::{NetworkMode, ResourceProfile};

    fn mock_config(dir: &Path) -> AgentVmConfig {
        let image = dir.join("images").join("default");
        std::fs::create_dir_all(&image).unwrap();
        std::fs::write(
            image.join("manifest.json"),
            r#"{"cmdline": "console=ttyS0"}"#,
        )
        .unwrap();
        std::fs::write(image.join("vmlinuz"), b"not a kernel").unwrap();
        std::fs::write(image.join("initramfs.cpio.gz"), b"not an initramfs").unwrap();
        AgentVmConfig {
            backend: BackendKind::Mock,
            image_dir: dir.join("images"),
            pool_min_size: 1,
            pool_max_size: 1,
            ..AgentVmConfig::defaults_for(dir)
        }
    }

    fn request(config: &AgentVmConfig) -> LeaseRequest {
        LeaseRequest {
            fingerprint: fingerprint(config),
            shape: PoolShape {
                image: "default".into(),
                profile: ResourceProfile::Minimal,
                network: NetworkMode::Isolated,
            },
            acquire_timeout: Duration::from_secs(10),
            client: "unit test".into(),
        }
    }

    async fn start(config: &AgentVmConfig) -> (DaemonPaths, tokio::task::JoinHandle<()>) {
        let paths = DaemonPaths::for_config(config);
        let options = ServeOptions {
            paths: paths.clone(),
            idle_timeout: Duration::from_secs(60),
            log_leases: true,
        };
        let daemon = tokio::spawn(serve(config.clone(), options).map(|r| r.unwrap()));
        for _ in 0..200 {
            if client::is_listening(&paths.socket) {
                return (paths, daemon);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the daemon did not listen");
    }

    async fn raw(socket: &Path, bytes: &[u8]) -> Response {
        let mut stream = UnixStream::connect(socket).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        read_message(&mut stream).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_are_reverted_and_reused_and_bad_requests_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = mock_config(dir.path());
        let (paths, daemon) = start(&config).await;
        let spec = config.vm_spec(locate_image("default", &config.image_dir).unwrap());

        // A second daemon on the same socket is refused.
        let second = serve(
            config.clone(),
            ServeOptions {
                paths: paths.clone(),
                idle_timeout: Duration::from_secs(1),
                log_leases: false,
            },
        )
        .await
        .unwrap_err();
        assert!(
            matches!(second, DaemonError::AlreadyRunning { .. }),
            "{second}"
        );

        // A lease gives a working VM through the spliced channel.
        let mut lease = client::lease(&paths.socket, request(&config), spec.clone())
            .await
            .unwrap();
        let vm_id = lease.id().to_string();
        let out = lease
            .exec(crate::command::Command::new("echo").arg("through the daemon"))
            .await
            .unwrap();
        assert_eq!(out.stdout, b"through the daemon\n");
        // Machine calls are forwarded; a revert inside the lease resyncs.
        assert_eq!(lease.state().await.unwrap(), MachineState::Running);
        lease.revert().await.unwrap();
        lease.ping().await.unwrap();
        let outcome = lease.release().await.unwrap();
        assert!(
            matches!(outcome, ReleaseOutcome::Reverted(_)),
            "{outcome:?}"
        );

        // Malformed requests: a clear error, and nothing changes.
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"hello");
        let answer = raw(&paths.socket, &garbage).await;
        assert!(
            matches!(&answer, Response::Error(Refusal::Malformed(m)) if m.contains("malformed")),
            "{answer:?}"
        );
        let answer = raw(&paths.socket, &u32::MAX.to_be_bytes()).await;
        assert!(
            matches!(&answer, Response::Error(Refusal::Malformed(m)) if m.contains("above the limit")),
            "{answer:?}"
        );
        let answer = raw(
            &paths.socket,
            &super::super::protocol::encode(&Request::Release),
        )
        .await;
        assert!(
            matches!(answer, Response::Error(Refusal::Unexpected(_))),
            "{answer:?}"
        );
        let answer = raw(
            &paths.socket,
            &super::super::protocol::encode(&Request::Channel { lease: 1, token: 0 }),
        )
        .await;
        assert_eq!(answer, Response::Error(Refusal::UnknownLease(1)));

        // Another configuration: refused, naming the difference.
        let mut other = request(&config);
        other.fingerprint.backend = "qemu".into();
        let e = client::lease(&paths.socket, other, spec.clone())
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("backend: daemon mock, this process qemu"),
            "{text}"
        );
        assert!(text.contains("agentvm pool stop"), "{text}");

        // The same VM serves the next lease; dropping a lease gives it back too.
        let lease = client::lease(&paths.socket, request(&config), spec.clone())
            .await
            .unwrap();
        assert_eq!(lease.id(), vm_id);
        assert_eq!(lease.uses(), 2);
        drop(lease);
        let mut lease = client::lease(&paths.socket, request(&config), spec)
            .await
            .unwrap();
        assert_eq!(lease.id(), vm_id);
        lease.ping().await.unwrap();

        let status = client::status(&paths.socket).await.unwrap();
        assert_eq!(status.open_leases, 1);
        assert_eq!(status.pools.len(), 1);
        assert_eq!(status.pools[0].key, "default/1x256MiB/isolated");
        assert_eq!(status.pools[0].leases, 3);
        assert_eq!(status.pools[0].vms, vec![vm_id]);

        // Stop ends the open lease and the pools, then the daemon.
        client::stop(&paths.socket).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), daemon)
            .await
            .unwrap()
            .unwrap();
        assert!(!paths.socket.exists());
        assert!(lease.ping().await.is_err(), "the daemon's end is closed");
    }
}
