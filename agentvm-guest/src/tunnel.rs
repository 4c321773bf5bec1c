//! The guest end of tunnelled TCP streams (see the runtime's `tunnel`
//! module for the host end and the flow control both follow).
//!
//! The host asks for a listener on a loopback port; every connection a
//! process makes there gets a stream id, is announced with `StreamOpen` and
//! pumped both ways: socket → host within the credit the host granted,
//! host → socket while the host stays within the credit granted to it. At
//! most [`MAX_GUEST_STREAMS`] streams are open at once; a connection beyond
//! that is closed at once, so an agent that opens thousands neither hangs
//! nor exhausts the guest. Everything ends with the session.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agentvm_runtime::protocol::{
    Message, StreamData, StreamId, StreamOpen, StreamReset, StreamWindow, STREAM_CHUNK_LEN,
    STREAM_WINDOW,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::server::Outbox;

/// Most tunnelled streams open at once in the guest.
pub const MAX_GUEST_STREAMS: usize = 256;

enum ToSocket {
    Data(Vec<u8>),
    Eof,
    /// The host abandoned the stream: write what came before, then close.
    Reset,
}

struct GuestStream {
    to_socket: mpsc::UnboundedSender<ToSocket>,
    /// Bytes the host may still send.
    host_credit: u64,
    /// Bytes we may still send the host, and a wake-up when it grows.
    our_credit: Arc<(Mutex<u64>, Notify)>,
    /// Directions that ended normally (EOF each way); at 2 the stream is done.
    directions_done: u8,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for GuestStream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Every listener and stream of one host connection.
pub struct Tunnels {
    out: Outbox,
    listeners: Mutex<HashMap<u16, JoinHandle<()>>>,
    streams: Mutex<HashMap<u64, GuestStream>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Drop for Tunnels {
    fn drop(&mut self) {
        for (_, task) in lock(&self.listeners).drain() {
            task.abort();
        }
        lock(&self.streams).clear();
    }
}

impl Tunnels {
    /// Tunnels whose frames go to `out`.
    pub fn new(out: Outbox) -> Arc<Self> {
        Arc::new(Self {
            out,
            listeners: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Listens on 127.0.0.1:`port`.
    pub async fn listen(self: &Arc<Self>, port: u16) -> std::io::Result<()> {
        if lock(&self.listeners).contains_key(&port) {
            return Ok(());
        }
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
        let tunnels = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                let socket = match listener.accept().await {
                    Ok((socket, _)) => socket,
                    // Out of descriptors or memory: do not spin; retry soon.
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Some(tunnels) = tunnels.upgrade() else {
                    return;
                };
                tunnels.open(socket, port).await;
            }
        });
        lock(&self.listeners).insert(port, task);
        Ok(())
    }

    /// Stops listening on `port`.
    pub fn unlisten(&self, port: u16) {
        if let Some(task) = lock(&self.listeners).remove(&port) {
            task.abort();
        }
    }

    async fn open(self: &Arc<Self>, socket: TcpStream, port: u16) {
        if lock(&self.streams).len() >= MAX_GUEST_STREAMS {
            log!(
                "tunnel: {MAX_GUEST_STREAMS} streams open; closing a new connection to port {port}"
            );
            drop(socket);
            return;
        }
        let _ = socket.set_nodelay(true);
        let stream_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (to_socket, from_host) = mpsc::unbounded_channel();
        let our_credit = Arc::new((Mutex::new(u64::from(STREAM_WINDOW)), Notify::new()));
        let (read_half, write_half) = socket.into_split();
        let up = tokio::spawn(pump_up(
            Arc::downgrade(self),
            stream_id,
            read_half,
            Arc::clone(&our_credit),
        ));
        let down = tokio::spawn(pump_down(
            Arc::downgrade(self),
            stream_id,
            write_half,
            from_host,
        ));
        lock(&self.streams).insert(
            stream_id,
            GuestStream {
                to_socket,
                host_credit: u64::from(STREAM_WINDOW),
                our_credit,
                directions_done: 0,
                tasks: vec![up, down],
            },
        );
        self.out
            .send(0, Message::StreamOpen(StreamOpen { stream_id, port }))
            .await;
    }

    /// Handles a stream frame from the host.
    pub fn deliver(&self, message: Message) {
        match message {
            Message::StreamData(StreamData { stream_id, data }) => {
                let mut streams = lock(&self.streams);
                let Some(stream) = streams.get_mut(&stream_id) else {
                    return;
                };
                let len = data.len() as u64;
                if len > stream.host_credit || data.len() > STREAM_CHUNK_LEN {
                    streams.remove(&stream_id);
                    drop(streams);
                    self.reset(stream_id, "the host sent beyond its credit");
                    return;
                }
                stream.host_credit -= len;
                let _ = stream.to_socket.send(ToSocket::Data(data));
            }
            Message::StreamWindow(StreamWindow { stream_id, credit }) => {
                if let Some(stream) = lock(&self.streams).get(&stream_id) {
                    let (credit_lock, notify) = &*stream.our_credit;
                    *lock(credit_lock) += u64::from(credit);
                    notify.notify_one();
                }
            }
            Message::StreamShutdown(StreamId { stream_id }) => {
                if let Some(stream) = lock(&self.streams).get(&stream_id) {
                    let _ = stream.to_socket.send(ToSocket::Eof);
                }
            }
            Message::StreamReset(StreamReset { stream_id, .. }) => {
                // In order behind the data already delivered: the socket gets
                // it before it closes. Without a writer left, end it now
                // (dropping the stream aborts its pumps and closes the socket).
                let mut streams = lock(&self.streams);
                let queued = streams
                    .get(&stream_id)
                    .is_some_and(|s| s.to_socket.send(ToSocket::Reset).is_ok());
                if !queued {
                    streams.remove(&stream_id);
                }
            }
            _ => {}
        }
    }

    fn reset(&self, stream_id: u64, reason: &str) {
        let out = self.out.clone();
        let reason = reason.to_owned();
        tokio::spawn(async move {
            out.send(0, Message::StreamReset(StreamReset { stream_id, reason }))
                .await;
        });
    }

    /// The host may send `credit` more bytes on `stream_id`.
    fn grant(&self, stream_id: u64, credit: u64) {
        if let Some(stream) = lock(&self.streams).get_mut(&stream_id) {
            stream.host_credit += credit;
        }
    }

    fn finish(&self, stream_id: u64) {
        lock(&self.streams).remove(&stream_id);
    }

    /// One direction reached EOF; the stream is forgotten when both did.
    fn direction_done(&self, stream_id: u64) {
        let mut streams = lock(&self.streams);
        let done = streams.get_mut(&stream_id).is_some_and(|s| {
            s.directions_done += 1;
            s.directions_done >= 2
        });
        if done {
            streams.remove(&stream_id);
        }
    }
}

/// Socket → host, within the credit the host granted.
async fn pump_up(
    tunnels: std::sync::Weak<Tunnels>,
    stream_id: u64,
    mut socket: tokio::net::tcp::OwnedReadHalf,
    credit: Arc<(Mutex<u64>, Notify)>,
) {
    let mut buf = vec![0u8; STREAM_CHUNK_LEN];
    loop {
        let allowed = loop {
            let (credit_lock, notify) = &*credit;
            let notified = notify.notified();
            let available = *lock(credit_lock);
            if available > 0 {
                break available;
            }
            notified.await;
        };
        let want = buf
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let read = socket.read(&mut buf[..want]).await;
        let Some(tunnels) = tunnels.upgrade() else {
            return;
        };
        match read {
            Ok(0) => {
                tunnels
                    .out
                    .send(0, Message::StreamShutdown(StreamId { stream_id }))
                    .await;
                tunnels.direction_done(stream_id);
                return;
            }
            Ok(n) => {
                *lock(&credit.0) -= n as u64;
                let data = buf[..n].to_vec();
                tunnels
                    .out
                    .send(0, Message::StreamData(StreamData { stream_id, data }))
                    .await;
            }
            Err(e) => {
                tunnels.reset(stream_id, &format!("reading the guest socket: {e}"));
                tunnels.finish(stream_id);
                return;
            }
        }
    }
}

/// Host → socket; grants the host credit for what was written.
async fn pump_down(
    tunnels: std::sync::Weak<Tunnels>,
    stream_id: u64,
    mut socket: tokio::net::tcp::OwnedWriteHalf,
    mut from_host: mpsc::UnboundedReceiver<ToSocket>,
) {
    while let Some(item) = from_host.recv().await {
        let Some(tunnels) = tunnels.upgrade() else {
            return;
        };
        match item {
            ToSocket::Data(data) => {
                if let Err(e) = socket.write_all(&data).await {
                    tunnels.reset(stream_id, &format!("writing the guest socket: {e}"));
                    tunnels.finish(stream_id);
                    return;
                }
                let credit = data.len() as u64;
                tunnels.grant(stream_id, credit);
                tunnels
                    .out
                    .send(
                        0,
                        Message::StreamWindow(StreamWindow {
                            stream_id,
                            credit: credit as u32,
                        }),
                    )
                    .await;
            }
            ToSocket::Eof => {
                let _ = socket.shutdown().await;
                tunnels.direction_done(stream_id);
                // Stay for a Reset that may follow (it ends the other
                // direction), without keeping the session's tunnels alive.
                let weak = Arc::downgrade(&tunnels);
                drop(tunnels);
                while let Some(item) = from_host.recv().await {
                    if matches!(item, ToSocket::Reset) {
                        if let Some(tunnels) = weak.upgrade() {
                            tunnels.finish(stream_id);
                        }
                        return;
                    }
                }
                return;
            }
            ToSocket::Reset => {
                let _ = socket.shutdown().await;
                tunnels.finish(stream_id);
                return;
            }
        }
    }
}
