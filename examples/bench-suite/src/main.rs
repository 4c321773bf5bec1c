//! `agentvm-bench`: the measuring program behind `cargo xtask bench`.
//!
//! Boots real VMs with the configured backend and image (the same
//! configuration the test harness reads: `.config/agentvm.toml`,
//! `AGENT_VM_*`) and writes raw samples as JSON; `cargo xtask bench`
//! computes the percentiles, adds the suite runs and prints the table.
//!
//! ```text
//! agentvm-bench --json out.json [--boots 5] [--reverts 30] [--execs 200]
//!               [--acquires 200] [--file-mib 16] [--file-rounds 3] [--warmup-vms 4]
//!               [--revert-write-mib 0]
//! ```
//!
//! `--revert-write-mib N` makes the change before each revert also write N
//! MiB outside the workspace (`/tmp/agentvm-fill`), so the revert has that
//! much guest memory to undo (the `agent` image rows of `cargo xtask bench`).
//!
//! Phases, in order: cold boots (the last VM is kept) → reverts → exec
//! round trips → file put/get → pool warm-up of `--warmup-vms` VMs →
//! acquires from that warm pool → (QEMU backend) starts from the golden
//! cache and a pool warm-up from it. Every VM is destroyed before exit.
//!
//! The cold phases run with the golden cache off (`golden_cache = false`);
//! the golden-cache phases use a cache of their own in a fresh runtime
//! directory, so what the user's runs left behind changes nothing.
//!
//! Progress goes to stderr as `@phase <text>` and `@note <text>` lines, which
//! `cargo xtask bench` turns into its progress output.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentvm_runtime::backend::qemu::accel;
use agentvm_runtime::backend::qemu::transport::detect_transport;
use agentvm_runtime::backend::qemu::{QemuBackend, QemuConfig};
use agentvm_runtime::backend::{Backend, BackendError, Machine};
use agentvm_runtime::command::Command;
use agentvm_runtime::config::{create_backend, AgentVmConfig, BackendKind};
use agentvm_runtime::image::locate_image;
use agentvm_runtime::pool::{PoolConfig, VmPool};
use agentvm_runtime::spec::VmSpec;
use agentvm_runtime::vm::Vm;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

/// Version of the raw output read by `cargo xtask bench`.
const RAW_FORMAT: u32 = 1;
/// Deadline of the pool warm-up and of each wait for the pool to settle.
const POOL_WAIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
struct Args {
    json: PathBuf,
    boots: usize,
    reverts: usize,
    execs: usize,
    acquires: usize,
    file_mib: usize,
    file_rounds: usize,
    warmup_vms: usize,
    revert_write_mib: usize,
}

impl Args {
    fn parse(mut argv: impl Iterator<Item = String>) -> Result<Self> {
        let mut args = Self {
            json: PathBuf::new(),
            boots: 5,
            reverts: 30,
            execs: 200,
            acquires: 200,
            file_mib: 16,
            file_rounds: 3,
            warmup_vms: 4,
            revert_write_mib: 0,
        };
        let mut json = None;
        while let Some(flag) = argv.next() {
            let value = argv
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            let count = || -> Result<usize> {
                let n: usize = value
                    .parse()
                    .with_context(|| format!("{flag}: {value:?} is not a whole number"))?;
                ensure!(n >= 1, "{flag} must be at least 1");
                Ok(n)
            };
            match flag.as_str() {
                "--json" => json = Some(PathBuf::from(&value)),
                "--boots" => args.boots = count()?,
                "--reverts" => args.reverts = count()?,
                "--execs" => args.execs = count()?,
                "--acquires" => args.acquires = count()?,
                "--file-mib" => args.file_mib = count()?,
                "--file-rounds" => args.file_rounds = count()?,
                "--warmup-vms" => args.warmup_vms = count()?,
                "--revert-write-mib" => {
                    args.revert_write_mib = value
                        .parse()
                        .with_context(|| format!("{flag}: {value:?} is not a whole number"))?
                }
                other => bail!("unknown argument {other:?} (see the doc comment of agentvm-bench)"),
            }
        }
        args.json = json.context("--json PATH is required")?;
        Ok(args)
    }
}

/// The raw samples (durations in ms unless the name says otherwise).
#[derive(Debug, Default, Serialize)]
struct Raw {
    format: u32,
    backend: String,
    accelerator: String,
    accelerator_reason: String,
    transport: String,
    transport_reason: String,
    image: String,
    guest_memory_mib: u32,
    guest_vcpus: u32,
    cold_boots: Vec<ColdBoot>,
    reverts: Vec<Revert>,
    exec_true_ms: Vec<f64>,
    /// Round trip of a ping over the control channel (same count as execs).
    ping_ms: Vec<f64>,
    /// The command of `Revert::first_exec_ms`, on a warm VM (same count as reverts).
    warm_shell_write_ms: Vec<f64>,
    file: FileTransfer,
    /// The stream tunnel (`Vm::tunnel_listen`) on the same VM.
    tunnel: TunnelBench,
    pool_warmup: PoolWarmup,
    acquire_us: Vec<f64>,
    /// Acquires as tests see them with the pool busy: twice as many workers
    /// as VMs, each acquiring, running `true` and releasing in a loop; the
    /// wait includes queueing behind the others and the background revert.
    acquire_busy_ms: Vec<f64>,
    /// Starts from the golden cache (QEMU backend): launch until the
    /// channel is in step. Empty when the backend has no golden cache.
    restore_ms: Vec<f64>,
    /// The pool warm-up again, its VMs started from the golden cache.
    pool_warmup_restored: Option<PoolWarmup>,
    vm_memory: Vec<VmMemory>,
    bench_process_hwm_kib: Option<u64>,
}

#[derive(Debug, Serialize)]
struct ColdBoot {
    to_hello_ms: f64,
    snapshot_ms: f64,
    /// `None` for the VM kept for the next phases.
    destroy_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Revert {
    total_ms: f64,
    restore_ms: f64,
    resync_ms: f64,
    /// The first command after the revert (a one-line shell write), after
    /// the warm-up when `warm_up_ms` is set.
    first_exec_ms: f64,
    /// [`Vm::warm_up`] between the revert and the first command, as the pool
    /// does after every revert (every other revert; `None` on the others).
    warm_up_ms: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
struct FileTransfer {
    size_bytes: u64,
    put_ms: Vec<f64>,
    get_ms: Vec<f64>,
}

#[derive(Debug, Default, Serialize)]
struct TunnelBench {
    size_bytes: u64,
    /// A guest `wget` downloading `size_bytes` from a host responder.
    host_to_guest_ms: Vec<f64>,
    /// A guest `dd | nc` uploading `size_bytes`, from accept to the last byte.
    guest_to_host_ms: Vec<f64>,
    /// 16-byte round trips through a guest echo (`nc -e cat`); compare with `ping_ms`.
    echo_rtt_ms: Vec<f64>,
}

#[derive(Debug, Default, Serialize)]
struct PoolWarmup {
    vms: usize,
    wall_ms: f64,
    /// Boot timings of the pool's VMs (booted in parallel).
    vm_to_hello_ms: Vec<f64>,
    vm_snapshot_ms: Vec<f64>,
}

/// Peak RSS of one QEMU process (`VmHWM`), read just before the VM is destroyed.
#[derive(Debug, Serialize)]
struct VmMemory {
    vm: String,
    pid: u32,
    /// `cold-boot` (just booted), `used` (after reverts, execs, files), `pool`.
    phase: &'static str,
    hwm_kib: u64,
}

/// The configured backend, remembering the pid of every QEMU it starts (for memory).
struct RecordingBackend {
    inner: Arc<dyn Backend>,
    pids: Mutex<Vec<(String, u32)>>,
}

impl RecordingBackend {
    fn pid_of(&self, vm: &str) -> Option<u32> {
        let pids = self.pids.lock().expect("pid list");
        pids.iter().find(|(id, _)| id == vm).map(|(_, pid)| *pid)
    }

    fn launched_since(&self, index: usize) -> Vec<(String, u32)> {
        self.pids.lock().expect("pid list")[index..].to_vec()
    }

    fn launched(&self) -> usize {
        self.pids.lock().expect("pid list").len()
    }
}

#[async_trait::async_trait]
impl Backend for RecordingBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Machine>, BackendError> {
        let machine = self.inner.launch(spec).await?;
        if let Some(pid) = machine.host_pid() {
            let id = machine.id().to_string();
            self.pids.lock().expect("pid list").push((id, pid));
        }
        Ok(machine)
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`).
fn status_kib(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Throughput both ways and echo latency through `Vm::tunnel_listen`.
async fn measure_tunnel(vm: &mut Vm, size: usize, echoes: usize) -> Result<TunnelBench> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PORT: u16 = 9000;
    let mut out = TunnelBench {
        size_bytes: size as u64,
        ..TunnelBench::default()
    };
    let mut listener = vm.tunnel_listen(PORT).await?;

    // host → guest: an HTTP/1.0 answer of `size` bytes to a guest wget.
    let server = tokio::spawn(async move {
        let mut stream = listener.accept().await?;
        let start = Instant::now();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await? == 1 {
            head.push(byte[0]);
        }
        let header = format!("HTTP/1.0 200 OK\r\nContent-Length: {size}\r\n\r\n");
        stream.write_all(header.as_bytes()).await?;
        stream.write_all(&vec![0x5a; size]).await?;
        stream.shutdown().await?;
        anyhow::Ok((start, listener))
    });
    let got = vm
        .exec(Command::shell(format!(
            "wget -q -O- http://127.0.0.1:{PORT}/ | wc -c"
        )))
        .await?;
    let (start, mut listener) = server.await??;
    out.host_to_guest_ms.push(ms(start.elapsed()));
    ensure!(
        String::from_utf8_lossy(&got.stdout).trim() == size.to_string(),
        "the guest received {:?} bytes through the tunnel, not {size}",
        String::from_utf8_lossy(&got.stdout).trim()
    );

    // guest → host: dd into nc, timed from accept to the last byte.
    let mut upload = vm
        .spawn(Command::shell(format!(
            "dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc 127.0.0.1 {PORT}",
            size.div_ceil(65536)
        )))
        .await?;
    let mut stream = listener.accept().await?;
    let start = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    while total < size {
        let n = stream.read(&mut buf).await?;
        ensure!(n > 0, "upload ended after {total} bytes");
        total += n;
    }
    out.guest_to_host_ms.push(ms(start.elapsed()));
    drop(stream);
    while upload.next_event().await?.is_some() {}

    // Latency: small round trips through a guest echo.
    let _echo = vm
        .spawn(Command::shell(format!("nc 127.0.0.1 {PORT} -e cat")))
        .await?;
    let mut stream = listener.accept().await?;
    let mut reply = [0u8; 16];
    for i in 0..echoes {
        let sent = [i as u8; 16];
        let start = Instant::now();
        stream.write_all(&sent).await?;
        stream.read_exact(&mut reply).await?;
        out.echo_rtt_ms.push(ms(start.elapsed()));
        ensure!(reply == sent, "the echo differs");
    }
    drop(stream);
    drop(listener);
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn phase(text: impl AsRef<str>) {
    eprintln!("@phase {}", text.as_ref());
}

fn note(text: impl AsRef<str>) {
    eprintln!("@note {}", text.as_ref());
}

/// Deterministic incompressible-looking bytes (xorshift64).
fn test_data(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(len);
    data
}

async fn wait_available(pool: &VmPool, want: usize) -> Result<()> {
    let deadline = Instant::now() + POOL_WAIT;
    loop {
        let status = pool.status();
        if status.available >= want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the pool did not get {want} VMs ready within {POOL_WAIT:?} ({status})"
        );
        ensure!(
            status.failed == 0,
            "a pool VM failed ({status}); see the warnings above"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn run(args: &Args) -> Result<Raw> {
    let config = AgentVmConfig::load().context("reading the agentvm configuration")?;
    ensure!(
        matches!(config.backend, BackendKind::Qemu | BackendKind::Libvirt),
        "agentvm-bench measures real VMs: the configured backend is {} (set AGENT_VM_BACKEND=qemu or libvirt)",
        config.backend.name()
    );
    let image = locate_image(&config.image, &config.image_dir)?;
    let spec = config.vm_spec(image);
    let inner = create_backend(&AgentVmConfig {
        golden_cache: false,
        ..config.clone()
    })?;
    // Both backends make the same accelerator decision (backend::qemu::accel);
    // libvirt's channel is always virtio-serial.
    let auto = accel::detect(agentvm_runtime::spec::Accel::Auto);
    let (transport, transport_reason) = match config.backend {
        BackendKind::Libvirt => (
            "virtio-serial".to_string(),
            "the libvirt backend always uses a virtio-serial channel".to_string(),
        ),
        _ => {
            let t = detect_transport();
            (t.transport.to_string(), t.reason)
        }
    };
    let mut raw = Raw {
        format: RAW_FORMAT,
        backend: config.backend.name().into(),
        accelerator: match spec.accel {
            agentvm_runtime::spec::Accel::Auto => auto.accel.to_string(),
            agentvm_runtime::spec::Accel::Kvm => "kvm".into(),
            agentvm_runtime::spec::Accel::Tcg => "tcg".into(),
        },
        accelerator_reason: match spec.accel {
            agentvm_runtime::spec::Accel::Auto => auto.reason,
            _ => "set by the agentvm configuration (accel / AGENT_VM_ACCEL)".into(),
        },
        transport,
        transport_reason,
        image: config.image.clone(),
        guest_memory_mib: spec.profile.memory_mib(),
        guest_vcpus: spec.profile.vcpus(),
        ..Raw::default()
    };
    let backend = Arc::new(RecordingBackend {
        inner,
        pids: Mutex::new(Vec::new()),
    });
    note(format!(
        "accelerator {} ({}), transport {}, image {:?}, guest {} vCPU / {} MiB",
        raw.accelerator,
        raw.accelerator_reason,
        raw.transport,
        raw.image,
        raw.guest_vcpus,
        raw.guest_memory_mib
    ));

    // 1. Cold boots; the last VM stays up for the next phases.
    phase(format!(
        "cold boot to guest Hello + golden snapshot, {} VMs one after the other",
        args.boots
    ));
    let mut kept = None;
    for i in 0..args.boots {
        let vm = Vm::boot(backend.as_ref(), spec.clone()).await?;
        let timings = vm.boot_timings();
        let pid = backend.pid_of(vm.id());
        let mut boot = ColdBoot {
            to_hello_ms: ms(timings.to_hello),
            snapshot_ms: ms(timings.snapshot),
            destroy_ms: None,
        };
        if let Some(pid) = pid {
            if let Some(hwm) = status_kib(&pid.to_string(), "VmHWM") {
                raw.vm_memory.push(VmMemory {
                    vm: vm.id().to_string(),
                    pid,
                    phase: "cold-boot",
                    hwm_kib: hwm,
                });
            }
        }
        if i + 1 == args.boots {
            kept = Some(vm);
        } else {
            let start = Instant::now();
            vm.destroy().await?;
            boot.destroy_ms = Some(ms(start.elapsed()));
        }
        note(format!(
            "boot {}/{}: Hello after {:.0} ms, snapshot {:.0} ms",
            i + 1,
            args.boots,
            boot.to_hello_ms,
            boot.snapshot_ms
        ));
        raw.cold_boots.push(boot);
    }
    let mut vm = kept.expect("at least one boot");

    // 2. Reverts, each after a change in the guest.
    // The change after each revert is timed too: the first command after a
    // revert is slower than a warm one (under TCG the translated code is gone).
    phase(format!(
        "revert to the golden snapshot, n = {}",
        args.reverts
    ));
    let fill = match args.revert_write_mib {
        0 => String::new(),
        mib => format!(" && head -c {} /dev/zero > /tmp/agentvm-fill", mib << 20),
    };
    vm.exec(Command::shell(format!("echo start > /workspace/f{fill}")))
        .await?;
    for i in 0..args.reverts {
        let t = vm.revert().await?;
        // Every other revert is followed by the pool's warm-up, so that one
        // run gives the first command both cold and warmed.
        let warm_up_ms = if i % 2 == 1 {
            Some(ms(vm.warm_up().await?))
        } else {
            None
        };
        let start = Instant::now();
        vm.exec(Command::shell(format!("echo {i} > /workspace/f{fill}")))
            .await?;
        raw.reverts.push(Revert {
            total_ms: ms(t.total),
            restore_ms: ms(t.restore),
            resync_ms: ms(t.resync.elapsed),
            first_exec_ms: ms(start.elapsed()),
            warm_up_ms,
        });
    }

    // 3. Exec round trips.
    phase(format!("exec round trip of `true`, n = {}", args.execs));
    for _ in 0..10 {
        vm.exec(Command::new("true")).await?;
    }
    for _ in 0..args.execs {
        let start = Instant::now();
        let out = vm.exec(Command::new("true")).await?;
        raw.exec_true_ms.push(ms(start.elapsed()));
        ensure!(
            out.report.status == agentvm_runtime::protocol::ExitStatus::Code(0),
            "`true` failed in the guest: {:?}",
            out.report.status
        );
    }

    // The channel alone: a ping answered by the guest agent (no process).
    for _ in 0..args.execs {
        raw.ping_ms.push(ms(vm.ping().await?));
    }
    // The command timed after each revert, on a warm VM.
    for i in 0..args.reverts {
        let start = Instant::now();
        vm.exec(Command::shell(format!("echo {i} > /workspace/f")))
            .await?;
        raw.warm_shell_write_ms.push(ms(start.elapsed()));
    }

    // 4. File put/get.
    let size = args.file_mib * 1024 * 1024;
    phase(format!(
        "file put/get of {} MiB, {} round(s)",
        args.file_mib, args.file_rounds
    ));
    let data = test_data(size);
    raw.file.size_bytes = size as u64;
    for round in 0..args.file_rounds {
        let start = Instant::now();
        vm.write_file("bench.bin", &data, 0o644).await?;
        let put = start.elapsed();
        let start = Instant::now();
        let (back, _mode) = vm.read_file("bench.bin").await?;
        let get = start.elapsed();
        ensure!(
            back == data,
            "the file read back differs from the one written"
        );
        raw.file.put_ms.push(ms(put));
        raw.file.get_ms.push(ms(get));
        note(format!(
            "round {}/{}: put {:.0} ms, get {:.0} ms",
            round + 1,
            args.file_rounds,
            ms(put),
            ms(get)
        ));
    }
    drop(data);

    // 4b. The stream tunnel.
    phase(format!(
        "tunnel: {} MiB each way, {} echo round trips",
        args.file_mib, args.execs
    ));
    // The measurement drives busybox wget and nc in the guest; an image
    // without them (the Debian agent image) is not measured.
    let tools = vm
        .exec(Command::shell(
            "command -v wget >/dev/null && command -v nc >/dev/null && nc --help 2>&1 | grep -q -- -e",
        ))
        .await?;
    if tools.report.status == agentvm_runtime::protocol::ExitStatus::Code(0) {
        // Never let a guest that does not connect hang the whole bench.
        raw.tunnel = tokio::time::timeout(
            Duration::from_secs(300),
            measure_tunnel(&mut vm, size, args.execs),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the tunnel measurement did not finish within 300 s"))??;
        note(format!(
            "host → guest {:.0} ms, guest → host {:.0} ms",
            raw.tunnel.host_to_guest_ms[0], raw.tunnel.guest_to_host_ms[0]
        ));
    } else {
        note("this image has no busybox wget/nc: tunnel not measured");
    }
    if let Some(pid) = backend.pid_of(vm.id()) {
        if let Some(hwm) = status_kib(&pid.to_string(), "VmHWM") {
            raw.vm_memory.push(VmMemory {
                vm: vm.id().to_string(),
                pid,
                phase: "used",
                hwm_kib: hwm,
            });
        }
    }
    vm.destroy().await?;

    // 5. Pool warm-up.
    phase(format!(
        "pool warm-up: {} VMs (min_size = max_size = {})",
        args.warmup_vms, args.warmup_vms
    ));
    let first_pool_vm = backend.launched();
    let started = Instant::now();
    let pool = VmPool::new(
        backend.clone(),
        PoolConfig::fixed(args.warmup_vms, spec.clone()),
    )?;
    let result = measure_pool(args, &pool, started, &mut raw).await;
    for (vm, pid) in backend.launched_since(first_pool_vm) {
        if let Some(hwm) = status_kib(&pid.to_string(), "VmHWM") {
            raw.vm_memory.push(VmMemory {
                vm,
                pid,
                phase: "pool",
                hwm_kib: hwm,
            });
        }
    }
    pool.shutdown().await;
    result?;
    if config.backend == BackendKind::Qemu {
        measure_golden_cache(args, &spec, &mut raw).await?;
    }
    raw.bench_process_hwm_kib = status_kib("self", "VmHWM");
    Ok(raw)
}

/// Starts from the golden cache: one boot shares its golden snapshot, then
/// `--boots` VMs start from it one after the other, then a pool of
/// `--warmup-vms` starts from it.
async fn measure_golden_cache(args: &Args, spec: &VmSpec, raw: &mut Raw) -> Result<()> {
    let runtime = tempfile::Builder::new()
        .prefix("agentvm-bench-")
        .tempdir()
        .context("creating a runtime directory for the golden cache")?;
    let backend = Arc::new(QemuBackend::new(QemuConfig {
        runtime_dir: Some(runtime.path().to_path_buf()),
        golden_cache: true,
        ..QemuConfig::default()
    })?);
    phase(format!(
        "golden cache: one boot shares its snapshot, then {} VMs start from it one after the other",
        args.boots
    ));
    let first = Vm::boot(backend.as_ref(), spec.clone()).await?;
    ensure!(
        !first.boot_timings().restored,
        "the golden cache in a fresh runtime directory was not empty"
    );
    first.destroy().await?;
    for i in 0..args.boots {
        let mut vm = Vm::boot(backend.as_ref(), spec.clone()).await?;
        let timings = vm.boot_timings();
        ensure!(
            timings.restored,
            "VM {} booted instead of starting from the golden cache",
            vm.id()
        );
        vm.exec(Command::new("true")).await?;
        vm.destroy().await?;
        raw.restore_ms.push(ms(timings.to_hello));
        note(format!(
            "start {}/{}: ready after {:.0} ms",
            i + 1,
            args.boots,
            ms(timings.to_hello)
        ));
    }
    phase(format!(
        "pool warm-up from the golden cache: {} VMs",
        args.warmup_vms
    ));
    let started = Instant::now();
    let pool = VmPool::new(backend, PoolConfig::fixed(args.warmup_vms, spec.clone()))?;
    let result = warm_up(&pool, args.warmup_vms, started, true).await;
    pool.shutdown().await;
    raw.pool_warmup_restored = Some(result?);
    Ok(())
}

/// Waits until the pool created at `started` has its `size` VMs ready and
/// collects their boot timings (these acquires are not samples); `restored`:
/// every VM must have started from the golden cache.
async fn warm_up(
    pool: &VmPool,
    size: usize,
    started: Instant,
    restored: bool,
) -> Result<PoolWarmup> {
    pool.wait_ready(POOL_WAIT).await?;
    let mut warmup = PoolWarmup {
        vms: size,
        wall_ms: ms(started.elapsed()),
        ..PoolWarmup::default()
    };
    let mut leases = Vec::new();
    for _ in 0..size {
        leases.push(pool.acquire(Duration::from_secs(60)).await?);
    }
    for lease in &leases {
        let t = lease.boot_timings();
        ensure!(
            t.restored == restored,
            "a pool VM {} (expected: {})",
            if t.restored {
                "started from the golden cache"
            } else {
                "booted"
            },
            if restored {
                "from the golden cache"
            } else {
                "a boot"
            }
        );
        warmup.vm_to_hello_ms.push(ms(t.to_hello));
        warmup.vm_snapshot_ms.push(ms(t.snapshot));
    }
    note(format!("{size} VMs ready after {:.0} ms", warmup.wall_ms));
    Ok(warmup)
}

/// Warm-up wall time, then acquires from the warm pool.
async fn measure_pool(args: &Args, pool: &VmPool, started: Instant, raw: &mut Raw) -> Result<()> {
    let size = args.warmup_vms;
    raw.pool_warmup = warm_up(pool, size, started, false).await?;

    // Acquires: all VMs idle, then take them one by one (each acquire finds
    // an idle VM), give them back (reverted in the background), repeat.
    phase(format!(
        "pool acquire from a warm pool of {size}, n = {}",
        args.acquires
    ));
    while raw.acquire_us.len() < args.acquires {
        wait_available(pool, size).await?;
        let mut leases = Vec::new();
        while leases.len() < size && raw.acquire_us.len() < args.acquires {
            let start = Instant::now();
            let lease = pool.acquire(Duration::from_secs(60)).await?;
            raw.acquire_us.push(start.elapsed().as_secs_f64() * 1e6);
            leases.push(lease);
        }
    }
    wait_available(pool, size).await?;

    // Under load: 2 × size workers share the pool, so every acquire queues.
    let workers = 2 * size;
    let per_worker = args.acquires.div_ceil(workers);
    phase(format!(
        "pool acquire under load: {workers} workers on {size} VMs, n = {}",
        workers * per_worker
    ));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut waits = Vec::with_capacity(per_worker);
                for _ in 0..per_worker {
                    let start = Instant::now();
                    let mut lease = pool.acquire(Duration::from_secs(120)).await?;
                    waits.push(ms(start.elapsed()));
                    lease.exec(Command::new("true")).await?;
                    drop(lease);
                }
                anyhow::Ok(waits)
            })
        })
        .collect();
    for task in tasks {
        raw.acquire_busy_ms
            .extend(task.await.context("an acquire worker panicked")??);
    }
    wait_available(pool, size).await?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("agentvm-bench: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    // The runtime's warnings (a VM that failed, a pool replacing one) on
    // stderr; `AGENTVM_LOG=debug` for more, as with the `agentvm` CLI.
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(&args)).and_then(|raw| {
        let text = serde_json::to_string_pretty(&raw)?;
        std::fs::write(&args.json, text).with_context(|| format!("writing {}", args.json.display()))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentvm-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
