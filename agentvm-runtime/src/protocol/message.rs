//! The messages that travel in frames, and their bodies.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::frame::FrameError;

macro_rules! messages {
    ($( $(#[$doc:meta])* $kind:literal => $variant:ident($body:ty), )*) => {
        /// Every message of the protocol. The kind byte of each variant is
        /// fixed forever within a protocol version.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub enum Message {
            $( $(#[$doc])* $variant($body), )*
        }

        impl Message {
            /// The kind byte written into the frame header.
            pub fn kind(&self) -> u8 {
                match self { $( Self::$variant(_) => $kind, )* }
            }

            /// Human-readable name of the message kind.
            pub fn kind_name(&self) -> &'static str {
                match self { $( Self::$variant(_) => stringify!($variant), )* }
            }

            /// Name of a kind byte, if this build knows it.
            pub fn name_of_kind(kind: u8) -> Option<&'static str> {
                match kind { $( $kind => Some(stringify!($variant)), )* _ => None }
            }

            pub(crate) fn encode_payload<W: std::io::Write>(&self, out: W) -> Result<(), postcard::Error> {
                match self { $( Self::$variant(body) => postcard::to_io(body, out).map(drop), )* }
            }

            pub(crate) fn decode_payload(kind: u8, request_id: u64, payload: &[u8]) -> Result<Self, FrameError> {
                match kind {
                    $( $kind => decode_body::<$body>(stringify!($variant), request_id, payload).map(Self::$variant), )*
                    _ => Err(FrameError::UnknownKind { kind, request_id }),
                }
            }
        }
    };
}

/// Decodes a body and insists that it fills the payload exactly.
fn decode_body<'a, T: Deserialize<'a>>(
    kind_name: &'static str,
    request_id: u64,
    payload: &'a [u8],
) -> Result<T, FrameError> {
    let payload_error = |source| FrameError::Payload {
        kind_name,
        request_id,
        source,
    };
    let (body, rest) = postcard::take_from_bytes(payload).map_err(payload_error)?;
    if rest.is_empty() {
        Ok(body)
    } else {
        Err(payload_error(postcard::Error::DeserializeBadEncoding))
    }
}

messages! {
    /// First message each way after connecting: versions and capabilities.
    1 => Hello(Hello),
    /// Liveness probe; also used to resynchronise the stream after a revert.
    2 => Ping(Ping),
    /// Answer to [`Message::Ping`], echoing its nonce.
    3 => Pong(Pong),
    /// Run a command in the guest. Answered by [`Message::Output`] chunks and one [`Message::Exit`].
    4 => Exec(ExecRequest),
    /// A chunk of a running command's stdout or stderr.
    5 => Output(OutputChunk),
    /// A command finished (or was killed).
    6 => Exit(ExitReport),
    /// One chunk of a file written into the guest. Answered by [`Message::Ok`] after the last chunk.
    7 => PutFile(PutFileChunk),
    /// Read a file from the guest. Answered by [`Message::FileData`] chunks.
    8 => GetFile(GetFileRequest),
    /// One chunk of a file read from the guest.
    9 => FileData(FileDataChunk),
    /// List workspace changes since the baseline. Answered by [`Message::Changes`].
    10 => ListChanges(ListChangesRequest),
    /// The workspace changes since the baseline.
    11 => Changes(ChangeList),
    /// Record the current workspace as the baseline for [`Message::ListChanges`]. Answered by [`Message::Ok`].
    12 => ResetBaseline(ResetBaselineRequest),
    /// Signal a running command's whole process tree. Answered by [`Message::Ok`].
    13 => Kill(KillRequest),
    /// Stop the guest agent (and power the VM off when asked). Answered by [`Message::Ok`].
    14 => Shutdown(ShutdownRequest),
    /// Generic success answer.
    15 => Ok(Ack),
    /// A request failed.
    16 => Error(ErrorReply),
    /// Set the guest's wall clock and mix fresh host entropy into its RNG
    /// (after every revert and start from a shared snapshot, whose clock and
    /// RNG state are those of the instant the snapshot was taken). Answered
    /// by [`Message::Ok`], or [`ErrorKind::Unsupported`] from an agent that
    /// does not own the machine (not PID 1).
    17 => Reseed(ReseedRequest),
    /// Listen on a TCP port of the guest's loopback and tunnel every
    /// connection to the host ([`Message::StreamOpen`]). Answered by
    /// [`Message::Ok`] or an error (port taken).
    40 => TunnelListen(TunnelListenRequest),
    /// Stop listening on a tunnelled port (open streams stay). Answered by [`Message::Ok`].
    41 => TunnelUnlisten(TunnelListenRequest),
    /// Guest → host, unsolicited (request id 0): a connection was accepted
    /// on a tunnelled port.
    42 => StreamOpen(StreamOpen),
    /// Bytes of a stream, either way; a sender never sends more than the
    /// credit the other side granted ([`STREAM_WINDOW`] to start with).
    43 => StreamData(StreamData),
    /// Either way: the receiver consumed this many more bytes; the sender may
    /// send that much more.
    44 => StreamWindow(StreamWindow),
    /// Either way: the sender will write no more (half-close; the other
    /// direction stays open).
    45 => StreamShutdown(StreamId),
    /// Either way: the stream is aborted, both directions.
    46 => StreamReset(StreamReset),
}

/// Versions and capabilities, sent by each side on connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The frame protocol version the sender speaks.
    pub protocol_version: u8,
    /// Name and version of the sending software, e.g. `agentvm-guest 0.1.0`.
    pub software: String,
    /// Optional features the sender supports (e.g. `"exec"`, `"files"`, `"changes"`).
    pub capabilities: Vec<String>,
    /// Guest only: absolute path of the workspace root in the guest.
    pub workspace_root: Option<String>,
    /// Guest only: kernel release (`uname -r`), if known.
    pub kernel: Option<String>,
}

/// Liveness probe carrying a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Value echoed back in the [`Pong`].
    pub nonce: u64,
}

/// Answer to a [`Ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The nonce of the ping answered.
    pub nonce: u64,
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Environment variables set for the command (on top of the inherited
    /// environment unless `clear_env`).
    pub env: Vec<(String, String)>,
    /// Start from an empty environment instead of the guest agent's.
    pub clear_env: bool,
    /// Working directory; relative paths are under the workspace root. `None`: the workspace root.
    pub cwd: Option<String>,
    /// Bytes written to the command's stdin, which is then closed.
    #[serde(with = "serde_bytes")]
    pub stdin: Vec<u8>,
    /// Kill the process tree after this long.
    pub timeout: Option<Duration>,
    /// How long to wait between SIGTERM and SIGKILL when killing on timeout.
    pub kill_grace: Duration,
    /// Most bytes of each of stdout and stderr captured; the rest is read and
    /// dropped and the exit report says so.
    pub output_limit: u64,
    /// Run as this user. `None`: the guest's default user (`agent` in the
    /// agent image, root in the busybox image).
    #[serde(default)]
    pub user: Option<ExecUser>,
}

/// A user a command runs as: uid and gid; supplementary groups are cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecUser {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl ExecUser {
    /// uid 0, gid 0.
    pub const ROOT: Self = Self { uid: 0, gid: 0 };
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A chunk of output of a running command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// Which stream.
    pub stream: OutputStream,
    /// The bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

/// Resources a command's process tree used, where the guest could measure them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// Peak resident set size of the largest process in the tree, in bytes.
    pub peak_rss_bytes: Option<u64>,
    /// CPU time spent in user mode by the tree.
    pub user_cpu: Option<Duration>,
    /// CPU time spent in the kernel by the tree.
    pub system_cpu: Option<Duration>,
    /// Processes (and threads) created in the guest while the command ran:
    /// the kernel's fork counter (`processes` in `/proc/stat`), guest-wide,
    /// so it includes the guest agent's own few threads.
    pub processes_started: Option<u64>,
    /// Most processes of the command's tree alive at once, from the
    /// guest's scans of the tree (every 500 ms while it runs; `None` when it
    /// ended before the first).
    pub peak_processes: Option<u64>,
    /// Packets the guest kernel found no route for while the command ran
    /// (IPv4 `OutNoRoutes` + IPv6 `Ip6OutNoRoutes`, guest-wide). In a VM
    /// without a NIC every attempt to reach another host lands here.
    pub unroutable_packets: Option<u64>,
    /// Processes the guest kernel's OOM killer killed while the command ran
    /// (`oom_kill` in `/proc/vmstat`, guest-wide).
    pub oom_kills: Option<u64>,
}

/// The end of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    /// Exit code or signal of the command's main process.
    pub status: ExitStatus,
    /// The timeout expired and the tree was killed.
    pub timed_out: bool,
    /// Wall time from spawn to exit.
    pub duration: Duration,
    /// Resource use of the process tree.
    pub resources: ResourceUsage,
    /// Total bytes the command wrote to stdout (captured or not).
    pub stdout_bytes: u64,
    /// Total bytes the command wrote to stderr (captured or not).
    pub stderr_bytes: u64,
    /// Stdout went over the output limit; only the first `output_limit` bytes were sent.
    pub stdout_truncated: bool,
    /// Stderr went over the output limit; only the first `output_limit` bytes were sent.
    pub stderr_truncated: bool,
}

/// One chunk of a file being written into the guest. All chunks of one file
/// share a request id and arrive in order; the first has offset 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFileChunk {
    /// Destination path; relative paths are under the workspace root.
    pub path: String,
    /// Permission bits of the file (e.g. `0o755`).
    pub mode: u32,
    /// Offset of `data` in the file.
    pub offset: u64,
    /// The bytes (at most [`FILE_CHUNK_LEN`](super::FILE_CHUNK_LEN)).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// This is the last chunk: the file is complete.
    pub last: bool,
}

/// Read a file from the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetFileRequest {
    /// Path; relative paths are under the workspace root.
    pub path: String,
}

/// One chunk of a file read from the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDataChunk {
    /// Permission bits of the file.
    pub mode: u32,
    /// Size of the whole file.
    pub total_size: u64,
    /// Offset of `data` in the file.
    pub offset: u64,
    /// The bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// This is the last chunk.
    pub last: bool,
}

/// Ask for the workspace changes since the baseline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListChangesRequest {
    /// Include the text of small UTF-8 files (before and after) in the answer.
    pub include_text: bool,
    /// Also list what changed outside the workspace since the baseline
    /// ([`ChangeList::outside_workspace`]).
    pub outside_workspace: bool,
}

/// Record the current workspace as the new baseline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetBaselineRequest {}

/// What kind of filesystem object an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (fifo, socket, device).
    Other,
}

/// State of one workspace entry at one point in time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// What it is.
    pub kind: FileKind,
    /// Size in bytes (regular files; 0 otherwise).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Lowercase hex SHA-256 of the content (regular files), or of the link target (symlinks).
    pub sha256: Option<String>,
    /// The content, for small UTF-8 text files when asked for.
    pub text: Option<String>,
}

/// How a workspace entry changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    /// It did not exist in the baseline.
    Created,
    /// It exists in both, with different content, kind or mode.
    Modified,
    /// It existed in the baseline and is gone.
    Deleted,
}

/// One changed workspace entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    /// Path relative to the workspace root, with `/` separators.
    pub path: String,
    /// How it changed.
    pub change: ChangeKind,
    /// State in the baseline (`None` when created).
    pub before: Option<FileState>,
    /// Current state (`None` when deleted).
    pub after: Option<FileState>,
}

/// The workspace changes since the baseline, sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeList {
    /// The changes.
    pub changes: Vec<FileChange>,
    /// When asked for: absolute paths outside the workspace (and outside
    /// `/proc`, `/sys`, `/dev` and the agent's staging directory) whose
    /// inode changed since the baseline — files written, created or
    /// chmod'ed, and the directories entries were created in or deleted
    /// from. Sorted; at most [`MAX_OUTSIDE_PATHS`].
    pub outside_workspace: Vec<String>,
    /// More paths outside the workspace changed than were listed.
    pub outside_truncated: bool,
}

/// Most paths listed in [`ChangeList::outside_workspace`].
pub const MAX_OUTSIDE_PATHS: usize = 100;

/// The host's wall clock and random bytes for the guest's kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReseedRequest {
    /// The host's `CLOCK_REALTIME` when the request was sent, since the Unix epoch.
    pub unix_time: Duration,
    /// Random bytes from the host, credited to the guest's entropy pool
    /// before its CRNG is reseeded (at most [`MAX_RESEED_ENTROPY`]).
    #[serde(with = "serde_bytes")]
    pub entropy: Vec<u8>,
}

/// Most entropy bytes a [`ReseedRequest`] carries (the kernel's input pool
/// takes at most 512 bytes per `RNDADDENTROPY`).
pub const MAX_RESEED_ENTROPY: usize = 512;

/// A tunnelled port of the guest's loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelListenRequest {
    /// TCP port on 127.0.0.1 in the guest.
    pub port: u16,
}

/// Credit each side of a stream starts with, in bytes.
pub const STREAM_WINDOW: u32 = 512 * 1024;

/// Most bytes in one [`StreamData`].
pub const STREAM_CHUNK_LEN: usize = 64 * 1024;

/// A new tunnelled connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpen {
    /// The guest's id for it (unique within a connection of the channel).
    pub stream_id: u64,
    /// The guest port it was accepted on.
    pub port: u16,
}

/// Bytes of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamData {
    /// The stream.
    pub stream_id: u64,
    /// At most [`STREAM_CHUNK_LEN`] bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// More credit for the other side of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamWindow {
    /// The stream.
    pub stream_id: u64,
    /// Bytes the other side may send beyond what it was granted before.
    pub credit: u32,
}

/// Names a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamId {
    /// The stream.
    pub stream_id: u64,
}

/// An aborted stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamReset {
    /// The stream.
    pub stream_id: u64,
    /// Why.
    pub reason: String,
}

/// Signal the process tree of a running command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillRequest {
    /// Request id of the [`Message::Exec`] whose tree to signal.
    pub target: u64,
    /// Signal number; `None`: SIGKILL.
    pub signal: Option<i32>,
}

/// Stop the guest agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownRequest {
    /// Power the VM off after stopping (only meaningful when the agent is PID 1).
    pub poweroff: bool,
}

/// Generic success.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request was malformed or made no sense (e.g. empty argv).
    BadRequest,
    /// A path resolved outside the roots the guest agent serves.
    PathOutsideWorkspace,
    /// A file or a target request does not exist.
    NotFound,
    /// A filesystem or process operation failed.
    Io,
    /// The command could not be started.
    SpawnFailed,
    /// A frame from the host could not be decoded.
    Protocol,
    /// The request kind is not supported by this guest.
    Unsupported,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Category of failure.
    pub kind: ErrorKind,
    /// Human-readable detail.
    pub message: String,
}
