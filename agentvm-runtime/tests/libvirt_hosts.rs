//! The libvirt backend over two hosts: the system daemon (`qemu:///system`)
//! and a second daemon standing in for a remote host
//! (`scripts/libvirt-host2.sh`: its own namespaces and state, reached as
//! `qemu+unix:///system?socket=…`, with this machine's /tmp and workspace
//! hidden from it, so the image must be uploaded through the storage API).
//!
//! Each test starts its own second daemon and stops it at the end. Needs
//! root, `--features libvirt`, the system daemon (`scripts/start-libvirtd.sh`)
//! and the guest image (`cargo xtask build-image`).
#![cfg(feature = "libvirt")]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command as Process;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_runtime::backend::libvirt::upload::STORAGE_POOL;
use agentvm_runtime::backend::libvirt::{LibvirtBackend, LibvirtConfig, LibvirtTimeouts};
use agentvm_runtime::backend::BackendError;
use agentvm_runtime::command::Command;
use agentvm_runtime::image::locate_image;
use agentvm_runtime::pool::{PoolConfig, VmPool};
use agentvm_runtime::protocol::ExitStatus;
use agentvm_runtime::spec::{Accel, NetworkMode, ResourceProfile, VmSpec};
use agentvm_runtime::vm::VmError;

const LOCAL: &str = "qemu:///system";

/// One test at a time: each boots two VMs on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn spec() -> VmSpec {
    let image = locate_image("default", &workspace().join("target/agentvm/images"))
        .unwrap_or_else(|e| panic!("{e}"));
    VmSpec {
        image,
        profile: ResourceProfile::Minimal,
        network: NetworkMode::Isolated,
        accel: Accel::Tcg,
        boot_timeout: Duration::from_secs(120),
    }
}

/// The second daemon, stopped (with everything it runs) when dropped.
struct Host2 {
    name: String,
    uri: String,
}

impl Host2 {
    fn script(name: &str, action: &str) -> std::process::Output {
        Process::new("sh")
            .arg(workspace().join("scripts/libvirt-host2.sh"))
            .arg(action)
            .env("AGENTVM_HOST2_NAME", name)
            .output()
            .expect("running scripts/libvirt-host2.sh")
    }

    fn start(name: &str) -> Self {
        let out = Self::script(name, "start");
        assert!(
            out.status.success(),
            "scripts/libvirt-host2.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let uri = String::from_utf8(Self::script(name, "uri").stdout)
            .unwrap()
            .trim()
            .to_owned();
        Self {
            name: name.to_owned(),
            uri,
        }
    }

    fn stop(&self) {
        let out = Self::script(&self.name, "stop");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn virsh(&self, args: &[&str]) -> String {
        virsh(&self.uri, args)
    }
}

impl Drop for Host2 {
    fn drop(&mut self) {
        let _ = Self::script(&self.name, "stop");
    }
}

fn virsh(uri: &str, args: &[&str]) -> String {
    let out = Process::new("virsh")
        .args(["-c", uri])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host (URI) whose daemon runs the domain of VM `id`.
fn host_of(hosts: &[&str], id: &str) -> String {
    let domain = format!("agentvm-{id}");
    hosts
        .iter()
        .find(|uri| {
            virsh(uri, &["list", "--name"])
                .lines()
                .any(|l| l.trim() == domain)
        })
        .unwrap_or_else(|| panic!("domain {domain} runs on none of {hosts:?}"))
        .to_string()
}

/// This process's `agentvm-<pid>-*` domains on a host.
fn our_domains(uri: &str) -> Vec<String> {
    let prefix = format!("agentvm-{}-", std::process::id());
    virsh(uri, &["list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

fn two_host_backend(host2: &Host2) -> Arc<LibvirtBackend> {
    Arc::new(
        LibvirtBackend::new(LibvirtConfig {
            hosts: vec![LOCAL.into(), host2.uri.clone()],
            timeouts: LibvirtTimeouts {
                host_retry: Duration::from_secs(3600),
                ..LibvirtTimeouts::default()
            },
            ..LibvirtConfig::default()
        })
        .unwrap_or_else(|e| panic!("{e}")),
    )
}

/// A pool of 2 over two hosts runs 4 tests; each host serves at least one
/// lease; the second host got the image through the storage API (volumes
/// named by content hash in agentvm's pool), and the files it uses are not
/// this machine's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_over_two_hosts_uses_both() {
    let _one = SERIAL.lock().await;
    let host2 = Host2::start("agentvm-libvirt2-suite");
    let backend = two_host_backend(&host2);
    assert_eq!(backend.host_uris(), [LOCAL.to_string(), host2.uri.clone()]);
    let pool = VmPool::new(backend.clone(), PoolConfig::fixed(2, spec())).unwrap();
    let started = Instant::now();
    pool.wait_ready(Duration::from_secs(180)).await.unwrap();
    eprintln!("pool of 2 over two hosts ready in {:?}", started.elapsed());
    let hosts = [LOCAL, host2.uri.as_str()];
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let mut leases = Vec::new();
    for test in 0..4 {
        let mut lease = pool.acquire(Duration::from_secs(120)).await.unwrap();
        let out = lease
            .exec(Command::shell(format!(
                "echo test {test} on $(uname -n); cat /proc/cmdline"
            )))
            .await
            .unwrap();
        assert_eq!(out.report.status, ExitStatus::Code(0), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with(&format!("test {test} on ")),
            "{out:?}"
        );
        *served.entry(host_of(&hosts, lease.id())).or_default() += 1;
        // Two leases at a time: the pool's two VMs are both in use.
        leases.push(lease);
        if leases.len() == 2 {
            for lease in leases.drain(..) {
                let _ = lease.release().await;
            }
        }
    }
    assert_eq!(served.values().sum::<usize>(), 4, "{served:?}");
    for host in hosts {
        assert!(
            served.get(host).copied().unwrap_or(0) >= 1,
            "host {host} served no lease: {served:?}"
        );
    }
    // The remote host runs the image from volumes of agentvm's pool, named by hash.
    let volumes = host2.virsh(&["vol-list", "--pool", STORAGE_POOL]);
    for kind in ["kernel", "initramfs"] {
        assert!(
            volumes
                .lines()
                .any(|l| l.trim_start().starts_with("agentvm-") && l.contains(&format!("-{kind} "))),
            "no {kind} volume on host 2:\n{volumes}"
        );
    }
    let remote_domain = our_domains(&host2.uri)
        .into_iter()
        .next()
        .expect("a VM on host 2");
    let xml = host2.virsh(&["dumpxml", &remote_domain]);
    let kernel = agentvm_runtime::backend::libvirt::domain_xml::element_text(&xml, "kernel")
        .expect("kernel in the domain XML");
    assert!(
        kernel.starts_with("/var/lib/libvirt/agentvm/agentvm-") && kernel.ends_with("-kernel"),
        "{kernel}"
    );
    pool.shutdown().await;
    for host in hosts {
        assert_eq!(our_domains(host), Vec::<String>::new(), "left on {host}");
    }
    // Only the image volumes (kept on purpose, by hash) stay; no state disk.
    let volumes = host2.virsh(&["vol-list", "--pool", STORAGE_POOL]);
    assert!(!volumes.contains("-state.qcow2"), "{volumes}");
    host2.stop();
}

/// The second host goes away (its daemon and every QEMU it ran are killed)
/// while a test runs a command on it: that command fails at once with
/// `HostLost` naming the host, the test on the first host is unaffected,
/// and the pool goes on with VMs on the first host only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_goes_away_fails_its_leases_and_the_pool_goes_on() {
    let _one = SERIAL.lock().await;
    let host2 = Host2::start("agentvm-libvirt2-loss");
    let backend = two_host_backend(&host2);
    let pool = VmPool::new(backend.clone(), PoolConfig::fixed(2, spec())).unwrap();
    pool.wait_ready(Duration::from_secs(180)).await.unwrap();
    let hosts = [LOCAL, host2.uri.as_str()];
    let a = pool.acquire(Duration::from_secs(60)).await.unwrap();
    let b = pool.acquire(Duration::from_secs(60)).await.unwrap();
    let (mut remote, mut local) = if host_of(&hosts, a.id()) == host2.uri {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(host_of(&hosts, local.id()), LOCAL);
    assert_eq!(host_of(&hosts, remote.id()), host2.uri);
    let remote_id = remote.id().to_owned();
    let running = tokio::spawn(async move {
        let started = Instant::now();
        let result = remote.exec(Command::shell("sleep 60; echo survived")).await;
        (result, started.elapsed(), remote)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    host2.stop();
    let (result, took, remote) = running.await.unwrap();
    match result {
        Err(VmError::Backend(BackendError::HostLost { host, vm, .. })) => {
            assert_eq!(host, host2.uri);
            assert_eq!(vm, remote_id);
        }
        other => panic!("expected HostLost naming {}, got {other:?}", host2.uri),
    }
    assert!(took < Duration::from_secs(30), "took {took:?}: not a hang");
    let message = VmError::Backend(BackendError::HostLost {
        host: host2.uri.clone(),
        vm: remote_id.clone(),
        reason: String::new(),
    })
    .to_string();
    assert!(
        message.starts_with(&format!(
            "libvirt host {} went away: VM {remote_id}",
            host2.uri
        )),
        "{message}"
    );
    // The test on the first host goes on.
    let out = local.exec(Command::shell("echo still here")).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still here\n");
    assert_eq!(backend.lost_hosts(), vec![host2.uri.clone()]);
    let _ = remote.release().await;
    let _ = local.release().await;
    // The pool replaces the lost VM on the host that is left.
    for _ in 0..2 {
        let mut lease = pool.acquire(Duration::from_secs(120)).await.unwrap();
        let out = lease.exec(Command::shell("true")).await.unwrap();
        assert_eq!(out.report.status, ExitStatus::Code(0));
        assert_eq!(host_of(&[LOCAL], lease.id()), LOCAL);
        let _ = lease.release().await;
    }
    pool.shutdown().await;
    assert_eq!(our_domains(LOCAL), Vec::<String>::new());
}

/// A host that does not answer when the backend starts is left out (the
/// backend still starts on the other), and rejoins at the first launch
/// after `host_retry` once its daemon answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_down_at_start_is_left_out_and_rejoins_when_it_answers() {
    let _one = SERIAL.lock().await;
    let name = "agentvm-libvirt2-late";
    let uri = String::from_utf8(Host2::script(name, "uri").stdout)
        .unwrap()
        .trim()
        .to_owned();
    let _ = Host2::script(name, "stop");
    let backend = LibvirtBackend::new(LibvirtConfig {
        hosts: vec![LOCAL.into(), uri.clone()],
        timeouts: LibvirtTimeouts {
            host_retry: Duration::from_secs(1),
            ..LibvirtTimeouts::default()
        },
        ..LibvirtConfig::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(backend.lost_hosts(), vec![uri.clone()]);
    let host2 = Host2::start(name);
    assert_eq!(host2.uri, uri);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut vm = backend.launch_libvirt(&spec()).await.unwrap();
    assert_eq!(backend.lost_hosts(), Vec::<String>::new());
    agentvm_runtime::backend::Machine::destroy(&mut vm)
        .await
        .unwrap();
    host2.stop();
}

/// Boot, `exec true` and revert on a VM of each host (`--ignored
/// --nocapture`; `AGENT_VM_COMPARE_N` execs per VM, default 50, and a fifth
/// as many reverts): what the remote path (streams through the daemon)
/// costs against the local one (files and sockets of this machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn local_vs_remote_latency() {
    let _one = SERIAL.lock().await;
    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }
    let n: usize = std::env::var("AGENT_VM_COMPARE_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let host2 = Host2::start("agentvm-libvirt2-measure");
    let backend = two_host_backend(&host2);
    let hosts = [LOCAL, host2.uri.as_str()];
    let mut vms = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        let vm = agentvm_runtime::vm::Vm::boot(backend.as_ref(), spec())
            .await
            .unwrap();
        vms.push((started.elapsed(), vm));
    }
    for (boot, mut vm) in vms {
        let host = host_of(&hosts, vm.id());
        let mut execs = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            vm.exec(Command::new("true")).await.unwrap();
            execs.push(t.elapsed());
        }
        let mut reverts = Vec::new();
        for _ in 0..(n / 5).max(1) {
            let t = Instant::now();
            vm.revert().await.unwrap();
            reverts.push(t.elapsed());
        }
        eprintln!(
            "{host}: boot (incl. upload on first use) {boot:?}, exec true p50 {:?} (n = {n}), revert p50 {:?} (n = {})",
            median(execs),
            median(reverts.clone()),
            reverts.len()
        );
        vm.destroy().await.unwrap();
    }
    host2.stop();
}
