//! Lending a VM's control channel to another process without the guest
//! noticing.
//!
//! [`SplicingBackend`] wraps the daemon's real backend. Each of its machines
//! keeps the host end of the guest's channel for the VM's whole life and
//! runs a *switch* task that copies bytes between that stream and one peer
//! at a time: the daemon's own [`GuestClient`](crate::client::GuestClient)
//! (through an in-memory pipe, [`Machine::connect_channel`]) while the VM is
//! in the pool, or a lease's channel connection ([`SpliceHandle::lend`])
//! while a test process holds it. The guest never sees the host go away, so
//! a lease costs no reconnection in the guest (its agent reopens a port only
//! after a 50 ms pause); garbage left by a lease that ended mid-frame is
//! dropped by the resynchronisation of the revert that follows: the first
//! restore after [`SpliceHandle::lease_ended`] reports
//! [`RevertOutcome::ChannelReset`], so the daemon's client reattaches with
//! [`GuestClient::attach_after_revert`](crate::client::GuestClient::attach_after_revert).

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::backend::{
    Backend, BackendError, BoxedChannel, Machine, MachineState, RestoredMachine, RevertOutcome,
};
use crate::protocol::Hello;
use crate::spec::VmSpec;

/// Capacity of the in-memory pipe between a switch and the daemon's client.
const PIPE_CAPACITY: usize = 256 * 1024;

/// A backend whose machines can lend their channel ([`SpliceHandle`]).
pub struct SplicingBackend {
    inner: Arc<dyn Backend>,
    handles: Mutex<HashMap<String, Registered>>,
}

/// A machine's splice handle and its hypervisor's pid, by VM id.
type Registered = (Weak<SpliceHandle>, Option<u32>);

impl SplicingBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        Self {
            inner,
            handles: Mutex::new(HashMap::new()),
        }
    }

    /// The splice handle of VM `vm` (while the VM exists).
    pub fn handle(&self, vm: &str) -> Option<Arc<SpliceHandle>> {
        let mut handles = self.handles.lock().expect("splice lock");
        handles.retain(|_, (h, _)| h.strong_count() > 0);
        handles.get(vm).and_then(|(h, _)| h.upgrade())
    }

    /// Host process ids of the hypervisors of the VMs alive.
    pub fn host_pids(&self) -> Vec<u32> {
        let mut handles = self.handles.lock().expect("splice lock");
        handles.retain(|_, (h, _)| h.strong_count() > 0);
        let mut pids: Vec<u32> = handles.values().filter_map(|(_, pid)| *pid).collect();
        pids.sort_unstable();
        pids
    }

    fn wrap(&self, inner: Box<dyn Machine>) -> SplicedMachine {
        let handle = Arc::new(SpliceHandle {
            switch: Mutex::new(None),
            reconnect: AtomicBool::new(true),
            reset_pending: AtomicBool::new(false),
        });
        self.handles.lock().expect("splice lock").insert(
            inner.id().to_string(),
            (Arc::downgrade(&handle), inner.host_pid()),
        );
        SplicedMachine { inner, handle }
    }
}

#[async_trait]
impl Backend for SplicingBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Machine>, BackendError> {
        let machine = self.inner.launch(spec).await?;
        Ok(Box::new(self.wrap(machine)))
    }

    async fn launch_restored(
        &self,
        spec: &VmSpec,
    ) -> Result<Option<RestoredMachine>, BackendError> {
        let Some(restored) = self.inner.launch_restored(spec).await? else {
            return Ok(None);
        };
        let machine = self.wrap(restored.machine);
        let channel = machine.handle.start_switch(restored.channel);
        Ok(Some(RestoredMachine {
            machine: Box::new(machine),
            channel,
            hello: restored.hello,
        }))
    }

    async fn forget_restored(&self, spec: &VmSpec) {
        self.inner.forget_restored(spec).await
    }
}

/// The lending side of one VM's channel, shared by its machine and the daemon.
#[derive(Debug)]
pub struct SpliceHandle {
    /// Sends the switch its next peer; `None` before the first connection.
    switch: Mutex<Option<mpsc::UnboundedSender<BoxedChannel>>>,
    /// The host end must be opened (again) before the next peer.
    reconnect: AtomicBool,
    /// A lease ended: the next restore reports a channel reset.
    reset_pending: AtomicBool,
}

impl SpliceHandle {
    /// Whether [`Machine::connect_channel`] must run before [`SpliceHandle::lend`]
    /// (no switch yet, or the host end broke, e.g. a backend whose restore
    /// restarted the hypervisor).
    pub fn needs_connect(&self) -> bool {
        let switch = self.switch.lock().expect("splice lock");
        self.reconnect.load(Ordering::SeqCst)
            || match switch.as_ref() {
                Some(switch) => switch.is_closed(),
                None => true,
            }
    }

    /// Makes `peer` the VM's channel peer. The daemon's own client loses
    /// its pipe (it reads end of stream). `false` when the switch is gone.
    pub fn lend(&self, peer: BoxedChannel) -> bool {
        let switch = self.switch.lock().expect("splice lock");
        switch.as_ref().is_some_and(|s| s.send(peer).is_ok())
    }

    /// The lease ended: the bytes that reach the daemon next may be garbage,
    /// so the next restore reports a channel reset.
    pub fn lease_ended(&self) {
        self.reset_pending.store(true, Ordering::SeqCst);
    }

    /// Starts a switch on the host end `stream` and returns the daemon's pipe to it.
    fn start_switch(&self, stream: BoxedChannel) -> BoxedChannel {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ours, theirs) = tokio::io::duplex(PIPE_CAPACITY);
        let _ = tx.send(Box::pin(theirs) as BoxedChannel);
        tokio::spawn(switch(stream, rx));
        *self.switch.lock().expect("splice lock") = Some(tx);
        self.reconnect.store(false, Ordering::SeqCst);
        Box::pin(ours)
    }

    /// A new pipe for the daemon's client on the running switch.
    fn pipe(&self) -> Option<BoxedChannel> {
        let (ours, theirs) = tokio::io::duplex(PIPE_CAPACITY);
        self.lend(Box::pin(theirs))
            .then(|| Box::pin(ours) as BoxedChannel)
    }

    fn restored(&self, outcome: RevertOutcome) -> RevertOutcome {
        if outcome == RevertOutcome::ChannelReset {
            self.reconnect.store(true, Ordering::SeqCst);
        }
        if self.reset_pending.swap(false, Ordering::SeqCst) {
            RevertOutcome::ChannelReset
        } else {
            outcome
        }
    }

    fn stop(&self) {
        self.switch.lock().expect("splice lock").take();
    }
}

/// Copies between the host end of the channel and the current peer until
/// the VM's side ends or the machine is gone. A new peer replaces the
/// current one at once; without a peer, what the guest sends is dropped
/// (it can only be the tail of an abandoned lease's traffic).
async fn switch(mut host: BoxedChannel, mut peers: mpsc::UnboundedReceiver<BoxedChannel>) {
    enum Event {
        Peer(Option<BoxedChannel>),
        PeerDone,
        HostDone,
        Dropped,
    }
    let mut peer: Option<BoxedChannel> = None;
    let mut sink = vec![0u8; 16 * 1024];
    loop {
        let event = match peer.as_mut() {
            Some(current) => {
                let mut host_side = KeepOpen(&mut host);
                tokio::select! {
                    biased;
                    next = peers.recv() => Event::Peer(next),
                    // The peer ended (both ways) or failed: wait for the next.
                    _ = tokio::io::copy_bidirectional(&mut host_side, current) => Event::PeerDone,
                }
            }
            None => tokio::select! {
                biased;
                next = peers.recv() => Event::Peer(next),
                read = host.read(&mut sink) => match read {
                    Ok(0) | Err(_) => Event::HostDone,
                    Ok(_) => Event::Dropped,
                },
            },
        };
        match event {
            Event::Peer(Some(next)) => peer = Some(next),
            // The machine is gone, or the VM's side of the channel is.
            Event::Peer(None) | Event::HostDone => return,
            Event::PeerDone => peer = None,
            Event::Dropped => {}
        }
    }
}

/// The host end of the channel as the copy sees it: a peer's end of stream
/// must not end the guest's (a shutdown would make the hypervisor drop the
/// connection and the guest agent reopen its port).
struct KeepOpen<'a>(&'a mut BoxedChannel);

impl AsyncRead for KeepOpen<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.0.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for KeepOpen<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.0.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A machine of [`SplicingBackend`].
struct SplicedMachine {
    inner: Box<dyn Machine>,
    handle: Arc<SpliceHandle>,
}

#[async_trait]
impl Machine for SplicedMachine {
    fn id(&self) -> &str {
        self.inner.id()
    }

    async fn connect_channel(&mut self) -> Result<BoxedChannel, BackendError> {
        if !self.handle.needs_connect() {
            if let Some(pipe) = self.handle.pipe() {
                return Ok(pipe);
            }
        }
        let stream = self.inner.connect_channel().await?;
        Ok(self.handle.start_switch(stream))
    }

    async fn snapshot_golden(&mut self) -> Result<(), BackendError> {
        self.inner.snapshot_golden().await
    }

    async fn share_golden(&mut self, hello: &Hello) -> Result<(), BackendError> {
        self.inner.share_golden(hello).await
    }

    async fn revert_golden(&mut self) -> Result<RevertOutcome, BackendError> {
        let outcome = self.inner.revert_golden().await?;
        Ok(self.handle.restored(outcome))
    }

    async fn save_snapshot(&mut self, name: &str) -> Result<(), BackendError> {
        self.inner.save_snapshot(name).await
    }

    async fn load_snapshot(&mut self, name: &str) -> Result<RevertOutcome, BackendError> {
        let outcome = self.inner.load_snapshot(name).await?;
        Ok(self.handle.restored(outcome))
    }

    async fn delete_snapshot(&mut self, name: &str) -> Result<(), BackendError> {
        self.inner.delete_snapshot(name).await
    }

    async fn snapshot_names(&mut self) -> Result<Vec<String>, BackendError> {
        self.inner.snapshot_names().await
    }

    async fn state(&mut self) -> Result<MachineState, BackendError> {
        self.inner.state().await
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        self.inner.pause().await
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        self.inner.resume().await
    }

    async fn check_alive(&mut self) -> Result<(), BackendError> {
        self.inner.check_alive().await
    }

    async fn destroy(&mut self) -> Result<(), BackendError> {
        self.handle.stop();
        self.inner.destroy().await
    }

    async fn wait_stopped(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        self.inner.wait_stopped(timeout).await
    }

    fn serial_tail(&self, lines: usize) -> String {
        self.inner.serial_tail(lines)
    }

    fn serial_log_path(&self) -> Option<PathBuf> {
        self.inner.serial_log_path()
    }

    fn host_pid(&self) -> Option<u32> {
        self.inner.host_pid()
    }
}

impl Drop for SplicedMachine {
    fn drop(&mut self) {
        self.handle.stop();
    }
}
