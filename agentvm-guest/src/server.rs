//! Serving one connection: frame dispatch and request bookkeeping.
//!
//! The read loop decodes frames (skipping garbage up to the next frame magic,
//! so a host can resynchronise with a Ping after a VM revert) and dispatches
//! them; long operations run in their own tasks and send their answers
//! through the connection's [`Outbox`], which a writer task drains in order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agentvm_runtime::protocol::{
    encode_frame, ChangeList, ErrorKind, ErrorReply, FileChange, Frame, FrameError, FrameReader,
    FrameWriter, Hello, KillRequest, Message, Pong, PutFileChunk, MAX_OUTSIDE_PATHS,
    PROTOCOL_VERSION,
};
use bytes::BytesMut;
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, oneshot};

use crate::changes::{self, Snapshot};
use crate::exec;
use crate::files::{self, Roots};
use crate::reaper::Reaper;
use crate::transport::Connection;
use crate::tree::Tree;

/// Capabilities announced in Hello.
pub const CAPABILITIES: [&str; 4] = ["exec", "files", "changes", "kill"];
/// Frames queued for the writer before senders wait.
const OUTBOX_DEPTH: usize = 64;
/// How long a Shutdown waits for its Ok to be written.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds an error reply.
pub fn error_reply(kind: ErrorKind, message: impl std::fmt::Display) -> ErrorReply {
    ErrorReply {
        kind,
        message: message.to_string(),
    }
}

enum Outgoing {
    Frame(u64, Message),
    Flush(oneshot::Sender<()>),
}

/// Where answers to the host go: a queue drained by the connection's writer.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Frame(id, message) => write!(f, "Frame({id}, {})", message.kind_name()),
            Self::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl Outbox {
    /// Queues a frame; `false` when the connection is gone.
    pub async fn send(&self, request_id: u64, message: Message) -> bool {
        self.tx
            .send(Outgoing::Frame(request_id, message))
            .await
            .is_ok()
    }

    /// Queues a frame from a blocking thread; `false` when the connection is gone.
    pub fn blocking_send(&self, request_id: u64, message: Message) -> bool {
        self.tx
            .blocking_send(Outgoing::Frame(request_id, message))
            .is_ok()
    }

    /// Waits until everything queued before was written.
    async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Outgoing::Flush(tx)).await.is_ok() {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, rx).await;
        }
    }
}

/// Work on the workspace baseline, done in order by one worker.
enum ChangesJob {
    List {
        request_id: u64,
        include_text: bool,
        outside_workspace: bool,
        out: Outbox,
    },
    Reset {
        request_id: u64,
        out: Outbox,
    },
}

/// State shared by all connections.
#[derive(Debug)]
pub struct Agent {
    roots: Roots,
    reaper: Arc<Reaper>,
    changes: mpsc::UnboundedSender<ChangesJob>,
    kernel: Option<String>,
}

impl std::fmt::Debug for ChangesJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::List { request_id, .. } => write!(f, "List({request_id})"),
            Self::Reset { request_id, .. } => write!(f, "Reset({request_id})"),
        }
    }
}

impl Agent {
    /// Records the initial workspace baseline and starts the workers.
    /// `system_root` is the tree watched for changes outside the workspace.
    pub async fn start(roots: Roots, system_root: PathBuf, reaper: Arc<Reaper>) -> Arc<Self> {
        let workspace = roots.workspace.clone();
        let since = changes::InodeTime::now();
        let baseline = tokio::task::spawn_blocking(move || changes::scan(&workspace))
            .await
            .unwrap_or_default();
        let (tx, rx) = mpsc::unbounded_channel();
        let watched = Watched {
            workspace: roots.workspace.clone(),
            staging: roots.staging.clone(),
            system_root,
        };
        tokio::spawn(changes_worker(watched, baseline, since, rx));
        Arc::new(Self {
            roots,
            reaper,
            changes: tx,
            kernel: kernel_release(),
        })
    }

    fn hello(&self) -> Message {
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            software: format!("agentvm-guest {}", env!("CARGO_PKG_VERSION")),
            capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            workspace_root: Some(self.roots.workspace.to_string_lossy().into_owned()),
            kernel: self.kernel.clone(),
        })
    }
}

fn kernel_release() -> Option<String> {
    // SAFETY: utsname is plain old data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid for the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

/// The trees the changes worker looks at.
#[derive(Debug, Clone)]
struct Watched {
    workspace: PathBuf,
    staging: PathBuf,
    system_root: PathBuf,
}

async fn changes_worker(
    watched: Watched,
    mut baseline: Snapshot,
    mut since: changes::InodeTime,
    mut rx: mpsc::UnboundedReceiver<ChangesJob>,
) {
    while let Some(job) = rx.recv().await {
        let outside = matches!(
            job,
            ChangesJob::List {
                outside_workspace: true,
                ..
            }
        );
        let now = changes::InodeTime::now();
        let w = watched.clone();
        let (current, outside) = tokio::task::spawn_blocking(move || {
            let current = changes::scan(&w.workspace);
            let outside = outside.then(|| {
                changes::changed_outside(
                    &w.system_root,
                    &[w.workspace.as_path(), w.staging.as_path()],
                    since,
                    MAX_OUTSIDE_PATHS,
                )
            });
            (current, outside)
        })
        .await
        .unwrap_or_default();
        match job {
            ChangesJob::Reset { request_id, out } => {
                baseline = current;
                since = now;
                out.send(request_id, Message::Ok(Default::default())).await;
            }
            ChangesJob::List {
                request_id,
                include_text,
                out,
                ..
            } => {
                let (outside_workspace, outside_truncated) = outside.unwrap_or_default();
                let list = ChangeList {
                    changes: changes::diff(&baseline, &current, include_text),
                    outside_workspace,
                    outside_truncated,
                };
                out.send(request_id, fit_changes(request_id, list)).await;
            }
        }
    }
}

/// The Changes answer, made to fit one frame: texts are dropped, largest
/// first, while the frame is too large; an Error if even that is not enough.
fn fit_changes(request_id: u64, list: ChangeList) -> Message {
    let mut buf = BytesMut::new();
    let mut message = Message::Changes(list);
    loop {
        buf.clear();
        match encode_frame(request_id, &message, &mut buf) {
            Ok(()) => return message,
            Err(FrameError::Oversized { len }) => {
                let Message::Changes(list) = &mut message else {
                    return Message::Error(error_reply(ErrorKind::Io, "cannot encode the changes"));
                };
                let excess = len.saturating_sub(agentvm_runtime::protocol::MAX_PAYLOAD_LEN as u64);
                if !drop_texts(&mut list.changes, excess) {
                    return Message::Error(error_reply(
                        ErrorKind::Io,
                        format!(
                            "{} workspace changes do not fit in one frame ({len} bytes); \
                             reset the baseline more often or list changes of a smaller workspace",
                            list.changes.len()
                        ),
                    ));
                }
            }
            Err(e) => {
                return Message::Error(error_reply(
                    ErrorKind::Io,
                    format!("cannot encode the changes: {e}"),
                ))
            }
        }
    }
}

/// Drops texts, largest first, until at least `excess` bytes were freed (or
/// at least one text when `excess` is 0). `false` if there was no text left.
fn drop_texts(changes: &mut [FileChange], excess: u64) -> bool {
    let mut texts: Vec<(usize, &mut Option<String>)> = changes
        .iter_mut()
        .flat_map(|c| [c.before.as_mut(), c.after.as_mut()])
        .flatten()
        .filter_map(|state| {
            state
                .text
                .as_ref()
                .map(|t| t.len())
                .map(|len| (len, &mut state.text))
        })
        .collect();
    if texts.is_empty() {
        return false;
    }
    texts.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
    let mut freed = 0u64;
    for (len, text) in texts {
        *text = None;
        freed += len as u64;
        if freed > excess {
            break;
        }
    }
    true
}

/// How serving a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The host went away (or the channel failed).
    Disconnected,
    /// The host asked the agent to stop; its Ok was written.
    Shutdown {
        /// Power the machine off.
        poweroff: bool,
    },
}

/// Serves one connection until it ends or the host asks for shutdown.
pub async fn serve(agent: &Arc<Agent>, conn: Connection) -> Outcome {
    let Connection { reader, writer, .. } = conn;
    let mut writer = FrameWriter::new(writer);
    if let Err(e) = writer.send(0, &agent.hello()).await {
        log!("cannot send Hello: {e}");
        return Outcome::Disconnected;
    }
    let (tx, rx) = mpsc::channel(OUTBOX_DEPTH);
    let mut writer_task = tokio::spawn(write_loop(writer, rx));
    let out = Outbox { tx };
    let mut session = Session {
        agent: Arc::clone(agent),
        tunnels: crate::tunnel::Tunnels::new(out.clone()),
        out,
        execs: Arc::new(Mutex::new(HashMap::new())),
        uploads: HashMap::new(),
    };
    let mut reader = FrameReader::new(reader);
    reader.set_resync(true);

    let outcome = loop {
        let skipped = reader.skipped_bytes();
        let next = tokio::select! {
            next = reader.next() => next,
            _ = &mut writer_task => {
                log!("control channel write failed");
                break Outcome::Disconnected;
            }
        };
        let dropped = reader.skipped_bytes() - skipped;
        if dropped > 0 {
            log!("resync: skipped {dropped} bytes of garbage");
        }
        match next {
            Ok(Some(frame)) => {
                if let Some(poweroff) = session.dispatch(frame).await {
                    session.out.flush().await;
                    break Outcome::Shutdown { poweroff };
                }
            }
            Ok(None) => break Outcome::Disconnected,
            Err(e) if e.is_frame_local() => {
                log!("protocol error: {e}");
                let reply = error_reply(ErrorKind::Protocol, &e);
                session
                    .out
                    .send(e.request_id().unwrap_or(0), Message::Error(reply))
                    .await;
            }
            Err(e) => {
                log!("control channel read failed: {e}");
                break Outcome::Disconnected;
            }
        }
    };
    session.close();
    writer_task.abort();
    outcome
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    while let Some(item) = rx.recv().await {
        match item {
            Outgoing::Frame(request_id, message) => match writer.send(request_id, &message).await {
                Ok(()) => {}
                Err(FrameError::Io(e)) => {
                    log!("write error: {e}");
                    return;
                }
                Err(e) => {
                    // Not encodable (too large): say so instead.
                    log!("cannot encode a {} frame: {e}", message.kind_name());
                    let reply = Message::Error(error_reply(ErrorKind::Io, &e));
                    if writer.send(request_id, &reply).await.is_err() {
                        return;
                    }
                }
            },
            Outgoing::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Per-connection request bookkeeping.
struct Session {
    agent: Arc<Agent>,
    out: Outbox,
    /// Running execs by request id, for Kill.
    execs: Arc<Mutex<HashMap<u64, Arc<Tree>>>>,
    /// Uploads in progress by request id; `None`: failed, dropping its chunks.
    uploads: HashMap<u64, Option<mpsc::Sender<PutFileChunk>>>,
    /// Tunnelled listeners and streams of this connection.
    tunnels: Arc<crate::tunnel::Tunnels>,
}

fn lock_execs(execs: &Mutex<HashMap<u64, Arc<Tree>>>) -> MutexGuard<'_, HashMap<u64, Arc<Tree>>> {
    execs
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Session {
    /// Handles one frame. `Some(poweroff)` when the host asked for shutdown.
    async fn dispatch(&mut self, frame: Frame) -> Option<bool> {
        let Frame {
            request_id: id,
            message,
        } = frame;
        match message {
            Message::Hello(hello) => {
                log!(
                    "host: {} (protocol {})",
                    hello.software,
                    hello.protocol_version
                );
                self.out.send(id, self.agent.hello()).await;
            }
            Message::Ping(ping) => {
                self.out
                    .send(id, Message::Pong(Pong { nonce: ping.nonce }))
                    .await;
            }
            Message::Exec(request) => self.exec(id, request).await,
            Message::Kill(request) => self.kill(id, request).await,
            Message::PutFile(chunk) => self.put_file(id, chunk).await,
            Message::GetFile(request) => {
                let agent = Arc::clone(&self.agent);
                let out = self.out.clone();
                tokio::task::spawn_blocking(move || {
                    files::send_file(&agent.roots, id, &request, &out)
                });
            }
            Message::ListChanges(request) => {
                self.changes_job(ChangesJob::List {
                    request_id: id,
                    include_text: request.include_text,
                    outside_workspace: request.outside_workspace,
                    out: self.out.clone(),
                })
                .await
            }
            Message::ResetBaseline(_) => {
                self.changes_job(ChangesJob::Reset {
                    request_id: id,
                    out: self.out.clone(),
                })
                .await
            }
            Message::Reseed(request) => {
                let reply = match crate::reseed::apply(&request) {
                    Ok(()) => Message::Ok(Default::default()),
                    Err(e @ crate::reseed::ReseedError::NotSystemOwner) => {
                        Message::Error(error_reply(ErrorKind::Unsupported, e))
                    }
                    Err(e @ crate::reseed::ReseedError::TooMuchEntropy(_)) => {
                        Message::Error(error_reply(ErrorKind::BadRequest, e))
                    }
                    Err(e) => Message::Error(error_reply(ErrorKind::Io, e)),
                };
                self.out.send(id, reply).await;
            }
            Message::TunnelListen(request) => {
                let reply = match self.tunnels.listen(request.port).await {
                    Ok(()) => Message::Ok(Default::default()),
                    Err(e) => Message::Error(error_reply(
                        ErrorKind::Io,
                        format!("cannot listen on 127.0.0.1:{}: {e}", request.port),
                    )),
                };
                self.out.send(id, reply).await;
            }
            Message::TunnelUnlisten(request) => {
                self.tunnels.unlisten(request.port);
                self.out.send(id, Message::Ok(Default::default())).await;
            }
            m @ (Message::StreamData(_)
            | Message::StreamWindow(_)
            | Message::StreamShutdown(_)
            | Message::StreamReset(_)) => self.tunnels.deliver(m),
            Message::Shutdown(request) => {
                self.out.send(id, Message::Ok(Default::default())).await;
                return Some(request.poweroff);
            }
            Message::Pong(_) | Message::Ok(_) | Message::Error(_) => {
                log!(
                    "ignoring a {} frame from the host (request {id})",
                    message.kind_name()
                );
            }
            Message::Output(_)
            | Message::Exit(_)
            | Message::FileData(_)
            | Message::Changes(_)
            | Message::StreamOpen(_) => {
                let reply = error_reply(
                    ErrorKind::BadRequest,
                    format!("{} is sent by the guest, not to it", message.kind_name()),
                );
                self.out.send(id, Message::Error(reply)).await;
            }
        }
        None
    }

    async fn exec(&mut self, id: u64, request: agentvm_runtime::protocol::ExecRequest) {
        if lock_execs(&self.execs).contains_key(&id) {
            let reply = error_reply(
                ErrorKind::BadRequest,
                format!("request id {id} already names a running exec"),
            );
            self.out.send(id, Message::Error(reply)).await;
            return;
        }
        let spawned = match exec::spawn(request, &self.agent.roots, &self.agent.reaper) {
            Ok(spawned) => spawned,
            Err(reply) => {
                self.out.send(id, Message::Error(reply)).await;
                return;
            }
        };
        lock_execs(&self.execs).insert(id, Arc::clone(&spawned.tree));
        let execs = Arc::clone(&self.execs);
        let out = self.out.clone();
        tokio::spawn(async move {
            let report = exec::run(spawned, id, out.clone()).await;
            lock_execs(&execs).remove(&id);
            out.send(id, Message::Exit(report)).await;
        });
    }

    async fn kill(&mut self, id: u64, request: KillRequest) {
        let signal = request.signal.unwrap_or(libc::SIGKILL);
        let reply = if !(1..=64).contains(&signal) {
            Message::Error(error_reply(
                ErrorKind::BadRequest,
                format!("invalid signal {signal}"),
            ))
        } else {
            let tree = lock_execs(&self.execs).get(&request.target).cloned();
            match tree {
                Some(tree) => {
                    tree.signal(signal);
                    Message::Ok(Default::default())
                }
                None => Message::Error(error_reply(
                    ErrorKind::NotFound,
                    format!("no running exec with request id {}", request.target),
                )),
            }
        };
        self.out.send(id, reply).await;
    }

    async fn put_file(&mut self, id: u64, chunk: PutFileChunk) {
        let last = chunk.last;
        match self.uploads.get(&id) {
            Some(Some(tx)) => {
                if tx.send(chunk).await.is_err() {
                    // The worker ended early; it has answered already.
                    self.uploads.insert(id, None);
                }
            }
            Some(None) => {}
            None if chunk.offset != 0 => {
                let reply = error_reply(
                    ErrorKind::BadRequest,
                    format!(
                        "PutFile chunk at offset {} of an unknown upload",
                        chunk.offset
                    ),
                );
                self.out.send(id, Message::Error(reply)).await;
                if !last {
                    self.uploads.insert(id, None);
                }
                return;
            }
            None => {
                let (tx, rx) = mpsc::channel(4);
                let agent = Arc::clone(&self.agent);
                let out = self.out.clone();
                tokio::task::spawn_blocking(move || {
                    files::upload_worker(&agent.roots, id, chunk, rx, &out)
                });
                if !last {
                    self.uploads.insert(id, Some(tx));
                }
                return;
            }
        }
        if last {
            self.uploads.remove(&id);
        }
    }

    async fn changes_job(&mut self, job: ChangesJob) {
        if let Err(mpsc::error::SendError(job)) = self.agent.changes.send(job) {
            let (request_id, out) = match job {
                ChangesJob::List {
                    request_id, out, ..
                }
                | ChangesJob::Reset { request_id, out } => (request_id, out),
            };
            out.send(
                request_id,
                Message::Error(error_reply(ErrorKind::Io, "change tracking is not running")),
            )
            .await;
        }
    }

    /// The connection ended: kill the trees of running commands (their tasks
    /// then reap and finish) and abandon unfinished uploads.
    fn close(&mut self) {
        let trees: Vec<Arc<Tree>> = lock_execs(&self.execs).values().cloned().collect();
        for tree in trees {
            tree.signal(libc::SIGKILL);
        }
        self.uploads.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_runtime::protocol::{ChangeKind, FileKind, FileState, MAX_PAYLOAD_LEN};

    fn change(path: String, text: Option<String>) -> FileChange {
        FileChange {
            path,
            change: ChangeKind::Created,
            before: None,
            after: Some(FileState {
                kind: FileKind::File,
                size: 0,
                mode: 0o644,
                sha256: Some("0".repeat(64)),
                text,
            }),
        }
    }

    fn list(changes: Vec<FileChange>) -> ChangeList {
        ChangeList {
            changes,
            ..ChangeList::default()
        }
    }

    #[test]
    fn small_change_lists_are_kept_whole() {
        let changes = vec![change("a".into(), Some("text".into()))];
        assert_eq!(
            fit_changes(1, list(changes.clone())),
            Message::Changes(list(changes))
        );
    }

    #[test]
    fn oversized_change_lists_lose_texts_first() {
        // 40 texts of 60 KiB: about 2.4 MiB, over the frame limit.
        let changes: Vec<FileChange> = (0..40)
            .map(|i| change(format!("f{i:02}"), Some("x".repeat(60 * 1024))))
            .collect();
        let Message::Changes(list) = fit_changes(1, list(changes)) else {
            panic!("expected Changes");
        };
        assert_eq!(list.changes.len(), 40);
        let kept = list
            .changes
            .iter()
            .filter(|c| c.after.as_ref().unwrap().text.is_some())
            .count();
        assert!(kept > 0 && kept < 40, "kept {kept} texts");
        let mut buf = BytesMut::new();
        encode_frame(1, &Message::Changes(list), &mut buf).unwrap();
        assert!(buf.len() <= MAX_PAYLOAD_LEN + agentvm_runtime::protocol::HEADER_LEN);
    }

    #[test]
    fn hopeless_change_lists_are_an_error() {
        let changes: Vec<FileChange> = (0..20_000)
            .map(|i| change(format!("some/longer/path/file{i:05}"), None))
            .collect();
        let Message::Error(reply) = fit_changes(1, list(changes)) else {
            panic!("expected Error");
        };
        assert_eq!(reply.kind, ErrorKind::Io);
    }
}
