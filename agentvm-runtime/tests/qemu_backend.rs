//! The QEMU backend against real VMs (TCG on machines without usable KVM).
//!
//! Guest image: `AGENTVM_TEST_KERNEL` + `AGENTVM_TEST_INITRAMFS` if set, else
//! the image built by `cargo xtask build-image` (`target/agentvm/images/default`).
//! Whatever the image's own init does, these tests append a small cpio
//! archive to its initramfs that replaces `/init` with an *echo guest* (the
//! kernel unpacks concatenated archives in order, later files win): a busybox
//! shell that loads the virtio modules it finds in the image and serves a
//! line protocol on the `org.agentvm.ctl` port:
//!
//! | host sends  | guest answers                        |
//! |-------------|--------------------------------------|
//! | `PING <x>`  | `PONG <x>`                           |
//! | `SET <v>`   | stores `<v>` in /tmp/state, `OK`     |
//! | `GET`       | `STATE <v>`                          |
//! | `CRASH`     | `echo c > /proc/sysrq-trigger` (kernel panic) |
//! | `EXIT`      | PID 1 exits (kernel panic)           |
//! | other line  | the same line                        |
//!
//! So the backend is tested independently of the guest agent's protocol.
//! The host's static busybox (`apt-get install busybox-static`) is put into
//! the overlay. Without any image the VM tests fail, saying how to build one.
//!
//! Run with `--nocapture` to see the timings (spawn → channel ready, savevm,
//! loadvm p50).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use agentvm_runtime::backend::qemu::process::QemuProcess;
use agentvm_runtime::backend::qemu::{QemuBackend, QemuConfig, QemuMachine};
use agentvm_runtime::backend::{Backend, BackendError, BoxedChannel, Machine, RevertOutcome};
use agentvm_runtime::spec::{Accel, ImagePaths, NetworkMode, ResourceProfile, VmSpec};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Generous: two cores shared by parallel tests (and possibly other VMs), TCG.
const BOOT_DEADLINE: Duration = Duration::from_secs(90);
const REPLY_DEADLINE: Duration = Duration::from_secs(30);
const CRASH_DEADLINE: Duration = Duration::from_secs(60);

const ECHO_INIT: &str = r#"#!/agentvm-echo/busybox sh
# agentvm QEMU backend test guest (see tests/qemu_backend.rs).
/agentvm-echo/busybox mkdir -p /agentvm-echo/bin
/agentvm-echo/busybox --install -s /agentvm-echo/bin
export PATH=/agentvm-echo/bin:/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in virtio_ring virtio virtio_mmio virtio_console; do
  f=$(find / -xdev -name "$m.ko" 2>/dev/null | head -n 1)
  if [ -n "$f" ]; then insmod "$f" 2>/dev/null; fi
done
dev=""
i=0
while [ -z "$dev" ] && [ $i -lt 400 ]; do
  for p in /sys/class/virtio-ports/*; do
    if [ -f "$p/name" ] && [ "$(cat "$p/name")" = org.agentvm.ctl ]; then dev=/dev/${p##*/}; fi
  done
  [ -z "$dev" ] && sleep 0.05
  i=$((i+1))
done
echo "echo-guest: serving on ${dev:-NOTHING}" > /dev/console
while true; do
  exec 3<>"$dev"
  while IFS= read -r line <&3; do
    case "$line" in
      "PING "*) echo "PONG ${line#PING }" >&3 ;;
      "SET "*) echo "${line#SET }" > /tmp/state; echo "OK" >&3 ;;
      GET) echo "STATE $(cat /tmp/state 2>/dev/null)" >&3 ;;
      CRASH) echo "echo-guest: crashing the kernel" > /dev/console; echo c > /proc/sysrq-trigger ;;
      EXIT) echo "echo-guest: init exiting" > /dev/console; exit 1 ;;
      *) echo "$line" >&3 ;;
    esac
  done
  exec 3<&-
  sleep 0.05
done
"#;

struct TestImage {
    kernel: PathBuf,
    initramfs: PathBuf,
}

const HOW_TO_GET_AN_IMAGE: &str = "no guest image for the QEMU backend tests. Either run `cargo xtask build-image` \
(produces target/agentvm/images/default/{vmlinuz,initramfs.cpio.gz}), or point AGENTVM_TEST_KERNEL at a bzImage \
and AGENTVM_TEST_INITRAMFS at an initramfs containing the virtio_ring, virtio, virtio_mmio and virtio_console \
modules (.ko, anywhere in the tree), e.g. from a Debian cloud kernel: `apt-get download linux-image-cloud-amd64` \
and the linux-image-*-cloud-amd64 it depends on, `dpkg-deb -x`, then cpio the four modules (newc, gzip)";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// (kernel, initramfs) from the environment or the default image.
fn source_image() -> (PathBuf, PathBuf, String) {
    if let (Some(k), Some(i)) = (
        std::env::var_os("AGENTVM_TEST_KERNEL"),
        std::env::var_os("AGENTVM_TEST_INITRAMFS"),
    ) {
        return (
            PathBuf::from(k),
            PathBuf::from(i),
            "AGENTVM_TEST_KERNEL/AGENTVM_TEST_INITRAMFS".into(),
        );
    }
    let mut candidates = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("agentvm/images/default"));
    }
    candidates.push(workspace_root().join("target/agentvm/images/default"));
    for dir in candidates {
        let (k, i) = (dir.join("vmlinuz"), dir.join("initramfs.cpio.gz"));
        if k.is_file() && i.is_file() {
            return (k, i, dir.display().to_string());
        }
    }
    panic!("{HOW_TO_GET_AN_IMAGE}");
}

/// Appends one newc entry.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let header = format!(
        "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        data.len(),
        0,
        0,
        0,
        0,
        name.len() + 1,
        0, // check
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// The test image: the source initramfs + an uncompressed overlay archive
/// with the echo `/init` and a static busybox. Built once per test binary.
fn image() -> &'static TestImage {
    static IMAGE: OnceLock<TestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let (kernel, initramfs, source) = source_image();
        assert!(
            kernel.is_file(),
            "kernel {} not found ({source}). {HOW_TO_GET_AN_IMAGE}",
            kernel.display()
        );
        let mut bytes = std::fs::read(&initramfs).unwrap_or_else(|e| {
            panic!(
                "reading initramfs {} ({source}): {e}. {HOW_TO_GET_AN_IMAGE}",
                initramfs.display()
            )
        });
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .expect(
                "the echo guest needs the host's static busybox: apt-get install busybox-static",
            );
        // The kernel reads an uncompressed archive only at a 4-byte aligned offset.
        while bytes.len() % 4 != 0 {
            bytes.push(0);
        }
        cpio_entry(&mut bytes, 900_001, "agentvm-echo", 0o040_755, &[]);
        cpio_entry(
            &mut bytes,
            900_002,
            "agentvm-echo/busybox",
            0o100_755,
            &busybox,
        );
        cpio_entry(&mut bytes, 900_003, "init", 0o100_755, ECHO_INIT.as_bytes());
        cpio_entry(&mut bytes, 0, "TRAILER!!!", 0, &[]);
        let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&out_dir).unwrap();
        // Named by content: reused across runs, never clobbered by a concurrent
        // run with another source image.
        let digest = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        };
        let out = out_dir.join(format!("qemu-backend-echo-initramfs-{digest:016x}.img"));
        if std::fs::metadata(&out).map(|m| m.len()).ok() != Some(bytes.len() as u64) {
            let tmp = out_dir.join(format!(
                "qemu-backend-echo-initramfs.{}.tmp",
                std::process::id()
            ));
            std::fs::write(&tmp, &bytes).unwrap();
            std::fs::rename(&tmp, &out).unwrap();
        }
        eprintln!(
            "test image: kernel {} + echo overlay on {} ({source})",
            kernel.display(),
            initramfs.display()
        );
        TestImage {
            kernel,
            initramfs: out,
        }
    })
}

fn spec() -> VmSpec {
    let img = image();
    VmSpec {
        image: ImagePaths {
            name: "qemu-backend-test".into(),
            kernel: img.kernel.clone(),
            initramfs: img.initramfs.clone(),
            cmdline: "console=ttyS0 panic=1 quiet".into(),
            rootfs: None,
        },
        profile: ResourceProfile::Minimal,
        network: NetworkMode::Isolated,
        accel: Accel::Auto,
        boot_timeout: BOOT_DEADLINE,
    }
}

fn backend() -> QemuBackend {
    QemuBackend::from_env().expect("QEMU backend")
}

/// Line-oriented view of the control channel.
struct Echo {
    reader: BufReader<tokio::io::ReadHalf<BoxedChannel>>,
    writer: tokio::io::WriteHalf<BoxedChannel>,
}

impl Echo {
    fn new(channel: BoxedChannel) -> Self {
        let (r, w) = tokio::io::split(channel);
        Self {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("channel write");
        self.writer.flush().await.unwrap();
    }

    async fn read_line(&mut self, within: Duration) -> Option<String> {
        let mut line = String::new();
        match tokio::time::timeout(within, self.reader.read_line(&mut line)).await {
            Ok(Ok(0)) => panic!("channel closed"),
            Ok(Ok(_)) => Some(line.trim_end_matches('\n').to_owned()),
            Ok(Err(e)) => panic!("channel read: {e}"),
            Err(_) => None,
        }
    }

    /// Sends a line and returns the answer.
    async fn ask(&mut self, line: &str) -> String {
        self.send(line).await;
        self.read_line(REPLY_DEADLINE)
            .await
            .unwrap_or_else(|| panic!("no answer to {line:?}"))
    }

    /// PING with a nonce, discarding anything else until its PONG (resynchronises).
    async fn sync(&mut self, nonce: &str, within: Duration) {
        self.send(&format!("PING {nonce}")).await;
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_line(left).await {
                Some(l) if l == format!("PONG {nonce}") => return,
                Some(_) => continue,
                None => panic!("no PONG {nonce} within {within:?}"),
            }
        }
    }
}

/// Launches a VM and waits until the echo guest answers; returns the time
/// from `launch()` to the first answer.
async fn boot(backend: &QemuBackend) -> (QemuMachine, Echo, Duration) {
    let started = Instant::now();
    let mut vm = backend.launch_qemu(&spec()).await.expect("launch");
    let channel = vm.connect_channel().await.expect("connect channel");
    let mut echo = Echo::new(channel);
    let nonce = format!("boot-{}", vm.id());
    echo.send(&format!("PING {nonce}")).await;
    match echo.read_line(BOOT_DEADLINE).await {
        Some(l) if l == format!("PONG {nonce}") => {}
        other => panic!(
            "guest did not answer the first PING: {other:?}\nserial:\n{}",
            vm.serial_tail(30)
        ),
    }
    (vm, echo, started.elapsed())
}

fn proc_gone(pid: u32) -> bool {
    // Gone, or a zombie waiting for a (non-us) reaper.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with(['Z', 'X']),
        Err(_) => true,
    }
}

async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn expect_crash(vm: &mut QemuMachine) -> (String, String) {
    let deadline = Instant::now() + CRASH_DEADLINE;
    loop {
        match vm.check_alive().await {
            Ok(()) => {
                assert!(
                    Instant::now() < deadline,
                    "crash not detected within {CRASH_DEADLINE:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(BackendError::Crashed {
                reason,
                serial_tail,
                ..
            }) => return (reason, serial_tail),
            Err(e) => panic!("expected Crashed, got {e}"),
        }
    }
}

#[tokio::test]
async fn launch_channel_pause_resume_destroy() {
    let backend = backend();
    let (mut vm, mut echo, ready) = boot(&backend).await;
    println!(
        "timing: spawn -> channel ready {:.3} s (accel {})",
        ready.as_secs_f64(),
        backend.auto_accel().accel
    );
    let pid = vm.pid().unwrap();
    let dir = vm.dir().to_owned();
    assert!(dir.join("qemu.pid").is_file() && dir.join("owner.pid").is_file());
    assert_eq!(
        std::fs::read_to_string(dir.join("qemu.pid"))
            .unwrap()
            .trim(),
        pid.to_string()
    );

    // Raw bytes round trip: text with tabs, UTF-8, and a 4 KiB line.
    let line = "hello\tworld \u{e4}\u{f6}\u{fc} \u{1f980} ~!@#$%^&*()";
    assert_eq!(echo.ask(line).await, line);
    let long: String = (0..4096)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    assert_eq!(echo.ask(&long).await, long);
    let mut rtts: Vec<f64> = Vec::new();
    for i in 0..20 {
        let t = Instant::now();
        assert_eq!(echo.ask(&format!("PING {i}")).await, format!("PONG {i}"));
        rtts.push(t.elapsed().as_secs_f64());
    }
    rtts.sort_by(f64::total_cmp);
    println!("timing: channel round trip p50 {:.2} ms", rtts[10] * 1e3);

    vm.check_alive().await.expect("alive");
    vm.pause().await.expect("pause");
    vm.check_alive().await.expect("a paused VM is alive");
    echo.send("PING paused").await;
    assert_eq!(
        echo.read_line(Duration::from_millis(500)).await,
        None,
        "a paused guest must not answer"
    );
    vm.resume().await.expect("resume");
    assert_eq!(
        echo.read_line(REPLY_DEADLINE).await.as_deref(),
        Some("PONG paused")
    );

    // Reverting without a golden snapshot is a Control error, and leaves the VM unusable.
    let err = vm.revert_golden().await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Control { message, .. } if message.contains("does not exist")),
        "{err}"
    );
    assert!(matches!(
        vm.check_alive().await,
        Err(BackendError::Crashed { .. })
    ));

    assert!(
        vm.serial_tail(50).contains("echo-guest: serving on"),
        "{}",
        vm.serial_tail(50)
    );
    vm.destroy().await.expect("destroy");
    assert!(proc_gone(pid), "QEMU {pid} still exists after destroy");
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert_eq!(vm.serial_log_path(), None);
    assert!(
        vm.serial_tail(50).contains("echo-guest: serving on"),
        "tail kept after destroy"
    );
    vm.destroy().await.expect("destroy is idempotent");
    assert!(matches!(
        vm.check_alive().await,
        Err(BackendError::Crashed { .. })
    ));
}

#[tokio::test]
async fn golden_snapshot_revert_restores_guest_state() {
    let backend = backend();
    let (mut vm, mut echo, _) = boot(&backend).await;
    assert_eq!(echo.ask("SET before-snapshot").await, "OK");

    let t = Instant::now();
    vm.snapshot_golden().await.expect("savevm");
    let savevm = t.elapsed();
    vm.check_alive().await.expect("alive after savevm");

    assert_eq!(echo.ask("SET after-snapshot").await, "OK");
    assert_eq!(echo.ask("GET").await, "STATE after-snapshot");

    let t = Instant::now();
    assert_eq!(
        vm.revert_golden().await.expect("loadvm"),
        RevertOutcome::ChannelKept
    );
    let first_loadvm = t.elapsed();
    echo.sync("after-revert", REPLY_DEADLINE).await;
    assert_eq!(
        echo.ask("GET").await,
        "STATE before-snapshot",
        "loadvm must restore guest memory"
    );

    let mut loadvm: Vec<Duration> = Vec::new();
    for i in 0..20 {
        assert_eq!(echo.ask(&format!("SET dirty-{i}")).await, "OK");
        let t = Instant::now();
        vm.revert_golden().await.expect("loadvm");
        loadvm.push(t.elapsed());
        echo.sync(&format!("r{i}"), REPLY_DEADLINE).await;
        assert_eq!(echo.ask("GET").await, "STATE before-snapshot");
    }
    vm.check_alive().await.expect("alive after reverts");
    loadvm.sort();
    println!(
        "timing: savevm {:.3} s, first loadvm {:.3} s, loadvm over 20: min {:.3} s p50 {:.3} s max {:.3} s",
        savevm.as_secs_f64(),
        first_loadvm.as_secs_f64(),
        loadvm[0].as_secs_f64(),
        loadvm[10].as_secs_f64(),
        loadvm[19].as_secs_f64()
    );
    vm.destroy().await.unwrap();
}

#[tokio::test]
async fn kernel_panic_is_reported_as_crash_with_serial_tail() {
    let keep = std::env::temp_dir().join(format!("agentvm-qemu-test-logs-{}", std::process::id()));
    let backend = QemuBackend::new(QemuConfig {
        keep_logs_in: Some(keep.clone()),
        ..QemuConfig::default()
    })
    .unwrap();
    let (mut vm, mut echo, _) = boot(&backend).await;
    let pid = vm.pid().unwrap();
    echo.send("CRASH").await;
    let t = Instant::now();
    let (reason, tail) = expect_crash(&mut vm).await;
    println!(
        "timing: panic -> Crashed {:.3} s ({reason})",
        t.elapsed().as_secs_f64()
    );
    assert!(
        tail.contains("Kernel panic"),
        "serial tail lacks the panic:\n{tail}"
    );
    // Every later operation reports the crash too, without hanging.
    assert!(matches!(
        vm.connect_channel().await,
        Err(BackendError::Crashed { .. })
    ));
    assert!(matches!(
        vm.snapshot_golden().await,
        Err(BackendError::Crashed { .. })
    ));
    assert!(matches!(
        vm.pause().await,
        Err(BackendError::Crashed { .. })
    ));
    assert!(proc_gone(pid));
    // The serial log survives the process, and (with keep_logs_in) the destroy.
    assert!(vm.serial_tail(100).contains("Kernel panic"));
    vm.destroy().await.unwrap();
    let kept = vm.serial_log_path().expect("kept serial log");
    assert!(kept.starts_with(&keep));
    assert!(std::fs::read_to_string(&kept).unwrap().contains("sysrq"));
    assert!(vm.serial_tail(100).contains("Kernel panic"));
    std::fs::remove_dir_all(&keep).unwrap();
}

#[tokio::test]
async fn init_exit_is_reported_as_crash() {
    let backend = backend();
    let (mut vm, mut echo, _) = boot(&backend).await;
    echo.send("EXIT").await;
    let (_, tail) = expect_crash(&mut vm).await;
    // The panic line comes before a long stack trace: the error's excerpt still starts at it.
    assert!(
        tail.contains("Attempted to kill init"),
        "serial tail:\n{tail}"
    );
    vm.destroy().await.unwrap();
}

#[tokio::test]
async fn two_vms_at_once_are_isolated() {
    let backend = backend();
    let ((mut a, mut ea, _), (mut b, mut eb, _)) = tokio::join!(boot(&backend), boot(&backend));
    assert_ne!(a.id(), b.id());
    assert_ne!(a.pid(), b.pid());
    assert_eq!(ea.ask("SET I am A").await, "OK");
    assert_eq!(eb.ask("SET I am B").await, "OK");
    assert_eq!(ea.ask("GET").await, "STATE I am A");
    assert_eq!(eb.ask("GET").await, "STATE I am B");
    let (pa, pb) = (a.pid().unwrap(), b.pid().unwrap());
    a.destroy().await.unwrap();
    // B is unaffected by A's destruction.
    b.check_alive().await.unwrap();
    assert_eq!(eb.ask("PING still-here").await, "PONG still-here");
    b.destroy().await.unwrap();
    assert!(proc_gone(pa) && proc_gone(pb));
}

#[tokio::test]
async fn dropping_the_machine_kills_qemu_and_removes_its_dir() {
    let backend = backend();
    let mut vm = backend.launch_qemu(&spec()).await.expect("launch");
    vm.check_alive().await.unwrap();
    let (pid, dir) = (vm.pid().unwrap(), vm.dir().to_owned());
    drop(vm);
    assert!(!dir.exists());
    wait_until("QEMU exit after drop", Duration::from_secs(10), || {
        proc_gone(pid)
    })
    .await;
}

#[tokio::test]
async fn boxed_backend_trait_object_works() {
    let backend: Box<dyn Backend> = Box::new(backend());
    assert_eq!(backend.name(), "qemu");
    let mut vm = backend.launch(&spec()).await.expect("launch");
    let mut echo = Echo::new(vm.connect_channel().await.unwrap());
    echo.sync("trait", BOOT_DEADLINE).await;
    vm.destroy().await.unwrap();
}

#[tokio::test]
async fn missing_image_is_reported_before_starting_qemu() {
    let backend = backend();
    let mut spec = VmSpec {
        image: ImagePaths {
            name: "nope".into(),
            kernel: PathBuf::from("/nonexistent/vmlinuz"),
            initramfs: PathBuf::from("/nonexistent/initramfs.cpio.gz"),
            cmdline: String::new(),
            rootfs: None,
        },
        profile: ResourceProfile::Minimal,
        network: NetworkMode::Isolated,
        accel: Accel::Tcg,
        boot_timeout: Duration::from_secs(5),
    };
    let err = backend.launch_qemu(&spec).await.unwrap_err();
    assert!(matches!(err, BackendError::MissingImage { .. }), "{err}");
    assert!(
        err.to_string().contains("`agentvm image build nope --out "),
        "{err}"
    );

    // A kernel QEMU cannot load: QEMU exits at once, reported as Crashed with QEMU's message.
    let bogus = std::env::temp_dir().join(format!("agentvm-bogus-kernel-{}", std::process::id()));
    std::fs::write(&bogus, b"this is not a kernel").unwrap();
    spec.image.kernel = bogus.clone();
    spec.image.initramfs = bogus.clone();
    let err = backend.launch_qemu(&spec).await.unwrap_err();
    let BackendError::Crashed { reason, .. } = &err else {
        panic!("expected Crashed, got {err}")
    };
    assert!(reason.contains("QEMU exited"), "{reason}");
    std::fs::remove_file(&bogus).unwrap();
}

/// Child half of `qemu_dies_with_its_owner_process`.
const OWNER_HELPER_ENV: &str = "AGENTVM_TEST_OWNER_HELPER";

/// A process spawned by the backend dies when the process that spawned it
/// dies, even abruptly (no destructors run): PR_SET_PDEATHSIG from the
/// supervisor thread. Re-executes this test binary as the short-lived owner.
#[tokio::test]
async fn qemu_dies_with_its_owner_process() {
    if std::env::var_os(OWNER_HELPER_ENV).is_some() {
        // Spawned from a tokio task on whatever thread; the supervisor thread forks.
        let log =
            std::env::temp_dir().join(format!("agentvm-owner-helper-{}.log", std::process::id()));
        let child = QemuProcess::spawn(Path::new("/bin/sleep"), &["300".into()], &log, None)
            .await
            .unwrap();
        println!("SPAWNED {}", child.pid());
        std::io::stdout().flush().unwrap();
        let _ = std::fs::remove_file(&log);
        std::mem::forget(child);
        std::process::exit(0);
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "qemu_dies_with_its_owner_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(OWNER_HELPER_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    // libtest prints "test <name> ... " on the same line before our output.
    let pid: u32 = stdout
        .split_once("SPAWNED ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "helper printed no pid: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    wait_until(
        "the orphaned child to be killed",
        Duration::from_secs(10),
        || proc_gone(pid),
    )
    .await;
}

/// The image directory of `cargo xtask build-image`, if built.
fn default_image_dir() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("agentvm/images/default"));
    }
    candidates.push(workspace_root().join("target/agentvm/images/default"));
    candidates
        .into_iter()
        .find(|d| d.join("vmlinuz").is_file() && d.join("initramfs.cpio.gz").is_file())
}

/// The real guest agent of `cargo xtask build-image`, unmodified, over this
/// backend: Hello on connect, Ping/Pong, and answering again after savevm +
/// loadvm (with the reader resynchronising past whatever was in flight).
#[tokio::test]
async fn real_guest_agent_answers_through_the_backend() {
    use agentvm_runtime::protocol::{FrameReader, FrameWriter, Message, Ping, PROTOCOL_VERSION};

    let dir = default_image_dir().unwrap_or_else(|| {
        panic!(
            "this test needs the real image: run `cargo xtask build-image` ({HOW_TO_GET_AN_IMAGE})"
        )
    });
    let mut spec = spec();
    spec.image.kernel = dir.join("vmlinuz");
    spec.image.initramfs = dir.join("initramfs.cpio.gz");
    let backend = backend();
    let started = Instant::now();
    let mut vm = backend.launch_qemu(&spec).await.expect("launch");
    let (r, w) = tokio::io::split(vm.connect_channel().await.expect("channel"));
    let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));

    let first = tokio::time::timeout(BOOT_DEADLINE, reader.next())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no Hello within {BOOT_DEADLINE:?}\nserial:\n{}",
                vm.serial_tail(40)
            )
        })
        .expect("frame")
        .expect("a frame, not EOF");
    let Message::Hello(hello) = &first.message else {
        panic!("expected Hello, got {first:?}")
    };
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    println!(
        "timing: spawn -> guest agent Hello {:.3} s ({})",
        started.elapsed().as_secs_f64(),
        hello.software
    );

    async fn ping<R, W>(
        reader: &mut FrameReader<R>,
        writer: &mut FrameWriter<W>,
        id: u64,
        vm: &QemuMachine,
    ) where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        writer
            .send(id, &Message::Ping(Ping { nonce: id * 1000 }))
            .await
            .expect("send ping");
        let deadline = Instant::now() + REPLY_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, reader.next())
                .await
                .unwrap_or_else(|_| panic!("no Pong {id}\nserial:\n{}", vm.serial_tail(40)))
                .expect("frame")
                .expect("not EOF");
            if let Message::Pong(p) = frame.message {
                if frame.request_id == id && p.nonce == id * 1000 {
                    return;
                }
            }
        }
    }

    ping(&mut reader, &mut writer, 1, &vm).await;
    vm.snapshot_golden().await.expect("savevm");
    ping(&mut reader, &mut writer, 2, &vm).await;
    assert_eq!(
        vm.revert_golden().await.expect("loadvm"),
        RevertOutcome::ChannelKept
    );
    reader.set_resync(true);
    reader.set_hunting(true);
    ping(&mut reader, &mut writer, 3, &vm).await;
    vm.check_alive().await.expect("alive");
    vm.destroy().await.unwrap();
}
