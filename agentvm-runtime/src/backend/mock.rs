//! An in-process fake backend for fast tests of the pool and harness logic.
//! Its "guest" is a task that speaks the real protocol over an in-memory pipe:
//! it answers Hello and Ping, and runs no real commands (an Exec of `echo
//! ARGS…` prints the args; `mock-timeout` reports a run killed at its
//! timeout; anything else exits 0), and lists no workspace changes.
//! Failures can be injected.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::DuplexStream;

use super::{
    Backend, BackendError, BoxedChannel, FromConfig, Machine, MachineState, RevertOutcome,
};
use crate::config::AgentVmConfig;
use crate::protocol::{
    Ack, ChangeList, ExitReport, ExitStatus, FrameReader, FrameWriter, Hello, Message, OutputChunk,
    OutputStream, Pong, ResourceUsage, PROTOCOL_VERSION,
};
use crate::spec::VmSpec;

/// Failure injection and counters shared by a [`MockBackend`] and its machines.
#[derive(Debug, Default)]
pub struct MockControl {
    /// Launches so far.
    pub launches: AtomicU64,
    /// Reverts so far.
    pub reverts: AtomicU64,
    /// Machines destroyed so far.
    pub destroyed: AtomicU64,
    /// Machines alive now.
    pub alive: AtomicUsize,
    /// The next this-many launches fail.
    pub fail_launches: AtomicUsize,
    /// The next this-many reverts fail.
    pub fail_reverts: AtomicUsize,
    /// Every machine reports itself crashed.
    pub crash_all: AtomicBool,
    /// Simulated boot time in milliseconds.
    pub boot_delay_ms: AtomicU64,
    /// Simulated revert time in milliseconds.
    pub revert_delay_ms: AtomicU64,
}

/// A backend whose VMs are in-process fakes.
#[derive(Debug, Clone, Default)]
pub struct MockBackend {
    control: Arc<MockControl>,
}

/// The mock reads no setting: it runs no VM.
impl FromConfig for MockBackend {
    fn from_config(_config: &AgentVmConfig) -> Result<Self, BackendError> {
        Ok(Self::new())
    }
}

impl MockBackend {
    /// A mock backend with no injected failures.
    pub fn new() -> Self {
        Self::default()
    }

    /// Failure injection and counters.
    pub fn control(&self) -> &Arc<MockControl> {
        &self.control
    }
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl Backend for MockBackend {
    fn name(&self) -> &'static str {
        "mock"
    }

    async fn launch(&self, _spec: &VmSpec) -> Result<Box<dyn Machine>, BackendError> {
        let n = self.control.launches.fetch_add(1, Ordering::SeqCst);
        let delay = self.control.boot_delay_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if take_one(&self.control.fail_launches) {
            return Err(BackendError::Control {
                vm: format!("mock-{n}"),
                operation: "launch".into(),
                message: "injected launch failure".into(),
            });
        }
        self.control.alive.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(MockMachine {
            id: format!("mock-{n}"),
            control: Arc::clone(&self.control),
            guest: None,
            destroyed: false,
            crashed: false,
            paused: false,
            snapshots: Vec::new(),
        }))
    }
}

/// One fake VM.
#[derive(Debug)]
pub struct MockMachine {
    id: String,
    control: Arc<MockControl>,
    guest: Option<tokio::task::JoinHandle<()>>,
    destroyed: bool,
    crashed: bool,
    paused: bool,
    snapshots: Vec<String>,
}

impl MockMachine {
    fn no_snapshot(&self, operation: &str, name: &str) -> BackendError {
        BackendError::Control {
            vm: self.id.clone(),
            operation: operation.into(),
            message: format!("no snapshot named {name:?}"),
        }
    }

    fn crashed(&self) -> BackendError {
        BackendError::Crashed {
            vm: self.id.clone(),
            reason: "injected crash".into(),
            serial_tail: "mock serial: kernel panic (injected)".into(),
        }
    }
}

#[async_trait]
impl Machine for MockMachine {
    fn id(&self) -> &str {
        &self.id
    }

    async fn connect_channel(&mut self) -> Result<BoxedChannel, BackendError> {
        let (host, guest) = tokio::io::duplex(1 << 20);
        if let Some(old) = self.guest.replace(tokio::spawn(fake_guest(guest))) {
            old.abort();
        }
        Ok(Box::pin(host))
    }

    async fn snapshot_golden(&mut self) -> Result<(), BackendError> {
        self.save_snapshot(super::GOLDEN_SNAPSHOT).await
    }

    async fn save_snapshot(&mut self, name: &str) -> Result<(), BackendError> {
        self.snapshots.retain(|n| n != name);
        self.snapshots.push(name.to_owned());
        Ok(())
    }

    async fn load_snapshot(&mut self, name: &str) -> Result<RevertOutcome, BackendError> {
        if !self.snapshots.iter().any(|n| n == name) {
            return Err(self.no_snapshot("loadvm", name));
        }
        Ok(RevertOutcome::ChannelKept)
    }

    async fn delete_snapshot(&mut self, name: &str) -> Result<(), BackendError> {
        if !self.snapshots.iter().any(|n| n == name) {
            return Err(self.no_snapshot("delvm", name));
        }
        self.snapshots.retain(|n| n != name);
        Ok(())
    }

    async fn snapshot_names(&mut self) -> Result<Vec<String>, BackendError> {
        Ok(self.snapshots.clone())
    }

    async fn state(&mut self) -> Result<MachineState, BackendError> {
        Ok(if self.destroyed {
            MachineState::ShutOff
        } else if self.crashed || self.control.crash_all.load(Ordering::SeqCst) {
            MachineState::Crashed
        } else if self.paused {
            MachineState::Paused
        } else {
            MachineState::Running
        })
    }

    async fn revert_golden(&mut self) -> Result<RevertOutcome, BackendError> {
        self.control.reverts.fetch_add(1, Ordering::SeqCst);
        let delay = self.control.revert_delay_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if take_one(&self.control.fail_reverts) {
            self.crashed = true;
            return Err(BackendError::Control {
                vm: self.id.clone(),
                operation: "revert".into(),
                message: "injected revert failure".into(),
            });
        }
        Ok(RevertOutcome::ChannelKept)
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        self.paused = true;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        self.paused = false;
        Ok(())
    }

    async fn check_alive(&mut self) -> Result<(), BackendError> {
        if self.crashed || self.destroyed || self.control.crash_all.load(Ordering::SeqCst) {
            return Err(self.crashed());
        }
        Ok(())
    }

    async fn wait_stopped(&mut self, _timeout: Duration) -> Result<bool, BackendError> {
        // The fake guest has nothing to shut down.
        Ok(true)
    }

    async fn destroy(&mut self) -> Result<(), BackendError> {
        if !self.destroyed {
            self.destroyed = true;
            if let Some(guest) = self.guest.take() {
                guest.abort();
            }
            self.control.alive.fetch_sub(1, Ordering::SeqCst);
            self.control.destroyed.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn serial_tail(&self, _lines: usize) -> String {
        format!("mock serial console of {}", self.id)
    }

    fn serial_log_path(&self) -> Option<PathBuf> {
        None
    }
}

impl Drop for MockMachine {
    fn drop(&mut self) {
        if !self.destroyed {
            self.destroyed = true;
            self.control.alive.fetch_sub(1, Ordering::SeqCst);
            self.control.destroyed.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(guest) = self.guest.take() {
            guest.abort();
        }
    }
}

async fn fake_guest(stream: DuplexStream) {
    let (read, write) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read);
    reader.set_resync(true);
    let mut writer = FrameWriter::new(write);
    while let Ok(Some(frame)) = reader.next().await {
        let id = frame.request_id;
        let replies = match frame.message {
            Message::Hello(_) => vec![Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                software: "mock-guest".into(),
                capabilities: vec!["exec".into()],
                workspace_root: Some("/workspace".into()),
                kernel: None,
            })],
            Message::Ping(ping) => vec![Message::Pong(Pong { nonce: ping.nonce })],
            Message::Reseed(_) => vec![Message::Ok(Default::default())],
            Message::Exec(exec) => {
                let mut out = Vec::new();
                let timeout = exec.argv.first().map(String::as_str) == Some("mock-timeout");
                if exec.argv.first().map(String::as_str) == Some("echo") {
                    let text = exec.argv[1..].join(" ") + "\n";
                    out.push(Message::Output(OutputChunk {
                        stream: OutputStream::Stdout,
                        data: text.into_bytes(),
                    }));
                }
                out.push(Message::Exit(ExitReport {
                    status: if timeout {
                        ExitStatus::Signal(9)
                    } else {
                        ExitStatus::Code(0)
                    },
                    timed_out: timeout,
                    duration: Duration::from_millis(1),
                    resources: ResourceUsage::default(),
                    stdout_bytes: 0,
                    stderr_bytes: 0,
                    stdout_truncated: false,
                    stderr_truncated: false,
                }));
                out
            }
            Message::ListChanges(_) => vec![Message::Changes(ChangeList::default())],
            _ => vec![Message::Ok(Ack {})],
        };
        for reply in replies {
            if writer.send(id, &reply).await.is_err() {
                return;
            }
        }
    }
}
