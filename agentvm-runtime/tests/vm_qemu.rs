//! The whole host side against real VMs run by the QEMU backend (TCG where
//! KVM does not work) with the real guest image and agent. The suite itself
//! is shared with the other backends (`vm_suite/mod.rs`); the golden cache,
//! which only the QEMU backend has, is tested here.

mod vm_suite;

use agentvm_runtime::backend::qemu::{QemuBackend, QemuConfig};
use agentvm_runtime::backend::Backend;
use agentvm_runtime::command::Command;
use agentvm_runtime::vm::Vm;

fn backend() -> std::sync::Arc<dyn Backend> {
    std::sync::Arc::new(QemuBackend::new(QemuConfig::default()).expect("qemu backend"))
}

vm_suite_tests!();

/// Boots and destroys one VM of `spec`, leaving its golden snapshot in the cache.
async fn seed_cache(backend: &QemuBackend, spec: &agentvm_runtime::spec::VmSpec) {
    Vm::boot(backend, spec.clone())
        .await
        .unwrap()
        .destroy()
        .await
        .unwrap();
}

/// A backend with the golden cache on, in a runtime directory of its own.
fn cached_backend(dir: &tempfile::TempDir) -> QemuBackend {
    QemuBackend::new(QemuConfig {
        runtime_dir: Some(dir.path().to_path_buf()),
        golden_cache: true,
        ..QemuConfig::default()
    })
    .expect("qemu backend")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_cache_starts_vms_that_behave_like_booted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let backend = cached_backend(&dir);
    let spec = vm_suite::spec();
    let key = backend.golden_key(&spec).expect("a cache key");
    let cache = backend.golden_cache().unwrap();
    assert!(cache.lookup(&key).is_none());

    let mut booted = Vm::boot(&backend, spec.clone()).await.unwrap();
    assert!(!booted.boot_timings().restored);
    let entry = cache
        .lookup(&key)
        .expect("the booted VM shared its golden snapshot");
    assert_eq!(&entry.meta.hello, booted.guest_info());
    // Changes after the golden snapshot are not part of it.
    vm_suite::sh(&mut booted, "echo booted > /workspace/after-snapshot").await;

    let mut restored = Vm::boot(&backend, spec.clone()).await.unwrap();
    let timings = restored.boot_timings();
    assert!(timings.restored, "{timings:?}");
    eprintln!(
        "cold boot {:?} + snapshot {:?}; restored in {:?}",
        booted.boot_timings().to_hello,
        booted.boot_timings().snapshot,
        timings.to_hello
    );
    assert_ne!(restored.id(), booted.id());
    assert_eq!(restored.guest_info(), booted.guest_info());
    let (code, out, _) = vm_suite::sh(&mut restored, "ls /workspace; uname -s").await;
    assert_eq!((code, out.as_str()), (0, "Linux\n"));
    // The two run independently, and the restored one reverts like any VM.
    vm_suite::sh(&mut restored, "echo r > /workspace/mine; rm /bin/ls").await;
    let (_, out, _) = vm_suite::sh(&mut booted, "ls /workspace").await;
    assert_eq!(out, "after-snapshot\n");
    restored.revert().await.unwrap();
    let (code, out, _) = vm_suite::sh(&mut restored, "ls /workspace; ls /bin/ls").await;
    assert_eq!((code, out.as_str()), (0, "/bin/ls\n"));
    let out = restored.exec(Command::new("true")).await.unwrap();
    assert_eq!(
        out.report.status,
        agentvm_runtime::protocol::ExitStatus::Code(0)
    );
    restored.destroy().await.unwrap();
    booted.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_golden_cache_entry_is_replaced_by_a_boot() {
    let dir = tempfile::tempdir().unwrap();
    let backend = cached_backend(&dir);
    let spec = vm_suite::spec();
    let key = backend.golden_key(&spec).unwrap();
    let first = Vm::boot(&backend, spec.clone()).await.unwrap();
    first.destroy().await.unwrap();
    let entry = backend.golden_cache().unwrap().lookup(&key).unwrap();
    // Truncated: loadvm cannot find the snapshot.
    std::fs::write(&entry.state_disk, b"not a qcow2").unwrap();
    let mut vm = Vm::boot(&backend, spec.clone()).await.unwrap();
    assert!(!vm.boot_timings().restored, "fell back to a boot");
    let (code, out, _) = vm_suite::sh(&mut vm, "echo ok").await;
    assert_eq!((code, out.as_str()), (0, "ok\n"));
    vm.destroy().await.unwrap();
    // The boot shared a good snapshot again, and the next VM uses it.
    let entry = backend.golden_cache().unwrap().lookup(&key).unwrap();
    assert!(std::fs::metadata(&entry.state_disk).unwrap().len() > 1024 * 1024);
    let vm = Vm::boot(&backend, spec).await.unwrap();
    assert!(vm.boot_timings().restored);
    vm.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_started_from_an_old_cache_entry_have_the_hosts_clock() {
    let dir = tempfile::tempdir().unwrap();
    let backend = cached_backend(&dir);
    let spec = vm_suite::spec();
    seed_cache(&backend, &spec).await;
    // The entry's clock is now this many seconds behind.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut vm = Vm::boot(&backend, spec).await.unwrap();
    assert!(vm.boot_timings().restored);
    vm_suite::assert_clock_is_the_hosts(&mut vm, "start from a 3 s old cache entry").await;
    vm.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_started_from_one_cache_entry_have_distinct_randomness() {
    let dir = tempfile::tempdir().unwrap();
    let backend = cached_backend(&dir);
    let spec = vm_suite::spec();
    seed_cache(&backend, &spec).await;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..10 {
        let mut vm = Vm::boot(&backend, spec.clone()).await.unwrap();
        assert!(vm.boot_timings().restored, "VM {i} started from the cache");
        let bytes = vm_suite::guest_urandom(&mut vm).await;
        vm.destroy().await.unwrap();
        assert!(
            seen.insert(bytes.clone()),
            "VM {i}: /dev/urandom repeated {bytes}"
        );
    }
}

fn pool_config(
    max_uses: Option<u64>,
    ttl: Option<std::time::Duration>,
    health_interval: Option<std::time::Duration>,
) -> agentvm_runtime::pool::PoolConfig {
    agentvm_runtime::pool::PoolConfig {
        max_uses,
        ttl,
        health_interval,
        ..agentvm_runtime::pool::PoolConfig::fixed(1, vm_suite::spec())
    }
}

const LONG: std::time::Duration = std::time::Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_replaces_a_vm_after_max_uses() {
    use agentvm_runtime::pool::{ReleaseOutcome, VmPool};
    let pool = VmPool::new(backend(), pool_config(Some(2), None, None)).unwrap();
    let lease = pool.acquire(LONG).await.unwrap();
    let first = lease.id().to_string();
    let outcome = lease.release().await.unwrap();
    assert!(
        matches!(outcome, ReleaseOutcome::Reverted(_)),
        "{outcome:?}"
    );
    let lease = pool.acquire(LONG).await.unwrap();
    assert_eq!((lease.id(), lease.uses()), (first.as_str(), 2));
    assert_eq!(lease.release().await.unwrap(), ReleaseOutcome::Recycled);
    let lease = pool.acquire(LONG).await.unwrap();
    assert_ne!(lease.id(), first, "a new VM after 2 uses");
    drop(lease);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_replaces_a_vm_past_its_ttl_even_while_idle() {
    use agentvm_runtime::pool::{ReleaseOutcome, VmPool};
    let ttl = std::time::Duration::from_secs(2);
    let pool = VmPool::new(backend(), pool_config(None, Some(ttl), None)).unwrap();
    let lease = pool.acquire(LONG).await.unwrap();
    let first = lease.id().to_string();
    tokio::time::sleep(ttl).await;
    assert_eq!(lease.release().await.unwrap(), ReleaseOutcome::Recycled);
    pool.shutdown().await;

    // Idle: the health checks retire it without anyone acquiring it.
    let every = std::time::Duration::from_millis(200);
    let pool = VmPool::new(backend(), pool_config(None, Some(ttl), Some(every))).unwrap();
    pool.wait_ready(LONG).await.unwrap();
    let lease = pool.acquire(LONG).await.unwrap();
    let second = lease.id().to_string();
    assert_ne!(second, first);
    lease.release().await.unwrap();
    let deadline = std::time::Instant::now() + LONG;
    while pool.status().destroyed == 0 {
        assert!(std::time::Instant::now() < deadline, "{}", pool.status());
        tokio::time::sleep(every).await;
    }
    let lease = pool.acquire(LONG).await.unwrap();
    assert_ne!(lease.id(), second, "replaced while idle");
    assert_eq!(pool.status().failed, 0, "recycled, not failed");
    drop(lease);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_replaces_a_vm_that_died_while_idle() {
    use agentvm_runtime::pool::VmPool;
    let every = std::time::Duration::from_millis(200);
    let pool = VmPool::new(backend(), pool_config(None, None, Some(every))).unwrap();
    let lease = pool.acquire(LONG).await.unwrap();
    let dead = lease.id().to_string();
    let pid = lease.host_pid().expect("QEMU has a pid");
    lease.release().await.unwrap();
    assert_eq!(pool.status().available, 1);
    // SIGKILL the idle VM's QEMU behind the pool's back.
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = std::time::Instant::now() + LONG;
    while pool.status().failed == 0 {
        assert!(std::time::Instant::now() < deadline, "{}", pool.status());
        tokio::time::sleep(every).await;
    }
    let mut lease = pool.acquire(LONG).await.unwrap();
    assert_ne!(lease.id(), dead);
    let (code, out, _) = vm_suite::sh(&mut lease, "echo alive").await;
    assert_eq!((code, out.as_str()), (0, "alive\n"));
    drop(lease);
    pool.shutdown().await;
}

/// The QEMU of a VM runs under seccomp, and — when the harness is root, the
/// QEMU user exists and can read the image — as that user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_under_seccomp_as_its_own_user() {
    let backend = QemuBackend::new(QemuConfig::default()).unwrap();
    let spec = vm_suite::spec();
    let jail = backend.jail().clone();
    let vm = Vm::boot(&backend, spec.clone()).await.unwrap();
    let pid = vm.host_pid().expect("a QEMU pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    assert_eq!(field("Seccomp:"), "2", "seccomp filter mode");
    let uid: u32 = field("Uid:").parse().unwrap();
    let ours = rustix_uid();
    let readable = jail.check_readable(&spec.image.files()).is_ok();
    match &jail.user {
        Some(user) if readable => assert_eq!(uid, user.uid, "QEMU runs as {}", user.name),
        Some(_) => assert_eq!(uid, 0, "root, because the image is not readable by others"),
        None => {
            assert_eq!(uid, ours);
            if ours == 0 {
                assert!(jail.user_unavailable.is_some(), "{jail:?}");
            }
        }
    }
    eprintln!("jail: {}", jail.describe().join("; "));
    vm.destroy().await.unwrap();
}

fn rustix_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a host whose /sys/fs/cgroup is cgroup v2 with memory, pids and cpu delegated (these machines mount cgroup v1); run with --ignored there"]
async fn each_vm_gets_its_own_cgroup_with_the_profiles_limits() {
    let backend = QemuBackend::new(QemuConfig::default()).unwrap();
    let parent = backend.jail().cgroup.clone().expect("cgroup v2 delegated");
    let vm = Vm::boot(&backend, vm_suite::spec()).await.unwrap();
    let dir = parent.dir.join(vm.id());
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    assert!(
        procs
            .lines()
            .any(|p| p == vm.host_pid().unwrap().to_string()),
        "{procs}"
    );
    let memory: u64 = std::fs::read_to_string(dir.join("memory.max"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        memory,
        (u64::from(vm_suite::spec().profile.memory_mib()) + 256) << 20
    );
    vm.destroy().await.unwrap();
    assert!(!dir.exists(), "removed with the VM");
}
