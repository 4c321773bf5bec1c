//! Real-VM latencies under the configured accelerator (TCG on machines without
//! usable KVM): `cargo bench -p agentvm-runtime --bench vm`.
//!
//! Needs the guest image (`cargo xtask build-image`). Prints cold boot to
//! Hello, golden snapshot, revert p50/p90/p99 (n = 30), exec round trip of
//! `true` p50/p99 (n = 200), and pool acquire from a warm pool p50/p99
//! (n = 200).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_runtime::backend::qemu::{QemuBackend, QemuConfig};
use agentvm_runtime::command::Command;
use agentvm_runtime::image::locate_image;
use agentvm_runtime::pool::{PoolConfig, VmPool};
use agentvm_runtime::spec::{Accel, NetworkMode, ResourceProfile, VmSpec};
use agentvm_runtime::vm::Vm;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<24} n={:<4} p50 {:>9.3} ms  p90 {:>9.3} ms  p99 {:>9.3} ms  max {:>9.3} ms",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.9)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap()),
    );
}

fn spec() -> VmSpec {
    let images = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/agentvm/images");
    VmSpec {
        image: locate_image("default", &images).unwrap_or_else(|e| panic!("{e}")),
        profile: ResourceProfile::Minimal,
        network: NetworkMode::Isolated,
        accel: Accel::Auto,
        boot_timeout: Duration::from_secs(120),
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let backend = Arc::new(QemuBackend::new(QemuConfig::default()).unwrap());
        println!(
            "accelerator: {} ({})",
            backend.auto_accel().accel,
            backend.auto_accel().reason
        );

        let mut vm = Vm::boot(backend.as_ref(), spec()).await.unwrap();
        let boot = vm.boot_timings();
        println!("{:<24} {:>9.3} ms", "cold boot to Hello", ms(boot.to_hello));
        println!("{:<24} {:>9.3} ms", "golden snapshot", ms(boot.snapshot));

        let mut reverts = Vec::new();
        let mut restores = Vec::new();
        for i in 0..30 {
            vm.exec(Command::shell(format!("echo {i} > /workspace/f")))
                .await
                .unwrap();
            let t = vm.revert().await.unwrap();
            reverts.push(t.total);
            restores.push(t.restore);
        }
        report("revert (total)", reverts);
        report("revert (loadvm only)", restores);

        let mut execs = Vec::new();
        for _ in 0..200 {
            let start = Instant::now();
            vm.exec(Command::new("true")).await.unwrap();
            execs.push(start.elapsed());
        }
        report("exec `true`", execs);
        vm.destroy().await.unwrap();

        let config = PoolConfig {
            min_size: 2,
            max_size: 2,
            max_uses: None,
            ttl: None,
            health_interval: None,
            spec: spec(),
        };
        let pool = VmPool::new(backend.clone(), config).unwrap();
        pool.wait_ready(Duration::from_secs(300)).await.unwrap();
        let mut acquires = Vec::new();
        for _ in 0..200 {
            // Warm pool: both VMs idle before each acquire.
            while pool.status().available < 2 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let start = Instant::now();
            let lease = pool.acquire(Duration::from_secs(60)).await.unwrap();
            acquires.push(start.elapsed());
            drop(lease);
        }
        report("pool acquire (warm)", acquires);
        pool.shutdown().await;
    });
}
