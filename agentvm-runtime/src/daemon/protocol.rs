//! The pool daemon's wire protocol: length-prefixed JSON messages on a UNIX
//! socket. Each message is a 4-byte big-endian length and that many bytes of
//! JSON; a length above [`MAX_MESSAGE_LEN`] or bytes that are not one of
//! these messages is a [`WireError`], answered with [`Response::Error`] and
//! the connection closed — nothing else changes.
//!
//! A connection starts with one [`Request`]: [`Request::Lease`] makes it a
//! lease (machine calls and [`Request::Release`] follow on it; its end gives
//! the VM back), [`Request::Channel`] makes it the byte stream of a leased
//! VM's control channel (after [`Response::ChannelReady`] the daemon splices
//! it to the guest), [`Request::Status`] and [`Request::Stop`] are one-shot.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::backend::{BackendError, MachineState, RevertOutcome};
use crate::client::ResyncStats;
use crate::pool::ReleaseOutcome;
use crate::protocol::Hello;
use crate::spec::{NetworkMode, ResourceProfile};
use crate::vm::{BootTimings, RevertTimings};

/// Version of this protocol; a daemon and a client of other versions refuse
/// each other (see [`Fingerprint`]).
pub const DAEMON_PROTOCOL_VERSION: u32 = 1;

/// Largest message either side accepts.
pub const MAX_MESSAGE_LEN: u32 = 1024 * 1024;

/// What must be equal in a test process and the daemon it leases from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// [`DAEMON_PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The `agentvm-runtime` version.
    pub version: String,
    /// The backend's configuration name.
    pub backend: String,
    /// The guest image directory.
    pub image_dir: PathBuf,
    /// The accelerator setting.
    pub accel: String,
    /// The libvirt connection URI (libvirt backend).
    pub libvirt_uri: Option<String>,
}

impl Fingerprint {
    /// The `(what, daemon's, ours)` triples that differ.
    pub fn differences(&self, ours: &Fingerprint) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let mut check = |what: &str, theirs: String, mine: String| {
            if theirs != mine {
                out.push((what.to_string(), theirs, mine));
            }
        };
        check(
            "protocol version",
            self.protocol.to_string(),
            ours.protocol.to_string(),
        );
        check(
            "agentvm version",
            self.version.clone(),
            ours.version.clone(),
        );
        check("backend", self.backend.clone(), ours.backend.clone());
        check(
            "image directory",
            self.image_dir.display().to_string(),
            ours.image_dir.display().to_string(),
        );
        check("accel", self.accel.clone(), ours.accel.clone());
        check(
            "libvirt URI",
            format!("{:?}", self.libvirt_uri),
            format!("{:?}", ours.libvirt_uri),
        );
        out
    }
}

/// The VMs a lease wants: one daemon pool per distinct shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolShape {
    /// Guest image name.
    pub image: String,
    /// Resource profile.
    pub profile: ResourceProfile,
    /// What the VM is attached to ([`NetworkMode::vm_attachment`]).
    pub network: NetworkMode,
}

impl PoolShape {
    /// The pool key, as the harness prints it (`default/1x256MiB/isolated`).
    pub fn key(&self) -> String {
        format!(
            "{}/{}x{}MiB/{}",
            self.image,
            self.profile.vcpus(),
            self.profile.memory_mib(),
            self.network
        )
    }
}

/// [`Request::Lease`]'s content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// The client's configuration, checked against the daemon's.
    pub fingerprint: Fingerprint,
    /// The VM wanted.
    pub shape: PoolShape,
    /// How long to wait for a VM.
    pub acquire_timeout: Duration,
    /// Who asks (for the daemon's log).
    pub client: String,
}

/// A hypervisor operation on the leased VM ([`crate::backend::Machine`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineCall {
    /// [`crate::backend::Machine::revert_golden`].
    RevertGolden,
    /// [`crate::backend::Machine::save_snapshot`].
    SaveSnapshot(String),
    /// [`crate::backend::Machine::load_snapshot`].
    LoadSnapshot(String),
    /// [`crate::backend::Machine::delete_snapshot`].
    DeleteSnapshot(String),
    /// [`crate::backend::Machine::snapshot_names`].
    SnapshotNames,
    /// [`crate::backend::Machine::state`].
    State,
    /// [`crate::backend::Machine::pause`].
    Pause,
    /// [`crate::backend::Machine::resume`].
    Resume,
    /// [`crate::backend::Machine::check_alive`].
    CheckAlive,
    /// [`crate::backend::Machine::wait_stopped`].
    WaitStopped(Duration),
}

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Lease a VM (first message of a lease connection).
    Lease(LeaseRequest),
    /// Make this connection the control channel of lease `lease` (first
    /// message of a channel connection; `token` is the lease's secret).
    Channel {
        /// The lease id.
        lease: u64,
        /// The lease's secret ([`LeaseGrant::token`]).
        token: u64,
    },
    /// A machine operation on the leased VM (lease connections only).
    Machine(MachineCall),
    /// Give the VM back and report the revert (lease connections only).
    Release,
    /// The daemon's pools and leases.
    Status,
    /// Shut the pools down and exit.
    Stop,
}

/// A VM's boot timings on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBoot {
    /// [`BootTimings::to_hello`].
    pub to_hello: Duration,
    /// [`BootTimings::snapshot`].
    pub snapshot: Duration,
    /// [`BootTimings::restored`].
    pub restored: bool,
    /// [`BootTimings::network`].
    pub network: Option<Duration>,
}

impl From<BootTimings> for WireBoot {
    fn from(b: BootTimings) -> Self {
        Self {
            to_hello: b.to_hello,
            snapshot: b.snapshot,
            restored: b.restored,
            network: b.network,
        }
    }
}

impl From<WireBoot> for BootTimings {
    fn from(b: WireBoot) -> Self {
        Self {
            to_hello: b.to_hello,
            snapshot: b.snapshot,
            restored: b.restored,
            network: b.network,
        }
    }
}

/// [`Response::Leased`]'s content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// The lease id.
    pub lease: u64,
    /// The secret a channel connection of this lease presents.
    pub token: u64,
    /// The VM's id.
    pub vm: String,
    /// Its guest agent's Hello.
    pub hello: Hello,
    /// Its boot timings.
    pub boot: WireBoot,
    /// How long the daemon's pool waited for it.
    pub waited: Duration,
    /// Leases this VM has served, this one included.
    pub uses: u64,
    /// The serial console log (same host: the client reads it directly).
    pub serial_log: Option<PathBuf>,
    /// The hypervisor's host process id.
    pub host_pid: Option<u32>,
    /// The daemon's process id.
    pub daemon_pid: u32,
}

/// A revert's timings on the wire ([`RevertTimings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRevert {
    /// Restoring the snapshot.
    pub restore: Duration,
    /// Stale frames dropped by the resync.
    pub frames_dropped: u64,
    /// Garbage bytes dropped by the resync.
    pub bytes_dropped: u64,
    /// The resync's round trip.
    pub resync: Duration,
    /// Whether the guest reseeded its clock and RNG.
    pub reseeded: bool,
    /// DHCP renewal.
    pub network: Option<Duration>,
    /// All of it.
    pub total: Duration,
}

/// How a release ended ([`ReleaseOutcome`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireRelease {
    /// Reverted and back in the pool.
    Reverted(WireRevert),
    /// Destroyed at its use count or age limit.
    Recycled,
    /// Destroyed because it failed.
    Destroyed(String),
    /// The daemon did not learn the outcome.
    Unknown(String),
}

impl From<ReleaseOutcome> for WireRelease {
    fn from(outcome: ReleaseOutcome) -> Self {
        match outcome {
            ReleaseOutcome::Reverted(t) => Self::Reverted(WireRevert {
                restore: t.restore,
                frames_dropped: t.resync.frames_dropped,
                bytes_dropped: t.resync.bytes_dropped,
                resync: t.resync.elapsed,
                reseeded: t.resync.reseeded,
                network: t.network,
                total: t.total,
            }),
            ReleaseOutcome::Recycled => Self::Recycled,
            ReleaseOutcome::Destroyed(reason) => Self::Destroyed(reason),
        }
    }
}

impl WireRelease {
    /// Back to a [`ReleaseOutcome`] (`Unknown` becomes `Destroyed`).
    pub fn into_outcome(self) -> ReleaseOutcome {
        match self {
            Self::Reverted(t) => ReleaseOutcome::Reverted(RevertTimings {
                restore: t.restore,
                resync: ResyncStats {
                    frames_dropped: t.frames_dropped,
                    bytes_dropped: t.bytes_dropped,
                    elapsed: t.resync,
                    reseeded: t.reseeded,
                },
                network: t.network,
                total: t.total,
            }),
            Self::Recycled => ReleaseOutcome::Recycled,
            Self::Destroyed(reason) | Self::Unknown(reason) => ReleaseOutcome::Destroyed(reason),
        }
    }
}

/// A machine call's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineAnswer {
    /// Done, nothing to report.
    Done,
    /// A restore's effect on the channel (`true`: reconnect it).
    Restored {
        /// [`RevertOutcome::ChannelReset`].
        channel_reset: bool,
    },
    /// Snapshot names.
    Names(Vec<String>),
    /// The run state.
    State(WireState),
    /// [`crate::backend::Machine::wait_stopped`]'s answer.
    Stopped(bool),
}

impl MachineAnswer {
    /// The answer to a restore.
    pub fn restored(outcome: RevertOutcome) -> Self {
        Self::Restored {
            channel_reset: outcome == RevertOutcome::ChannelReset,
        }
    }
}

/// [`MachineState`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireState {
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Shut off.
    ShutOff,
    /// Crashed.
    Crashed,
}

impl From<MachineState> for WireState {
    fn from(s: MachineState) -> Self {
        match s {
            MachineState::Running => Self::Running,
            MachineState::Paused => Self::Paused,
            MachineState::ShutOff => Self::ShutOff,
            MachineState::Crashed => Self::Crashed,
        }
    }
}

impl From<WireState> for MachineState {
    fn from(s: WireState) -> Self {
        match s {
            WireState::Running => Self::Running,
            WireState::Paused => Self::Paused,
            WireState::ShutOff => Self::ShutOff,
            WireState::Crashed => Self::Crashed,
        }
    }
}

/// A backend error on the wire: crashes keep their serial tail, the rest
/// their message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireBackendError {
    /// [`BackendError::Crashed`].
    Crashed {
        /// VM id.
        vm: String,
        /// What was observed.
        reason: String,
        /// End of the serial console.
        serial_tail: String,
    },
    /// Anything else.
    Other(String),
}

impl From<&BackendError> for WireBackendError {
    fn from(e: &BackendError) -> Self {
        match e {
            BackendError::Crashed {
                vm,
                reason,
                serial_tail,
            } => Self::Crashed {
                vm: vm.clone(),
                reason: reason.clone(),
                serial_tail: serial_tail.clone(),
            },
            other => Self::Other(other.to_string()),
        }
    }
}

impl WireBackendError {
    /// Back to a [`BackendError`] about `operation` on `vm`.
    pub fn into_backend(self, vm: &str, operation: &str) -> BackendError {
        match self {
            Self::Crashed {
                vm,
                reason,
                serial_tail,
            } => BackendError::Crashed {
                vm,
                reason,
                serial_tail,
            },
            Self::Other(message) => BackendError::Control {
                vm: vm.to_string(),
                operation: format!("{operation} (through the pool daemon)"),
                message,
            },
        }
    }
}

/// One pool of the daemon, for [`Response::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolReport {
    /// The pool key ([`PoolShape::key`]).
    pub key: String,
    /// VMs ready.
    pub available: usize,
    /// VMs leased.
    pub leased: usize,
    /// VMs booting.
    pub booting: usize,
    /// VMs reverting.
    pub reverting: usize,
    /// VMs destroyed so far.
    pub destroyed: u64,
    /// Leases granted so far.
    pub leases: u64,
    /// The ids of the VMs leased so far, in order of first lease.
    pub vms: Vec<String>,
}

/// [`Response::Status`]'s content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's process id.
    pub pid: u32,
    /// Its configuration.
    pub fingerprint: Fingerprint,
    /// Its idle timeout.
    pub idle_timeout: Duration,
    /// Its pools.
    pub pools: Vec<PoolReport>,
    /// Leases open now.
    pub open_leases: usize,
    /// Hypervisor process ids of the VMs alive.
    pub vm_pids: Vec<u32>,
}

/// Why the daemon refused a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The request was not understood ([`WireError`]).
    Malformed(String),
    /// The client's configuration differs from the daemon's: `(what, daemon's, client's)`.
    Mismatch {
        /// The differences.
        differences: Vec<(String, String, String)>,
        /// The daemon's process id.
        daemon_pid: u32,
    },
    /// No VM could be had (pool error).
    Acquire(String),
    /// The request does not fit the connection (e.g. a machine call before a lease).
    Unexpected(String),
    /// The lease of a channel connection does not exist (any more).
    UnknownLease(u64),
    /// A machine call failed.
    Machine(WireBackendError),
    /// The daemon is shutting down.
    ShuttingDown,
}

/// What the daemon sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// A VM is leased on this connection.
    Leased(Box<LeaseGrant>),
    /// This connection is now the VM's control channel.
    ChannelReady,
    /// A machine call's answer.
    Machine(MachineAnswer),
    /// The VM was given back.
    Released(WireRelease),
    /// The daemon's state.
    Status(Box<DaemonStatus>),
    /// The daemon stops.
    Stopping,
    /// The request was refused.
    Error(Refusal),
}

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed.
    #[error("pool daemon socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection before a message started.
    #[error("the connection closed")]
    Closed,
    /// The length prefix is above [`MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes is above the limit of {MAX_MESSAGE_LEN}")]
    TooLarge(u32),
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Encodes `message` with its length prefix.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let json = serde_json::to_vec(message).expect("protocol messages serialize");
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// Decodes one message body (without its length prefix).
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Writes one message.
pub async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    message: &T,
) -> Result<(), WireError> {
    writer.write_all(&encode(message)).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one message, exactly its bytes (nothing after it is consumed: a
/// channel connection's spliced bytes follow its first message).
pub async fn read_message<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    reader: &mut R,
) -> Result<T, WireError> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_MESSAGE_LEN {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    reader.read_exact(&mut body).await?;
    decode(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint() -> Fingerprint {
        Fingerprint {
            protocol: DAEMON_PROTOCOL_VERSION,
            version: "0.1.0".into(),
            backend: "qemu".into(),
            image_dir: "/ws/target/agentvm/images".into(),
            accel: "auto".into(),
            libvirt_uri: None,
        }
    }

    async fn round_trip<T>(message: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let bytes = encode(message);
        let mut reader = &bytes[..];
        let back = read_message(&mut reader).await.unwrap();
        assert!(reader.is_empty(), "read exactly one message");
        back
    }

    #[tokio::test]
    async fn requests_and_responses_round_trip() {
        let requests = [
            Request::Lease(LeaseRequest {
                fingerprint: fingerprint(),
                shape: PoolShape {
                    image: "default".into(),
                    profile: ResourceProfile::Custom {
                        vcpus: 2,
                        memory_mib: 512,
                    },
                    network: NetworkMode::Bridge("br0".into()),
                },
                acquire_timeout: Duration::from_millis(1500),
                client: "pid 1 test a::b".into(),
            }),
            Request::Channel {
                lease: 7,
                token: u64::MAX,
            },
            Request::Machine(MachineCall::SaveSnapshot("s1".into())),
            Request::Machine(MachineCall::WaitStopped(Duration::from_secs(3))),
            Request::Release,
            Request::Status,
            Request::Stop,
        ];
        for request in requests {
            assert_eq!(round_trip(&request).await, request);
        }
        let responses = [
            Response::ChannelReady,
            Response::Machine(MachineAnswer::restored(RevertOutcome::ChannelReset)),
            Response::Machine(MachineAnswer::State(MachineState::Paused.into())),
            Response::Released(WireRelease::Destroyed("crashed".into())),
            Response::Error(Refusal::Mismatch {
                differences: vec![("backend".into(), "qemu".into(), "libvirt".into())],
                daemon_pid: 42,
            }),
        ];
        for response in responses {
            assert_eq!(round_trip(&response).await, response);
        }
    }

    #[tokio::test]
    async fn messages_are_read_one_at_a_time() {
        let mut bytes = encode(&Request::Status);
        bytes.extend_from_slice(b"raw channel bytes");
        let mut reader = &bytes[..];
        let first: Request = read_message(&mut reader).await.unwrap();
        assert_eq!(first, Request::Status);
        assert_eq!(reader, b"raw channel bytes");
    }

    #[tokio::test]
    async fn malformed_input_is_an_error_not_a_panic() {
        // Not JSON.
        let mut bytes = 5u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        let e = read_message::<_, Request>(&mut &bytes[..])
            .await
            .unwrap_err();
        assert!(matches!(e, WireError::Malformed(_)), "{e}");
        // JSON, but no such request.
        let body = br#"{"launch_missiles":true}"#;
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        let e = read_message::<_, Request>(&mut &bytes[..])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("malformed message"), "{e}");
        // A length far above the limit is refused before any allocation.
        let bytes = u32::MAX.to_be_bytes();
        let e = read_message::<_, Request>(&mut &bytes[..])
            .await
            .unwrap_err();
        assert!(matches!(e, WireError::TooLarge(u32::MAX)), "{e}");
        // Truncated body.
        let mut bytes = 100u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{\"status\"");
        let e = read_message::<_, Request>(&mut &bytes[..])
            .await
            .unwrap_err();
        assert!(matches!(e, WireError::Io(_)), "{e}");
        // Nothing at all: a clean close.
        let e = read_message::<_, Request>(&mut &b""[..]).await.unwrap_err();
        assert!(matches!(e, WireError::Closed), "{e}");
    }

    #[test]
    fn fingerprint_differences_name_what_differs() {
        let daemon = fingerprint();
        assert!(daemon.differences(&daemon).is_empty());
        let ours = Fingerprint {
            backend: "libvirt".into(),
            image_dir: "/other".into(),
            ..fingerprint()
        };
        let diff = daemon.differences(&ours);
        assert_eq!(
            diff,
            vec![
                ("backend".into(), "qemu".into(), "libvirt".into()),
                (
                    "image directory".into(),
                    "/ws/target/agentvm/images".into(),
                    "/other".into()
                ),
            ]
        );
    }

    #[test]
    fn release_outcomes_survive_the_wire() {
        let timings = RevertTimings {
            restore: Duration::from_millis(90),
            resync: ResyncStats {
                frames_dropped: 1,
                bytes_dropped: 2,
                elapsed: Duration::from_millis(3),
                reseeded: true,
            },
            network: None,
            total: Duration::from_millis(100),
        };
        let outcome = ReleaseOutcome::Reverted(timings);
        assert_eq!(WireRelease::from(outcome.clone()).into_outcome(), outcome);
    }
}
