//! [`Vm`]: a booted VM with a connected guest agent — the handle tests use.
//!
//! Lifecycle: [`Vm::boot`] (launch → wait for the guest's Hello → golden
//! snapshot) → commands and files → [`Vm::revert`] (back to the golden
//! snapshot, channel resynchronised) → … → [`Vm::destroy`].
//!
//! Besides the golden snapshot a test may take named ones
//! ([`Vm::snapshot`], [`Vm::revert_to`], [`Vm::snapshots`],
//! [`Vm::delete_snapshot`]); [`Vm::state`] and [`Vm::wait_for_state`] show
//! the run state.

use std::time::{Duration, Instant, SystemTime};

use crate::backend::{
    is_valid_snapshot_name, Backend, BackendError, Machine, MachineState, RestoredMachine,
    RevertOutcome, GOLDEN_SNAPSHOT,
};
use crate::client::{ClientError, ExecOutput, ExecStream, GuestClient, ResyncStats};
use crate::command::Command;
use crate::events::{emit, Event, ProcessUsage};
use crate::protocol::{ChangeList, ExitStatus, FileChange, Hello, ListChangesRequest};
use crate::spec::{NetworkMode, VmSpec};

/// Lines of serial console put into crash and boot errors.
pub const SERIAL_TAIL_LINES: usize = 40;
/// How long a resynchronisation after a revert may take.
pub const RESYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Vm::warm_up`]'s no-op command may take.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time the host grants the guest beyond a command's own timeout
/// before it declares the guest hung.
pub const HOST_EXEC_SLACK: Duration = Duration::from_secs(30);
/// The guest's DHCP wrapper (`images/agentvm-dhcp`; the same path in every
/// image): takes a lease on each NIC, applies address, default route and
/// `/etc/resolv.conf`, and exits.
pub const GUEST_DHCP: &str = "/usr/local/sbin/agentvm-dhcp";
/// How long the guest's DHCP may take (the wrapper gives up after 30 s per
/// NIC). Unless the network sets `no-ping`, dnsmasq pings an address for 3 s
/// before it offers it to a new MAC and answers no one meanwhile: VMs that
/// boot together wait for each other (4.5–17 s measured with two or three
/// at once under TCG on 2 busy cores).
pub const DHCP_TIMEOUT: Duration = Duration::from_secs(40);

/// Why an operation on a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The hypervisor backend failed (includes crashes, with the serial tail).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The guest agent answered with an error or broke the protocol.
    #[error("VM {vm}: {source}")]
    Guest {
        /// VM id.
        vm: String,
        /// The client error.
        #[source]
        source: ClientError,
    },
    /// The guest agent did not say Hello in time.
    #[error("VM {vm} did not boot within {after:?} (no Hello from the guest agent)\n--- last serial console lines ---\n{serial_tail}")]
    BootTimeout {
        /// VM id.
        vm: String,
        /// The deadline.
        after: Duration,
        /// The end of the serial console log.
        serial_tail: String,
    },
    /// A snapshot name that is not allowed (see [`Vm::snapshot`]).
    #[error("VM {vm}: {problem}")]
    InvalidSnapshotName {
        /// VM id.
        vm: String,
        /// What is wrong with the name.
        problem: String,
    },
    /// [`Vm::wait_for_state`] ran out of time.
    #[error("VM {vm} did not reach state {wanted} within {after:?} (it is {now})")]
    StateTimeout {
        /// VM id.
        vm: String,
        /// The state waited for.
        wanted: MachineState,
        /// The state at the deadline.
        now: MachineState,
        /// The deadline.
        after: Duration,
    },
    /// The no-op command of [`Vm::warm_up`] did not succeed.
    #[error("VM {vm}: the warm-up command `sh -c :` after a restore ended with {status}; the guest is not usable")]
    WarmUp {
        /// VM id.
        vm: String,
        /// How the command ended.
        status: String,
    },
    /// The guest could not take a DHCP lease for its network interface.
    #[error("VM {vm}: DHCP on its network interface failed: {problem}")]
    Network {
        /// VM id.
        vm: String,
        /// What went wrong, with the wrapper's output and what to do.
        problem: String,
    },
    /// The guest stopped answering (the VM is alive but hung).
    #[error("VM {vm}: guest agent stopped answering during {operation} (waited {after:?})\n--- last serial console lines ---\n{serial_tail}")]
    Hung {
        /// VM id.
        vm: String,
        /// What was being done.
        operation: String,
        /// How long was waited.
        after: Duration,
        /// The end of the serial console log.
        serial_tail: String,
    },
}

impl VmError {
    /// Whether the VM is broken (crashed, hung, channel gone) and must be
    /// destroyed rather than reused.
    pub fn vm_is_broken(&self) -> bool {
        match self {
            Self::Guest { source, .. } => matches!(
                source,
                ClientError::Closed { .. } | ClientError::Protocol(_) | ClientError::Timeout { .. }
            ),
            Self::InvalidSnapshotName { .. } => false,
            _ => true,
        }
    }

    /// The guest's own error, when the guest answered a request with one.
    pub fn guest_error(&self) -> Option<&ClientError> {
        match self {
            Self::Guest { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Timings of a VM's boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTimings {
    /// Launch of the hypervisor until the guest agent's Hello; for a VM
    /// restored from a shared golden snapshot, until its channel was in step.
    pub to_hello: Duration,
    /// Taking the golden snapshot (zero when restored).
    pub snapshot: Duration,
    /// Started from a golden snapshot another VM shared
    /// ([`Backend::launch_restored`]) instead of booting.
    pub restored: bool,
    /// Taking the DHCP lease (`None`: the VM takes none, see [`takes_dhcp`]).
    pub network: Option<Duration>,
}

/// How [`Vm::shutdown`] stopped the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// The guest powered itself off in time.
    Graceful,
    /// It did not: the hypervisor stopped it.
    Forced,
}

/// Timings of one revert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevertTimings {
    /// Restoring the golden snapshot in the hypervisor.
    pub restore: Duration,
    /// Resynchronising the control channel.
    pub resync: ResyncStats,
    /// Renewing the DHCP lease (`None`: the VM takes none, see [`takes_dhcp`]).
    pub network: Option<Duration>,
    /// All of it.
    pub total: Duration,
}

/// Whether a VM on `network` takes its address by DHCP: its NIC is on
/// agentvm's own libvirt network, whose dnsmasq serves DHCP. A user's bridge
/// is left alone (it may serve none); the guest can run [`GUEST_DHCP`] itself.
pub fn takes_dhcp(network: &NetworkMode) -> bool {
    matches!(network, NetworkMode::NatFiltered)
}

/// Runs [`GUEST_DHCP`] as root and returns how long it took. At boot this
/// gives the VM its lease before the golden snapshot; after a revert or a
/// start from a shared snapshot it renews it: the snapshot holds the address
/// of the lease taken when it was made (another VM's, with another MAC, for
/// a shared one, and possibly expired), so every VM asks again for its own.
async fn take_dhcp_lease(client: &GuestClient, machine: &dyn Machine) -> Result<Duration, VmError> {
    let start = Instant::now();
    let vm = machine.id().to_string();
    let request = Command::new(GUEST_DHCP)
        .as_root()
        .timeout(DHCP_TIMEOUT)
        .into_request();
    let budget = DHCP_TIMEOUT + HOST_EXEC_SLACK;
    let output = match tokio::time::timeout(budget, client.exec_collect(request)).await {
        Ok(Ok(output)) => output,
        // The guest agent could not start it: an image built before the wrapper.
        Ok(Err(ClientError::Guest { message, .. })) => {
            return Err(VmError::Network {
                vm,
                problem: format!(
                    "{message}; the guest image has no {GUEST_DHCP}: rebuild it with \
                     `cargo xtask build-image`"
                ),
            })
        }
        Ok(Err(source)) => return Err(VmError::Guest { vm, source }),
        Err(_) => {
            return Err(VmError::Hung {
                vm,
                operation: format!("DHCP ({GUEST_DHCP})"),
                after: budget,
                serial_tail: machine.serial_tail(SERIAL_TAIL_LINES),
            })
        }
    };
    let report = &output.report;
    if report.status == ExitStatus::Code(0) && !report.timed_out {
        tracing::debug!(vm, stdout = %String::from_utf8_lossy(&output.stdout).trim(), "DHCP lease");
        return Ok(start.elapsed());
    }
    let hint = "check that the libvirt network agentvm-nat is active and serves DHCP \
                (`cargo xtask setup-network`; `virsh net-dhcp-leases agentvm-nat` lists its leases)";
    let how = if report.timed_out {
        format!("was killed after {DHCP_TIMEOUT:?}")
    } else {
        format!("ended with {:?}", report.status)
    };
    Err(VmError::Network {
        vm,
        problem: format!(
            "{GUEST_DHCP} {how}: {}; {hint}",
            [&output.stderr, &output.stdout]
                .map(|text| String::from_utf8_lossy(text).trim().to_string())
                .into_iter()
                .filter(|text| !text.is_empty())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    })
}

/// A running VM whose guest agent is connected and ready.
pub struct Vm {
    machine: Box<dyn Machine>,
    client: GuestClient,
    spec: VmSpec,
    boot: BootTimings,
    created: Instant,
    reverts: u64,
    last_sample: Option<(f64, SystemTime)>,
    /// A snapshot besides the golden one may exist (taken through this handle).
    user_snapshots: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.machine.id())
            .field("reverts", &self.reverts)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Launches a VM from `spec`, waits for its guest agent and takes the
    /// golden snapshot every later [`Vm::revert`] returns to. A VM that
    /// crashes or hangs while booting is destroyed and the error carries the
    /// end of its serial console log.
    ///
    /// When the backend holds a golden snapshot of the same spec (its golden
    /// cache), the VM starts from that instead of booting; if that fails, the
    /// snapshot is dropped from the cache and the VM boots.
    pub async fn boot(backend: &dyn Backend, spec: VmSpec) -> Result<Self, VmError> {
        match Self::restore(backend, &spec).await {
            Ok(Some(vm)) => return Ok(vm),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "starting from the shared golden snapshot failed; booting instead");
                backend.forget_restored(&spec).await;
            }
        }
        Self::cold_boot(backend, spec).await
    }

    /// Starts the VM from a shared golden snapshot, if the backend has one.
    async fn restore(backend: &dyn Backend, spec: &VmSpec) -> Result<Option<Self>, VmError> {
        let started = Instant::now();
        let Some(restored) = backend.launch_restored(spec).await? else {
            return Ok(None);
        };
        let RestoredMachine {
            mut machine,
            channel,
            hello,
        } = restored;
        let client = GuestClient::attach(channel, hello);
        if let Err(source) = client.resync(RESYNC_TIMEOUT).await {
            let error = match machine.check_alive().await {
                Err(e) => e.into(),
                Ok(()) => VmError::Guest {
                    vm: machine.id().to_string(),
                    source,
                },
            };
            let _ = machine.destroy().await;
            return Err(error);
        }
        let network = if takes_dhcp(&spec.network) {
            match take_dhcp_lease(&client, machine.as_ref()).await {
                Ok(took) => Some(took),
                Err(error) => {
                    let _ = machine.destroy().await;
                    return Err(error);
                }
            }
        } else {
            None
        };
        let boot = BootTimings {
            to_hello: started.elapsed(),
            snapshot: Duration::ZERO,
            restored: true,
            network,
        };
        emit(Event::VmCreated {
            vm: machine.id().to_string(),
            vcpus: spec.profile.vcpus(),
            memory_mib: spec.profile.memory_mib(),
            host_pid: machine.host_pid(),
        });
        emit(Event::VmRestored {
            vm: machine.id().to_string(),
            restore_seconds: boot.to_hello.as_secs_f64(),
        });
        tracing::info!(vm = machine.id(), ?boot, "VM ready (restored)");
        Ok(Some(Self {
            machine,
            client,
            spec: spec.clone(),
            boot,
            created: Instant::now(),
            reverts: 0,
            last_sample: None,
            user_snapshots: false,
        }))
    }

    /// Boots the VM, waits for the Hello and takes (and shares) the golden snapshot.
    async fn cold_boot(backend: &dyn Backend, spec: VmSpec) -> Result<Self, VmError> {
        let started = Instant::now();
        let mut machine = match backend.launch(&spec).await {
            Ok(machine) => machine,
            Err(e) => {
                emit(Event::VmBootFailed {
                    vm: None,
                    error: e.to_string(),
                });
                return Err(e.into());
            }
        };
        emit(Event::VmCreated {
            vm: machine.id().to_string(),
            vcpus: spec.profile.vcpus(),
            memory_mib: spec.profile.memory_mib(),
            host_pid: machine.host_pid(),
        });
        let failed = |machine: &dyn Machine, error: String| {
            emit(Event::VmBootFailed {
                vm: Some(machine.id().to_string()),
                error,
            });
            emit(Event::VmDestroyed {
                vm: machine.id().to_string(),
                reason: "boot failed".into(),
            });
        };
        match Self::handshake(&mut machine, &spec, started).await {
            Ok((client, to_hello)) => {
                emit(Event::VmBooted {
                    vm: machine.id().to_string(),
                    boot_seconds: to_hello.as_secs_f64(),
                });
                // The lease goes into the golden snapshot (each revert renews
                // it); then the baseline, so that the lease's
                // /etc/resolv.conf is not among the changes of a test.
                let network = if takes_dhcp(&spec.network) {
                    let lease = match take_dhcp_lease(&client, machine.as_ref()).await {
                        Ok(took) => {
                            client
                                .reset_baseline()
                                .await
                                .map(|()| took)
                                .map_err(|source| VmError::Guest {
                                    vm: machine.id().to_string(),
                                    source,
                                })
                        }
                        Err(e) => Err(e),
                    };
                    match lease {
                        Ok(took) => Some(took),
                        Err(e) => {
                            let _ = machine.destroy().await;
                            failed(machine.as_ref(), e.to_string());
                            return Err(e);
                        }
                    }
                } else {
                    None
                };
                let snapshot_start = Instant::now();
                if let Err(e) = machine.snapshot_golden().await {
                    let _ = machine.destroy().await;
                    failed(machine.as_ref(), e.to_string());
                    return Err(e.into());
                }
                let boot = BootTimings {
                    to_hello,
                    snapshot: snapshot_start.elapsed(),
                    restored: false,
                    network,
                };
                emit(Event::VmSnapshotted {
                    vm: machine.id().to_string(),
                    snapshot_seconds: boot.snapshot.as_secs_f64(),
                });
                // Sharing is an optimisation for later VMs: a failure only costs them a boot.
                if let Err(e) = machine.share_golden(client.guest_hello()).await {
                    if machine.check_alive().await.is_err() {
                        let _ = machine.destroy().await;
                        failed(machine.as_ref(), e.to_string());
                        return Err(e.into());
                    }
                    tracing::warn!(vm = machine.id(), error = %e, "could not share the golden snapshot");
                }
                // The kernel took its clock from the RTC (whole seconds) and
                // savevm stopped it for a while: set it to the host's.
                if let Err(source) = client.reseed(RESYNC_TIMEOUT).await {
                    let error = VmError::Guest {
                        vm: machine.id().to_string(),
                        source,
                    };
                    let _ = machine.destroy().await;
                    failed(machine.as_ref(), error.to_string());
                    return Err(error);
                }
                tracing::info!(vm = machine.id(), ?boot, "VM ready");
                Ok(Self {
                    machine,
                    client,
                    spec,
                    boot,
                    created: Instant::now(),
                    reverts: 0,
                    last_sample: None,
                    user_snapshots: false,
                })
            }
            Err(e) => {
                let _ = machine.destroy().await;
                failed(machine.as_ref(), e.to_string());
                Err(e)
            }
        }
    }

    /// Connects the channel and waits for the Hello while watching for a crash.
    async fn handshake(
        machine: &mut Box<dyn Machine>,
        spec: &VmSpec,
        started: Instant,
    ) -> Result<(GuestClient, Duration), VmError> {
        let deadline = started + spec.boot_timeout;
        let stream = machine.connect_channel().await?;
        let hello = GuestClient::connect(stream, spec.boot_timeout);
        tokio::pin!(hello);
        let mut watch = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                result = &mut hello => {
                    return match result {
                        Ok(client) => Ok((client, started.elapsed())),
                        Err(ClientError::Timeout { .. }) => Err(VmError::BootTimeout {
                            vm: machine.id().to_string(),
                            after: spec.boot_timeout,
                            serial_tail: machine.serial_tail(SERIAL_TAIL_LINES),
                        }),
                        Err(source) => {
                            machine.check_alive().await?;
                            Err(VmError::Guest { vm: machine.id().to_string(), source })
                        }
                    };
                }
                _ = watch.tick() => {
                    machine.check_alive().await?;
                    if Instant::now() > deadline + Duration::from_secs(1) {
                        return Err(VmError::BootTimeout {
                            vm: machine.id().to_string(),
                            after: spec.boot_timeout,
                            serial_tail: machine.serial_tail(SERIAL_TAIL_LINES),
                        });
                    }
                }
            }
        }
    }

    /// A handle on a VM another process owns: `machine` forwards the
    /// hypervisor operations to that process (the pool daemon's lease,
    /// [`crate::daemon`]) and its channel reaches the same guest agent, which
    /// said `hello` and is quiet (no request in flight). Connects the channel;
    /// no resynchronisation is needed.
    pub async fn attach(
        mut machine: Box<dyn Machine>,
        hello: Hello,
        spec: VmSpec,
        boot: BootTimings,
    ) -> Result<Self, VmError> {
        let stream = machine.connect_channel().await?;
        Ok(Self {
            client: GuestClient::attach(stream, hello),
            machine,
            spec,
            boot,
            created: Instant::now(),
            reverts: 0,
            last_sample: None,
            user_snapshots: false,
        })
    }

    /// The hypervisor-level machine. For the pool daemon, which runs the
    /// machine operations of a VM it lent to another process: they bypass
    /// this handle's channel (that process resynchronises its own).
    pub fn machine_mut(&mut self) -> &mut dyn Machine {
        self.machine.as_mut()
    }

    /// The VM's unique id.
    pub fn id(&self) -> &str {
        self.machine.id()
    }

    /// The spec it was launched from.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// How long its boot took.
    pub fn boot_timings(&self) -> BootTimings {
        self.boot
    }

    /// Time since the VM became ready.
    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// How many times it was reverted.
    pub fn revert_count(&self) -> u64 {
        self.reverts
    }

    /// The guest agent's Hello.
    pub fn guest_info(&self) -> &Hello {
        self.client.guest_hello()
    }

    /// The control channel client, for operations this handle does not wrap.
    pub fn client(&self) -> &GuestClient {
        &self.client
    }

    /// Host process id of the VM's hypervisor, when the backend knows it.
    pub fn host_pid(&self) -> Option<u32> {
        self.machine.host_pid()
    }

    /// Samples the hypervisor process's resource use from `/proc` (CPU
    /// percentage since the previous sample) and emits it as
    /// [`Event::VmResources`]. `None` when the backend has no host process.
    pub fn sample_resources(&mut self) -> Option<ProcessUsage> {
        let pid = self.machine.host_pid()?;
        let now = SystemTime::now();
        let usage = ProcessUsage::sample(pid, self.last_sample)?;
        self.last_sample = Some((usage.cpu_seconds, now));
        emit(Event::VmResources {
            vm: self.id().to_string(),
            usage,
        });
        Some(usage)
    }

    /// The last lines of the serial console.
    pub fn serial_tail(&self, lines: usize) -> String {
        self.machine.serial_tail(lines)
    }

    /// Path of the serial console log.
    pub fn serial_log_path(&self) -> Option<std::path::PathBuf> {
        self.machine.serial_log_path()
    }

    /// Runs a command to completion and returns its output and exit report.
    pub async fn exec(&mut self, command: Command) -> Result<ExecOutput, VmError> {
        let budget = command
            .get_timeout()
            .unwrap_or(Duration::from_secs(24 * 3600))
            + HOST_EXEC_SLACK;
        let request = command.into_request();
        let result = tokio::time::timeout(budget, self.client.exec_collect(request)).await;
        match result {
            Ok(output) => self.guest_result(output).await,
            Err(_) => Err(self.hung("exec", budget)),
        }
    }

    /// Starts a command and streams its events.
    pub async fn spawn(&mut self, command: Command) -> Result<ExecStream, VmError> {
        let result = self.client.exec(command.into_request()).await;
        self.guest_result(result).await
    }

    /// Writes a file in the guest (relative paths are under the workspace).
    pub async fn write_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), VmError> {
        let result = self.client.put_file(path, data, mode).await;
        self.guest_result(result).await
    }

    /// Reads a file from the guest; returns content and permission bits.
    pub async fn read_file(&mut self, path: &str) -> Result<(Vec<u8>, u32), VmError> {
        let result = self.client.get_file(path).await;
        self.guest_result(result).await
    }

    /// Workspace changes since the baseline.
    pub async fn workspace_changes(
        &mut self,
        include_text: bool,
    ) -> Result<Vec<FileChange>, VmError> {
        let result = self.client.list_changes(include_text).await;
        self.guest_result(result).await
    }

    /// The changes since the baseline as `request` asks for them: the
    /// workspace's, and those outside it.
    pub async fn changes(&mut self, request: ListChangesRequest) -> Result<ChangeList, VmError> {
        let result = self.client.changes(request).await;
        self.guest_result(result).await
    }

    /// Makes the current workspace the baseline for [`Vm::workspace_changes`].
    pub async fn reset_workspace_baseline(&mut self) -> Result<(), VmError> {
        let result = self.client.reset_baseline().await;
        self.guest_result(result).await
    }

    /// Listens on TCP `port` of the guest's loopback; every connection a
    /// guest process makes there arrives on the returned listener as a
    /// [`TunnelStream`](crate::tunnel::TunnelStream), carried over the
    /// control channel (no NIC needed). A revert ends the listener.
    pub async fn tunnel_listen(
        &mut self,
        port: u16,
    ) -> Result<crate::tunnel::TunnelListener, VmError> {
        let result = self.client.tunnel_listen(port).await;
        self.guest_result(result).await
    }

    /// Round trip of a ping over the control channel (a health check).
    pub async fn ping(&mut self) -> Result<Duration, VmError> {
        let result = tokio::time::timeout(Duration::from_secs(5), self.client.ping()).await;
        match result {
            Ok(rtt) => self.guest_result(rtt).await,
            Err(_) => Err(self.hung("ping", Duration::from_secs(5))),
        }
    }

    /// Pauses the VM's vCPUs.
    pub async fn pause(&mut self) -> Result<(), VmError> {
        Ok(self.machine.pause().await?)
    }

    /// Resumes the VM's vCPUs.
    pub async fn resume(&mut self) -> Result<(), VmError> {
        Ok(self.machine.resume().await?)
    }

    /// The VM's run state, as the hypervisor reports it.
    pub async fn state(&mut self) -> Result<MachineState, VmError> {
        Ok(self.machine.state().await?)
    }

    /// Waits until the VM is in `wanted` (polling every 20 ms), at most
    /// `timeout`; [`VmError::StateTimeout`] names the state it is in then.
    pub async fn wait_for_state(
        &mut self,
        wanted: MachineState,
        timeout: Duration,
    ) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.machine.state().await?;
            if now == wanted {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmError::StateTimeout {
                    vm: self.id().to_string(),
                    wanted,
                    now,
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Takes a snapshot named `name` (memory + disk) that [`Vm::revert_to`]
    /// returns to, replacing one of the same name. Names are 1–64 ASCII
    /// letters, digits, `_`, `-`, `.`, starting with a letter; `golden` is
    /// the VM's own. The pool deletes a lease's snapshots when it ends.
    pub async fn snapshot(&mut self, name: &str) -> Result<(), VmError> {
        self.check_user_snapshot_name(name)?;
        self.user_snapshots = true;
        Ok(self.machine.save_snapshot(name).await?)
    }

    /// The VM's snapshots, oldest first; the golden one is among them.
    pub async fn snapshots(&mut self) -> Result<Vec<String>, VmError> {
        Ok(self.machine.snapshot_names().await?)
    }

    /// Restores snapshot `name` (or `golden`, like [`Vm::revert`]) and
    /// resynchronises the channel, the guest's clock and its RNG.
    pub async fn revert_to(&mut self, name: &str) -> Result<RevertTimings, VmError> {
        if name != GOLDEN_SNAPSHOT {
            self.check_user_snapshot_name(name)?;
        }
        self.load(name).await
    }

    /// Deletes snapshot `name`. The golden snapshot cannot be deleted.
    pub async fn delete_snapshot(&mut self, name: &str) -> Result<(), VmError> {
        self.check_user_snapshot_name(name)?;
        Ok(self.machine.delete_snapshot(name).await?)
    }

    /// Deletes every snapshot but the golden one (the pool calls this when
    /// a lease ends, so one test's snapshots never reach the next).
    pub async fn delete_user_snapshots(&mut self) -> Result<usize, VmError> {
        if !self.user_snapshots {
            return Ok(0);
        }
        let names = self.machine.snapshot_names().await?;
        let mut deleted = 0;
        for name in names.iter().filter(|n| *n != GOLDEN_SNAPSHOT) {
            self.machine.delete_snapshot(name).await?;
            deleted += 1;
        }
        self.user_snapshots = false;
        Ok(deleted)
    }

    fn check_user_snapshot_name(&self, name: &str) -> Result<(), VmError> {
        let problem = if name == GOLDEN_SNAPSHOT {
            "the golden snapshot is the VM's own: it cannot be taken, replaced or deleted \
             (use revert() to return to it)"
                .to_string()
        } else if !is_valid_snapshot_name(name) {
            format!(
                "invalid snapshot name {name:?}: use 1-64 ASCII letters, digits, '_', '-', '.', \
                 starting with a letter"
            )
        } else {
            return Ok(());
        };
        Err(VmError::InvalidSnapshotName {
            vm: self.id().to_string(),
            problem,
        })
    }

    /// Restores the golden snapshot and resynchronises the control channel:
    /// afterwards the VM is exactly as it was right after boot.
    pub async fn revert(&mut self) -> Result<RevertTimings, VmError> {
        self.load(GOLDEN_SNAPSHOT).await
    }

    async fn load(&mut self, name: &str) -> Result<RevertTimings, VmError> {
        let start = Instant::now();
        let outcome = if name == GOLDEN_SNAPSHOT {
            self.machine.revert_golden().await?
        } else {
            self.machine.load_snapshot(name).await?
        };
        let restore = start.elapsed();
        if outcome == RevertOutcome::ChannelReset {
            let stream = self.machine.connect_channel().await?;
            self.client =
                GuestClient::attach_after_revert(stream, self.client.guest_hello().clone());
        }
        let resync = match self.client.resync(RESYNC_TIMEOUT).await {
            Ok(stats) => stats,
            Err(source) => {
                self.machine.check_alive().await?;
                return Err(VmError::Guest {
                    vm: self.id().to_string(),
                    source,
                });
            }
        };
        let network = if takes_dhcp(&self.spec.network) {
            match take_dhcp_lease(&self.client, self.machine.as_ref()).await {
                Ok(took) => Some(took),
                Err(e) => {
                    self.machine.check_alive().await?;
                    return Err(e);
                }
            }
        } else {
            None
        };
        self.reverts += 1;
        let total = start.elapsed();
        emit(Event::VmReverted {
            vm: self.id().to_string(),
            revert_seconds: total.as_secs_f64(),
        });
        Ok(RevertTimings {
            restore,
            resync,
            network,
            total,
        })
    }

    /// Runs a no-op shell command (`sh -c :`) so that the guest's next
    /// command does not pay for a cold start. Under TCG, restoring a snapshot
    /// throws away all translated guest code (QEMU flushes its translation
    /// cache on `loadvm`), and the first command after a revert took ~150 ms
    /// against ~15 ms warm; after this warm-up the first command costs about
    /// twice a warm one (`cargo xtask bench`, `first_exec_*` figures). The
    /// pool calls it in the background after every revert, off the test's
    /// path. Returns how long it took.
    pub async fn warm_up(&mut self) -> Result<Duration, VmError> {
        let start = Instant::now();
        let out = self
            .exec(Command::shell(":").timeout(WARM_UP_TIMEOUT))
            .await?;
        if out.report.status != ExitStatus::Code(0) {
            return Err(VmError::WarmUp {
                vm: self.id().to_string(),
                status: format!("{:?}", out.report.status),
            });
        }
        Ok(start.elapsed())
    }

    /// Checks that the VM runs and its agent answers.
    pub async fn health_check(&mut self) -> Result<(), VmError> {
        self.machine.check_alive().await?;
        self.ping().await.map(drop)
    }

    /// Stops the VM gracefully: the guest agent syncs and powers the guest
    /// off, the hypervisor is given `timeout` to notice (QEMU exits, the
    /// libvirt domain shuts off), then the VM's files are removed. A guest
    /// that does not stop in time is stopped by force; the result says which.
    pub async fn shutdown(mut self, timeout: Duration) -> Result<Shutdown, VmError> {
        let asked = self.client.shutdown(true).await;
        let graceful = match asked {
            Ok(()) => self.machine.wait_stopped(timeout).await?,
            Err(e) => {
                tracing::warn!(vm = self.id(), error = %e, "the guest agent did not take the shutdown; stopping by force");
                false
            }
        };
        let outcome = if graceful {
            Shutdown::Graceful
        } else {
            Shutdown::Forced
        };
        self.destroy_because(match outcome {
            Shutdown::Graceful => "shutdown",
            Shutdown::Forced => "shutdown (forced)",
        })
        .await?;
        Ok(outcome)
    }

    /// Stops the VM and removes its files.
    pub async fn destroy(self) -> Result<(), VmError> {
        self.destroy_because("destroyed").await
    }

    /// [`Vm::destroy`], recording `reason` in the [`Event::VmDestroyed`].
    pub async fn destroy_because(mut self, reason: &str) -> Result<(), VmError> {
        let result = self.machine.destroy().await;
        emit(Event::VmDestroyed {
            vm: self.id().to_string(),
            reason: reason.to_string(),
        });
        Ok(result?)
    }

    /// Maps a client error to a [`VmError`], turning a dead channel into the
    /// crash that caused it when the machine is gone.
    async fn guest_result<T>(&mut self, result: Result<T, ClientError>) -> Result<T, VmError> {
        match result {
            Ok(value) => Ok(value),
            Err(source) => {
                if matches!(
                    source,
                    ClientError::Closed { .. } | ClientError::Protocol(_)
                ) {
                    self.machine.check_alive().await?;
                }
                Err(VmError::Guest {
                    vm: self.id().to_string(),
                    source,
                })
            }
        }
    }

    fn hung(&self, operation: &str, after: Duration) -> VmError {
        VmError::Hung {
            vm: self.id().to_string(),
            operation: operation.to_string(),
            after,
            serial_tail: self.machine.serial_tail(SERIAL_TAIL_LINES),
        }
    }
}
