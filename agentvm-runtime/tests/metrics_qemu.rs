//! Metrics of real VMs: a pool on the QEMU backend with the metrics sink
//! subscribed and the endpoint served; the per-VM series come from the QEMU
//! process's `/proc/<pid>/{stat,status,io}`, sampled when a lease is given
//! back.
//!
//! Needs the image of `cargo xtask build-image` (target/agentvm/images/default).

mod vm_suite;

use std::sync::Arc;
use std::time::Duration;

use agentvm_runtime::backend::qemu::{QemuBackend, QemuConfig};
use agentvm_runtime::command::Command;
use agentvm_runtime::events;
use agentvm_runtime::metrics::{self, Metrics};
use agentvm_runtime::pool::{PoolConfig, VmPool};
use vm_suite::spec;

/// The value of the sample line starting with `series ` in a metrics text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_a_real_vm_come_from_its_qemu_process() {
    let metrics = Arc::new(Metrics::new());
    let _sub = events::subscribe(metrics.clone());
    let listener = metrics::bind(0).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(metrics::serve(listener, Arc::clone(&metrics)));

    let backend = QemuBackend::new(QemuConfig::default()).expect("qemu backend");
    let pool = VmPool::new(Arc::new(backend), PoolConfig::fixed(1, spec())).unwrap();
    pool.wait_ready(Duration::from_secs(120)).await.unwrap();
    let mut lease = pool.acquire(Duration::from_secs(60)).await.unwrap();
    let vm = lease.id().to_string();
    assert!(lease.host_pid().is_some(), "QEMU's pid is known");
    let (_, text) = metrics::http_get(port, "/metrics").await.unwrap();
    let pool_series = |state: &str| {
        format!(
            r#"agent_vm_pool_size{{pool="{}",state="{state}"}}"#,
            pool.id()
        )
    };
    assert_eq!(metric(&text, &pool_series("leased")), Some(1.0), "{text}");
    let out = lease
        .exec(Command::shell(
            "dd if=/dev/zero of=/tmp/f bs=1M count=8 2>/dev/null; sync",
        ))
        .await
        .unwrap();
    assert!(out.stderr.is_empty(), "{out:?}");
    lease.release().await.unwrap();
    let (_, text) = metrics::http_get(port, "/metrics").await.unwrap();
    assert_eq!(metric(&text, &pool_series("leased")), Some(0.0), "{text}");
    assert_eq!(
        metric(&text, &pool_series("available")),
        Some(1.0),
        "{text}"
    );
    let series = |name: &str| format!("{name}{{vm=\"{vm}\"}}");
    let memory = metric(&text, &series("agent_vm_memory_usage_bytes")).unwrap_or(0.0);
    assert!(
        memory > 50.0 * 1048576.0,
        "QEMU RSS of a 256 MiB guest:\n{text}"
    );
    let cpu = metric(&text, &series("agent_vm_cpu_usage_percent"));
    assert!(cpu.is_some_and(|c| c > 0.0), "{text}");
    assert!(
        metric(&text, &series("agent_vm_disk_read_bytes_total")).is_some(),
        "{text}"
    );
    assert!(
        metric(&text, &series("agent_vm_disk_write_bytes_total")).is_some(),
        "{text}"
    );
    assert!(
        metric(&text, "agent_vm_boot_duration_seconds_count") >= Some(1.0),
        "{text}"
    );
    assert!(
        metric(&text, "agent_vm_revert_duration_seconds_count") >= Some(1.0),
        "{text}"
    );
    pool.shutdown().await;
    let (_, text) = metrics::http_get(port, "/metrics").await.unwrap();
    assert!(
        !text.contains(&format!("vm=\"{vm}\"")),
        "per-VM series removed:\n{text}"
    );
    server.abort();
}
