//! The shared real-VM suite (`vm_suite/mod.rs`) against the libvirt backend,
//! plus libvirt specifics: snapshot metadata, the revert paths, a
//! nat-filtered NIC, the sweep of leftovers, an unreachable daemon.
//!
//! Needs `--features libvirt`, a running daemon (`scripts/start-libvirtd.sh`)
//! and the guest image (`cargo xtask build-image`).
#![cfg(feature = "libvirt")]

mod vm_suite;

use std::time::{Duration, Instant};

use agentvm_runtime::backend::libvirt::{LibvirtBackend, LibvirtConfig, RevertPath};
use agentvm_runtime::backend::{Backend, Machine, RevertOutcome};
use agentvm_runtime::spec::NetworkMode;
use agentvm_runtime::vm::Vm;

fn backend() -> std::sync::Arc<dyn Backend> {
    std::sync::Arc::new(libvirt_backend())
}

fn libvirt_backend() -> LibvirtBackend {
    LibvirtBackend::new(LibvirtConfig::default()).unwrap_or_else(|e| panic!("{e}"))
}

vm_suite_tests!();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_have_metadata_and_both_revert_paths_work() {
    let backend = libvirt_backend();
    let mut m = backend.launch_libvirt(&vm_suite::spec()).await.unwrap();
    // Let the guest come up a little (snapshots work on a booting guest too).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let info = m.create_snapshot("s1", "first & only").await.unwrap();
    assert_eq!(info.name, "s1");
    assert_eq!(info.description, "first & only");
    assert!(info.created + 5 >= before, "{info:?}");
    m.create_snapshot("s2", "second").await.unwrap();
    let names: Vec<_> = m
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["s1", "s2"]);
    let t = Instant::now();
    assert_eq!(
        m.revert_to_snapshot("s1", RevertPath::Loadvm)
            .await
            .unwrap(),
        RevertOutcome::ChannelKept
    );
    let loadvm = t.elapsed();
    let t = Instant::now();
    assert_eq!(
        m.revert_to_snapshot("s1", RevertPath::SnapshotApi)
            .await
            .unwrap(),
        RevertOutcome::ChannelReset
    );
    let api = t.elapsed();
    eprintln!("[libvirt] revert via HMP loadvm {loadvm:?}, via virDomainRevertToSnapshot {api:?}");
    m.check_alive().await.unwrap();
    let pid = m.host_pid().expect("QEMU pid from libvirt's pid file");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    m.pause().await.unwrap();
    m.check_alive().await.unwrap();
    m.resume().await.unwrap();
    m.check_alive().await.unwrap();
    m.delete_snapshot("s2").await.unwrap();
    assert_eq!(m.list_snapshots().await.unwrap().len(), 1);
    let dir = m.dir().to_path_buf();
    let name = m.domain_name().to_owned();
    m.destroy().await.unwrap();
    assert!(!dir.exists());
    let out = std::process::Command::new("virsh")
        .args(["-c", backend.uri(), "domstate", &name])
        .output()
        .unwrap();
    assert!(!out.status.success(), "domain {name} is undefined");
}

/// Needs `cargo xtask setup-network` (which `cargo xtask test` runs first);
/// without it the boot fails with the message saying to run it. Sends no
/// traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_filtered_vm_has_a_filtered_nic() {
    let backend = libvirt_backend();
    let mut spec = vm_suite::spec();
    spec.network = NetworkMode::NatFiltered;
    let mut vm = Vm::boot(&backend, spec)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let xml = std::process::Command::new("virsh")
        .args(["-c", backend.uri(), "dumpxml"])
        .arg(format!("agentvm-{}", vm.id()))
        .output()
        .unwrap();
    let xml = String::from_utf8_lossy(&xml.stdout);
    assert!(xml.contains("<source network='agentvm-nat'"), "{xml}");
    assert!(xml.contains("<filterref filter='agentvm-egress'"), "{xml}");
    // The guest sees the virtio NIC (virtio_net is in the image).
    let (code, stdout, stderr) = vm_suite::sh(&mut vm, "ls /sys/class/net").await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.split_whitespace().any(|n| n == "eth0"), "{stdout}");
    vm.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_dead_owners_are_swept() {
    // A domain whose metadata names a dead owner, as a crashed test process leaves it.
    let backend = libvirt_backend();
    let mut m = backend.launch_libvirt(&vm_suite::spec()).await.unwrap();
    let name = m.domain_name().to_owned();
    let uri = backend.uri().to_owned();
    let virsh = |args: &[&str]| {
        std::process::Command::new("virsh")
            .args(["-c", &uri])
            .args(args)
            .output()
            .unwrap()
    };
    let xml = String::from_utf8(virsh(&["dumpxml", "--inactive", &name]).stdout).unwrap();
    let pid = std::process::id().to_string();
    let dead = xml.replace(&format!("pid=\"{pid}\""), "pid=\"999999999\"");
    assert_ne!(xml, dead, "owner pid found in\n{xml}");
    let file = m.dir().join("dead.xml");
    std::fs::write(&file, dead).unwrap();
    assert!(virsh(&["define", file.to_str().unwrap()]).status.success());
    let swept = backend.sweep().await.unwrap();
    assert!(swept.contains(&name), "{swept:?}");
    assert!(!virsh(&["domstate", &name]).status.success());
    // Already gone: destroy is still fine.
    m.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_daemon_says_how_to_start_it() {
    let err = LibvirtBackend::new(LibvirtConfig {
        uri: Some("qemu:///system?socket=/nonexistent/libvirt-sock".into()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("libvirt daemon unreachable at qemu:///system?socket=/nonexistent/libvirt-sock: start it with scripts/start-libvirtd.sh"),
        "{err}"
    );
}

/// Boot, revert and exec latency of both backends in one run (`--ignored`;
/// `AGENT_VM_COMPARE_N` reverts/execs per backend, default 10/50).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn compare_backends() {
    use agentvm_runtime::backend::qemu::{QemuBackend, QemuConfig};
    use agentvm_runtime::command::Command;

    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }
    let n: usize = std::env::var("AGENT_VM_COMPARE_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut backends: Vec<(&str, std::sync::Arc<dyn Backend>)> = vec![
        (
            "qemu",
            std::sync::Arc::new(QemuBackend::new(QemuConfig::default()).unwrap()),
        ),
        ("libvirt (loadvm)", backend()),
    ];
    if std::env::var("AGENT_VM_COMPARE_API").as_deref() == Ok("1") {
        backends.push((
            "libvirt (snapshot API)",
            std::sync::Arc::new(
                LibvirtBackend::new(LibvirtConfig {
                    revert_path: Some(RevertPath::SnapshotApi),
                    ..Default::default()
                })
                .unwrap(),
            ),
        ));
    }
    for (label, backend) in backends {
        let mut boots = Vec::new();
        let mut vm = None;
        for _ in 0..2 {
            if let Some(v) = vm.take() {
                let v: agentvm_runtime::vm::Vm = v;
                v.destroy().await.unwrap();
            }
            let t = Instant::now();
            let v = vm_suite::boot_on(&*backend).await;
            boots.push(t.elapsed());
            vm = Some(v);
        }
        let mut vm = vm.unwrap();
        let snapshot = vm.boot_timings().snapshot;
        let mut reverts = Vec::new();
        for _ in 0..n {
            vm_suite::sh(&mut vm, "touch /workspace/x").await;
            let t = Instant::now();
            vm.revert().await.unwrap();
            reverts.push(t.elapsed());
        }
        let mut execs = Vec::new();
        for _ in 0..n * 5 {
            let t = Instant::now();
            vm.exec(Command::new("true")).await.unwrap();
            execs.push(t.elapsed());
        }
        eprintln!(
            "{label:>24}: boot+hello+golden p50 {:?} (n=2), golden snapshot {:?}, revert+resync p50 {:?} (n={n}), exec `true` p50 {:?} (n={})",
            median(boots),
            snapshot,
            median(reverts),
            median(execs),
            n * 5
        );
        vm.destroy().await.unwrap();
    }
}

/// The libvirt snapshot API revert path (QEMU restarted, channel reset) also
/// gives back a working VM, revert after revert (without waiting for the
/// guest's hang-up, every second resync Ping was lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_api_revert_then_exec() {
    let backend = LibvirtBackend::new(LibvirtConfig {
        revert_path: Some(RevertPath::SnapshotApi),
        ..Default::default()
    })
    .unwrap();
    let mut vm = vm_suite::boot_on(&backend).await;
    for i in 0..5 {
        vm_suite::sh(&mut vm, "touch /workspace/x").await;
        let serial = vm.serial_log_path();
        let t = Instant::now();
        let result = vm.revert().await;
        if let Err(e) = &result {
            let log = serial
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            let tail: Vec<_> = log.lines().rev().take(30).collect();
            panic!(
                "revert {i} failed: {e}\n--- serial ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        eprintln!("[libvirt snapshot API] revert {i}: {:?}", t.elapsed());
        let (_, stdout, _) = vm_suite::sh(&mut vm, "ls /workspace").await;
        assert_eq!(stdout, "");
    }
    vm.destroy().await.unwrap();
}

/// The connection is reopened after the daemon restarted (`--ignored`: it
/// restarts the system libvirtd with `scripts/start-libvirtd.sh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the system libvirtd"]
async fn survives_a_daemon_restart() {
    let backend = libvirt_backend();
    let mut vm = vm_suite::boot_on(&backend).await;
    let pid = String::from_utf8(
        std::process::Command::new("pgrep")
            .args(["-x", "libvirtd"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let pid = pid.lines().next().expect("libvirtd runs").trim().to_owned();
    assert!(std::process::Command::new("kill")
        .arg(&pid)
        .status()
        .unwrap()
        .success());
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/start-libvirtd.sh");
    assert!(std::process::Command::new("sh")
        .arg(script)
        .status()
        .unwrap()
        .success());
    // The domain survived the daemon; the backend's connection is reopened.
    vm.revert().await.unwrap();
    let (_, out, _) = vm_suite::sh(&mut vm, "echo ok").await;
    assert_eq!(out, "ok\n");
    vm.destroy().await.unwrap();
}

/// The host's address on agentvm-nat (its dnsmasq serves DHCP and DNS there).
const NAT_HOST: &str = "192.168.213.1";

/// A guest's IPv4 configuration, as the guest itself reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GuestNet {
    /// `eth0`'s address and prefix length.
    address: std::net::Ipv4Addr,
    prefix: u8,
    /// The default route's gateway and device, e.g. `192.168.213.1 eth0`.
    default_route: String,
    /// `nameserver` lines of /etc/resolv.conf.
    nameservers: Vec<String>,
}

async fn guest_net(vm: &mut Vm) -> GuestNet {
    let (code, out, err) = vm_suite::sh(
        vm,
        "ip -4 -o addr show dev eth0; echo ---; ip -4 route show default; echo ---; cat /etc/resolv.conf",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let parts: Vec<&str> = out.split("---\n").collect();
    assert_eq!(parts.len(), 3, "{out}");
    let inet: Vec<&str> = parts[0]
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .collect();
    assert_eq!(inet.len(), 1, "exactly one IPv4 address on eth0:\n{out}");
    let (address, prefix) = inet[0].split_once('/').expect("address/prefix");
    // `default via 192.168.213.1 dev eth0 ...`
    let route: Vec<&str> = parts[1].split_whitespace().collect();
    let default_route = match route.as_slice() {
        ["default", "via", gw, "dev", dev, ..] => format!("{gw} {dev}"),
        _ => panic!("no default route via a gateway:\n{out}"),
    };
    GuestNet {
        address: address.parse().unwrap(),
        prefix: prefix.parse().unwrap(),
        default_route,
        nameservers: parts[2]
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver "))
            .map(|s| s.trim().to_string())
            .collect(),
    }
}

/// The MAC address libvirt gave the VM's NIC.
fn mac_of(backend: &LibvirtBackend, vm: &Vm) -> String {
    let out = std::process::Command::new("virsh")
        .args(["-c", backend.uri(), "domiflist"])
        .arg(format!("agentvm-{}", vm.id()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter(|l| l.contains("agentvm-nat"))
        .find_map(|l| l.split_whitespace().last().map(str::to_string))
        .unwrap_or_else(|| panic!("no NIC on agentvm-nat in\n{text}"))
}

/// Whether agentvm-nat's dnsmasq holds a lease of `address` for `mac`.
fn leased(backend: &LibvirtBackend, mac: &str, address: std::net::Ipv4Addr) -> bool {
    let out = std::process::Command::new("virsh")
        .args([
            "-c",
            backend.uri(),
            "net-dhcp-leases",
            "agentvm-nat",
            "--mac",
            mac,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .any(|l| l.contains(mac) && l.contains(&format!(" {address}/24 ")))
}

/// Checks that the guest's configuration is a lease from agentvm-nat's
/// DHCP, for this VM's own MAC: an address in the DHCP range, the default
/// route and the nameserver the network hands out, and dnsmasq's record.
async fn assert_dhcp_config(backend: &LibvirtBackend, vm: &Vm, net: &GuestNet) {
    let octets = net.address.octets();
    assert_eq!(octets[..3], [192, 168, 213], "{net:?}");
    assert!(
        (10..=254).contains(&octets[3]),
        "outside the DHCP range: {net:?}"
    );
    assert_eq!(net.prefix, 24, "{net:?}");
    assert_eq!(net.default_route, format!("{NAT_HOST} eth0"), "{net:?}");
    assert_eq!(net.nameservers, [NAT_HOST], "{net:?}");
    let mac = mac_of(backend, vm);
    // libvirt's record is written by a helper dnsmasq runs after the ACK: allow it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !leased(backend, &mac, net.address) {
        assert!(
            std::time::Instant::now() < deadline,
            "dnsmasq has no lease of {} for {mac}",
            net.address
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Accepts one connection on `listener` within 8 s: the peer's address and
/// what it sent (`None`: nothing connected).
async fn accept_one(listener: tokio::net::TcpListener) -> Option<(std::net::IpAddr, String)> {
    use tokio::io::AsyncReadExt;
    match tokio::time::timeout(Duration::from_secs(8), listener.accept()).await {
        Ok(Ok((mut s, peer))) => {
            let mut text = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut text)).await;
            Some((peer.ip(), text))
        }
        _ => None,
    }
}

/// The egress filter at work, on this machine only: the guest takes its
/// address, default route and nameserver from agentvm-nat's DHCP; it may
/// open a connection to the host's bridge address on an allowed port (80)
/// but not on another (8080), and the host cannot open one to the guest.
/// Needs `cargo xtask setup-network`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_filter_allows_listed_ports_and_drops_the_rest() {
    use tokio::net::{TcpListener, TcpStream};

    let backend = libvirt_backend();
    let mut spec = vm_suite::spec();
    spec.network = NetworkMode::NatFiltered;
    let mut vm = Vm::boot(&backend, spec)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The lease's /etc/resolv.conf is not a change of the test.
    let changes = vm
        .changes(agentvm_runtime::protocol::ListChangesRequest {
            include_text: false,
            outside_workspace: true,
        })
        .await
        .unwrap();
    assert!(
        !changes
            .outside_workspace
            .iter()
            .any(|p| p.contains("resolv.conf")),
        "{:?}",
        changes.outside_workspace
    );
    let net = guest_net(&mut vm).await;
    assert_dhcp_config(&backend, &vm, &net).await;
    let guest = net.address;
    let allowed = tokio::spawn(accept_one(TcpListener::bind((NAT_HOST, 80)).await.unwrap()));
    let blocked = tokio::spawn(accept_one(
        TcpListener::bind((NAT_HOST, 8080)).await.unwrap(),
    ));
    let (code, _, stderr) = vm_suite::sh(
        &mut vm,
        &format!(
            "(echo via-80 | nc -w 3 {NAT_HOST} 80; echo via-8080 | nc -w 3 {NAT_HOST} 8080; \
              nc -l -p 8000 -w 5 >/dev/null &) ; true"
        ),
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        allowed.await.unwrap(),
        Some((guest.into(), "via-80\n".to_string())),
        "port 80 must pass, from the guest's DHCP address"
    );
    assert_eq!(blocked.await.unwrap(), None, "port 8080 must be dropped");
    let inbound =
        tokio::time::timeout(Duration::from_secs(3), TcpStream::connect((guest, 8000))).await;
    assert!(
        !matches!(inbound, Ok(Ok(_))),
        "the host must not reach the guest: {inbound:?}"
    );
    vm.destroy().await.unwrap();
}

/// Two nat-filtered VMs at once each hold their own lease (distinct
/// addresses, each for its own MAC) and reach the host from it. After a
/// revert each renews its lease; a snapshot that holds the *other* VM's
/// address (as a golden snapshot shared between VMs would) is corrected when
/// it is restored. Needs `cargo xtask setup-network`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_filtered_vms_get_their_own_leases_across_reverts() {
    use tokio::net::TcpListener;

    // 443: another port than the egress test's, which may run at the same time.
    const PORT: u16 = 443;
    let backend = libvirt_backend();
    let mut spec = vm_suite::spec();
    spec.network = NetworkMode::NatFiltered;
    let (a, b) = tokio::join!(
        Vm::boot(&backend, spec.clone()),
        Vm::boot(&backend, spec.clone())
    );
    let mut vms = [
        a.unwrap_or_else(|e| panic!("{e}")),
        b.unwrap_or_else(|e| panic!("{e}")),
    ];
    for vm in &vms {
        let took = vm
            .boot_timings()
            .network
            .expect("a nat-filtered VM takes a lease");
        eprintln!("[dhcp] VM {} lease at boot: {took:?}", vm.id());
    }

    // Both reach the host, each from its own address.
    async fn connect_both(vms: &mut [Vm; 2]) -> [GuestNet; 2] {
        let mut nets = Vec::new();
        for vm in vms.iter_mut() {
            let net = guest_net(vm).await;
            let listener = TcpListener::bind((NAT_HOST, PORT)).await.unwrap();
            let accepted = tokio::spawn(accept_one(listener));
            let (code, _, err) = vm_suite::sh(
                vm,
                &format!("echo from-{} | nc -w 3 {NAT_HOST} {PORT}", vm.id()),
            )
            .await;
            if code != 0 {
                let host = std::process::Command::new("ip")
                    .args(["neigh", "show", "dev", "virbr-agentvm"])
                    .output()
                    .unwrap();
                let (_, guest, _) =
                    vm_suite::sh(vm, "ip addr; ip route; ip neigh; cat /proc/net/arp").await;
                panic!(
                    "VM {} ({net:?}) cannot reach the host: {err}\n--- guest ---\n{guest}\n--- host neighbours ---\n{}",
                    vm.id(),
                    String::from_utf8_lossy(&host.stdout)
                );
            }
            assert_eq!(
                accepted.await.unwrap(),
                Some((net.address.into(), format!("from-{}\n", vm.id()))),
                "VM {} must reach the host from its DHCP address {}",
                vm.id(),
                net.address
            );
            nets.push(net);
        }
        [nets[0].clone(), nets[1].clone()]
    }
    let before = connect_both(&mut vms).await;
    for (vm, net) in vms.iter().zip(&before) {
        assert_dhcp_config(&backend, vm, net).await;
    }
    assert_ne!(before[0].address, before[1].address, "{before:?}");

    // A revert renews each VM's lease: same MAC, same address, still working.
    for vm in vms.iter_mut() {
        let t = vm.revert().await.unwrap_or_else(|e| panic!("{e}"));
        let took = t.network.expect("a revert renews the lease");
        eprintln!(
            "[dhcp] VM {} revert {:?} (restore {:?}, resync {:?}, lease {took:?})",
            vm.id(),
            t.total,
            t.restore,
            t.resync.elapsed
        );
    }
    let after = connect_both(&mut vms).await;
    assert_eq!(after, before, "each VM keeps its own lease across a revert");

    // A snapshot that holds an address not leased to the VM (as one shared
    // between VMs would hold the lease of the VM that made it): restoring it
    // gives the VM its own lease back. The address is outside the DHCP range,
    // so no other VM holds it: two live holders of one address would fight
    // over the host's neighbour entry, which says nothing about the renewal.
    let stale = std::net::Ipv4Addr::new(192, 168, 213, 9);
    let (code, _, err) = vm_suite::sh(
        &mut vms[1],
        &format!(
            "ip -4 addr flush dev eth0 && ip -4 addr add {stale}/24 dev eth0 && \
             ip -4 route replace default via {NAT_HOST} dev eth0"
        ),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(guest_net(&mut vms[1]).await.address, stale);
    vms[1].snapshot("clone").await.unwrap();
    vms[1]
        .revert_to("clone")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let restored = connect_both(&mut vms).await;
    assert_eq!(
        restored, before,
        "the restored VM asked for its own lease again"
    );
    assert_dhcp_config(&backend, &vms[1], &restored[1]).await;

    for vm in vms {
        vm.destroy().await.unwrap();
    }
}

/// The `agent` image (Debian) takes its lease with Debian's dhclient, leaves
/// no DHCP daemon behind, renews the lease on revert, and the lease's
/// /etc/resolv.conf is not among the changes a test sees. `--ignored`: it
/// needs the agent image (`cargo xtask build-image --name agent`), which
/// `cargo xtask test` builds and then runs this. Needs `cargo xtask setup-network`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the agent image: cargo xtask build-image --name agent"]
async fn agent_image_takes_its_lease_with_dhclient() {
    use agentvm_runtime::command::Command;
    use agentvm_runtime::protocol::ListChangesRequest;
    use tokio::net::TcpListener;

    // 9418 (git): a port the other nat-filtered tests do not listen on.
    const PORT: u16 = 9418;
    let backend = libvirt_backend();
    let mut spec = vm_suite::spec();
    spec.image = agentvm_runtime::image::locate_image("agent", &vm_suite::images_dir())
        .unwrap_or_else(|e| panic!("{e} (cargo xtask build-image --name agent)"));
    spec.profile = agentvm_runtime::spec::ResourceProfile::Light;
    spec.network = NetworkMode::NatFiltered;
    let mut vm = Vm::boot(&backend, spec)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[dhcp] agent image lease at boot: {:?}",
        vm.boot_timings().network
    );
    let (code, out, err) = vm_suite::sh(
        &mut vm,
        "command -v dhclient; pgrep -l 'dhclient|udhcpc' || echo none",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out, "/usr/sbin/dhclient\nnone\n",
        "dhclient is the client and does not stay"
    );
    for round in 0..2 {
        let net = guest_net(&mut vm).await;
        assert_dhcp_config(&backend, &vm, &net).await;
        let listener = TcpListener::bind((NAT_HOST, PORT)).await.unwrap();
        let accepted = tokio::spawn(accept_one(listener));
        // bash's /dev/tcp: the image has no nc.
        let out = vm
            .exec(
                Command::new("bash")
                    .arg("-c")
                    .arg(format!("echo round-{round} > /dev/tcp/{NAT_HOST}/{PORT}")),
            )
            .await
            .unwrap();
        assert_eq!(
            out.report.status,
            agentvm_runtime::protocol::ExitStatus::Code(0),
            "{out:?}"
        );
        assert_eq!(
            accepted.await.unwrap(),
            Some((net.address.into(), format!("round-{round}\n")))
        );
        let changes = vm
            .changes(ListChangesRequest {
                include_text: false,
                outside_workspace: true,
            })
            .await
            .unwrap();
        assert!(
            !changes
                .outside_workspace
                .iter()
                .any(|p| p.contains("resolv.conf")),
            "the lease is not a change of the test: {:?}",
            changes.outside_workspace
        );
        let t = vm.revert().await.unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "[dhcp] agent image revert {:?}, lease {:?}",
            t.total, t.network
        );
    }
    vm.destroy().await.unwrap();
}
