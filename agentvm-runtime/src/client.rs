//! The host end of the control channel: a client that multiplexes requests to
//! the guest agent over one byte stream.
//!
//! One task reads frames and routes each to the request it answers (by
//! request id); callers hold a receiver per request. Frames are written whole
//! under a lock, so concurrent requests interleave frame by frame.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::protocol::{
    ChangeList, ErrorKind, ExecRequest, ExitReport, FileChange, Frame, FrameError, FrameReader,
    FrameWriter, GetFileRequest, Hello, KillRequest, ListChangesRequest, Message, OutputStream,
    Ping, PutFileChunk, ReseedRequest, ResetBaselineRequest, ShutdownRequest, TunnelListenRequest,
    FILE_CHUNK_LEN, PROTOCOL_VERSION,
};
use crate::tunnel::{Hub, TunnelListener};

/// Most bytes of answers the client buffers for callers that have not read
/// them yet. A guest that floods the host past this is cut off.
pub const MAX_BUFFERED_BYTES: usize = 256 * 1024 * 1024;

/// Why a request to the guest failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The guest sent bytes that are not a valid frame (the guest is untrusted:
    /// this is a protocol violation, and the channel is closed).
    #[error("malformed frame from the guest: {0}")]
    Protocol(#[from] FrameError),
    /// The guest answered the request with an error.
    #[error("guest error ({kind:?}): {message}")]
    Guest {
        /// Category.
        kind: ErrorKind,
        /// Detail from the guest.
        message: String,
    },
    /// The guest answered with a message that does not fit the request.
    #[error("unexpected {got} in answer to {request}")]
    UnexpectedReply {
        /// The request kind.
        request: &'static str,
        /// The message kind received.
        got: &'static str,
    },
    /// The channel is closed; no more requests can be made on it.
    #[error("control channel closed: {reason}")]
    Closed {
        /// Why it closed.
        reason: String,
    },
    /// The guest did not answer in time.
    #[error("guest did not answer {operation} within {after:?}")]
    Timeout {
        /// The request.
        operation: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The guest speaks another protocol version.
    #[error("guest speaks protocol version {guest}, the host {PROTOCOL_VERSION}: rebuild the guest image (`agentvm image build`, or `cargo xtask build-image` in the agentvm repository)")]
    VersionMismatch {
        /// The guest's version.
        guest: u8,
    },
    /// The request was abandoned because the VM was reverted under it.
    #[error("request abandoned: the VM was reverted")]
    Reverted,
}

/// What the guest said about a finished command, with its captured output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Captured stdout (at most the request's output limit).
    pub stdout: Vec<u8>,
    /// Captured stderr (at most the request's output limit).
    pub stderr: Vec<u8>,
    /// Exit status, timing, resources and truncation flags.
    pub report: ExitReport,
}

/// One event of a running command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Output on stdout or stderr.
    Output(OutputStream, Vec<u8>),
    /// The command ended; no more events follow.
    Exit(ExitReport),
}

/// Statistics of a [`GuestClient::resync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncStats {
    /// Stale frames dropped while waiting for the echo.
    pub frames_dropped: u64,
    /// Garbage bytes dropped.
    pub bytes_dropped: u64,
    /// Time from sending the ping to receiving its echo.
    pub elapsed: Duration,
    /// The guest set its clock to the host's and reseeded its RNG
    /// ([`GuestClient::reseed`]); `false` for an agent that does not own the
    /// machine (not PID 1, e.g. run on the host in tests).
    pub reseeded: bool,
}

type Waiters = HashMap<u64, mpsc::UnboundedSender<Message>>;

struct Shared {
    waiters: Mutex<Waiters>,
    closed: Mutex<Option<String>>,
    buffered: AtomicUsize,
}

impl Shared {
    fn close(&self, reason: String) {
        let mut closed = self.closed.lock().expect("lock");
        if closed.is_none() {
            *closed = Some(reason);
        }
        drop(closed);
        self.waiters.lock().expect("lock").clear();
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed {
            reason: self
                .closed
                .lock()
                .expect("lock")
                .clone()
                .unwrap_or_else(|| "the connection ended".into()),
        }
    }
}

enum Control {
    /// Drop every frame until a Pong with this nonce arrives.
    Resync {
        nonce: u64,
        done: oneshot::Sender<(u64, u64)>,
    },
}

/// A request in flight: receives the frames that answer it.
struct Pending {
    id: u64,
    rx: mpsc::UnboundedReceiver<Message>,
    shared: Arc<Shared>,
}

impl Pending {
    async fn recv(&mut self) -> Result<Message, ClientError> {
        match self.rx.recv().await {
            Some(message) => {
                self.shared
                    .buffered
                    .fetch_sub(payload_weight(&message), Ordering::Relaxed);
                Ok(message)
            }
            None => Err(self.shared.closed_error()),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.shared.waiters.lock().expect("lock").remove(&self.id);
        // Give back the budget of frames nobody will read.
        while let Ok(message) = self.rx.try_recv() {
            self.shared
                .buffered
                .fetch_sub(payload_weight(&message), Ordering::Relaxed);
        }
    }
}

/// Bytes a buffered message counts against [`MAX_BUFFERED_BYTES`].
fn payload_weight(message: &Message) -> usize {
    match message {
        Message::Output(chunk) => chunk.data.len() + 16,
        Message::FileData(chunk) => chunk.data.len() + 32,
        Message::Changes(list) => list.changes.len() * 256,
        _ => 64,
    }
}

/// Host-side client of one guest agent connection.
pub struct GuestClient {
    writer: Arc<tokio::sync::Mutex<ChannelWriter>>,
    shared: Arc<Shared>,
    control: mpsc::UnboundedSender<Control>,
    next_id: AtomicU64,
    guest_hello: Hello,
    reader_task: tokio::task::JoinHandle<()>,
    tunnel: Arc<Hub>,
    tunnel_writer_task: tokio::task::JoinHandle<()>,
}

type ChannelWriter = FrameWriter<Box<dyn AsyncWrite + Send + Unpin>>;

impl std::fmt::Debug for GuestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestClient")
            .field("guest", &self.guest_hello.software)
            .finish_non_exhaustive()
    }
}

impl Drop for GuestClient {
    fn drop(&mut self) {
        self.reader_task.abort();
        self.tunnel_writer_task.abort();
        self.tunnel
            .reset_all("the control channel client was dropped");
    }
}

/// Writes the tunnel's frames (request id 0) as they come.
async fn tunnel_writer(
    writer: Arc<tokio::sync::Mutex<ChannelWriter>>,
    mut frames: mpsc::UnboundedReceiver<Message>,
    shared: Arc<Shared>,
) {
    while let Some(message) = frames.recv().await {
        if let Err(e) = writer.lock().await.send(0, &message).await {
            shared.close(format!("write failed: {e}"));
            return;
        }
    }
}

/// Host software name sent in the Hello.
fn host_hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        software: format!("agentvm-runtime {}", env!("CARGO_PKG_VERSION")),
        capabilities: vec!["exec".into(), "files".into(), "changes".into()],
        workspace_root: None,
        kernel: None,
    }
}

impl GuestClient {
    /// Connects over `stream`: exchanges Hellos (waiting at most `timeout` for
    /// the guest's) and starts routing frames. Must be called inside a tokio runtime.
    pub async fn connect<S>(stream: S, timeout: Duration) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let mut client = Self::attach(stream, host_hello());
        let hello = client
            .with_timeout("Hello", timeout, async {
                match client
                    .request(Message::Hello(host_hello()))
                    .await?
                    .recv()
                    .await?
                {
                    Message::Hello(hello) => Ok(hello),
                    other => Err(unexpected("Hello", &other)),
                }
            })
            .await?;
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::VersionMismatch {
                guest: hello.protocol_version,
            });
        }
        client.guest_hello = hello;
        Ok(client)
    }

    /// Starts routing frames on `stream` without a Hello exchange, for a
    /// stream re-opened to a guest that already said `guest_hello` (e.g. after
    /// a revert that restarted the hypervisor). Call [`GuestClient::resync`] next.
    pub fn attach<S>(stream: S, guest_hello: Hello) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::attach_with(stream, guest_hello, false)
    }

    /// [`GuestClient::attach`] for a stream that may begin with garbage (the
    /// end of frames a reverted guest was writing, or the middle of one):
    /// until [`GuestClient::resync`] is called, whatever arrives is dropped
    /// instead of closing the channel as malformed. Call `resync` next.
    pub fn attach_after_revert<S>(stream: S, guest_hello: Hello) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::attach_with(stream, guest_hello, true)
    }

    fn attach_with<S>(stream: S, guest_hello: Hello, garbage_first: bool) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read_half, write_half): (ReadHalf<S>, WriteHalf<S>) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            waiters: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            buffered: AtomicUsize::new(0),
        });
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (tunnel_tx, tunnel_rx) = mpsc::unbounded_channel();
        let tunnel = Hub::new(tunnel_tx);
        let reader_task = tokio::spawn(read_loop(
            FrameReader::new(read_half),
            Arc::clone(&shared),
            Arc::clone(&tunnel),
            control_rx,
            garbage_first,
        ));
        let writer: Arc<tokio::sync::Mutex<ChannelWriter>> = Arc::new(tokio::sync::Mutex::new(
            FrameWriter::new(Box::new(write_half)),
        ));
        let tunnel_writer_task = tokio::spawn(tunnel_writer(
            Arc::clone(&writer),
            tunnel_rx,
            Arc::clone(&shared),
        ));
        Self {
            writer,
            shared,
            control: control_tx,
            next_id: AtomicU64::new(1),
            guest_hello,
            reader_task,
            tunnel,
            tunnel_writer_task,
        }
    }

    /// The guest agent's Hello (software version, workspace root, kernel).
    pub fn guest_hello(&self) -> &Hello {
        &self.guest_hello
    }

    /// Whether the channel is still usable.
    pub fn is_open(&self) -> bool {
        self.shared.closed.lock().expect("lock").is_none()
    }

    /// Round trip of a Ping; returns its latency.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let nonce = fresh_nonce();
        let start = Instant::now();
        match self
            .request(Message::Ping(Ping { nonce }))
            .await?
            .recv()
            .await?
        {
            Message::Pong(pong) if pong.nonce == nonce => Ok(start.elapsed()),
            other => Err(unexpected("Ping", &other)),
        }
    }

    /// Brings the stream back in step after the VM was reverted: abandons
    /// every request in flight, sends a Ping with a fresh nonce and drops
    /// everything (stale frames, garbage bytes) until its echo arrives.
    pub async fn resync(&self, timeout: Duration) -> Result<ResyncStats, ClientError> {
        let abandoned: Vec<_> = self.shared.waiters.lock().expect("lock").drain().collect();
        drop(abandoned);
        // The guest's listeners and streams are gone with its memory.
        self.tunnel
            .reset_all("the VM was reverted: its tunnelled listeners and streams are gone");
        let nonce = fresh_nonce();
        let (done_tx, done_rx) = oneshot::channel();
        self.control
            .send(Control::Resync {
                nonce,
                done: done_tx,
            })
            .map_err(|_| self.shared.closed_error())?;
        let start = Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send(id, &Message::Ping(Ping { nonce })).await?;
        let (frames_dropped, bytes_dropped) = self
            .with_timeout("resync Ping", timeout, async {
                done_rx.await.map_err(|_| self.shared.closed_error())
            })
            .await?;
        let elapsed = start.elapsed();
        let reseeded = self.reseed(timeout).await?;
        Ok(ResyncStats {
            frames_dropped,
            bytes_dropped,
            elapsed,
            reseeded,
        })
    }

    /// Sets the guest's wall clock to the host's and credits fresh host
    /// entropy to its RNG, then forces a CRNG reseed. A VM restored from a
    /// snapshot otherwise keeps the clock and RNG state of the instant the
    /// snapshot was taken — every VM and every test the same. [`resync`]
    /// calls this; `Ok(false)` when the guest agent does not own the machine.
    ///
    /// [`resync`]: Self::resync
    pub async fn reseed(&self, timeout: Duration) -> Result<bool, ClientError> {
        self.with_timeout("Reseed", timeout, self.send_reseed())
            .await
    }

    async fn send_reseed(&self) -> Result<bool, ClientError> {
        let mut entropy = vec![0u8; 64];
        getrandom::fill(&mut entropy).map_err(|e| ClientError::Closed {
            reason: format!("no host randomness for the guest: {e}"),
        })?;
        let unix_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let request = Message::Reseed(ReseedRequest { unix_time, entropy });
        match self.request(request).await?.recv().await? {
            Message::Ok(_) => Ok(true),
            Message::Error(e) if e.kind == ErrorKind::Unsupported => Ok(false),
            other => Err(unexpected("Reseed", &other)),
        }
    }

    /// Listens on TCP `port` of the guest's loopback and tunnels every
    /// connection a guest process makes there to the returned listener
    /// (see [`crate::tunnel`]). A revert ends the listener.
    pub async fn tunnel_listen(&self, port: u16) -> Result<TunnelListener, ClientError> {
        // Registered first: a connection may arrive before the Ok does.
        let listener = self.tunnel.add_listener(port);
        let answer = async {
            let request = Message::TunnelListen(TunnelListenRequest { port });
            expect_ok("TunnelListen", self.request(request).await?.recv().await?)
        };
        match answer.await {
            Ok(()) => Ok(listener),
            Err(e) => {
                self.tunnel.remove_listener(port);
                Err(e)
            }
        }
    }

    /// Stops listening on a tunnelled port; open streams stay.
    pub async fn tunnel_unlisten(&self, port: u16) -> Result<(), ClientError> {
        self.tunnel.remove_listener(port);
        let request = Message::TunnelUnlisten(TunnelListenRequest { port });
        expect_ok("TunnelUnlisten", self.request(request).await?.recv().await?)
    }

    /// Tunnelled streams open now.
    pub fn tunnel_streams(&self) -> usize {
        self.tunnel.open_streams()
    }

    /// Starts a command; its output and exit arrive on the returned stream.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecStream, ClientError> {
        let pending = self.request(Message::Exec(request)).await?;
        Ok(ExecStream {
            pending,
            finished: false,
        })
    }

    /// Runs a command to completion and collects its output.
    pub async fn exec_collect(&self, request: ExecRequest) -> Result<ExecOutput, ClientError> {
        let mut stream = self.exec(request).await?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        loop {
            match stream.next_event().await? {
                Some(ExecEvent::Output(OutputStream::Stdout, data)) => stdout.extend(data),
                Some(ExecEvent::Output(OutputStream::Stderr, data)) => stderr.extend(data),
                Some(ExecEvent::Exit(report)) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        report,
                    })
                }
                None => return Err(self.shared.closed_error()),
            }
        }
    }

    /// Signals the process tree of the command started by request `exec_id`
    /// (`None`: SIGKILL).
    pub async fn kill(&self, exec_id: u64, signal: Option<i32>) -> Result<(), ClientError> {
        let message = Message::Kill(KillRequest {
            target: exec_id,
            signal,
        });
        expect_ok("Kill", self.request(message).await?.recv().await?)
    }

    /// Writes `data` to `path` in the guest with permission bits `mode`.
    pub async fn put_file(&self, path: &str, data: &[u8], mode: u32) -> Result<(), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut pending = self.register(id)?;
        let mut chunks = data.chunks(FILE_CHUNK_LEN).peekable();
        let mut offset = 0u64;
        if chunks.peek().is_none() {
            self.send(id, &put_chunk(path, mode, 0, &[], true)).await?;
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.send(id, &put_chunk(path, mode, offset, chunk, last))
                .await?;
            offset += chunk.len() as u64;
            // The guest answers early only to refuse; stop sending then.
            if let Ok(message) = pending.rx.try_recv() {
                return expect_ok("PutFile", message);
            }
        }
        expect_ok("PutFile", pending.recv().await?)
    }

    /// Reads `path` from the guest; returns its content and permission bits.
    pub async fn get_file(&self, path: &str) -> Result<(Vec<u8>, u32), ClientError> {
        let request = Message::GetFile(GetFileRequest { path: path.into() });
        let mut pending = self.request(request).await?;
        let mut data = Vec::new();
        loop {
            match pending.recv().await? {
                Message::FileData(chunk) => {
                    if chunk.offset != data.len() as u64
                        || chunk.total_size < chunk.offset + chunk.data.len() as u64
                    {
                        return Err(ClientError::UnexpectedReply {
                            request: "GetFile",
                            got: "FileData chunk out of order",
                        });
                    }
                    if data.is_empty() {
                        // Bounded by MAX_PAYLOAD_LEN-sized chunks actually received, not the claim.
                        data.reserve(chunk.data.len());
                    }
                    data.extend_from_slice(&chunk.data);
                    if chunk.last {
                        return Ok((data, chunk.mode));
                    }
                }
                other => return Err(unexpected("GetFile", &other)),
            }
        }
    }

    /// Lists workspace changes since the baseline (with small texts when asked).
    pub async fn list_changes(&self, include_text: bool) -> Result<Vec<FileChange>, ClientError> {
        let list = self
            .changes(ListChangesRequest {
                include_text,
                outside_workspace: false,
            })
            .await?;
        Ok(list.changes)
    }

    /// The changes since the baseline, as `request` asks for them (also
    /// those outside the workspace).
    pub async fn changes(&self, request: ListChangesRequest) -> Result<ChangeList, ClientError> {
        match self
            .request(Message::ListChanges(request))
            .await?
            .recv()
            .await?
        {
            Message::Changes(list) => Ok(list),
            other => Err(unexpected("ListChanges", &other)),
        }
    }

    /// Records the current workspace as the baseline for [`GuestClient::list_changes`].
    pub async fn reset_baseline(&self) -> Result<(), ClientError> {
        let request = Message::ResetBaseline(ResetBaselineRequest {});
        expect_ok("ResetBaseline", self.request(request).await?.recv().await?)
    }

    /// Asks the guest agent to stop (and power the VM off when `poweroff`).
    pub async fn shutdown(&self, poweroff: bool) -> Result<(), ClientError> {
        let request = Message::Shutdown(ShutdownRequest { poweroff });
        expect_ok("Shutdown", self.request(request).await?.recv().await?)
    }

    fn register(&self, id: u64) -> Result<Pending, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        if !self.is_open() {
            return Err(self.shared.closed_error());
        }
        self.shared.waiters.lock().expect("lock").insert(id, tx);
        Ok(Pending {
            id,
            rx,
            shared: Arc::clone(&self.shared),
        })
    }

    async fn request(&self, message: Message) -> Result<Pending, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pending = self.register(id)?;
        self.send(id, &message).await?;
        Ok(pending)
    }

    async fn send(&self, id: u64, message: &Message) -> Result<(), ClientError> {
        let mut writer = self.writer.lock().await;
        writer.send(id, message).await.map_err(|e| {
            let reason = format!("write failed: {e}");
            self.shared.close(reason.clone());
            ClientError::Closed { reason }
        })
    }

    async fn with_timeout<T>(
        &self,
        operation: &'static str,
        after: Duration,
        fut: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(after, fut)
            .await
            .unwrap_or(Err(ClientError::Timeout { operation, after }))
    }
}

/// The events of one running command.
pub struct ExecStream {
    pending: Pending,
    finished: bool,
}

impl std::fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStream")
            .field("id", &self.pending.id)
            .finish()
    }
}

impl ExecStream {
    /// Request id of the command (the target for [`GuestClient::kill`]).
    pub fn id(&self) -> u64 {
        self.pending.id
    }

    /// Next output chunk or the exit; `None` after the exit was returned.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.finished {
            return Ok(None);
        }
        match self.pending.recv().await? {
            Message::Output(chunk) => Ok(Some(ExecEvent::Output(chunk.stream, chunk.data))),
            Message::Exit(report) => {
                self.finished = true;
                Ok(Some(ExecEvent::Exit(report)))
            }
            other => {
                self.finished = true;
                Err(unexpected("Exec", &other))
            }
        }
    }
}

fn put_chunk(path: &str, mode: u32, offset: u64, data: &[u8], last: bool) -> Message {
    Message::PutFile(PutFileChunk {
        path: path.into(),
        mode,
        offset,
        data: data.to_vec(),
        last,
    })
}

fn expect_ok(request: &'static str, message: Message) -> Result<(), ClientError> {
    match message {
        Message::Ok(_) => Ok(()),
        other => Err(unexpected(request, &other)),
    }
}

/// Turns a guest Error into [`ClientError::Guest`], anything else into `UnexpectedReply`.
fn unexpected(request: &'static str, message: &Message) -> ClientError {
    match message {
        Message::Error(error) => ClientError::Guest {
            kind: error.kind,
            message: error.message.clone(),
        },
        other => ClientError::UnexpectedReply {
            request,
            got: other.kind_name(),
        },
    }
}

fn fresh_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

struct ResyncState {
    nonce: u64,
    done: oneshot::Sender<(u64, u64)>,
    frames_dropped: u64,
    bytes_at_start: u64,
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    shared: Arc<Shared>,
    tunnel: Arc<Hub>,
    mut control: mpsc::UnboundedReceiver<Control>,
    garbage_first: bool,
) {
    let mut resync: Option<ResyncState> = None;
    // Before the first resync of a client attached after a revert nothing
    // was asked: every frame and every broken one is garbage.
    let mut discarding = garbage_first;
    if discarding {
        reader.set_resync(true);
        reader.set_hunting(true);
    }
    let reason = loop {
        let next = tokio::select! {
            biased;
            command = control.recv() => {
                match command {
                    Some(Control::Resync { nonce, done }) => {
                        discarding = false;
                        reader.set_resync(true);
                        reader.set_hunting(true);
                        reader.discard_buffered();
                        resync = Some(ResyncState { nonce, done, frames_dropped: 0, bytes_at_start: reader.skipped_bytes() });
                        continue;
                    }
                    None => break "client dropped".to_string(),
                }
            }
            next = reader.next() => next,
        };
        match next {
            Ok(Some(frame)) => {
                if let Some(state) = resync.take() {
                    match frame.message {
                        Message::Pong(pong) if pong.nonce == state.nonce => {
                            reader.set_resync(false);
                            reader.set_hunting(false);
                            let bytes = reader.skipped_bytes() - state.bytes_at_start;
                            let _ = state.done.send((state.frames_dropped, bytes));
                        }
                        _ => {
                            resync = Some(ResyncState {
                                frames_dropped: state.frames_dropped + 1,
                                ..state
                            });
                        }
                    }
                    continue;
                }
                if discarding {
                    continue;
                }
                if let Err(reason) = route(&shared, &tunnel, frame) {
                    break reason;
                }
            }
            Ok(None) => break "the guest closed the channel".to_string(),
            Err(error) if discarding && error.is_frame_local() => {}
            Err(error) if resync.is_some() && error.is_frame_local() => {
                if let Some(state) = resync.as_mut() {
                    state.frames_dropped += 1;
                }
            }
            Err(error) => break format!("malformed frame from the guest: {error}"),
        }
    };
    #[cfg(feature = "host")]
    tracing::debug!(%reason, "control channel reader stopped");
    tunnel.reset_all(&format!("the control channel closed: {reason}"));
    shared.close(reason);
}

/// Hands a frame to the request waiting for it. Frames for unknown requests
/// (e.g. output of an abandoned command) are dropped.
fn route(shared: &Shared, tunnel: &Arc<Hub>, frame: Frame) -> Result<(), String> {
    let Frame {
        request_id,
        message,
    } = frame;
    let message = match message {
        m @ (Message::StreamOpen(_)
        | Message::StreamData(_)
        | Message::StreamWindow(_)
        | Message::StreamShutdown(_)
        | Message::StreamReset(_)) => {
            tunnel.deliver(m);
            return Ok(());
        }
        other => other,
    };
    let weight = payload_weight(&message);
    let waiters = shared.waiters.lock().expect("lock");
    let Some(waiter) = waiters.get(&request_id) else {
        return Ok(());
    };
    let total = shared.buffered.fetch_add(weight, Ordering::Relaxed) + weight;
    if total > MAX_BUFFERED_BYTES {
        return Err(format!(
            "the guest sent more than {MAX_BUFFERED_BYTES} bytes nobody has read; cutting it off"
        ));
    }
    if waiter.send(message).is_err() {
        shared.buffered.fetch_sub(weight, Ordering::Relaxed);
    }
    Ok(())
}
