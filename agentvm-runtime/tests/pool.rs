//! Pool logic against the in-process mock backend (no VMs): sizing, FIFO
//! fairness, release on drop and on panic, replacement of broken VMs,
//! recycling, shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use agentvm_runtime::backend::mock::MockBackend;
use agentvm_runtime::command::Command;
use agentvm_runtime::pool::{PoolError, ReleaseOutcome, VmPool};

mod mock_pool;
use mock_pool::config;

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn prewarms_min_size_and_hands_out_working_vms() {
    let backend = MockBackend::new();
    let pool = VmPool::new(Arc::new(backend.clone()), config(2, 4)).unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    assert_eq!(pool.status().available, 2);
    assert_eq!(backend.control().launches.load(Ordering::SeqCst), 2);

    let mut lease = pool.acquire(WAIT).await.unwrap();
    let out = lease.exec(Command::new("echo").arg("hi")).await.unwrap();
    assert_eq!(out.stdout, b"hi\n");
    let status = pool.status();
    assert_eq!((status.available, status.leased), (1, 1));
    let outcome = lease.release().await.unwrap();
    assert!(
        matches!(outcome, ReleaseOutcome::Reverted(_)),
        "{outcome:?}"
    );
    assert_eq!(pool.status().available, 2);
    assert_eq!(backend.control().reverts.load(Ordering::SeqCst), 1);
    pool.shutdown().await;
    assert_eq!(backend.control().alive.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn grows_to_max_size_and_times_out_beyond_it() {
    let backend = MockBackend::new();
    let pool = VmPool::new(Arc::new(backend.clone()), config(0, 2)).unwrap();
    let a = pool.acquire(WAIT).await.unwrap();
    let b = pool.acquire(WAIT).await.unwrap();
    assert_ne!(a.id(), b.id());
    let err = pool.acquire(Duration::from_millis(200)).await.unwrap_err();
    assert!(
        matches!(err, PoolError::AcquireTimeout { status, .. } if status.leased == 2),
        "{err}"
    );
    assert_eq!(
        backend.control().launches.load(Ordering::SeqCst),
        2,
        "never more than max_size"
    );
    drop((a, b));
    pool.shutdown().await;
}

#[tokio::test]
async fn waiters_are_served_first_come_first_served() {
    let backend = MockBackend::new();
    backend
        .control()
        .revert_delay_ms
        .store(20, Ordering::SeqCst);
    let pool = VmPool::new(Arc::new(backend), config(1, 1)).unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let first = pool.acquire(WAIT).await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let pool = pool.clone();
        let order = Arc::clone(&order);
        tasks.push(tokio::spawn(async move {
            let lease = pool.acquire(WAIT).await.unwrap();
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(lease);
        }));
        // Make the arrival order unambiguous.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pool.status().waiting, 4);
    drop(first);
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    pool.shutdown().await;
}

#[tokio::test]
async fn a_lease_dropped_by_a_panicking_test_returns_the_vm() {
    let backend = MockBackend::new();
    let pool = VmPool::new(Arc::new(backend.clone()), config(1, 1)).unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let p = pool.clone();
    let result = tokio::spawn(async move {
        let _lease = p.acquire(WAIT).await.unwrap();
        panic!("the test failed");
    })
    .await;
    assert!(result.is_err());
    let lease = pool.acquire(WAIT).await.unwrap();
    assert_eq!(backend.control().reverts.load(Ordering::SeqCst), 1);
    drop(lease);
    pool.shutdown().await;
}

#[tokio::test]
async fn a_vm_that_fails_to_revert_is_replaced_not_reused() {
    let backend = MockBackend::new();
    let pool = VmPool::new(Arc::new(backend.clone()), config(1, 1)).unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let lease = pool.acquire(WAIT).await.unwrap();
    let broken_id = lease.id().to_string();
    backend.control().fail_reverts.store(1, Ordering::SeqCst);
    let outcome = lease.release().await.unwrap();
    assert!(
        matches!(outcome, ReleaseOutcome::Destroyed(_)),
        "{outcome:?}"
    );
    let lease = pool.acquire(WAIT).await.unwrap();
    assert_ne!(lease.id(), broken_id);
    assert_eq!(pool.status().failed, 1);
    assert_eq!(backend.control().launches.load(Ordering::SeqCst), 2);
    drop(lease);
    pool.shutdown().await;
}

#[tokio::test]
async fn vms_are_recycled_after_max_uses() {
    let backend = MockBackend::new();
    let mut cfg = config(1, 1);
    cfg.max_uses = Some(2);
    let pool = VmPool::new(Arc::new(backend.clone()), cfg).unwrap();
    let first = pool.acquire(WAIT).await.unwrap();
    let id = first.id().to_string();
    first.release().await.unwrap();
    let second = pool.acquire(WAIT).await.unwrap();
    assert_eq!(second.id(), id);
    assert_eq!(second.uses(), 2);
    assert_eq!(second.release().await.unwrap(), ReleaseOutcome::Recycled);
    let third = pool.acquire(WAIT).await.unwrap();
    assert_ne!(third.id(), id);
    drop(third);
    pool.shutdown().await;
}

#[tokio::test]
async fn persistent_boot_failures_fail_acquire_with_the_boot_error() {
    let backend = MockBackend::new();
    backend.control().fail_launches.store(100, Ordering::SeqCst);
    let pool = VmPool::new(Arc::new(backend.clone()), config(1, 2)).unwrap();
    let err = pool.acquire(WAIT).await.unwrap_err();
    assert!(
        matches!(&err, PoolError::BootFailing { last_error, .. } if last_error.contains("injected launch failure")),
        "{err}"
    );
    assert!(
        backend.control().launches.load(Ordering::SeqCst) <= 4,
        "the pool stops retrying"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn a_vm_that_crashed_while_leased_is_destroyed_on_release_and_replaced() {
    let backend = MockBackend::new();
    let pool = VmPool::new(Arc::new(backend.clone()), config(1, 1)).unwrap();
    let lease = pool.acquire(WAIT).await.unwrap();
    backend.control().crash_all.store(true, Ordering::SeqCst);
    let outcome = lease.release().await.unwrap();
    assert!(
        matches!(outcome, ReleaseOutcome::Destroyed(_)),
        "{outcome:?}"
    );
    backend.control().crash_all.store(false, Ordering::SeqCst);
    let lease = pool.acquire(WAIT).await.unwrap();
    lease.release().await.unwrap();
    pool.shutdown().await;
    assert_eq!(backend.control().alive.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn shutdown_destroys_everything_and_refuses_acquire() {
    let backend = MockBackend::new();
    let pool = VmPool::new(Arc::new(backend.clone()), config(3, 3)).unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let lease = pool.acquire(WAIT).await.unwrap();
    let p = pool.clone();
    let shutdown = tokio::spawn(async move { p.shutdown().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(matches!(
        pool.acquire(WAIT).await,
        Err(PoolError::ShuttingDown)
    ));
    drop(lease);
    shutdown.await.unwrap();
    assert_eq!(backend.control().alive.load(Ordering::SeqCst), 0);
    assert_eq!(pool.status().destroyed, 3);
}

#[test]
fn invalid_sizes_are_rejected() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let err = VmPool::new(Arc::new(MockBackend::new()), config(3, 2)).unwrap_err();
        assert!(matches!(err, PoolError::InvalidConfig(_)));
    });
}

/// The value of the sample line starting with `series ` in a metrics text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_endpoint_follows_the_pool() {
    use agentvm_runtime::events::{self, Event, Recorder};
    use agentvm_runtime::metrics::{self, Metrics};

    let metrics = Arc::new(Metrics::new());
    let _sub = events::subscribe(metrics.clone());
    let recorder = Arc::new(Recorder::default());
    let _rec = events::subscribe(recorder.clone());
    let listener = metrics::bind(0).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(metrics::serve(listener, Arc::clone(&metrics)));
    let scrape = || async move { metrics::http_get(port, "/metrics").await.unwrap().1 };

    let backend = MockBackend::new();
    let pool = VmPool::new(Arc::new(backend.clone()), config(1, 2)).unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let series = |state: &str| {
        format!(
            r#"agent_vm_pool_size{{pool="{}",state="{state}"}}"#,
            pool.id()
        )
    };
    let text = scrape().await;
    assert_eq!(metric(&text, &series("available")), Some(1.0), "{text}");
    let boots = metric(&text, "agent_vm_boot_duration_seconds_count").unwrap();
    assert!(boots >= 1.0, "{text}");

    let lease = pool.acquire(WAIT).await.unwrap();
    let vm = lease.id().to_string();
    let text = scrape().await;
    assert_eq!(metric(&text, &series("leased")), Some(1.0), "{text}");
    assert_eq!(metric(&text, &series("available")), Some(0.0), "{text}");
    let acquires = metric(&text, "agent_vm_pool_acquire_duration_seconds_count").unwrap();
    let reverts = metric(&text, "agent_vm_revert_duration_seconds_count").unwrap_or(0.0);

    lease.release().await.unwrap();
    let text = scrape().await;
    assert_eq!(metric(&text, &series("leased")), Some(0.0), "{text}");
    assert_eq!(metric(&text, &series("available")), Some(1.0), "{text}");
    assert!(metric(&text, "agent_vm_revert_duration_seconds_count").unwrap() > reverts);
    assert!(metric(&text, "agent_vm_pool_acquire_duration_seconds_count").unwrap() >= acquires);
    pool.shutdown().await;
    server.abort();

    // The lifecycle of that VM, in order.
    let kinds: Vec<&'static str> = recorder
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::VmCreated { vm: v, .. } if *v == vm => Some("created"),
            Event::VmBooted { vm: v, .. } if *v == vm => Some("booted"),
            Event::VmSnapshotted { vm: v, .. } if *v == vm => Some("snapshotted"),
            Event::VmAcquired { vm: v, .. } if *v == vm => Some("acquired"),
            Event::VmReleased { vm: v, .. } if *v == vm => Some("released"),
            Event::VmReverted { vm: v, .. } if *v == vm => Some("reverted"),
            Event::VmDestroyed { vm: v, .. } if *v == vm => Some("destroyed"),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "created",
            "booted",
            "snapshotted",
            "acquired",
            "released",
            "reverted",
            "destroyed"
        ]
    );
}
