//! Prometheus metrics, fed by [`events`](crate::events) and served as text
//! on `GET /metrics` ([`serve`]).
//!
//! | metric | type | from |
//! |---|---|---|
//! | `agent_vm_boot_duration_seconds` | histogram | launch until the guest's Hello |
//! | `agent_vm_restore_duration_seconds` | histogram | start from the golden cache until the channel is in step |
//! | `agent_vm_pool_size{pool,state}` | gauge | `state`: available, leased, booting, reverting |
//! | `agent_vm_pool_acquire_duration_seconds` | histogram | wait in `VmPool::acquire` |
//! | `agent_vm_revert_duration_seconds` | histogram | restore + channel resync |
//! | `agent_vm_cpu_usage_percent{vm}` | gauge | hypervisor process, `/proc/<pid>/stat`, sampled at release |
//! | `agent_vm_memory_usage_bytes{vm}` | gauge | hypervisor RSS, `/proc/<pid>/status` |
//! | `agent_vm_disk_read_bytes_total{vm}` / `agent_vm_disk_write_bytes_total{vm}` | counter | `/proc/<pid>/io` |
//! | `agent_vm_crashed_total` | counter | VMs found crashed, hung or broken |
//! | `agent_execution_total{status}` | counter | agent runs by `success`, `failure`, `timeout`, `signal` |
//! | `agent_execution_duration_seconds` | histogram | agent run wall time |
//! | `agent_execution_timeout_total` | counter | agent runs killed at their timeout |
//! | `agent_anomaly_total{kind}` | counter | anomalies found by the harness |
//!
//! Per-VM series are removed when the VM is destroyed (only QEMU, whose
//! process id is known, has them).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::events::{Event, EventSink};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    /// `allowed` or `denied`.
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    /// `up` (agent to host) or `down`.
    direction: String,
}

/// The metrics registry and its families. An [`EventSink`]: subscribe it
/// with [`events::subscribe`](crate::events::subscribe).
pub struct Metrics {
    registry: Mutex<Registry>,
    boot: Histogram,
    restore: Histogram,
    pool_size: Family<PoolLabels, Gauge>,
    acquire: Histogram,
    revert: Histogram,
    cpu: Family<VmLabels, Gauge<f64, AtomicU64>>,
    memory: Family<VmLabels, Gauge>,
    disk_read: Family<VmLabels, Counter>,
    disk_write: Family<VmLabels, Counter>,
    crashed: Counter,
    executions: Family<StatusLabels, Counter>,
    execution_duration: Histogram,
    timeouts: Counter,
    anomalies: Family<KindLabels, Counter>,
    connections: Family<VerdictLabels, Counter>,
    connection_bytes: Family<DirectionLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family, registered and empty.
    pub fn new() -> Self {
        // 1 ms .. ~65 s for VM operations, 10 ms .. ~650 s for agent runs.
        let fast = || Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let slow = || Histogram::new(exponential_buckets(0.01, 2.0, 17));
        let metrics = Self {
            registry: Mutex::new(Registry::default()),
            boot: slow(),
            restore: fast(),
            pool_size: Family::default(),
            acquire: fast(),
            revert: fast(),
            cpu: Family::default(),
            memory: Family::default(),
            disk_read: Family::default(),
            disk_write: Family::default(),
            crashed: Counter::default(),
            executions: Family::default(),
            execution_duration: slow(),
            timeouts: Counter::default(),
            anomalies: Family::default(),
            connections: Family::default(),
            connection_bytes: Family::default(),
        };
        {
            let mut r = metrics.registry.lock().expect("registry");
            r.register(
                "agent_vm_boot_duration_seconds",
                "Launch of a VM until its guest agent's Hello",
                metrics.boot.clone(),
            );
            r.register(
                "agent_vm_restore_duration_seconds",
                "Start of a VM from a shared golden snapshot until its channel is in step",
                metrics.restore.clone(),
            );
            r.register(
                "agent_vm_pool_size",
                "VMs of a pool by state",
                metrics.pool_size.clone(),
            );
            r.register(
                "agent_vm_pool_acquire_duration_seconds",
                "Wait for a VM from the pool",
                metrics.acquire.clone(),
            );
            r.register(
                "agent_vm_revert_duration_seconds",
                "Revert of a VM to its golden snapshot",
                metrics.revert.clone(),
            );
            r.register(
                "agent_vm_cpu_usage_percent",
                "CPU use of a VM's hypervisor process since its previous sample (100 = one core)",
                metrics.cpu.clone(),
            );
            r.register(
                "agent_vm_memory_usage_bytes",
                "Resident memory of a VM's hypervisor process",
                metrics.memory.clone(),
            );
            r.register(
                "agent_vm_disk_read_bytes",
                "Bytes a VM's hypervisor process read from storage",
                metrics.disk_read.clone(),
            );
            r.register(
                "agent_vm_disk_write_bytes",
                "Bytes a VM's hypervisor process wrote to storage",
                metrics.disk_write.clone(),
            );
            r.register(
                "agent_vm_crashed",
                "VMs found crashed, hung or broken",
                metrics.crashed.clone(),
            );
            r.register(
                "agent_execution",
                "Agent runs by status (success, failure, timeout, signal)",
                metrics.executions.clone(),
            );
            r.register(
                "agent_execution_duration_seconds",
                "Wall time of agent runs",
                metrics.execution_duration.clone(),
            );
            r.register(
                "agent_execution_timeout",
                "Agent runs killed at their timeout",
                metrics.timeouts.clone(),
            );
            r.register(
                "agent_egress_connections",
                "Connections agents asked the egress proxy for, by verdict (allowed, denied)",
                metrics.connections.clone(),
            );
            r.register(
                "agent_egress_bytes",
                "Bytes through the egress proxy, by direction (up: agent to host, down)",
                metrics.connection_bytes.clone(),
            );
            r.register(
                "agent_anomaly",
                "Anomalies found in test runs, by kind",
                metrics.anomalies.clone(),
            );
        }
        metrics
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

fn set_counter(counter: &Counter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

impl EventSink for Metrics {
    fn handle(&self, _at: SystemTime, event: &Event) {
        let vm_labels = |vm: &str| VmLabels { vm: vm.to_string() };
        match event {
            Event::VmBooted { boot_seconds, .. } => self.boot.observe(*boot_seconds),
            Event::VmRestored {
                restore_seconds, ..
            } => self.restore.observe(*restore_seconds),
            Event::PoolStatus {
                pool,
                available,
                leased,
                booting,
                reverting,
            } => {
                for (state, n) in [
                    ("available", available),
                    ("leased", leased),
                    ("booting", booting),
                    ("reverting", reverting),
                ] {
                    self.pool_size
                        .get_or_create(&PoolLabels {
                            pool: pool.clone(),
                            state: state.to_string(),
                        })
                        .set(*n as i64);
                }
            }
            Event::VmAcquired { waited_seconds, .. } => self.acquire.observe(*waited_seconds),
            Event::VmReverted { revert_seconds, .. } => self.revert.observe(*revert_seconds),
            Event::VmResources { vm, usage } => {
                let labels = vm_labels(vm);
                self.cpu.get_or_create(&labels).set(usage.cpu_percent);
                self.memory
                    .get_or_create(&labels)
                    .set(usage.rss_bytes as i64);
                set_counter(
                    &self.disk_read.get_or_create(&labels),
                    usage.disk_read_bytes,
                );
                set_counter(
                    &self.disk_write.get_or_create(&labels),
                    usage.disk_write_bytes,
                );
            }
            Event::VmCrashed { .. } => {
                self.crashed.inc();
            }
            Event::VmDestroyed { vm, .. } => {
                let labels = vm_labels(vm);
                self.cpu.remove(&labels);
                self.memory.remove(&labels);
                self.disk_read.remove(&labels);
                self.disk_write.remove(&labels);
            }
            Event::Execution(execution) => {
                self.executions
                    .get_or_create(&StatusLabels {
                        status: execution.status().to_string(),
                    })
                    .inc();
                self.execution_duration.observe(execution.duration_seconds);
                if execution.timed_out {
                    self.timeouts.inc();
                }
            }
            Event::Connection(connection) => {
                let verdict = if connection.allowed {
                    "allowed"
                } else {
                    "denied"
                };
                self.connections
                    .get_or_create(&VerdictLabels {
                        verdict: verdict.to_string(),
                    })
                    .inc();
                for (direction, bytes) in
                    [("up", connection.bytes_up), ("down", connection.bytes_down)]
                {
                    self.connection_bytes
                        .get_or_create(&DirectionLabels {
                            direction: direction.to_string(),
                        })
                        .inc_by(bytes);
                }
            }
            Event::Anomaly { kind, .. } => {
                self.anomalies
                    .get_or_create(&KindLabels { kind: kind.clone() })
                    .inc();
            }
            _ => {}
        }
    }
}

/// Binds the metrics endpoint on `127.0.0.1:port` (port 0: any free port).
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", port)).await
}

/// Serves `GET /metrics` (and `GET /`) on `listener` until the task is
/// dropped: one request per connection, anything else gets 404 or 405.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                respond(stream, &metrics),
            )
            .await;
        });
    }
}

async fn respond(mut stream: tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&request);
    let mut first = text.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics" | "/") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// One `GET path` over HTTP/1.1 to `127.0.0.1:port`; returns the status
/// line and the body. For tests and `agentvm` tooling.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(String, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Execution, ProcessUsage};

    /// The value of the sample line starting with `series ` in `text`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn events_update_the_metrics() {
        let m = Metrics::new();
        let at = SystemTime::now();
        m.handle(
            at,
            &Event::PoolStatus {
                pool: "p".into(),
                available: 1,
                leased: 2,
                booting: 0,
                reverting: 0,
            },
        );
        m.handle(
            at,
            &Event::VmBooted {
                vm: "v".into(),
                boot_seconds: 2.0,
            },
        );
        let usage = ProcessUsage {
            cpu_percent: 50.0,
            rss_bytes: 1000,
            disk_read_bytes: 10,
            disk_write_bytes: 20,
            ..Default::default()
        };
        m.handle(
            at,
            &Event::VmResources {
                vm: "v".into(),
                usage,
            },
        );
        m.handle(
            at,
            &Event::VmResources {
                vm: "v".into(),
                usage: ProcessUsage {
                    disk_read_bytes: 15,
                    ..usage
                },
            },
        );
        let exec = Execution {
            test: "t".into(),
            vm: "v".into(),
            agent: "a".into(),
            argv: vec![],
            exit_code: None,
            signal: Some(9),
            timed_out: true,
            duration_seconds: 5.0,
            stdout_bytes: 0,
            stderr_bytes: 0,
            output_truncated: false,
            peak_rss_bytes: None,
            cpu_seconds: None,
            processes_started: Some(3),
            peak_processes: None,
            unroutable_packets: Some(0),
            outside_workspace_paths: Some(0),
        };
        m.handle(at, &Event::Execution(exec));
        let text = m.encode();
        assert_eq!(
            value(&text, r#"agent_vm_pool_size{pool="p",state="leased"}"#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "agent_vm_boot_duration_seconds_count"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, r#"agent_vm_memory_usage_bytes{vm="v"}"#),
            Some(1000.0)
        );
        assert_eq!(
            value(&text, r#"agent_vm_disk_read_bytes_total{vm="v"}"#),
            Some(15.0),
            "{text}"
        );
        assert_eq!(
            value(&text, r#"agent_execution_total{status="timeout"}"#),
            Some(1.0)
        );
        assert_eq!(value(&text, "agent_execution_timeout_total"), Some(1.0));
        for (allowed, up) in [(true, 100), (false, 0), (false, 0)] {
            m.handle(
                at,
                &Event::Connection(crate::events::Connection {
                    test: "t".into(),
                    vm: "v".into(),
                    host: "h.example".into(),
                    port: 443,
                    kind: "connect".into(),
                    allowed,
                    bytes_up: up,
                    bytes_down: 7,
                    duration_seconds: 0.1,
                    error: None,
                }),
            );
        }
        let text = m.encode();
        assert_eq!(
            value(&text, r#"agent_egress_connections_total{verdict="denied"}"#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                r#"agent_egress_connections_total{verdict="allowed"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, r#"agent_egress_bytes_total{direction="up"}"#),
            Some(100.0)
        );
        assert_eq!(
            value(&text, r#"agent_egress_bytes_total{direction="down"}"#),
            Some(21.0)
        );
        m.handle(
            at,
            &Event::VmDestroyed {
                vm: "v".into(),
                reason: "shutdown".into(),
            },
        );
        assert!(!m.encode().contains(r#"vm="v""#));
    }

    #[tokio::test]
    async fn the_endpoint_serves_the_text_format() {
        let metrics = Arc::new(Metrics::new());
        let listener = bind(0).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(serve(listener, Arc::clone(&metrics)));
        metrics.handle(
            SystemTime::now(),
            &Event::VmReverted {
                vm: "v".into(),
                revert_seconds: 0.1,
            },
        );
        let (status, body) = http_get(port, "/metrics").await.unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(
            value(&body, "agent_vm_revert_duration_seconds_count"),
            Some(1.0),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        let (status, _) = http_get(port, "/nope").await.unwrap();
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        server.abort();
    }
}
