//! Hypervisor backends. A [`Backend`] launches [`Machine`]s; callers (the
//! [`Vm`](crate::vm::Vm) handle, the pool) only use these traits, so QEMU,
//! libvirt and a mock are interchangeable.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::protocol::Hello;
use crate::spec::VmSpec;

mod factory;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod mock;
pub mod qemu;

pub use factory::{create_backend, FromConfig};

/// The byte stream of a VM's control channel.
pub trait ChannelStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ChannelStream for T {}

/// A boxed control channel stream.
pub type BoxedChannel = Pin<Box<dyn ChannelStream>>;

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A program the backend needs is not installed.
    #[error("{program} not found: {hint}")]
    MissingProgram {
        /// The program.
        program: String,
        /// What to do about it.
        hint: String,
    },
    /// The configured backend is not compiled into this build.
    #[error("the {backend} backend is not compiled in: {hint}")]
    NotCompiled {
        /// The backend's configuration name.
        backend: &'static str,
        /// How to get it.
        hint: &'static str,
    },
    /// A setting (environment variable) of the backend has a bad value.
    #[error("{setting}={value:?} is not valid: expected {expected}")]
    InvalidSetting {
        /// The setting.
        setting: String,
        /// Its value.
        value: String,
        /// What is allowed.
        expected: String,
    },
    /// The guest image is missing or incomplete.
    #[error("guest image {name:?} not found at {}: build it with {}", .path.display(), crate::image::build_hint_for_missing(.name, .path, ""))]
    MissingImage {
        /// Image name.
        name: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The hypervisor process could not be started.
    #[error("failed to start {what}: {source}")]
    Spawn {
        /// What was being started.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VM died (QEMU exited, guest kernel panicked and the VM stopped).
    #[error("VM {vm} crashed: {reason}\n--- last serial console lines ---\n{serial_tail}")]
    Crashed {
        /// VM id.
        vm: String,
        /// What was observed.
        reason: String,
        /// The end of the serial console log.
        serial_tail: String,
    },
    /// The hypervisor's control interface (QMP, libvirt API) reported an error.
    #[error("VM {vm}: {operation} failed: {message}")]
    Control {
        /// VM id.
        vm: String,
        /// The operation.
        operation: String,
        /// What the hypervisor said.
        message: String,
    },
    /// An operation did not finish in time.
    #[error("VM {vm}: {operation} did not finish within {after:?}")]
    Timeout {
        /// VM id.
        vm: String,
        /// The operation.
        operation: String,
        /// The deadline.
        after: Duration,
    },
    /// The host a VM ran on went away (its libvirt daemon or the machine
    /// stopped answering): the VM is lost with it.
    #[error("libvirt host {host} went away: VM {vm} on it is lost ({reason}); new VMs go to the other configured hosts, if any")]
    HostLost {
        /// The host's connection URI.
        host: String,
        /// VM id.
        vm: String,
        /// What failed.
        reason: String,
    },
    /// No configured host can take another VM.
    #[error("no libvirt host can take another VM: {details}")]
    NoHost {
        /// Each host and why not.
        details: String,
    },
    /// Filesystem or socket I/O on the host failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Launches VMs.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name for logs and reports (`qemu`, `libvirt`, `mock`).
    fn name(&self) -> &'static str;

    /// Starts a VM from `spec`. Returns once the hypervisor runs the guest and
    /// the host end of the control channel can be connected; it does not wait
    /// for the guest agent (the caller waits for its Hello).
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Machine>, BackendError>;

    /// Starts a VM already at the golden snapshot an earlier VM of the same
    /// `spec` shared with [`Machine::share_golden`] (a golden cache), with
    /// the host end of its control channel connected. `None` when the
    /// backend has no such snapshot (or no cache): boot with
    /// [`Backend::launch`] instead.
    async fn launch_restored(
        &self,
        _spec: &VmSpec,
    ) -> Result<Option<RestoredMachine>, BackendError> {
        Ok(None)
    }

    /// Drops the shared golden snapshot of `spec`: a VM restored from it did
    /// not work, and no later VM should try it again.
    async fn forget_restored(&self, _spec: &VmSpec) {}
}

/// A VM started at a shared golden snapshot ([`Backend::launch_restored`]).
pub struct RestoredMachine {
    /// The VM.
    pub machine: Box<dyn Machine>,
    /// Its control channel, connected before the snapshot was loaded so that
    /// the guest never sees the host go away (resynchronise it first).
    pub channel: BoxedChannel,
    /// What the guest agent said in its Hello before the snapshot.
    pub hello: Hello,
}

impl std::fmt::Debug for RestoredMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoredMachine")
            .field("vm", &self.machine.id())
            .field("hello", &self.hello)
            .finish_non_exhaustive()
    }
}

/// One running VM, at the hypervisor level.
#[async_trait]
pub trait Machine: Send + Sync {
    /// Unique id (also used in file names and logs).
    fn id(&self) -> &str;

    /// Opens the host end of the control channel. May be called again after
    /// the stream broke (e.g. a backend whose revert restarts the hypervisor).
    async fn connect_channel(&mut self) -> Result<BoxedChannel, BackendError>;

    /// Takes the golden snapshot (memory + disk) of the running VM.
    async fn snapshot_golden(&mut self) -> Result<(), BackendError>;

    /// Offers the golden snapshot just taken, with the guest agent's
    /// `hello`, to the backend's golden cache, so that later VMs of the same
    /// spec can start from it ([`Backend::launch_restored`]). Does nothing
    /// when the backend has no cache or already holds one for this spec.
    async fn share_golden(&mut self, _hello: &Hello) -> Result<(), BackendError> {
        Ok(())
    }

    /// Restores the golden snapshot. Afterwards the guest runs from the instant
    /// of the snapshot; bytes in flight on the channel are garbage and the
    /// caller must resynchronise. Returns whether the channel stream must be
    /// reconnected (the old one is dead).
    async fn revert_golden(&mut self) -> Result<RevertOutcome, BackendError>;

    /// Takes a named snapshot (memory + disk) beside the golden one; one of
    /// the same name is replaced. The caller checks the name
    /// ([`is_valid_snapshot_name`]) and keeps the golden name for itself.
    async fn save_snapshot(&mut self, name: &str) -> Result<(), BackendError>;
    /// Restores a named snapshot, like [`Machine::revert_golden`].
    async fn load_snapshot(&mut self, name: &str) -> Result<RevertOutcome, BackendError>;
    /// Deletes a named snapshot.
    async fn delete_snapshot(&mut self, name: &str) -> Result<(), BackendError>;
    /// The names of the VM's snapshots (the golden one included), oldest first.
    async fn snapshot_names(&mut self) -> Result<Vec<String>, BackendError>;
    /// The VM's run state. A VM that is gone is `ShutOff` or `Crashed`, not an error.
    async fn state(&mut self) -> Result<MachineState, BackendError>;
    /// Pauses the vCPUs.
    async fn pause(&mut self) -> Result<(), BackendError>;

    /// Resumes the vCPUs.
    async fn resume(&mut self) -> Result<(), BackendError>;

    /// `Err(Crashed)` when the VM is no longer running (process gone, guest panicked).
    async fn check_alive(&mut self) -> Result<(), BackendError>;

    /// Stops the VM at once and removes its temporary files. Idempotent.
    async fn destroy(&mut self) -> Result<(), BackendError>;

    /// Waits until the guest has powered itself off (the hypervisor process
    /// exited, or the domain is shut off), at most `timeout`. `Ok(false)`
    /// when it still runs then. Call [`Machine::destroy`] afterwards either way
    /// (it removes the files).
    async fn wait_stopped(&mut self, timeout: Duration) -> Result<bool, BackendError>;

    /// The last `lines` lines of the serial console log.
    fn serial_tail(&self, lines: usize) -> String;

    /// Path of the serial console log, for artifacts.
    fn serial_log_path(&self) -> Option<PathBuf>;

    /// Host process id of the hypervisor, when there is one (for resource
    /// sampling from `/proc`).
    fn host_pid(&self) -> Option<u32> {
        None
    }
}

/// Name of every VM's golden snapshot (taken after boot, restored by
/// [`Machine::revert_golden`]).
pub const GOLDEN_SNAPSHOT: &str = "golden";

/// A VM's run state, as its hypervisor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MachineState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are stopped (paused, or busy saving or loading a snapshot).
    Paused,
    /// The guest powered itself off, or the VM was destroyed.
    ShutOff,
    /// The guest kernel panicked or the hypervisor failed.
    Crashed,
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::ShutOff => "shut off",
            Self::Crashed => "crashed",
        })
    }
}

/// Whether `name` may name a snapshot the user takes: 1 to 64 ASCII
/// letters, digits, `_`, `-` or `.`, starting with a letter (a name of
/// digits would be taken for a snapshot id by QEMU's monitor).
pub fn is_valid_snapshot_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// What a revert did to the control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevertOutcome {
    /// The stream survived; resynchronise it.
    ChannelKept,
    /// The stream is dead; call [`Machine::connect_channel`] again.
    ChannelReset,
}
