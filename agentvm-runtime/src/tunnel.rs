//! The host end of streams tunnelled over the control channel.
//!
//! A guest has no NIC; agents inside reach the host's model gateway and
//! egress proxy through TCP ports the guest agent listens on (on the
//! guest's loopback) and tunnels to the host. [`GuestClient::tunnel_listen`]
//! opens such a port and returns a [`TunnelListener`]; each connection a
//! guest process makes arrives as a [`TunnelStream`] — an `AsyncRead +
//! AsyncWrite` the host can hand to any server (hyper, a proxy, a test).
//!
//! Flow control: each side may send only as many bytes as the other side
//! granted ([`STREAM_WINDOW`] at the start, then as much as it consumed,
//! [`Message::StreamWindow`]), so a stream never buffers more than a window
//! on either end, and exec and file traffic keep flowing beside it. The guest
//! is untrusted: data beyond its credit, or for a stream that does not exist,
//! resets that stream, nothing more. After a revert the guest's listeners and
//! streams are gone with its memory; [`Hub::reset_all`] ends the host's ends.
//!
//! [`GuestClient::tunnel_listen`]: crate::client::GuestClient::tunnel_listen

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::protocol::{
    Message, StreamData, StreamId, StreamOpen, StreamReset, StreamWindow, STREAM_CHUNK_LEN,
    STREAM_WINDOW,
};

/// Connections a listener holds that nobody accepted yet; more are refused.
pub const ACCEPT_BACKLOG: usize = 64;
/// Most streams open at once on one channel; more are refused.
pub const MAX_STREAMS: usize = 1024;

/// Data or the end of one direction, as delivered to a stream's reader.
#[derive(Debug)]
enum Inbound {
    Data(Vec<u8>),
    Eof,
    Reset(String),
}

/// What the hub and a stream share.
#[derive(Debug)]
struct StreamShared {
    /// Bytes we may still send to the guest.
    send_credit: u64,
    /// Bytes the guest may still send us.
    recv_credit: u64,
    /// A writer waiting for credit.
    write_waker: Option<Waker>,
    /// Why the stream is dead (reset either way, revert, channel closed).
    error: Option<String>,
}

/// The state of every tunnel on one control channel.
#[derive(Debug)]
pub struct Hub {
    state: Mutex<HubState>,
    out: mpsc::UnboundedSender<Message>,
}

#[derive(Debug, Default)]
struct HubState {
    listeners: HashMap<u16, mpsc::Sender<TunnelStream>>,
    streams: HashMap<u64, (Arc<Mutex<StreamShared>>, mpsc::UnboundedSender<Inbound>)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    /// A hub whose frames for the guest go to `out` (written with request id 0).
    pub fn new(out: mpsc::UnboundedSender<Message>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(HubState::default()),
            out,
        })
    }

    /// Registers a listener for `port` (before the guest is asked to listen,
    /// so no connection can arrive unannounced).
    pub fn add_listener(self: &Arc<Self>, port: u16) -> TunnelListener {
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        lock(&self.state).listeners.insert(port, tx);
        TunnelListener { port, rx }
    }

    /// Forgets the listener of `port`.
    pub fn remove_listener(&self, port: u16) {
        lock(&self.state).listeners.remove(&port);
    }

    /// Handles a stream frame from the guest. Returns `false` for messages
    /// that are not the tunnel's.
    pub fn deliver(self: &Arc<Self>, message: Message) -> bool {
        match message {
            Message::StreamOpen(open) => self.open(open),
            Message::StreamData(StreamData { stream_id, data }) => self.data(stream_id, data),
            Message::StreamWindow(StreamWindow { stream_id, credit }) => {
                self.credit(stream_id, credit)
            }
            Message::StreamShutdown(StreamId { stream_id }) => {
                if let Some((_, inbound)) = lock(&self.state).streams.get(&stream_id) {
                    let _ = inbound.send(Inbound::Eof);
                }
            }
            Message::StreamReset(StreamReset { stream_id, reason }) => self.end(
                stream_id,
                &format!("the guest reset the stream: {reason}"),
                false,
            ),
            _ => return false,
        }
        true
    }

    fn open(self: &Arc<Self>, StreamOpen { stream_id, port }: StreamOpen) {
        let mut state = lock(&self.state);
        let refuse = |why: &str| {
            let _ = self.out.send(Message::StreamReset(StreamReset {
                stream_id,
                reason: why.to_owned(),
            }));
        };
        if state.streams.contains_key(&stream_id) {
            drop(state);
            return self.end(stream_id, "the guest opened a stream id twice", true);
        }
        if state.streams.len() >= MAX_STREAMS {
            return refuse("too many tunnelled streams open");
        }
        let Some(listener) = state.listeners.get(&port).cloned() else {
            return refuse("nothing listens on this port on the host");
        };
        let shared = Arc::new(Mutex::new(StreamShared {
            send_credit: u64::from(STREAM_WINDOW),
            recv_credit: u64::from(STREAM_WINDOW),
            write_waker: None,
            error: None,
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = TunnelStream {
            id: stream_id,
            port,
            shared: Arc::clone(&shared),
            inbound: rx,
            pending: Vec::new(),
            pending_at: 0,
            consumed: 0,
            read_done: false,
            write_done: false,
            out: self.out.clone(),
            hub: Arc::downgrade(self),
        };
        let refused = match listener.try_send(stream) {
            Ok(()) => {
                state.streams.insert(stream_id, (shared, tx));
                return;
            }
            Err(mpsc::error::TrySendError::Full(stream)) => {
                (stream, "the host's accept backlog is full")
            }
            Err(mpsc::error::TrySendError::Closed(stream)) => {
                state.listeners.remove(&port);
                (stream, "the host stopped listening on this port")
            }
        };
        // Dropped without the lock: a stream's Drop takes it.
        drop(state);
        let (mut stream, why) = refused;
        stream.read_done = true;
        stream.write_done = true;
        drop(stream);
        refuse(why);
    }

    fn data(self: &Arc<Self>, stream_id: u64, data: Vec<u8>) {
        let violation = {
            let state = lock(&self.state);
            let Some((shared, inbound)) = state.streams.get(&stream_id) else {
                // A stream the host already ended: its data is late, not wrong.
                return;
            };
            let mut shared = lock(shared);
            let len = data.len() as u64;
            if data.len() > STREAM_CHUNK_LEN {
                Some(format!(
                    "the guest sent a {len}-byte chunk (most {STREAM_CHUNK_LEN})"
                ))
            } else if len > shared.recv_credit {
                Some(format!(
                    "the guest sent {len} bytes with only {} of credit",
                    shared.recv_credit
                ))
            } else {
                shared.recv_credit -= len;
                let _ = inbound.send(Inbound::Data(data));
                None
            }
        };
        if let Some(why) = violation {
            self.end(stream_id, &why, true);
        }
    }

    fn credit(self: &Arc<Self>, stream_id: u64, credit: u32) {
        let violation = {
            let state = lock(&self.state);
            let Some((shared, _)) = state.streams.get(&stream_id) else {
                return;
            };
            let mut shared = lock(shared);
            shared.send_credit += u64::from(credit);
            if shared.send_credit > 64 * u64::from(STREAM_WINDOW) {
                Some("the guest granted absurd credit".to_owned())
            } else {
                if let Some(waker) = shared.write_waker.take() {
                    waker.wake();
                }
                None
            }
        };
        if let Some(why) = violation {
            self.end(stream_id, &why, true);
        }
    }

    /// Ends one stream: its reader gets `reason` as an error, its writer too.
    /// `tell_guest`: also send the guest a reset.
    fn end(&self, stream_id: u64, reason: &str, tell_guest: bool) {
        let removed = lock(&self.state).streams.remove(&stream_id);
        if let Some((shared, inbound)) = removed {
            let mut shared = lock(&shared);
            shared.error.get_or_insert_with(|| reason.to_owned());
            if let Some(waker) = shared.write_waker.take() {
                waker.wake();
            }
            let _ = inbound.send(Inbound::Reset(reason.to_owned()));
        }
        if tell_guest {
            #[cfg(feature = "host")]
            tracing::warn!(stream_id, %reason, "tunnelled stream reset");
            let _ = self.out.send(Message::StreamReset(StreamReset {
                stream_id,
                reason: reason.to_owned(),
            }));
        }
    }

    /// Ends every stream and listener: the guest's side is gone (a revert
    /// restored its memory, or the channel closed).
    pub fn reset_all(&self, reason: &str) {
        let (streams, listeners) = {
            let mut state = lock(&self.state);
            (
                std::mem::take(&mut state.streams),
                std::mem::take(&mut state.listeners),
            )
        };
        drop(listeners);
        for (_, (shared, inbound)) in streams {
            let mut shared = lock(&shared);
            shared.error.get_or_insert_with(|| reason.to_owned());
            if let Some(waker) = shared.write_waker.take() {
                waker.wake();
            }
            let _ = inbound.send(Inbound::Reset(reason.to_owned()));
        }
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        lock(&self.state).streams.len()
    }

    fn forget(&self, stream_id: u64) {
        lock(&self.state).streams.remove(&stream_id);
    }
}

/// A tunnelled port: yields the connections guest processes make to it.
#[derive(Debug)]
pub struct TunnelListener {
    port: u16,
    rx: mpsc::Receiver<TunnelStream>,
}

/// Why no stream could be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tunnel listener on guest port {port} closed (the VM was reverted or its channel closed); listen again")]
pub struct ListenerClosed {
    /// The guest port.
    pub port: u16,
}

impl TunnelListener {
    /// The guest port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next connection. Fails once the guest's listener is gone.
    pub async fn accept(&mut self) -> Result<TunnelStream, ListenerClosed> {
        self.rx
            .recv()
            .await
            .ok_or(ListenerClosed { port: self.port })
    }
}

/// One tunnelled connection, the host's end. Reads see the guest process's
/// bytes and then EOF when it shuts down its write side; `shutdown` is a
/// half-close; dropping it before both directions ended resets the stream.
#[derive(Debug)]
pub struct TunnelStream {
    id: u64,
    port: u16,
    shared: Arc<Mutex<StreamShared>>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    pending: Vec<u8>,
    pending_at: usize,
    /// Bytes read since credit was last granted back.
    consumed: u64,
    read_done: bool,
    write_done: bool,
    out: mpsc::UnboundedSender<Message>,
    hub: Weak<Hub>,
}

impl TunnelStream {
    /// The guest port the connection was made to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The stream's id on the channel.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn grant(&mut self, force: bool) {
        if self.consumed > 0 && (force || self.consumed >= u64::from(STREAM_WINDOW / 4)) {
            let credit = self.consumed.min(u64::from(u32::MAX)) as u32;
            lock(&self.shared).recv_credit += u64::from(credit);
            self.consumed -= u64::from(credit);
            let _ = self.out.send(Message::StreamWindow(StreamWindow {
                stream_id: self.id,
                credit,
            }));
        }
    }
}

fn broken(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, reason.to_owned())
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pending_at < this.pending.len() {
                let n = buf.remaining().min(this.pending.len() - this.pending_at);
                buf.put_slice(&this.pending[this.pending_at..this.pending_at + n]);
                this.pending_at += n;
                this.consumed += n as u64;
                // Grant back at once when the reader caught up, so a peer
                // waiting for credit never stalls on a partly read window.
                let drained = this.pending_at == this.pending.len();
                this.grant(drained);
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match this.inbound.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Inbound::Data(data))) => {
                    this.pending = data;
                    this.pending_at = 0;
                }
                Poll::Ready(Some(Inbound::Eof)) => {
                    this.read_done = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Inbound::Reset(reason))) => {
                    this.read_done = true;
                    this.write_done = true;
                    return Poll::Ready(Err(broken(&reason)));
                }
                Poll::Ready(None) => {
                    this.read_done = true;
                    let reason = lock(&this.shared)
                        .error
                        .clone()
                        .unwrap_or_else(|| "the control channel closed".into());
                    return Poll::Ready(Err(broken(&reason)));
                }
            }
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.write_done {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the tunnelled stream was shut down for writing",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut shared = lock(&self.shared);
        if let Some(reason) = &shared.error {
            return Poll::Ready(Err(broken(reason)));
        }
        if shared.send_credit == 0 {
            shared.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf
            .len()
            .min(STREAM_CHUNK_LEN)
            .min(usize::try_from(shared.send_credit).unwrap_or(usize::MAX));
        shared.send_credit -= n as u64;
        drop(shared);
        let sent = self.out.send(Message::StreamData(StreamData {
            stream_id: self.id,
            data: buf[..n].to_vec(),
        }));
        match sent {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(broken("the control channel closed"))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_done {
            self.write_done = true;
            let _ = self
                .out
                .send(Message::StreamShutdown(StreamId { stream_id: self.id }));
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let dead = lock(&self.shared).error.is_some();
        let finished = self.read_done && self.write_done;
        if !dead && !finished {
            let _ = self.out.send(Message::StreamReset(StreamReset {
                stream_id: self.id,
                reason: "the host closed the stream".into(),
            }));
        }
        if let Some(hub) = self.hub.upgrade() {
            hub.forget(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn hub() -> (Arc<Hub>, mpsc::UnboundedReceiver<Message>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Hub::new(tx), rx)
    }

    fn open(hub: &Arc<Hub>, id: u64, port: u16) {
        assert!(hub.deliver(Message::StreamOpen(StreamOpen {
            stream_id: id,
            port
        })));
    }

    #[tokio::test]
    async fn data_flows_both_ways_with_half_close() {
        let (hub, mut to_guest) = hub();
        let mut listener = hub.add_listener(80);
        open(&hub, 7, 80);
        let mut stream = listener.accept().await.unwrap();
        assert_eq!((stream.id(), stream.port()), (7, 80));
        hub.deliver(Message::StreamData(StreamData {
            stream_id: 7,
            data: b"ping".to_vec(),
        }));
        hub.deliver(Message::StreamShutdown(StreamId { stream_id: 7 }));
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        // Reading to the end gave the credit back.
        assert!(matches!(
            to_guest.recv().await,
            Some(Message::StreamWindow(StreamWindow {
                stream_id: 7,
                credit: 4
            }))
        ));
        stream.write_all(b"pong").await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(
            to_guest.recv().await,
            Some(Message::StreamData(StreamData {
                stream_id: 7,
                data: b"pong".to_vec()
            }))
        );
        assert_eq!(
            to_guest.recv().await,
            Some(Message::StreamShutdown(StreamId { stream_id: 7 }))
        );
        drop(stream);
        assert_eq!(hub.open_streams(), 0);
        assert!(
            to_guest.try_recv().is_err(),
            "a finished stream is not reset"
        );
    }

    #[tokio::test]
    async fn writes_wait_for_credit() {
        let (hub, mut to_guest) = hub();
        let mut listener = hub.add_listener(1);
        open(&hub, 1, 1);
        let mut stream = listener.accept().await.unwrap();
        let big = vec![7u8; STREAM_WINDOW as usize + 10];
        let writer = tokio::spawn(async move {
            stream.write_all(&big).await.unwrap();
            stream
        });
        let mut sent = 0;
        while sent < STREAM_WINDOW as usize {
            match to_guest.recv().await.unwrap() {
                Message::StreamData(d) => sent += d.data.len(),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(sent, STREAM_WINDOW as usize, "exactly the window, no more");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(to_guest.try_recv().is_err(), "blocked without credit");
        assert!(!writer.is_finished());
        hub.deliver(Message::StreamWindow(StreamWindow {
            stream_id: 1,
            credit: 10,
        }));
        let _stream = writer.await.unwrap();
        match to_guest.recv().await.unwrap() {
            Message::StreamData(d) => assert_eq!(d.data.len(), 10),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn data_beyond_credit_resets_only_that_stream() {
        let (hub, mut to_guest) = hub();
        let mut listener = hub.add_listener(1);
        open(&hub, 1, 1);
        open(&hub, 2, 1);
        let mut greedy = listener.accept().await.unwrap();
        let mut fine = listener.accept().await.unwrap();
        for _ in 0..(STREAM_WINDOW as usize / STREAM_CHUNK_LEN + 1) {
            hub.deliver(Message::StreamData(StreamData {
                stream_id: 1,
                data: vec![0; STREAM_CHUNK_LEN],
            }));
        }
        let mut sink = Vec::new();
        let err = greedy.read_to_end(&mut sink).await.unwrap_err();
        assert!(err.to_string().contains("credit"), "{err}");
        assert!(matches!(
            to_guest.recv().await,
            Some(Message::StreamReset(StreamReset { stream_id: 1, .. }))
        ));
        hub.deliver(Message::StreamData(StreamData {
            stream_id: 2,
            data: b"ok".to_vec(),
        }));
        let mut two = [0u8; 2];
        fine.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"ok");
        // Data for a stream that never existed is dropped.
        hub.deliver(Message::StreamData(StreamData {
            stream_id: 99,
            data: b"?".to_vec(),
        }));
    }

    #[tokio::test]
    async fn connections_to_unknown_ports_and_beyond_the_backlog_are_refused() {
        let (hub, mut to_guest) = hub();
        open(&hub, 1, 5);
        assert!(matches!(
            to_guest.recv().await,
            Some(Message::StreamReset(StreamReset { stream_id: 1, .. }))
        ));
        let _listener = hub.add_listener(5);
        for id in 0..(ACCEPT_BACKLOG as u64 + 3) {
            open(&hub, 100 + id, 5);
        }
        assert_eq!(hub.open_streams(), ACCEPT_BACKLOG);
        let mut refused = 0;
        while let Ok(m) = to_guest.try_recv() {
            assert!(matches!(m, Message::StreamReset(_)), "{m:?}");
            refused += 1;
        }
        assert_eq!(refused, 3);
    }

    #[tokio::test]
    async fn reset_all_ends_streams_and_listeners() {
        let (hub, _to_guest) = hub();
        let mut listener = hub.add_listener(1);
        open(&hub, 1, 1);
        let mut stream = listener.accept().await.unwrap();
        hub.reset_all("the VM was reverted");
        let mut sink = Vec::new();
        let err = stream.read_to_end(&mut sink).await.unwrap_err();
        assert!(err.to_string().contains("reverted"), "{err}");
        assert!(stream.write_all(b"x").await.is_err());
        assert_eq!(
            listener.accept().await.unwrap_err(),
            ListenerClosed { port: 1 }
        );
    }
}
