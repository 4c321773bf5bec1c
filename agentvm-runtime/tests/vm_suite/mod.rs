//! The real-VM suite, shared by every backend: boot → Hello → golden
//! snapshot, exec, files, revert restores state, timeouts, crash detection,
//! two VMs, pool acquire/release.
//!
//! A test file provides `fn backend() -> Arc<dyn Backend>` and expands
//! [`vm_suite_tests!`] (see `vm_qemu.rs`, `vm_libvirt.rs`). Needs the image of
//! `cargo xtask build-image` (target/agentvm/images/default); without it every
//! test fails with that command in the message.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use agentvm_runtime::backend::Backend;
use agentvm_runtime::command::Command;
use agentvm_runtime::image::locate_image;
use agentvm_runtime::protocol::ExitStatus;
use agentvm_runtime::spec::{Accel, NetworkMode, ResourceProfile, VmSpec};
use agentvm_runtime::vm::Vm;

pub fn images_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/agentvm/images")
}

pub fn spec() -> VmSpec {
    let image = locate_image("default", &images_dir()).unwrap_or_else(|e| panic!("{e}"));
    VmSpec {
        image,
        profile: ResourceProfile::Minimal,
        network: NetworkMode::Isolated,
        accel: Accel::Auto,
        boot_timeout: Duration::from_secs(120),
    }
}

pub async fn boot_on(backend: &dyn Backend) -> Vm {
    Vm::boot(backend, spec())
        .await
        .unwrap_or_else(|e| panic!("boot on {} failed: {e}", backend.name()))
}

pub async fn sh(vm: &mut Vm, script: &str) -> (i32, String, String) {
    let out = vm
        .exec(Command::shell(script))
        .await
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    let code = match out.report.status {
        ExitStatus::Code(c) => c,
        ExitStatus::Signal(s) => 128 + s,
    };
    (
        code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The guest's wall clock as seconds since the epoch, bracketed by the
/// host's before and after the command, all as f64 seconds.
pub async fn guest_clock(vm: &mut Vm) -> (f64, f64, f64) {
    let host = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let before = host();
    // busybox date has no %N; adjtimex prints the time to the microsecond.
    let (code, out, err) = sh(vm, "adjtimex | grep 'time.tv_'").await;
    let after = host();
    assert_eq!(code, 0, "{err}");
    let field = |name: &str| -> f64 {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the guest's adjtimex output {out:?}"))
    };
    let guest = field("time.tv_sec:") + field("time.tv_usec:") / 1e6;
    (before, guest, after)
}

/// Asserts the guest clock is within a second of the host's.
pub async fn assert_clock_is_the_hosts(vm: &mut Vm, when: &str) {
    let (before, guest, after) = guest_clock(vm).await;
    assert!(
        guest > before - 1.0 && guest < after + 1.0,
        "{when}: guest clock {guest:.3} is off the host's [{before:.3}, {after:.3}] by {:.3} s",
        if guest < before {
            guest - before
        } else {
            guest - after
        }
    );
}

/// 16 bytes of the guest's `/dev/urandom`, as hex.
pub async fn guest_urandom(vm: &mut Vm) -> String {
    let (code, out, err) = sh(vm, "head -c16 /dev/urandom | od -An -tx1").await;
    assert_eq!(code, 0, "{err}");
    let hex: String = out.split_whitespace().collect();
    assert_eq!(hex.len(), 32, "{out:?}");
    hex
}

/// Keeps `threads` host CPUs busy until the value is dropped (at most
/// `limit`), so guest timing is as on a loaded CI machine.
pub struct HostLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HostLoad {
    pub fn start(threads: usize, limit: Duration) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let end = std::time::Instant::now() + limit;
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for HostLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Expands the suite's `#[tokio::test]`s; the calling file defines
/// `fn backend() -> std::sync::Arc<dyn agentvm_runtime::backend::Backend>`.
#[macro_export]
macro_rules! vm_suite_tests {
    () => {
        mod suite {
        use std::time::Duration;

        use super::backend;

        use agentvm_runtime::backend::BackendError;
        use agentvm_runtime::client::ClientError;
        use agentvm_runtime::command::Command;
        use agentvm_runtime::pool::{PoolConfig, ReleaseOutcome, VmPool};
        use agentvm_runtime::protocol::{ErrorKind, ExitStatus};
        use agentvm_runtime::vm::{Vm, VmError};

        use $crate::vm_suite::{sh, spec};

        async fn boot() -> Vm {
            let backend = backend();
            $crate::vm_suite::boot_on(&*backend).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn boots_and_says_hello() {
            let mut vm = boot().await;
            let hello = vm.guest_info().clone();
            assert!(hello.software.starts_with("agentvm-guest"), "{hello:?}");
            assert_eq!(hello.workspace_root.as_deref(), Some("/workspace"));
            assert!(
                hello.kernel.as_deref().unwrap_or("").contains("cloud-amd64"),
                "{hello:?}"
            );
            vm.ping().await.unwrap();
            let t = vm.boot_timings();
            eprintln!(
                "[{}] boot to hello {:?}, golden snapshot {:?}",
                backend().name(),
                t.to_hello,
                t.snapshot
            );
            vm.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn exec_exit_codes_stdout_stderr_and_uname() {
            let mut vm = boot().await;
            assert_eq!(
                sh(&mut vm, "echo out; echo err >&2; exit 7").await,
                (7, "out\n".into(), "err\n".into())
            );
            let (code, stdout, _) = sh(&mut vm, "uname -s; pwd; id -u").await;
            assert_eq!((code, stdout.as_str()), (0, "Linux\n/workspace\n0\n"));
            let err = vm.exec(Command::new("/no/such/program")).await.unwrap_err();
            assert!(
                matches!(
                    err.guest_error(),
                    Some(ClientError::Guest {
                        kind: ErrorKind::SpawnFailed | ErrorKind::NotFound,
                        ..
                    })
                ),
                "{err}"
            );
            vm.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn file_round_trip() {
            let mut vm = boot().await;
            let data: Vec<u8> = (0..3 * 1024 * 1024u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            vm.write_file("blob.bin", &data, 0o750).await.unwrap();
            let (back, mode) = vm.read_file("/workspace/blob.bin").await.unwrap();
            assert_eq!(mode & 0o777, 0o750);
            assert!(back == data, "content differs after the round trip");
            let (_, sum, _) = sh(&mut vm, "sha256sum blob.bin | cut -d' ' -f1").await;
            use sha2::Digest;
            assert_eq!(sum.trim(), hex::encode(sha2::Sha256::digest(&data)));
            vm.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn df_reports_the_root_and_the_workspace() {
            let mut vm = boot().await;
            let (code, out, err) = sh(&mut vm, "df / /workspace").await;
            assert_eq!(code, 0, "{out}{err}");
            let mounted_on: Vec<&str> = out
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().last())
                .collect();
            assert_eq!(mounted_on, ["/", "/"], "{out}");
            vm.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_guest_clock_is_the_hosts_after_a_revert() {
            let mut vm = boot().await;
            $crate::vm_suite::assert_clock_is_the_hosts(&mut vm, "after boot").await;
            // The golden snapshot's clock lags more the older it is.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let timings = vm.revert().await.unwrap();
            assert!(timings.resync.reseeded, "{timings:?}");
            $crate::vm_suite::assert_clock_is_the_hosts(&mut vm, "after a revert 3 s later").await;
            vm.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn urandom_differs_after_every_revert_on_a_loaded_host() {
            let mut vm = boot().await;
            let _load = $crate::vm_suite::HostLoad::start(3, Duration::from_secs(300));
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..20 {
                vm.revert().await.unwrap();
                let bytes = $crate::vm_suite::guest_urandom(&mut vm).await;
                assert!(seen.insert(bytes.clone()), "revert {i}: /dev/urandom repeated {bytes}");
            }
            vm.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn revert_restores_the_golden_state() {
            let mut vm = boot().await;
            vm.write_file("notes.txt", b"agent was here\n", 0o644)
                .await
                .unwrap();
            let (code, _, _) = sh(
                &mut vm,
                "echo x > /etc/agent-mark && rm -f /bin/ls && ! test -e /bin/ls",
            )
            .await;
            assert_eq!(code, 0, "the damage was done");
            let timings = vm.revert().await.unwrap();
            eprintln!("[{}] revert: {timings:?}", backend().name());
            let (code, stdout, _) = sh(
                &mut vm,
                "test -e /bin/ls && echo ls-back; ls /workspace; test -e /etc/agent-mark || echo mark-gone",
            )
            .await;
            assert_eq!((code, stdout.as_str()), (0, "ls-back\nmark-gone\n"));
            assert!(
                vm.workspace_changes(false).await.unwrap().is_empty(),
                "workspace is at its baseline again"
            );
            // Reverting again and again keeps working.
            for _ in 0..3 {
                sh(&mut vm, "touch /workspace/again").await;
                vm.revert().await.unwrap();
            }
            let (_, stdout, _) = sh(&mut vm, "ls /workspace").await;
            assert_eq!(stdout, "");
            vm.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn timeout_kills_a_runaway() {
            let mut vm = boot().await;
            let out = vm
                .exec(
                    Command::shell(
                        "trap '' TERM; (while :; do :; done) & while :; do sleep 1; done",
                    )
                    .timeout(Duration::from_secs(2)),
                )
                .await
                .unwrap();
            assert!(out.report.timed_out);
            assert_eq!(out.report.status, ExitStatus::Signal(9));
            // Nothing of the tree is left burning CPU.
            let (_, stdout, _) = sh(&mut vm, "ps -o pid,comm | grep -c 'sh$' || true").await;
            assert!(
                stdout.trim().parse::<u32>().unwrap() <= 1,
                "leftover shells: {stdout}"
            );
            vm.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_guest_kernel_panic_is_a_typed_error_with_the_serial_tail() {
            let mut vm = boot().await;
            let result = tokio::time::timeout(
                Duration::from_secs(90),
                vm.exec(
                    Command::shell("echo c > /proc/sysrq-trigger").timeout(Duration::from_secs(60)),
                ),
            )
            .await
            .expect("a crash is detected, not a hang");
            let err = result.expect_err("the VM crashed");
            match &err {
                VmError::Backend(BackendError::Crashed { serial_tail, .. }) => {
                    assert!(
                        serial_tail.contains("sysrq") || serial_tail.contains("Kernel panic"),
                        "{serial_tail}"
                    );
                }
                other => panic!("expected a crash, got {other}"),
            }
            assert!(err.vm_is_broken());
            vm.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn two_vms_do_not_interfere() {
            let (mut a, mut b) = tokio::join!(boot(), boot());
            assert_ne!(a.id(), b.id());
            sh(&mut a, "echo a > /workspace/who").await;
            sh(&mut b, "echo b > /workspace/who").await;
            assert_eq!(a.read_file("who").await.unwrap().0, b"a\n");
            assert_eq!(b.read_file("who").await.unwrap().0, b"b\n");
            a.revert().await.unwrap();
            assert_eq!(
                b.read_file("who").await.unwrap().0,
                b"b\n",
                "reverting a leaves b alone"
            );
            let (_, stdout, _) = sh(&mut a, "cat /workspace/who 2>/dev/null || echo none").await;
            assert_eq!(stdout, "none\n");
            a.destroy().await.unwrap();
            b.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn graceful_shutdown_powers_the_guest_off() {
            // Graceful: the hypervisor saw the guest power itself off in time
            // (otherwise it is stopped by force and says so).
            let vm = boot().await;
            let outcome = vm.shutdown(Duration::from_secs(30)).await.unwrap();
            assert_eq!(outcome, agentvm_runtime::vm::Shutdown::Graceful);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn pool_acquire_release_reverts() {
            let pool = VmPool::new(
                backend(),
                PoolConfig::fixed(1, spec()),
            )
            .unwrap();
            pool.wait_ready(Duration::from_secs(180)).await.unwrap();
            let mut lease = pool.acquire(Duration::from_secs(180)).await.unwrap();
            let (code, _, _) = sh(&mut lease, "echo dirty > /workspace/state").await;
            assert_eq!(code, 0);
            let outcome = lease.release().await.unwrap();
            assert!(matches!(outcome, ReleaseOutcome::Reverted(_)), "{outcome:?}");
            let mut lease = pool.acquire(Duration::from_secs(180)).await.unwrap();
            let (_, stdout, _) = sh(&mut lease, "ls /workspace").await;
            assert_eq!(stdout, "", "the next lease starts clean");
            drop(lease);
            pool.shutdown().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_guest_process_reaches_the_host_through_the_tunnel() {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut vm = boot().await;
            let mut listener = vm.tunnel_listen(8080).await.unwrap();
            let server = tokio::spawn(async move {
                let mut stream = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    stream.read_exact(&mut byte).await.unwrap();
                    head.push(byte[0]);
                }
                stream
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 19\r\n\r\nhello from the host")
                    .await
                    .unwrap();
                stream.shutdown().await.unwrap();
                (String::from_utf8_lossy(&head).into_owned(), listener)
            });
            // busybox nc, not wget: the static busybox's wget crashes (SIGSEGV
            // even for a refused port). nc stops at stdin's EOF: keep it open.
            let (code, out, err) = sh(
                &mut vm,
                "(printf 'GET /v1/messages HTTP/1.1\\r\\nHost: model\\r\\n\\r\\n'; sleep 2) | nc 127.0.0.1 8080",
            )
            .await;
            assert_eq!(code, 0, "{err}");
            assert!(out.ends_with("\r\n\r\nhello from the host"), "{out:?} {err:?}");
            let (head, mut listener) = server.await.unwrap();
            assert!(head.starts_with("GET /v1/messages HTTP/1.1\r\n"), "{head}");

            // Guest -> host throughput: 16 MiB through nc, counted on the host.
            let counter = tokio::spawn(async move {
                let mut stream = listener.accept().await.unwrap();
                let started = std::time::Instant::now();
                let n = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await.unwrap();
                stream.shutdown().await.unwrap();
                (n, started.elapsed(), listener)
            });
            let (code, _, err) = sh(
                &mut vm,
                "dd if=/dev/zero bs=65536 count=256 2>/dev/null | nc 127.0.0.1 8080",
            )
            .await;
            assert_eq!(code, 0, "{err}");
            let (n, took, mut listener) = counter.await.unwrap();
            assert_eq!(n, 16 << 20);
            eprintln!(
                "[{}] tunnel guest->host: 16 MiB in {:.2} s ({:.1} MiB/s)",
                backend().name(),
                took.as_secs_f64(),
                16.0 / took.as_secs_f64()
            );

            // A revert takes the guest's listener with it: the host's ends,
            // and a new listen works.
            vm.revert().await.unwrap();
            assert!(listener.accept().await.is_err());
            let (code, _, err) = sh(&mut vm, "nc 127.0.0.1 8080 </dev/null").await;
            assert_ne!(code, 0, "nothing listens after the revert");
            assert!(err.contains("refused"), "{err}");
            let _again = vm.tunnel_listen(8080).await.unwrap();
            vm.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn run_states_and_named_snapshots() {
            use agentvm_runtime::backend::MachineState;
            let mut vm = boot().await;
            assert_eq!(vm.state().await.unwrap(), MachineState::Running);
            vm.pause().await.unwrap();
            vm.wait_for_state(MachineState::Paused, Duration::from_secs(10)).await.unwrap();
            let err = vm
                .wait_for_state(MachineState::Running, Duration::from_millis(100))
                .await
                .unwrap_err();
            assert!(matches!(err, VmError::StateTimeout { .. }), "{err}");
            vm.resume().await.unwrap();
            vm.wait_for_state(MachineState::Running, Duration::from_secs(10)).await.unwrap();

            sh(&mut vm, "echo a > /workspace/a").await;
            vm.snapshot("with-a").await.unwrap();
            sh(&mut vm, "echo b > /workspace/b; rm /workspace/a").await;
            assert_eq!(vm.snapshots().await.unwrap(), ["golden", "with-a"]);
            let timings = vm.revert_to("with-a").await.unwrap();
            assert!(timings.resync.reseeded, "{timings:?}");
            let (_, out, _) = sh(&mut vm, "ls /workspace").await;
            assert_eq!(out, "a\n", "back at the named snapshot");
            // The golden snapshot is the VM's own; bad names are refused.
            for bad in ["golden", "1abc", "has space", ""] {
                let err = vm.snapshot(bad).await.unwrap_err();
                assert!(matches!(err, VmError::InvalidSnapshotName { .. }), "{bad:?}: {err}");
                assert!(!err.vm_is_broken());
            }
            assert!(vm.delete_snapshot("golden").await.is_err());
            vm.delete_snapshot("with-a").await.unwrap();
            assert_eq!(vm.snapshots().await.unwrap(), ["golden"]);
            assert!(vm.revert_to("with-a").await.is_err(), "deleted");
            vm.revert().await.unwrap();
            let (_, out, _) = sh(&mut vm, "ls /workspace").await;
            assert_eq!(out, "");
            vm.destroy().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_leases_snapshots_do_not_reach_the_next_lease() {
            let pool = VmPool::new(backend(), PoolConfig::fixed(1, spec())).unwrap();
            let mut lease = pool.acquire(Duration::from_secs(180)).await.unwrap();
            lease.snapshot("mine").await.unwrap();
            lease.release().await.unwrap();
            let mut lease = pool.acquire(Duration::from_secs(180)).await.unwrap();
            assert_eq!(lease.snapshots().await.unwrap(), ["golden"]);
            drop(lease);
            pool.shutdown().await;
        }
        }
    };
}
