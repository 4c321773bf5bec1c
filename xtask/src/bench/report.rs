//! The benchmark report: built from the measuring program's raw samples, the
//! suite runs and the memory sampler; written as JSON (schema in the README,
//! "Benchmark report (JSON)") and printed as a table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use super::machine::Machine;
use super::procs::{MemoryStats, INTERVAL};
use super::stats::{round3, Summary};
use super::suite::SuiteRun;

/// Version of the JSON report. Fields are only ever added, never renamed or
/// removed; a change that would break readers bumps this.
pub const SCHEMA_VERSION: u32 = 1;

/// Targets of the issue.
pub const TARGET_SUITE_SPEEDUP: f64 = 8.0;
pub const TARGET_REVERT_P50_MS: f64 = 50.0;
pub const TARGET_ACQUIRE_P50_MS: f64 = 1.0;
pub const TARGET_EXEC_P50_MS: f64 = 5.0;
/// The first command on a VM the pool reverted (and warmed up), against the
/// same command on a warm VM.
pub const TARGET_FIRST_COMMAND_RATIO: f64 = 2.0;
pub const TARGET_QUICK_RUN_S: f64 = 300.0;

/// The minimum sample counts of the issue (the full run meets them).
pub const MIN_BOOTS: usize = 5;
pub const MIN_REVERTS: usize = 30;
pub const MIN_ACQUIRES: usize = 200;
pub const MIN_EXECS: usize = 200;
pub const DEFAULT_SUITE_TESTS: usize = 40;

// ---------------------------------------------------------------------------
// Raw samples written by `agentvm-bench` (examples/bench-suite/src/main.rs).

#[derive(Debug, Clone, Deserialize)]
pub struct Raw {
    pub format: u32,
    pub backend: String,
    pub accelerator: String,
    pub accelerator_reason: String,
    pub transport: String,
    pub image: String,
    pub guest_memory_mib: u32,
    pub guest_vcpus: u32,
    pub cold_boots: Vec<RawBoot>,
    pub reverts: Vec<RawRevert>,
    pub exec_true_ms: Vec<f64>,
    pub ping_ms: Vec<f64>,
    pub warm_shell_write_ms: Vec<f64>,
    pub file: RawFile,
    /// The stream tunnel (absent in the output of older bench programs).
    #[serde(default)]
    pub tunnel: Option<RawTunnel>,
    pub pool_warmup: RawWarmup,
    pub acquire_us: Vec<f64>,
    /// Acquires with the pool busy (absent in the output of older bench programs).
    #[serde(default)]
    pub acquire_busy_ms: Vec<f64>,
    /// Starts from the golden cache (empty when the backend has none).
    #[serde(default)]
    pub restore_ms: Vec<f64>,
    #[serde(default)]
    pub pool_warmup_restored: Option<RawWarmup>,
    pub vm_memory: Vec<RawVmMemory>,
    pub bench_process_hwm_kib: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawBoot {
    pub to_hello_ms: f64,
    pub snapshot_ms: f64,
    pub destroy_ms: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawRevert {
    pub total_ms: f64,
    pub restore_ms: f64,
    pub resync_ms: f64,
    pub first_exec_ms: f64,
    /// The pool's warm-up ran between the revert and the command.
    #[serde(default)]
    pub warm_up_ms: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawFile {
    pub size_bytes: u64,
    pub put_ms: Vec<f64>,
    pub get_ms: Vec<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawTunnel {
    pub size_bytes: u64,
    pub host_to_guest_ms: Vec<f64>,
    pub guest_to_host_ms: Vec<f64>,
    pub echo_rtt_ms: Vec<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawWarmup {
    pub vms: usize,
    pub wall_ms: f64,
    pub vm_to_hello_ms: Vec<f64>,
    pub vm_snapshot_ms: Vec<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawVmMemory {
    pub hwm_kib: u64,
}

impl Raw {
    pub fn parse(json: &str) -> Result<Self> {
        let raw: Self = serde_json::from_str(json)?;
        ensure!(
            raw.format == 1,
            "unknown agentvm-bench output format {}",
            raw.format
        );
        ensure!(
            !raw.cold_boots.is_empty()
                && !raw.reverts.is_empty()
                && !raw.exec_true_ms.is_empty()
                && !raw.ping_ms.is_empty()
                && !raw.warm_shell_write_ms.is_empty()
                && !raw.file.put_ms.is_empty()
                && !raw.file.get_ms.is_empty()
                && !raw.pool_warmup.vm_to_hello_ms.is_empty()
                && !raw.acquire_us.is_empty(),
            "agentvm-bench output lacks samples of a phase"
        );
        Ok(raw)
    }
}

/// Summary of samples that are known to be there ([`Raw::parse`] checked).
fn summary(samples: impl IntoIterator<Item = f64>) -> Summary {
    let samples: Vec<f64> = samples.into_iter().collect();
    Summary::of(&samples).unwrap_or(Summary {
        n: 0,
        p50: 0.0,
        p90: 0.0,
        p99: 0.0,
        min: 0.0,
        max: 0.0,
        mean: 0.0,
    })
}

// ---------------------------------------------------------------------------
// The report.

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub tool: String,
    /// RFC 3339 UTC.
    pub started_at: String,
    /// Whole run, including building the programs.
    pub duration_s: f64,
    /// The measuring part (programs already built).
    pub measure_s: f64,
    pub quick: bool,
    pub backend: String,
    pub machine: Machine,
    pub guest: Guest,
    pub samples: Samples,
    pub cold_boot: ColdBoot,
    pub golden_snapshot_ms: Summary,
    pub revert: Revert,
    pub pool_acquire_us: Summary,
    /// Acquire as a test sees it with the pool busy (twice as many workers as
    /// VMs, each acquire → `true` → release): the wait includes queueing
    /// behind the others and the background revert. `null`: not measured.
    pub pool_acquire_busy_ms: Option<Summary>,
    pub exec_true_ms: Summary,
    /// A ping answered by the guest agent: the channel's share of an exec.
    pub channel_ping_ms: Summary,
    pub file_transfer: FileTransfer,
    /// Guest-loopback streams tunnelled over the control channel (`null`: not measured).
    pub tunnel: Option<TunnelReport>,
    pub suite: Suite,
    pub pool_warmup: PoolWarmup,
    /// Starting VMs from the golden cache (`null`: the backend has none).
    pub golden_cache: Option<GoldenCacheReport>,
    pub memory: Memory,
    pub targets: Vec<Target>,
    pub where_the_time_goes: Vec<String>,
    /// Raw samples and the suite logs.
    pub artifacts_dir: String,
    /// The Debian `agent` image, when built (`null` otherwise).
    pub agent_image: Option<super::agent_image::AgentImageReport>,
    /// Docker and vmtest doing the same work, with ratios against this run.
    pub peers: Option<super::peers::PeersReport>,
    /// The suite under cargo-nextest, with and without the pool daemon.
    pub nextest: Option<super::peers::Outcome<super::nextest::NextestReport>>,
    /// A pool over two libvirt hosts vs one (`skipped` says why not measured).
    pub libvirt_two_hosts: Option<super::libvirt_hosts::TwoHostsReport>,
    /// A lease over the pool daemon's socket (`null`: not measured).
    pub daemon_lease: Option<super::daemon_lease::DaemonLeaseReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Guest {
    pub image: String,
    pub memory_mib: u32,
    pub vcpus: u32,
}

/// The sample counts used, and where they are below the issue's minimums.
#[derive(Debug, Clone, Serialize)]
pub struct Samples {
    pub cold_boots: usize,
    pub reverts: usize,
    pub execs: usize,
    pub acquires: usize,
    pub file_rounds: usize,
    pub warmup_vms: usize,
    pub suite_tests: usize,
    pub below_minimums: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ColdBoot {
    /// Launch of QEMU until the guest agent's Hello.
    pub to_hello_ms: Summary,
    /// Until Hello + golden snapshot: when a pool could hand the VM out.
    pub ready_ms: Summary,
    pub destroy_ms: Option<Summary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Revert {
    /// loadvm + channel resync.
    pub total_ms: Summary,
    pub restore_ms: Summary,
    pub resync_ms: Summary,
    /// A one-line shell write right after the revert (no warm-up)...
    pub first_exec_after_ms: Summary,
    /// ...the pool's warm-up after a revert (`Vm::warm_up`, in the
    /// background of a lease's take-back)...
    pub warm_up_ms: Summary,
    /// ...the same shell write after that warm-up...
    pub first_exec_after_warm_up_ms: Summary,
    /// ...and the same command on a warm VM.
    pub warm_exec_ms: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileTransfer {
    pub size_mib: f64,
    /// From the median time.
    pub put_mib_s: f64,
    pub get_mib_s: f64,
    pub put_ms: Summary,
    pub get_ms: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct TunnelReport {
    pub size_mib: f64,
    /// From the median time.
    pub host_to_guest_mib_s: f64,
    pub guest_to_host_mib_s: f64,
    /// 16-byte round trip through a guest echo program.
    pub echo_rtt_ms: Summary,
    /// `echo_rtt_ms.p50 - channel_ping_ms.p50`: what the tunnel and the
    /// guest's TCP loopback add to a bare channel round trip.
    pub added_latency_ms: f64,
}

impl TunnelReport {
    fn from_raw(raw: &RawTunnel, ping_p50_ms: f64) -> Option<Self> {
        let size_mib = raw.size_bytes as f64 / (1024.0 * 1024.0);
        let down = Summary::of(&raw.host_to_guest_ms)?;
        let up = Summary::of(&raw.guest_to_host_ms)?;
        let echo_rtt_ms = Summary::of(&raw.echo_rtt_ms)?;
        Some(Self {
            size_mib,
            host_to_guest_mib_s: round3(size_mib / (down.p50 / 1000.0)),
            guest_to_host_mib_s: round3(size_mib / (up.p50 / 1000.0)),
            added_latency_ms: round3(echo_rtt_ms.p50 - ping_p50_ms),
            echo_rtt_ms,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Suite {
    pub tests: usize,
    pub pool_size: usize,
    /// The pool's VMs start from the golden cache the first run left.
    pub pooled: SuiteRun,
    /// The first run on this machine: the golden cache is empty, the pool's VMs boot.
    pub pooled_first_run: SuiteRun,
    pub naive: SuiteRun,
    pub naive_serial: SuiteRun,
    /// `naive.wall_s / pooled.wall_s` (same concurrency): the headline.
    pub speedup: f64,
    /// `naive.wall_s / pooled_first_run.wall_s`.
    pub speedup_first_run: f64,
    /// `naive_serial.wall_s / pooled.wall_s`.
    pub speedup_vs_serial: f64,
    /// Per-test cost without the pool's warm-up: (naive acquire p50 + naive
    /// test p50) / (pooled test p50 + pooled revert p50). What the ratio
    /// tends to for a long suite.
    pub steady_state_speedup: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolWarmup {
    pub vms: usize,
    /// Pool creation until all its VMs are ready (booted in parallel).
    pub wall_ms: f64,
    /// `vms` × the cold boot's `ready_ms.p50`.
    pub sequential_cold_boots_ms: f64,
    /// `sequential_cold_boots_ms / wall_ms`.
    pub speedup: f64,
    pub vm_to_hello_ms: Summary,
    pub vm_snapshot_ms: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct GoldenCacheReport {
    /// One VM started from the golden cache until its channel is in step.
    pub restore_ms: Summary,
    /// `cold_boot.ready_ms.p50 / restore_ms.p50`.
    pub speedup_vs_cold_boot: f64,
    /// The pool warm-up with its VMs started from the cache.
    pub pool_warmup_vms: usize,
    pub pool_warmup_wall_ms: f64,
    /// `pool_warmup.wall_ms / pool_warmup_wall_ms`.
    pub pool_warmup_speedup: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub sample_interval_ms: u64,
    /// Peak of the summed RSS of this process and all its descendants
    /// (measuring program, test binaries, QEMUs).
    pub peak_total_rss_mib: f64,
    /// Peak of the summed RSS of the QEMU processes alive at once.
    pub peak_qemu_rss_mib: f64,
    pub max_concurrent_vms: usize,
    pub vms_seen: usize,
    /// Each QEMU's own peak RSS (`VmHWM`), over every VM of the run.
    pub per_vm_hwm_mib: Option<Summary>,
    /// The same, read by the measuring program just before each of its VMs was destroyed.
    pub per_vm_hwm_exact_mib: Option<Summary>,
    pub phases: BTreeMap<String, PhaseMemory>,
    /// Peak RSS of the other processes, by name.
    pub processes_hwm_mib: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseMemory {
    pub peak_total_rss_mib: f64,
    pub peak_qemu_rss_mib: f64,
    pub max_concurrent_vms: usize,
    pub per_vm_hwm_mib: Option<Summary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub description: String,
    /// `>= 8`, `<= 150`, ...
    pub target: String,
    pub value: f64,
    pub unit: String,
    pub met: bool,
}

/// Everything the report is made of.
pub struct Inputs {
    pub quick: bool,
    pub backend: String,
    pub started_at: String,
    pub duration_s: f64,
    pub measure_s: f64,
    pub machine: Machine,
    pub samples: Samples,
    pub raw: Raw,
    pub pooled_first_run: SuiteRun,
    pub pooled: SuiteRun,
    pub naive: SuiteRun,
    pub naive_serial: SuiteRun,
    pub memory: MemoryStats,
    pub artifacts_dir: String,
}

fn mib(kib: u64) -> f64 {
    round3(kib as f64 / 1024.0)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b * 100.0).round() / 100.0
    } else {
        0.0
    }
}

impl Report {
    pub fn build(inputs: Inputs) -> Self {
        let Inputs {
            quick,
            backend,
            started_at,
            duration_s,
            measure_s,
            mut machine,
            samples,
            raw,
            pooled_first_run,
            pooled,
            naive,
            naive_serial,
            memory,
            artifacts_dir,
        } = inputs;
        let backend = if raw.backend.is_empty() {
            backend
        } else {
            raw.backend.clone()
        };
        machine.accelerator = raw.accelerator.clone();
        machine.accelerator_reason = raw.accelerator_reason.clone();
        machine.transport = raw.transport.clone();

        let boots = &raw.cold_boots;
        let cold_boot = ColdBoot {
            to_hello_ms: summary(boots.iter().map(|b| b.to_hello_ms)),
            ready_ms: summary(boots.iter().map(|b| b.to_hello_ms + b.snapshot_ms)),
            destroy_ms: Summary::of(
                &boots
                    .iter()
                    .filter_map(|b| b.destroy_ms)
                    .collect::<Vec<_>>(),
            ),
        };
        let golden_snapshot_ms = summary(boots.iter().map(|b| b.snapshot_ms));
        let revert = Revert {
            total_ms: summary(raw.reverts.iter().map(|r| r.total_ms)),
            restore_ms: summary(raw.reverts.iter().map(|r| r.restore_ms)),
            resync_ms: summary(raw.reverts.iter().map(|r| r.resync_ms)),
            first_exec_after_ms: summary(
                raw.reverts
                    .iter()
                    .filter(|r| r.warm_up_ms.is_none())
                    .map(|r| r.first_exec_ms),
            ),
            warm_up_ms: summary(raw.reverts.iter().filter_map(|r| r.warm_up_ms)),
            first_exec_after_warm_up_ms: summary(
                raw.reverts
                    .iter()
                    .filter(|r| r.warm_up_ms.is_some())
                    .map(|r| r.first_exec_ms),
            ),
            warm_exec_ms: summary(raw.warm_shell_write_ms.iter().copied()),
        };
        let size_mib = raw.file.size_bytes as f64 / (1024.0 * 1024.0);
        let put_ms = summary(raw.file.put_ms.iter().copied());
        let get_ms = summary(raw.file.get_ms.iter().copied());
        let file_transfer = FileTransfer {
            size_mib,
            put_mib_s: round3(size_mib / (put_ms.p50 / 1000.0)),
            get_mib_s: round3(size_mib / (get_ms.p50 / 1000.0)),
            put_ms,
            get_ms,
        };
        let per_test = |run: &SuiteRun, boot: bool| {
            let test = run.test_ms.map_or(0.0, |s| s.p50);
            let extra = if boot {
                run.acquire_ms.map_or(0.0, |s| s.p50)
            } else {
                run.revert_ms.map_or(0.0, |s| s.p50)
            };
            test + extra
        };
        let suite = Suite {
            tests: pooled.tests,
            pool_size: pooled.pool_max_size,
            speedup: ratio(naive.wall_s, pooled.wall_s),
            speedup_first_run: ratio(naive.wall_s, pooled_first_run.wall_s),
            speedup_vs_serial: ratio(naive_serial.wall_s, pooled.wall_s),
            steady_state_speedup: ratio(per_test(&naive, true), per_test(&pooled, false)),
            pooled,
            pooled_first_run,
            naive,
            naive_serial,
        };
        let warm = &raw.pool_warmup;
        let sequential = warm.vms as f64 * cold_boot.ready_ms.p50;
        let pool_warmup = PoolWarmup {
            vms: warm.vms,
            wall_ms: round3(warm.wall_ms),
            sequential_cold_boots_ms: round3(sequential),
            speedup: ratio(sequential, warm.wall_ms),
            vm_to_hello_ms: summary(warm.vm_to_hello_ms.iter().copied()),
            vm_snapshot_ms: summary(warm.vm_snapshot_ms.iter().copied()),
        };
        let golden_cache = raw.pool_warmup_restored.as_ref().and_then(|w| {
            let restore_ms = Summary::of(&raw.restore_ms)?;
            Some(GoldenCacheReport {
                speedup_vs_cold_boot: ratio(cold_boot.ready_ms.p50, restore_ms.p50),
                restore_ms,
                pool_warmup_vms: w.vms,
                pool_warmup_wall_ms: round3(w.wall_ms),
                pool_warmup_speedup: ratio(pool_warmup.wall_ms, w.wall_ms),
            })
        });
        let memory = Memory::build(&memory, &raw);
        let pool_acquire_us = summary(raw.acquire_us.iter().copied());
        let exec_true_ms = summary(raw.exec_true_ms.iter().copied());
        let channel_ping_ms = summary(raw.ping_ms.iter().copied());

        let mut targets = vec![
            Target {
                name: "suite_speedup".into(),
                description: format!(
                    "{} trivial tests: pool of {} vs a fresh VM per test, same concurrency",
                    suite.tests, suite.pool_size
                ),
                target: format!(">= {TARGET_SUITE_SPEEDUP}"),
                value: suite.speedup,
                unit: "x".into(),
                met: suite.speedup >= TARGET_SUITE_SPEEDUP,
            },
            Target {
                name: "revert_p50_ms".into(),
                description: "revert to the golden snapshot (loadvm + resync), p50".into(),
                target: format!("<= {TARGET_REVERT_P50_MS}"),
                value: revert.total_ms.p50,
                unit: "ms".into(),
                met: revert.total_ms.p50 <= TARGET_REVERT_P50_MS,
            },
            Target {
                name: "acquire_p50_ms".into(),
                description: "pool acquire from a warm pool, p50".into(),
                target: format!("<= {TARGET_ACQUIRE_P50_MS}"),
                value: pool_acquire_us.p50 / 1000.0,
                unit: "ms".into(),
                met: pool_acquire_us.p50 / 1000.0 <= TARGET_ACQUIRE_P50_MS,
            },
            Target {
                name: "exec_p50_ms".into(),
                description: "exec round trip of `true`, p50".into(),
                target: format!("<= {TARGET_EXEC_P50_MS}"),
                value: exec_true_ms.p50,
                unit: "ms".into(),
                met: exec_true_ms.p50 <= TARGET_EXEC_P50_MS,
            },
            {
                let ratio =
                    revert.first_exec_after_warm_up_ms.p50 / revert.warm_exec_ms.p50.max(1e-9);
                Target {
                    name: "first_command_ratio".into(),
                    description: "first command after a revert and the pool's warm-up vs the \
                                  same command on a warm VM, p50"
                        .into(),
                    target: format!("<= {TARGET_FIRST_COMMAND_RATIO}"),
                    value: round3(ratio),
                    unit: "x".into(),
                    met: ratio <= TARGET_FIRST_COMMAND_RATIO,
                }
            },
        ];
        if quick {
            targets.push(Target {
                name: "quick_run_s".into(),
                description: "the whole `cargo xtask bench --quick` run".into(),
                target: format!("< {TARGET_QUICK_RUN_S}"),
                value: round3(duration_s),
                unit: "s".into(),
                met: duration_s < TARGET_QUICK_RUN_S,
            });
        }
        let mut report = Self {
            schema_version: SCHEMA_VERSION,
            tool: "cargo xtask bench".into(),
            started_at,
            duration_s: round3(duration_s),
            measure_s: round3(measure_s),
            quick,
            backend,
            machine,
            guest: Guest {
                image: raw.image.clone(),
                memory_mib: raw.guest_memory_mib,
                vcpus: raw.guest_vcpus,
            },
            samples,
            cold_boot,
            golden_snapshot_ms,
            revert,
            pool_acquire_us,
            pool_acquire_busy_ms: (!raw.acquire_busy_ms.is_empty())
                .then(|| summary(raw.acquire_busy_ms.iter().copied())),
            exec_true_ms,
            channel_ping_ms,
            tunnel: raw
                .tunnel
                .as_ref()
                .and_then(|t| TunnelReport::from_raw(t, channel_ping_ms.p50)),
            file_transfer,
            suite,
            pool_warmup,
            golden_cache,
            memory,
            targets,
            where_the_time_goes: Vec::new(),
            artifacts_dir,
            agent_image: None,
            peers: None,
            nextest: None,
            libvirt_two_hosts: None,
            daemon_lease: None,
        };
        report.where_the_time_goes = report.explain();
        report
    }

    /// Where the time goes: the suite always, the other targets when missed.
    fn explain(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let s = &self.suite;
        let (p, n) = (&s.pooled, &s.naive);
        let p50 = |x: Option<Summary>| x.map_or(0.0, |s| s.p50);
        let (p_test, p_revert) = (p50(p.test_ms), p50(p.revert_ms));
        let (n_test, n_acquire) = (p50(n.test_ms), p50(n.acquire_ms));
        let warmup_s = p.first_acquire_ms / 1000.0;
        let first = &s.pooled_first_run;
        let cached = self.golden_cache.is_some();
        notes.push(format!(
            "suite, pool of {}: {:.2} s for {} tests = {:.2} s waiting for the pool's first VM \
             (its {} VMs {} when the first test starts; {:.0}% of the \
             wall time) + {:.2} s for the tests: each runs {:.0} ms on its VM (p50), then its VM \
             is reverted on the same test thread ({:.0} ms p50), {} threads → ≈ {:.0} ms per test{}",
            s.pool_size,
            p.wall_s,
            s.tests,
            warmup_s,
            p.pool_min_size,
            if cached {
                "start from the golden cache"
            } else {
                "boot in parallel (no golden cache on this backend)"
            },
            100.0 * warmup_s / p.wall_s.max(1e-9),
            p.wall_s - warmup_s,
            p_test,
            p_revert,
            p.concurrency,
            (p_test + p_revert) / p.concurrency.max(1) as f64,
            if cached {
                format!(
                    ". The first run on a machine (empty cache, the VMs boot and share their \
                     snapshot) waited {:.2} s for its first VM: {:.2} s in all, {:.1}×",
                    first.first_acquire_ms / 1000.0,
                    first.wall_s,
                    s.speedup_first_run,
                )
            } else {
                String::new()
            },
        ));
        notes.push(format!(
            "suite, fresh VM per test: {:.2} s; each test waits {:.0} ms (p50) for its VM \
             (boot to Hello + golden snapshot, {} booting at once on {} CPUs) and runs {:.0} ms \
             → ≈ {:.0} ms per test. Steady-state ratio (no warm-up) ≈ {:.1}×, measured {:.1}× \
             with {} tests ({:.1}× without the pool's warm-up; one test at a time: {:.2} s, {:.1}×)",
            n.wall_s,
            n_acquire,
            n.concurrency,
            self.machine.nproc,
            n_test,
            (n_acquire + n_test) / n.concurrency.max(1) as f64,
            s.steady_state_speedup,
            s.speedup,
            s.tests,
            n.wall_s / (p.wall_s - warmup_s).max(1e-9),
            s.naive_serial.wall_s,
            s.speedup_vs_serial,
        ));
        if p_test > 1.3 * n_test {
            // The pool's wall time if its tests ran as fast as on a fresh VM.
            let pooled_at_fresh_speed = warmup_s
                + s.tests as f64 * (n_test + p_revert) / p.concurrency.max(1) as f64 / 1000.0;
            notes.push(format!(
                "a test takes {:.0} ms on a reverted VM but {:.0} ms on a freshly booted one \
                 (at that speed the pooled run would take ≈ {:.1} s, ratio ≈ {:.1}×): \
                 the first commands after a revert are slow ({:.0} ms p50 for a shell write right \
                 after loadvm vs {:.0} ms warm){}",
                p_test,
                n_test,
                pooled_at_fresh_speed,
                n.wall_s / pooled_at_fresh_speed.max(1e-9),
                self.revert.first_exec_after_ms.p50,
                self.revert.warm_exec_ms.p50,
                if self.machine.accelerator == "tcg" {
                    " — after loadvm QEMU flushes all of TCG's translated code (cpu_common_post_load: \
                     tb_flush + tlb_flush), so the guest agent, busybox and kernel paths are translated \
                     again on every test (a perf profile of the vCPU thread after loadvm: ~9% of its time \
                     runs translated code against ~44% on a warm VM, the rest is mostly TCG \
                     translation; README, Benchmarks)"
                } else {
                    ""
                }
            ));
        }
        let serial_acquire = p50(s.naive_serial.acquire_ms);
        if n.concurrency > 1 && n_acquire > 1.3 * serial_acquire {
            notes.push(format!(
                "with {} fresh VMs booting at once each boot took {:.0} ms (p50) against {:.0} ms \
                 one at a time: the {} CPUs were the bottleneck, so {} threads made the fresh-VM \
                 method only {:.1}× faster than one test at a time",
                n.concurrency,
                n_acquire,
                serial_acquire,
                self.machine.nproc,
                n.concurrency,
                s.naive_serial.wall_s / n.wall_s.max(1e-9)
            ));
        }
        let snapshot = self.golden_snapshot_ms.p50;
        let naive_without_snapshot =
            n.wall_s - s.tests as f64 * snapshot / 1000.0 / n.concurrency.max(1) as f64;
        notes.push(format!(
            "the fresh-VM method also takes a golden snapshot of every VM ({snapshot:.0} ms p50) \
             that a plain boot-per-test runner would skip; without it the ratio would be ≈ {:.1}×",
            naive_without_snapshot / p.wall_s.max(1e-9)
        ));
        if s.speedup < TARGET_SUITE_SPEEDUP {
            let tests_needed = if s.steady_state_speedup > TARGET_SUITE_SPEEDUP {
                // wall_p ≈ warmup + N·cp, wall_n ≈ N·cn; N·cn / (warmup + N·cp) ≥ 8.
                let cp = (p_test + p_revert) / p.concurrency.max(1) as f64 / 1000.0;
                let cn = (n_acquire + n_test) / n.concurrency.max(1) as f64 / 1000.0;
                let denom = cn - TARGET_SUITE_SPEEDUP * cp;
                (denom > 0.0).then(|| (TARGET_SUITE_SPEEDUP * warmup_s / denom).ceil())
            } else {
                None
            };
            notes.push(format!(
                "suite ratio {:.1}× < {TARGET_SUITE_SPEEDUP}×: {}",
                s.speedup,
                match tests_needed {
                    Some(t) => format!(
                        "the pool's one-off warm-up ({warmup_s:.1} s) is not amortised over {} tests; \
                         with these per-test costs the ratio passes {TARGET_SUITE_SPEEDUP}× from ≈ {t:.0} tests",
                        s.tests
                    ),
                    None => format!(
                        "even without the warm-up the pool's per-test cost ({:.0} ms test + {:.0} ms \
                         revert) is more than 1/{TARGET_SUITE_SPEEDUP} of a fresh VM's ({:.0} ms boot + {:.0} ms test)",
                        p_test, p_revert, n_acquire, n_test
                    ),
                }
            ));
        }
        if self.revert.total_ms.p50 > TARGET_REVERT_P50_MS {
            notes.push(format!(
                "revert p50 {:.0} ms > {TARGET_REVERT_P50_MS} ms: loadvm {:.0} ms p50 + channel \
                 resync {:.0} ms p50 (loadvm restores {} MiB of guest RAM)",
                self.revert.total_ms.p50,
                self.revert.restore_ms.p50,
                self.revert.resync_ms.p50,
                self.guest.memory_mib
            ));
        }
        if self.pool_acquire_us.p50 > TARGET_ACQUIRE_P50_MS * 1000.0 {
            notes.push(format!(
                "acquire p50 {:.3} ms > {TARGET_ACQUIRE_P50_MS} ms from a warm pool (max {:.3} ms)",
                self.pool_acquire_us.p50 / 1000.0,
                self.pool_acquire_us.max / 1000.0
            ));
        }
        if self.exec_true_ms.p50 > TARGET_EXEC_P50_MS {
            notes.push(format!(
                "exec round trip p50 {:.1} ms > {TARGET_EXEC_P50_MS} ms: a ping through the channel \
                 and the guest agent takes {:.1} ms (p50), so ≈ {:.1} ms is the guest starting \
                 `true` and reporting its exit (posix_spawn, exec, wait, output streams) on an emulated \
                 CPU ({})",
                self.exec_true_ms.p50,
                self.channel_ping_ms.p50,
                self.exec_true_ms.p50 - self.channel_ping_ms.p50,
                self.machine.accelerator
            ));
        }
        let w = &self.pool_warmup;
        let parallel = w.vms.min(self.machine.nproc).max(1);
        notes.push(format!(
            "pool warm-up: the pool boots its {} VMs in parallel, but {} — {} vs {} × {} = {} \
             ({:.1}×; each VM ready after {} p50 instead of {})",
            w.vms,
            if self.machine.accelerator == "tcg" {
                format!(
                    "under TCG each booting VM keeps a host CPU busy, so {} CPUs run at most \
                     {parallel} boots at full speed",
                    self.machine.nproc
                )
            } else {
                format!(
                    "{} CPUs run at most {parallel} boots at full speed",
                    self.machine.nproc
                )
            },
            Unit::Ms.show(w.wall_ms),
            w.vms,
            Unit::Ms.show(self.cold_boot.ready_ms.p50),
            Unit::Ms.show(w.sequential_cold_boots_ms),
            w.speedup,
            Unit::Ms.show(w.vm_to_hello_ms.p50 + w.vm_snapshot_ms.p50),
            Unit::Ms.show(self.cold_boot.ready_ms.p50),
        ));
        // Before the run nothing of ours ran: the load at the start is other work.
        let load = |l: &[f64]| l.first().copied().unwrap_or(0.0);
        let load_start = load(&self.machine.loadavg_start);
        if load_start > 0.5 * self.machine.nproc as f64 {
            notes.push(format!(
                "other work shared the machine (1-min load average {load_start:.2} before the run \
                 started, {:.2} at its end including its own VMs, on {} CPUs): CPU-bound numbers \
                 (boot, revert, exec under TCG) are inflated and vary between runs",
                load(&self.machine.loadavg_end),
                self.machine.nproc
            ));
        }
        notes
    }

    /// The table printed at the end of a run.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "agentvm bench — backend {}, accelerator {} ({}), {}",
            self.backend, m.accelerator, m.accelerator_reason, m.qemu_version
        );
        let _ = writeln!(
            out,
            "machine: {} × {}, {:.1} GiB, kernel {}, load {:?} → {:?}; commit {}{}",
            m.nproc,
            m.cpu_model,
            m.memory_total_mib as f64 / 1024.0,
            m.kernel,
            m.loadavg_start,
            m.loadavg_end,
            &m.git_commit[..m.git_commit.len().min(12)],
            if m.git_dirty { " (dirty)" } else { "" }
        );
        let _ = writeln!(
            out,
            "guest: image {:?}, {} vCPU, {} MiB, {} channel; run {:.0} s ({:.0} s measuring){}",
            self.guest.image,
            self.guest.vcpus,
            self.guest.memory_mib,
            m.transport,
            self.duration_s,
            self.measure_s,
            if self.quick { ", --quick" } else { "" }
        );
        if !self.samples.below_minimums.is_empty() {
            let _ = writeln!(
                out,
                "{}fewer samples than the issue's minimums: {}",
                if self.quick { "quick run, " } else { "" },
                self.samples.below_minimums.join("; ")
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<34} {:>5} {:>10} {:>10} {:>10}  notes",
            "measurement", "n", "p50", "p90", "p99"
        );
        let row = |out: &mut String, name: &str, s: &Summary, unit: Unit, notes: String| {
            let _ = writeln!(
                out,
                "{:<34} {:>5} {:>10} {:>10} {:>10}  {notes}",
                name,
                s.n,
                unit.show(s.p50),
                unit.show(s.p90),
                unit.show(s.p99)
            );
        };
        let c = &self.cold_boot;
        row(
            &mut out,
            "1. cold boot to guest Hello",
            &c.to_hello_ms,
            Unit::Ms,
            format!("+ snapshot: ready p50 {}", Unit::Ms.show(c.ready_ms.p50)),
        );
        row(
            &mut out,
            "2. golden snapshot (savevm)",
            &self.golden_snapshot_ms,
            Unit::Ms,
            String::new(),
        );
        let r = &self.revert;
        row(
            &mut out,
            "   revert (loadvm + resync)",
            &r.total_ms,
            Unit::Ms,
            format!(
                "loadvm p50 {}, resync p50 {}",
                Unit::Ms.show(r.restore_ms.p50),
                Unit::Ms.show(r.resync_ms.p50)
            ),
        );
        row(
            &mut out,
            "   first command after a revert",
            &r.first_exec_after_ms,
            Unit::Ms,
            format!(
                "same command, warm VM: p50 {}",
                Unit::Ms.show(r.warm_exec_ms.p50)
            ),
        );
        row(
            &mut out,
            "   first command after revert + warm-up",
            &r.first_exec_after_warm_up_ms,
            Unit::Ms,
            format!(
                "the pool's warm-up after each revert (off the test's path): p50 {}",
                Unit::Ms.show(r.warm_up_ms.p50)
            ),
        );
        row(
            &mut out,
            "3. pool acquire (warm pool)",
            &self.pool_acquire_us,
            Unit::Us,
            format!("max {}", Unit::Us.show(self.pool_acquire_us.max)),
        );
        if let Some(busy) = &self.pool_acquire_busy_ms {
            row(
                &mut out,
                "3b. pool acquire, pool busy",
                busy,
                Unit::Ms,
                format!(
                    "{} workers on {} VMs: queueing + revert included",
                    2 * self.pool_warmup.vms,
                    self.pool_warmup.vms
                ),
            );
        }
        row(
            &mut out,
            "4. exec round trip of `true`",
            &self.exec_true_ms,
            Unit::Ms,
            format!("max {}", Unit::Ms.show(self.exec_true_ms.max)),
        );
        row(
            &mut out,
            "   channel ping (no process)",
            &self.channel_ping_ms,
            Unit::Ms,
            String::new(),
        );
        let f = &self.file_transfer;
        let _ = writeln!(
            out,
            "{:<34} {:>5}  put {:.1} MiB/s ({} p50), get {:.1} MiB/s ({} p50)",
            format!("   file put / get, {:.0} MiB", f.size_mib),
            f.put_ms.n,
            f.put_mib_s,
            Unit::Ms.show(f.put_ms.p50),
            f.get_mib_s,
            Unit::Ms.show(f.get_ms.p50)
        );
        if let Some(t) = &self.tunnel {
            let _ = writeln!(
                out,
                "{:<34} {:>5}  host→guest {:.1} MiB/s, guest→host {:.1} MiB/s",
                format!("   tunnel stream, {:.0} MiB", t.size_mib),
                1,
                t.host_to_guest_mib_s,
                t.guest_to_host_mib_s,
            );
            row(
                &mut out,
                "   tunnel echo, 16 B round trip",
                &t.echo_rtt_ms,
                Unit::Ms,
                format!("+{} over a ping", Unit::Ms.show(t.added_latency_ms)),
            );
        }
        let _ = writeln!(out);
        let s = &self.suite;
        let _ = writeln!(
            out,
            "5. suite: {} trivial agent tests through the harness (wall time of the test binary)",
            s.tests
        );
        let cached = self.golden_cache.is_some();
        for (label, run) in [
            ("pool of 2, 2 threads", &s.pooled),
            ("  first run, empty golden cache", &s.pooled_first_run),
            ("fresh VM per test, 2 threads", &s.naive),
            ("fresh VM per test, 1 thread", &s.naive_serial),
        ]
        .into_iter()
        .filter(|(_, run)| cached || !std::ptr::eq(*run, &s.pooled_first_run))
        {
            let p50 = |x: Option<Summary>| Unit::Ms.show(x.map_or(0.0, |x| x.p50));
            let _ = writeln!(
                out,
                "   {:<31} {:>8.2} s  {:>6.0} ms/test; per test p50: test {}, {}",
                label,
                run.wall_s,
                run.per_test_s * 1000.0,
                p50(run.test_ms),
                match run.revert_ms {
                    Some(revert) => format!(
                        "revert {}; first test waited {}",
                        p50(Some(revert)),
                        Unit::Ms.show(run.first_acquire_ms)
                    ),
                    None => format!("wait for a VM {}", p50(run.acquire_ms)),
                }
            );
        }
        let _ = writeln!(
            out,
            "   speed-up {:.1}× (same concurrency; first run {:.1}×), {:.1}× vs one test at a time; steady state ≈ {:.1}×",
            s.speedup, s.speedup_first_run, s.speedup_vs_serial, s.steady_state_speedup
        );
        let w = &self.pool_warmup;
        let _ = writeln!(
            out,
            "6. pool warm-up, {} VMs: {} vs {} × one cold boot = {} ({:.1}×)",
            w.vms,
            Unit::Ms.show(w.wall_ms),
            w.vms,
            Unit::Ms.show(w.sequential_cold_boots_ms),
            w.speedup,
        );
        if let Some(g) = &self.golden_cache {
            let _ = writeln!(
                out,
                "   from the golden cache: {} VMs ready after {} ({:.1}× faster); one VM {} p50 \
                 (n = {}, p90 {}) vs a cold boot's {} ({:.1}×)",
                g.pool_warmup_vms,
                Unit::Ms.show(g.pool_warmup_wall_ms),
                g.pool_warmup_speedup,
                Unit::Ms.show(g.restore_ms.p50),
                g.restore_ms.n,
                Unit::Ms.show(g.restore_ms.p90),
                Unit::Ms.show(self.cold_boot.ready_ms.p50),
                g.speedup_vs_cold_boot,
            );
        }
        let mem = &self.memory;
        let _ = writeln!(
            out,
            "7. memory: peak RSS of the whole run {:.0} MiB, QEMUs together {:.0} MiB ({}); \
             per VM (VmHWM) p50 {:.0} MiB, max {:.0} MiB over {} VMs",
            mem.peak_total_rss_mib,
            mem.peak_qemu_rss_mib,
            vms_at_once(mem.max_concurrent_vms),
            mem.per_vm_hwm_mib.map_or(0.0, |s| s.p50),
            mem.per_vm_hwm_mib.map_or(0.0, |s| s.max),
            mem.vms_seen
        );
        for phase in PHASES {
            let Some(p) = mem.phases.get(*phase) else {
                continue;
            };
            let _ = writeln!(
                out,
                "   {:<31} peak {:>5.0} MiB total, {:>5.0} MiB QEMU ({}){}",
                phase,
                p.peak_total_rss_mib,
                p.peak_qemu_rss_mib,
                vms_at_once(p.max_concurrent_vms),
                p.per_vm_hwm_mib
                    .map_or(String::new(), |s| format!(", per VM p50 {:.0} MiB", s.p50))
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "targets");
        for t in &self.targets {
            let value = match t.unit.as_str() {
                "ms" => Unit::Ms.show(t.value),
                "x" => format!("{:.1}×", t.value),
                "s" => format!("{:.0} s", t.value),
                other => format!("{} {other}", t.value),
            };
            let _ = writeln!(
                out,
                "   {:<7} {:<15} {:>9}  (target {} {}) — {}",
                if t.met { "met" } else { "MISSED" },
                t.name,
                value,
                t.target,
                t.unit,
                t.description
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "where the time goes");
        for note in &self.where_the_time_goes {
            let _ = writeln!(out, "   * {note}");
        }
        out
    }
}

/// The memory sampler's phases, in the order they run.
pub const PHASES: &[&str] = &[
    "micro",
    "suite-pooled-first-run",
    "suite-pooled",
    "suite-naive",
    "suite-naive-serial",
];

fn vms_at_once(n: usize) -> String {
    if n == 1 {
        "1 VM at once".into()
    } else {
        format!("{n} VMs at once")
    }
}

impl Memory {
    fn build(stats: &MemoryStats, raw: &Raw) -> Self {
        let all: Vec<f64> = stats.qemu.values().map(|q| mib(q.hwm_kib)).collect();
        let exact: Vec<f64> = raw.vm_memory.iter().map(|m| mib(m.hwm_kib)).collect();
        let phases = stats
            .phases
            .iter()
            .filter(|(name, _)| PHASES.contains(&name.as_str()))
            .map(|(name, peak)| {
                let hwm: Vec<f64> = stats
                    .qemu
                    .values()
                    .filter(|q| &q.phase == name)
                    .map(|q| mib(q.hwm_kib))
                    .collect();
                (
                    name.clone(),
                    PhaseMemory {
                        peak_total_rss_mib: mib(peak.total_rss_kib),
                        peak_qemu_rss_mib: mib(peak.qemu_rss_kib),
                        max_concurrent_vms: peak.qemu_processes,
                        per_vm_hwm_mib: Summary::of(&hwm),
                    },
                )
            })
            .collect();
        let mut processes_hwm_mib = BTreeMap::new();
        if let Some(kib) = raw.bench_process_hwm_kib {
            processes_hwm_mib.insert("agentvm-bench".to_string(), mib(kib));
        }
        for (name, kib) in &stats.others_hwm_kib {
            // Test binaries are named `trivial-<hash>`.
            let name = match name.split_once('-') {
                Some((base, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => base,
                _ => name.as_str(),
            };
            let entry = processes_hwm_mib.entry(name.to_string()).or_insert(0.0);
            *entry = f64::max(*entry, mib(*kib));
        }
        Self {
            sample_interval_ms: INTERVAL.as_millis() as u64,
            peak_total_rss_mib: mib(stats.peak.total_rss_kib),
            peak_qemu_rss_mib: mib(stats.peak.qemu_rss_kib),
            max_concurrent_vms: stats.peak.qemu_processes,
            vms_seen: stats.qemu.len(),
            per_vm_hwm_mib: Summary::of(&all),
            per_vm_hwm_exact_mib: Summary::of(&exact),
            phases,
            processes_hwm_mib,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Unit {
    Ms,
    Us,
}

impl Unit {
    /// `2.41 s`, `86.2 ms`, `9.12 ms`, `3.1 µs`.
    fn show(self, value: f64) -> String {
        let ms = match self {
            Self::Ms => value,
            Self::Us => value / 1000.0,
        };
        if ms >= 1000.0 {
            format!("{:.2} s", ms / 1000.0)
        } else if ms >= 100.0 {
            format!("{ms:.0} ms")
        } else if ms >= 1.0 {
            format!("{ms:.1} ms")
        } else if ms >= 0.1 {
            format!("{:.0} µs", ms * 1000.0)
        } else {
            format!("{:.1} µs", ms * 1000.0)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::procs::{PhasePeak, QemuSeen};
    use crate::bench::suite::{HarnessLine, NAIVE, NAIVE_SERIAL, POOLED, POOLED_FIRST_RUN};
    use std::path::Path;

    const RAW: &str = r#"{
      "format": 1, "backend": "qemu", "accelerator": "tcg", "accelerator_reason": "auto: no vmx",
      "transport": "virtio-serial", "transport_reason": "auto", "image": "default",
      "guest_memory_mib": 256, "guest_vcpus": 1,
      "cold_boots": [{"to_hello_ms": 2400.0, "snapshot_ms": 110.0, "destroy_ms": 30.0},
                     {"to_hello_ms": 2000.0, "snapshot_ms": 120.0, "destroy_ms": null}],
      "reverts": [{"total_ms": 100.0, "restore_ms": 80.0, "resync_ms": 20.0, "first_exec_ms": 60.0},
                  {"total_ms": 100.0, "restore_ms": 80.0, "resync_ms": 20.0, "first_exec_ms": 20.0, "warm_up_ms": 90.0}],
      "exec_true_ms": [9.0, 8.0], "ping_ms": [0.5], "warm_shell_write_ms": [12.0],
      "file": {"size_bytes": 16777216, "put_ms": [1000.0], "get_ms": [200.0]},
      "tunnel": {"size_bytes": 16777216, "host_to_guest_ms": [4000.0], "guest_to_host_ms": [8000.0],
                 "echo_rtt_ms": [1.5, 2.5]},
      "pool_warmup": {"vms": 4, "wall_ms": 5000.0, "vm_to_hello_ms": [4000.0], "vm_snapshot_ms": [200.0]},
      "acquire_us": [3.0, 5.0],
      "acquire_busy_ms": [150.0, 170.0, 400.0],
      "restore_ms": [300.0, 250.0],
      "pool_warmup_restored": {"vms": 4, "wall_ms": 1000.0, "vm_to_hello_ms": [600.0], "vm_snapshot_ms": [0.0]},
      "vm_memory": [{"vm": "1-0", "pid": 5, "phase": "pool", "hwm_kib": 262144}],
      "bench_process_hwm_kib": 40000, "extra_field_from_a_newer_program": 1
    }"#;

    fn run(
        mode: &crate::bench::suite::Mode,
        acquire: f64,
        test: f64,
        revert: Option<f64>,
        wall: f64,
    ) -> SuiteRun {
        let lines: Vec<HarnessLine> = (0..10)
            .map(|i| HarnessLine {
                test: format!("t{i}"),
                vm: format!("vm{}", i % 2),
                test_ms: test,
                acquire_ms: acquire,
                revert_ms: revert,
            })
            .collect();
        SuiteRun::from_lines(mode, 10, wall, &lines, Path::new("log"))
    }

    pub(crate) fn report() -> Report {
        let peak = PhasePeak {
            total_rss_kib: 1024 * 1024,
            qemu_rss_kib: 900 * 1024,
            qemu_processes: 4,
        };
        let mut memory = MemoryStats {
            peak,
            ..MemoryStats::default()
        };
        memory.phases.insert("micro".into(), peak);
        memory.qemu.insert(
            7,
            QemuSeen {
                hwm_kib: 250 * 1024,
                phase: "micro".into(),
            },
        );
        memory
            .others_hwm_kib
            .insert("trivial-0123abcd".into(), 30 * 1024);
        Report::build(Inputs {
            quick: true,
            backend: "qemu".into(),
            started_at: "2024-01-01T00:00:00Z".into(),
            duration_s: 100.0,
            measure_s: 90.0,
            machine: Machine {
                nproc: 2,
                git_commit: "0123456789abcdef".into(),
                ..Machine::default()
            },
            samples: Samples {
                cold_boots: 2,
                reverts: 1,
                execs: 2,
                acquires: 2,
                file_rounds: 1,
                warmup_vms: 4,
                suite_tests: 10,
                below_minimums: vec!["suite N = 10 < 40".into()],
            },
            raw: Raw::parse(RAW).unwrap(),
            pooled: run(&POOLED, 0.0, 150.0, Some(90.0), 4.0),
            pooled_first_run: run(&POOLED_FIRST_RUN, 0.0, 150.0, Some(90.0), 6.0),
            naive: run(&NAIVE, 2100.0, 50.0, None, 11.0),
            naive_serial: run(&NAIVE_SERIAL, 2000.0, 50.0, None, 21.0),
            memory,
            artifacts_dir: "target/agentvm/bench".into(),
        })
    }

    #[test]
    fn builds_the_report() {
        let r = report();
        assert_eq!(r.machine.accelerator, "tcg");
        assert_eq!(r.cold_boot.ready_ms.p50, 2120.0);
        assert_eq!(r.cold_boot.destroy_ms.unwrap().n, 1);
        assert_eq!(r.file_transfer.put_mib_s, 16.0);
        assert_eq!(r.file_transfer.get_mib_s, 80.0);
        let busy = r.pool_acquire_busy_ms.unwrap();
        assert_eq!((busy.n, busy.p50), (3, 170.0));
        assert_eq!(r.suite.speedup, 2.75);
        assert_eq!(r.suite.speedup_first_run, 1.83);
        let g = r
            .golden_cache
            .as_ref()
            .expect("restore samples give a golden-cache report");
        assert_eq!(g.restore_ms.p50, 250.0);
        assert_eq!(g.speedup_vs_cold_boot, 8.48);
        assert_eq!((g.pool_warmup_vms, g.pool_warmup_speedup), (4, 5.0));
        assert_eq!(r.suite.speedup_vs_serial, 5.25);
        // (2100 + 50) / (150 + 90)
        assert_eq!(r.suite.steady_state_speedup, 8.96);
        assert_eq!(r.pool_warmup.sequential_cold_boots_ms, 8480.0);
        assert_eq!(r.memory.per_vm_hwm_exact_mib.unwrap().p50, 256.0);
        assert_eq!(r.memory.processes_hwm_mib["trivial"], 30.0);
        // Cold and warmed first commands are told apart.
        assert_eq!(r.revert.first_exec_after_ms.p50, 60.0);
        assert_eq!(r.revert.first_exec_after_warm_up_ms.p50, 20.0);
        assert_eq!(r.revert.warm_up_ms.p50, 90.0);
        let met: Vec<(&str, bool)> = r.targets.iter().map(|t| (t.name.as_str(), t.met)).collect();
        assert_eq!(
            met,
            [
                ("suite_speedup", false),
                ("revert_p50_ms", false),
                ("acquire_p50_ms", true),
                ("exec_p50_ms", false),
                ("first_command_ratio", true),
                ("quick_run_s", true)
            ]
        );
        // The missed suite target is explained, with the suite size where it would pass.
        let why = r.where_the_time_goes.join("\n");
        assert!(why.contains("suite ratio 2.8× < 8×"), "{why}");
        assert!(why.contains("passes 8× from"), "{why}");
        assert!(why.contains("translated again"), "{why}");
    }

    #[test]
    fn a_backend_without_golden_cache_reports_none() {
        let mut raw: serde_json::Value = serde_json::from_str(RAW).unwrap();
        let obj = raw.as_object_mut().unwrap();
        obj.remove("restore_ms");
        obj.remove("pool_warmup_restored");
        let raw = Raw::parse(&raw.to_string()).unwrap();
        assert!(raw.restore_ms.is_empty() && raw.pool_warmup_restored.is_none());
    }

    #[test]
    fn json_has_the_documented_top_level_fields() {
        let json = serde_json::to_value(report()).unwrap();
        assert_eq!(json["schema_version"], 1);
        for key in [
            "tool",
            "started_at",
            "duration_s",
            "measure_s",
            "quick",
            "backend",
            "machine",
            "guest",
            "samples",
            "cold_boot",
            "golden_snapshot_ms",
            "revert",
            "pool_acquire_us",
            "pool_acquire_busy_ms",
            "exec_true_ms",
            "file_transfer",
            "suite",
            "pool_warmup",
            "golden_cache",
            "memory",
            "targets",
            "where_the_time_goes",
            "artifacts_dir",
            "peers",
            "nextest",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        for key in [
            "pooled",
            "pooled_first_run",
            "naive",
            "naive_serial",
            "speedup_first_run",
        ] {
            assert!(json["suite"].get(key).is_some(), "missing suite.{key}");
        }
        for key in [
            "nproc",
            "cpu_model",
            "memory_total_mib",
            "accelerator",
            "qemu_version",
            "git_commit",
            "git_dirty",
        ] {
            assert!(json["machine"].get(key).is_some(), "missing machine.{key}");
        }
        assert_eq!(json["suite"]["pooled"]["wall_s"], 4.0);
        assert_eq!(json["revert"]["total_ms"]["p50"], 100.0);
    }

    #[test]
    fn renders_a_table() {
        let table = report().render();
        for needle in [
            "1. cold boot to guest Hello",
            "revert (loadvm + resync)",
            "3. pool acquire (warm pool)",
            "3b. pool acquire, pool busy",
            "8 workers on 4 VMs",
            "4. exec round trip of `true`",
            "file put / get, 16 MiB",
            "tunnel stream, 16 MiB",
            "host→guest 4.0 MiB/s, guest→host 2.0 MiB/s",
            "tunnel echo, 16 B round trip",
            "5. suite: 10 trivial agent tests",
            "speed-up 2.8×",
            "6. pool warm-up, 4 VMs",
            "7. memory",
            "MISSED  suite_speedup",
            "quick run, fewer samples",
            "where the time goes",
        ] {
            assert!(table.contains(needle), "{needle:?} not in\n{table}");
        }
    }

    #[test]
    fn units() {
        assert_eq!(Unit::Ms.show(2410.0), "2.41 s");
        assert_eq!(Unit::Ms.show(86.24), "86.2 ms");
        assert_eq!(Unit::Ms.show(150.4), "150 ms");
        assert_eq!(Unit::Us.show(3.24), "3.2 µs");
        assert_eq!(Unit::Ms.show(0.2021), "202 µs");
    }
}
