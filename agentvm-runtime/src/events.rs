//! What happened: a typed [`Event`] for every VM lifecycle step, agent
//! execution, test and anomaly, and a process-wide registry of
//! [`EventSink`]s that consume them (the Prometheus [`metrics`](crate::metrics),
//! the harness's audit log, ...).
//!
//! The pool and [`Vm`](crate::vm::Vm) call [`emit`]; outputs [`subscribe`].
//! Emitting with no sink registered costs a read lock and nothing else.
//! Events never carry secrets: the harness redacts what it emits (argv,
//! failure messages) before emitting.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The hypervisor process of a VM was launched.
    VmCreated {
        /// VM id.
        vm: String,
        /// vCPUs.
        vcpus: u32,
        /// Memory in MiB.
        memory_mib: u32,
        /// Host process id of the hypervisor, when the backend knows it.
        host_pid: Option<u32>,
    },
    /// The guest agent said Hello.
    VmBooted {
        /// VM id.
        vm: String,
        /// Launch until Hello, seconds.
        boot_seconds: f64,
    },
    /// A VM started from a shared golden snapshot (the backend's golden
    /// cache) instead of booting: it is ready.
    VmRestored {
        /// VM id.
        vm: String,
        /// Launch until the channel was in step, seconds.
        restore_seconds: f64,
    },
    /// The golden snapshot was taken: the VM is ready.
    VmSnapshotted {
        /// VM id.
        vm: String,
        /// Taking the snapshot, seconds.
        snapshot_seconds: f64,
    },
    /// A VM failed to boot (it was destroyed).
    VmBootFailed {
        /// VM id, when the launch got that far.
        vm: Option<String>,
        /// Why.
        error: String,
    },
    /// A caller got a VM from a pool.
    VmAcquired {
        /// Pool id.
        pool: String,
        /// VM id.
        vm: String,
        /// How long `acquire` waited, seconds.
        waited_seconds: f64,
        /// Leases this VM served, this one included.
        uses: u64,
    },
    /// A lease was given back.
    VmReleased {
        /// Pool id.
        pool: String,
        /// VM id.
        vm: String,
    },
    /// A VM was reverted to its golden snapshot.
    VmReverted {
        /// VM id.
        vm: String,
        /// Restore + resynchronisation, seconds.
        revert_seconds: f64,
    },
    /// A VM was found crashed, hung or broken.
    VmCrashed {
        /// VM id.
        vm: String,
        /// What failed.
        error: String,
    },
    /// A VM was stopped and its files removed.
    VmDestroyed {
        /// VM id.
        vm: String,
        /// Why (`recycled`, `shutdown`, `broken`, `boot failed`, `dropped`).
        reason: String,
    },
    /// Host-side resource use of a VM's hypervisor process.
    VmResources {
        /// VM id.
        vm: String,
        /// The sample.
        #[serde(flatten)]
        usage: ProcessUsage,
    },
    /// A pool's counters changed.
    PoolStatus {
        /// Pool id.
        pool: String,
        /// Ready VMs.
        available: usize,
        /// Leased VMs.
        leased: usize,
        /// Booting VMs.
        booting: usize,
        /// Reverting VMs.
        reverting: usize,
    },
    /// A test started on a VM.
    TestStarted {
        /// Full test name.
        test: String,
        /// VM id.
        vm: String,
    },
    /// One agent run (from the test harness).
    Execution(Execution),
    /// One connection an agent asked the egress proxy for, allowed or refused
    /// (from the test harness, after the run).
    Connection(Connection),
    /// Something unusual about a test's runs.
    Anomaly {
        /// Full test name.
        test: String,
        /// The kind (`timeout`, `output_cap`, `memory`, `duration_zscore`, ...).
        kind: String,
        /// What was seen.
        message: String,
    },
    /// A test ended.
    TestFinished {
        /// Full test name.
        test: String,
        /// `passed` or `failed`.
        result: String,
        /// VM id, if it got one.
        vm: Option<String>,
        /// Test body, seconds.
        duration_seconds: f64,
        /// Revert after the test, seconds (when it was reverted).
        revert_seconds: Option<f64>,
        /// Kinds of the anomalies found.
        anomalies: Vec<String>,
        /// The (redacted) failure message.
        failure: Option<String>,
    },
}

/// One connection through (or refused by) the egress proxy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Connection {
    /// Full test name (empty outside the harness).
    pub test: String,
    /// VM id.
    pub vm: String,
    /// Target host as the agent named it.
    pub host: String,
    /// Target port.
    pub port: u16,
    /// `connect` (a CONNECT tunnel, e.g. HTTPS) or `http` (plain HTTP).
    pub kind: String,
    /// Whether the allowlist let it through.
    pub allowed: bool,
    /// Bytes from the agent to the host.
    pub bytes_up: u64,
    /// Bytes from the host to the agent.
    pub bytes_down: u64,
    /// How long it lasted, seconds.
    pub duration_seconds: f64,
    /// What went wrong, if anything (refused, resolution or connection failure).
    pub error: Option<String>,
}

/// One agent execution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Execution {
    /// Full test name (empty outside the harness).
    pub test: String,
    /// VM id.
    pub vm: String,
    /// The agent's name (its program).
    pub agent: String,
    /// Program and arguments, secrets redacted.
    pub argv: Vec<String>,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal, when killed by one.
    pub signal: Option<i32>,
    /// Whether it was killed at its timeout.
    pub timed_out: bool,
    /// Wall time, seconds.
    pub duration_seconds: f64,
    /// Stdout bytes produced.
    pub stdout_bytes: u64,
    /// Stderr bytes produced.
    pub stderr_bytes: u64,
    /// Whether an output hit its cap.
    pub output_truncated: bool,
    /// Peak RSS of the largest process, bytes.
    pub peak_rss_bytes: Option<u64>,
    /// User + system CPU, seconds.
    pub cpu_seconds: Option<f64>,
    /// Processes the guest started while it ran.
    pub processes_started: Option<u64>,
    /// Most processes of its tree alive at once.
    pub peak_processes: Option<u64>,
    /// Packets the guest could not route while it ran.
    pub unroutable_packets: Option<u64>,
    /// Paths outside the workspace it changed (`None`: not listed).
    pub outside_workspace_paths: Option<usize>,
}

impl Execution {
    /// `success`, `failure`, `timeout` or `signal`.
    pub fn status(&self) -> &'static str {
        if self.timed_out {
            "timeout"
        } else if self.exit_code == Some(0) {
            "success"
        } else if self.signal.is_some() {
            "signal"
        } else {
            "failure"
        }
    }
}

/// Resource use of a host process (the hypervisor of a VM), from `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ProcessUsage {
    /// User + system CPU time since the process started, seconds.
    pub cpu_seconds: f64,
    /// CPU use since the previous sample (or the start), percent of one core.
    pub cpu_percent: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Peak resident set size, bytes.
    pub peak_rss_bytes: u64,
    /// Bytes read from storage.
    pub disk_read_bytes: u64,
    /// Bytes written to storage.
    pub disk_write_bytes: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

impl ProcessUsage {
    /// Reads `/proc/<pid>/{stat,status,io}`. `previous` (cpu seconds and
    /// when they were read) gives the CPU percentage over the interval; else
    /// it is the average since the process started. `None` when the process
    /// is gone.
    pub fn sample(pid: u32, previous: Option<(f64, SystemTime)>) -> Option<Self> {
        let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
        let stat = std::fs::read_to_string(proc.join("stat")).ok()?;
        let status = std::fs::read_to_string(proc.join("status")).unwrap_or_default();
        let io = std::fs::read_to_string(proc.join("io")).unwrap_or_default();
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
        let (cpu_seconds, start_ticks) = parse_stat(&stat)?;
        let cpu_percent = match previous {
            Some((cpu, at)) => {
                let wall = SystemTime::now()
                    .duration_since(at)
                    .unwrap_or(Duration::ZERO)
                    .as_secs_f64();
                if wall > 0.0 {
                    (cpu_seconds - cpu).max(0.0) / wall * 100.0
                } else {
                    0.0
                }
            }
            None => {
                let up: f64 = uptime
                    .split_whitespace()
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0.0);
                let age = up - start_ticks / USER_HZ;
                if age > 0.0 {
                    cpu_seconds / age * 100.0
                } else {
                    0.0
                }
            }
        };
        Some(Self {
            cpu_seconds,
            cpu_percent,
            rss_bytes: status_kib(&status, "VmRSS:").unwrap_or(0) * 1024,
            peak_rss_bytes: status_kib(&status, "VmHWM:").unwrap_or(0) * 1024,
            disk_read_bytes: io_field(&io, "read_bytes:").unwrap_or(0),
            disk_write_bytes: io_field(&io, "write_bytes:").unwrap_or(0),
        })
    }
}

/// (utime + stime in seconds, starttime in ticks) of a `/proc/<pid>/stat` line.
fn parse_stat(stat: &str) -> Option<(f64, f64)> {
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3 of the man page, i.e. index 0 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let start: f64 = fields.get(19)?.parse().ok()?;
    Some(((utime + stime) / USER_HZ, start))
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn io_field(io: &str, key: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// A consumer of events. Called synchronously on the emitting thread: keep
/// it quick and never block on async work.
pub trait EventSink: Send + Sync {
    /// Handles one event; `at` is when it happened.
    fn handle(&self, at: SystemTime, event: &Event);
}

type Sinks = Vec<(u64, Arc<dyn EventSink>)>;

static SINKS: RwLock<Sinks> = RwLock::new(Vec::new());
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Registers `sink` until the returned [`Subscription`] is dropped.
#[must_use = "the sink is unregistered when the subscription is dropped"]
pub fn subscribe(sink: Arc<dyn EventSink>) -> Subscription {
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    SINKS
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, sink));
    Subscription { id }
}

/// Sends `event` to every registered sink.
pub fn emit(event: Event) {
    let sinks = SINKS.read().unwrap_or_else(|e| e.into_inner());
    if sinks.is_empty() {
        return;
    }
    let now = SystemTime::now();
    for (_, sink) in sinks.iter() {
        sink.handle(now, &event);
    }
}

/// Keeps a sink registered; dropping it unregisters the sink.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
}

impl Subscription {
    /// Keeps the sink registered for the rest of the process.
    pub fn forever(self) {
        std::mem::forget(self);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        SINKS
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != self.id);
    }
}

/// An RFC 3339 UTC timestamp with milliseconds (`2026-11-26T17:20:04.123Z`).
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// An event as one JSON object, with its timestamp as `ts`:
/// `{"ts":"…","event":"vm_booted","vm":"…",…}`.
pub fn to_json_line(at: SystemTime, event: &Event) -> String {
    #[derive(Serialize)]
    struct Line<'a> {
        ts: String,
        #[serde(flatten)]
        event: &'a Event,
    }
    serde_json::to_string(&Line {
        ts: rfc3339(at),
        event,
    })
    .unwrap_or_else(|e| format!("{{\"ts\":\"{}\",\"error\":\"{e}\"}}", rfc3339(at)))
}

/// A sink that keeps every event (for tests).
#[derive(Debug, Default)]
pub struct Recorder {
    events: std::sync::Mutex<Vec<Event>>,
}

impl Recorder {
    /// The events so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl EventSink for Recorder {
    fn handle(&self, _at: SystemTime, event: &Event) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_with_spaces_in_the_name() {
        let stat = "1234 (qemu system) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 1000 0 0";
        let (cpu, start) = parse_stat(stat).unwrap();
        assert!((cpu - 3.0).abs() < 1e-9, "{cpu}");
        assert_eq!(start, 1000.0);
    }

    #[test]
    fn own_process_is_sampled() {
        let usage = ProcessUsage::sample(std::process::id(), None).unwrap();
        assert!(usage.rss_bytes > 0, "{usage:?}");
        assert!(usage.peak_rss_bytes >= usage.rss_bytes, "{usage:?}");
        assert!(ProcessUsage::sample(u32::MAX, None).is_none());
    }

    #[test]
    fn lines_are_tagged_json_with_a_utc_timestamp() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let line = to_json_line(
            at,
            &Event::VmBooted {
                vm: "vm-1".into(),
                boot_seconds: 1.5,
            },
        );
        assert_eq!(
            line,
            r#"{"ts":"2023-11-14T22:13:20.123Z","event":"vm_booted","vm":"vm-1","boot_seconds":1.5}"#
        );
        let exec = to_json_line(
            at,
            &Event::Execution(Execution {
                test: "t".into(),
                vm: "v".into(),
                agent: "a".into(),
                argv: vec!["a".into()],
                exit_code: Some(0),
                signal: None,
                timed_out: false,
                duration_seconds: 0.5,
                stdout_bytes: 1,
                stderr_bytes: 0,
                output_truncated: false,
                peak_rss_bytes: None,
                cpu_seconds: None,
                processes_started: Some(3),
                peak_processes: None,
                unroutable_packets: Some(0),
                outside_workspace_paths: Some(0),
            }),
        );
        let value: serde_json::Value = serde_json::from_str(&exec).unwrap();
        assert_eq!(value["event"], "execution");
        assert_eq!(value["agent"], "a");
    }

    #[test]
    fn subscriptions_end_when_dropped() {
        let recorder = Arc::new(Recorder::default());
        let sub = subscribe(recorder.clone());
        let marker = || Event::VmReleased {
            pool: "p-test-sub".into(),
            vm: "x".into(),
        };
        emit(marker());
        drop(sub);
        emit(marker());
        let seen = recorder
            .events()
            .into_iter()
            .filter(|e| *e == marker())
            .count();
        assert_eq!(seen, 1);
    }
}
