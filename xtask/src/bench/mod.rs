//! `cargo xtask bench [--quick] [--backend qemu|libvirt] [--json PATH]`:
//! measures the real-VM costs on this machine in one run and prints a table
//! (and writes a JSON report, schema in the README).
//!
//! xtask does not link the runtime (it must build without libvirt headers):
//! it builds `examples/bench-suite` in release mode and runs
//!
//! 1. `agentvm-bench` — boots, snapshot, reverts, exec round trips, file
//!    put/get, pool warm-up and acquires; it writes raw samples as JSON;
//! 2. the suite's test binary (`tests/trivial.rs`, N trivial agent tests)
//!    four times: a warm pool of 2 with an empty golden cache (first run),
//!    again with the cache that run left, a fresh VM per test 2 at a time,
//!    and one at a time (both booting, cache off) — only the binary's run is
//!    timed;
//!
//! while a thread samples the memory of every process below this one
//! ([`procs`]). Percentiles are computed here ([`stats`]). Then, in the
//! same run, the peers ([`peers`]: Docker, vmtest) and the suite under
//! cargo-nextest ([`nextest`]), with ratios against agentvm's rows;
//! `--only peers|nextest` measures just those.

mod agent_image;
mod daemon_lease;
mod libvirt_hosts;
mod machine;
mod nextest;
mod peers;
mod procs;
mod progress;
mod report;
mod stats;
mod suite;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use self::machine::Machine;
use self::progress::{Event, Printer};
use self::report::{
    Inputs, Raw, Report, Samples, DEFAULT_SUITE_TESTS, MIN_ACQUIRES, MIN_BOOTS, MIN_EXECS,
    MIN_REVERTS,
};
use self::suite::{
    Mode, NAIVE, NAIVE_SERIAL, POOLED, POOLED_FIRST_RUN, POOLED_NO_CACHE, REGISTERED_TESTS,
};
use crate::util::{rfc3339_utc, show_command, workspace_root};

/// Which backend runs the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// QEMU started directly (`-M microvm`).
    Qemu,
    /// libvirt domains (builds the bench with the `libvirt` feature; the
    /// daemon must run: scripts/start-libvirtd.sh).
    Libvirt,
}

impl BackendArg {
    /// The `AGENT_VM_BACKEND` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Libvirt => "libvirt",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Fewer samples and a 10-test suite (about 2 minutes; the output says
    /// which counts are below the full run's).
    #[arg(long)]
    pub quick: bool,
    /// The VM backend to measure.
    #[arg(long, value_enum, default_value_t = BackendArg::Qemu)]
    pub backend: BackendArg,
    /// Where to write the JSON report [default: target/agentvm/bench.json].
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Trivial tests in the suite comparison [default: 40, --quick: 10; at most 40].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=REGISTERED_TESTS as i64))]
    pub suite_tests: Option<u16>,
    /// Measure only these rows (repeatable), without agentvm's own: their
    /// ratios against agentvm are then left out (the two-host row is its own
    /// comparison, one host vs two). The JSON goes to
    /// target/agentvm/bench-only.json unless --json says otherwise.
    #[arg(long, value_enum, value_name = "ROWS")]
    pub only: Vec<Only>,
}

/// Rows `--only` can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Only {
    /// Docker and vmtest ([`peers`]).
    Peers,
    /// The suite under cargo-nextest ([`nextest`]).
    Nextest,
    /// A pool over two libvirt hosts vs one ([`libvirt_hosts`]; needs
    /// `--backend libvirt`).
    LibvirtHosts,
}

/// Sample counts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub boots: usize,
    pub reverts: usize,
    pub execs: usize,
    pub acquires: usize,
    pub file_rounds: usize,
    pub warmup_vms: usize,
    pub suite_tests: usize,
}

impl Plan {
    pub fn new(quick: bool, suite_tests: Option<usize>) -> Self {
        let base = if quick {
            Self {
                boots: 3,
                reverts: MIN_REVERTS,
                execs: MIN_EXECS,
                acquires: MIN_ACQUIRES,
                file_rounds: 1,
                warmup_vms: 4,
                suite_tests: 10,
            }
        } else {
            Self {
                boots: MIN_BOOTS,
                reverts: 50,
                execs: 500,
                acquires: MIN_ACQUIRES,
                file_rounds: 3,
                warmup_vms: 4,
                suite_tests: DEFAULT_SUITE_TESTS,
            }
        };
        Self {
            suite_tests: suite_tests.unwrap_or(base.suite_tests),
            ..base
        }
    }

    /// Where the counts are below the minimums.
    pub fn below_minimums(&self) -> Vec<String> {
        let checks = [
            ("cold boots", self.boots, MIN_BOOTS),
            ("reverts", self.reverts, MIN_REVERTS),
            ("execs", self.execs, MIN_EXECS),
            ("acquires", self.acquires, MIN_ACQUIRES),
            ("suite tests", self.suite_tests, DEFAULT_SUITE_TESTS),
        ];
        checks
            .iter()
            .filter(|(_, n, min)| n < min)
            .map(|(what, n, min)| format!("{what} n = {n} < {min}"))
            .collect()
    }

    fn samples(&self) -> Samples {
        Samples {
            cold_boots: self.boots,
            reverts: self.reverts,
            execs: self.execs,
            acquires: self.acquires,
            file_rounds: self.file_rounds,
            warmup_vms: self.warmup_vms,
            suite_tests: self.suite_tests,
            below_minimums: self.below_minimums(),
        }
    }

    fn bench_args(&self, json: &Path) -> Vec<String> {
        let mut args = vec!["--json".to_string(), json.display().to_string()];
        for (flag, n) in [
            ("--boots", self.boots),
            ("--reverts", self.reverts),
            ("--execs", self.execs),
            ("--acquires", self.acquires),
            ("--file-mib", 16),
            ("--file-rounds", self.file_rounds),
            ("--warmup-vms", self.warmup_vms),
        ] {
            args.push(flag.to_string());
            args.push(n.to_string());
        }
        args
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let started_at = rfc3339_utc(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    let printer = Printer::new();
    let root = workspace_root();
    let plan = Plan::new(args.quick, args.suite_tests.map(usize::from));
    let out_dir = root.join("target/agentvm/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| root.join("target/agentvm/bench.json"));
    if !args.only.is_empty() {
        return run_only(&args, &printer, &root, &plan, &out_dir, &started_at);
    }
    let mut machine = Machine::detect(&root);

    printer.phase("building examples/bench-suite (release): agentvm-bench and the trivial suite");
    let programs = build(&root, args.backend)?;

    let measure_started = Instant::now();
    let sampler = procs::Sampler::start();
    let result = measure(
        &printer,
        &sampler,
        &root,
        &out_dir,
        &plan,
        &programs,
        args.backend,
    );
    let memory = sampler.finish();
    let (raw, [pooled_first_run, pooled, naive, naive_serial]) = result?;
    machine.finish();

    let mut report = Report::build(Inputs {
        quick: args.quick,
        backend: args.backend.name().into(),
        started_at,
        duration_s: printer.elapsed_secs(),
        measure_s: measure_started.elapsed().as_secs_f64(),
        machine,
        samples: plan.samples(),
        raw,
        pooled_first_run,
        pooled,
        naive,
        naive_serial,
        memory,
        artifacts_dir: out_dir.display().to_string(),
    });
    if args.backend == BackendArg::Qemu {
        report.agent_image = measure_agent_image(&printer, &root, &out_dir, &programs, args.quick)?;
    }
    if args.backend == BackendArg::Qemu {
        printer.phase("pool daemon: lease over its socket");
        report.daemon_lease = daemon_lease::measure(&printer, &root, &out_dir, args.quick)?;
    }
    report.libvirt_two_hosts = Some(libvirt_hosts::measure(
        &printer,
        args.backend,
        &root,
        &out_dir,
        &programs.suite,
        plan.suite_tests,
    ));
    // Peers and nextest last, against agentvm's rows of this run.
    let mut peers = peers::PeersReport::measure(&printer, &root, args.quick, plan.suite_tests);
    peers.compare(&peers::Agentvm::from_report(&report));
    report.peers = Some(peers);
    report.nextest = Some(nextest::measure(
        &printer,
        &nextest_setup(&args, &root, &out_dir, &plan),
    ));
    // The whole run, these rows included (the quick-run target says "whole").
    report.duration_s = stats::round3(printer.elapsed_secs());
    if let Some(t) = report.targets.iter_mut().find(|t| t.name == "quick_run_s") {
        t.value = report.duration_s;
        t.met = report.duration_s < report::TARGET_QUICK_RUN_S;
    }
    write_json(&json_path, &report)?;
    printer.phase(format!("report written to {}", json_path.display()));
    println!("\n{}", report.render());
    if let Some(agent) = &report.agent_image {
        println!("{}", agent.render());
    }
    if let Some(hosts) = &report.libvirt_two_hosts {
        println!("{}", hosts.render());
    }
    if let Some(lease) = &report.daemon_lease {
        println!("{}", lease.render());
    }
    print_extra_rows(report.peers.as_ref(), report.nextest.as_ref());
    Ok(())
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(value)?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

fn nextest_setup<'a>(
    args: &BenchArgs,
    root: &'a Path,
    out_dir: &'a Path,
    plan: &Plan,
) -> nextest::Setup<'a> {
    nextest::Setup {
        root,
        out_dir,
        backend: args.backend.name(),
        libvirt: args.backend == BackendArg::Libvirt,
        tests: plan.suite_tests,
        // A full run installs cargo-nextest when missing; --quick stays cheap.
        install: !args.quick,
    }
}

fn print_extra_rows(
    peers: Option<&peers::PeersReport>,
    nextest: Option<&peers::Outcome<nextest::NextestReport>>,
) {
    if let Some(p) = peers {
        println!("{}", p.render());
    }
    match nextest {
        Some(peers::Outcome::Measured(n)) => println!("{}", n.render()),
        Some(peers::Outcome::Skipped { reason }) => {
            println!("\nnextest rows: skipped — {reason}")
        }
        None => {}
    }
}

/// What `--only` writes: the selected rows, without agentvm's.
#[derive(Debug, serde::Serialize)]
struct OnlyReport {
    schema_version: u32,
    tool: String,
    started_at: String,
    duration_s: f64,
    quick: bool,
    only: Vec<Only>,
    note: String,
    peers: Option<peers::PeersReport>,
    nextest: Option<peers::Outcome<nextest::NextestReport>>,
    libvirt_two_hosts: Option<libvirt_hosts::TwoHostsReport>,
}

/// `--only`: the selected rows alone (no agentvm rows, so no ratios).
fn run_only(
    args: &BenchArgs,
    printer: &Printer,
    root: &Path,
    plan: &Plan,
    out_dir: &Path,
    started_at: &str,
) -> Result<()> {
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| root.join("target/agentvm/bench-only.json"));
    let peers = args
        .only
        .contains(&Only::Peers)
        .then(|| peers::PeersReport::measure(printer, root, args.quick, plan.suite_tests));
    let nextest = args
        .only
        .contains(&Only::Nextest)
        .then(|| nextest::measure(printer, &nextest_setup(args, root, out_dir, plan)));
    let libvirt_two_hosts = if args.only.contains(&Only::LibvirtHosts) {
        printer.phase("building examples/bench-suite (release): the trivial suite");
        let programs = build(root, args.backend)?;
        Some(libvirt_hosts::measure(
            printer,
            args.backend,
            root,
            out_dir,
            &programs.suite,
            plan.suite_tests,
        ))
    } else {
        None
    };
    let report = OnlyReport {
        schema_version: report::SCHEMA_VERSION,
        tool: "cargo xtask bench --only".into(),
        started_at: started_at.to_string(),
        duration_s: stats::round3(printer.elapsed_secs()),
        quick: args.quick,
        only: args.only.clone(),
        note: "agentvm's own rows were not measured (--only): no ratios against agentvm".into(),
        peers,
        nextest,
        libvirt_two_hosts,
    };
    write_json(&json_path, &report)?;
    printer.phase(format!("report written to {}", json_path.display()));
    if let Some(hosts) = &report.libvirt_two_hosts {
        println!("{}", hosts.render());
    }
    print_extra_rows(report.peers.as_ref(), report.nextest.as_ref());
    Ok(())
}

/// The `agent` image rows: the measuring program again, with that image,
/// when it is built (else `None`, and a note how to build it).
fn measure_agent_image(
    printer: &Printer,
    root: &Path,
    out_dir: &Path,
    programs: &Programs,
    quick: bool,
) -> Result<Option<agent_image::AgentImageReport>> {
    let image_dir = root.join("target/agentvm/images").join(agent_image::IMAGE);
    let Some((_, rootfs_bytes)) = agent_image::rootfs_of(&image_dir) else {
        printer.phase(format!(
            "agent image: not built, no rows (cargo xtask build-image --name {})",
            agent_image::IMAGE
        ));
        return Ok(None);
    };
    printer.phase(format!(
        "agent image {:?} ({} profile): boots, reverts after writing {} MiB, exec",
        agent_image::IMAGE,
        agent_image::PROFILE,
        agent_image::WRITE_MIB
    ));
    let raw_path = out_dir.join("raw-agent-image.json");
    let _ = std::fs::remove_file(&raw_path);
    let mut command = Command::new(&programs.bench);
    command
        .args(agent_image::bench_args(&raw_path, quick))
        .current_dir(root)
        .env("AGENT_VM_BACKEND", "qemu")
        .env("AGENT_VM_IMAGE", agent_image::IMAGE)
        .env("AGENT_VM_PROFILE", agent_image::PROFILE)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    let raw = run_bench_program(printer, &mut command, &raw_path, " (agent image)")?;
    Ok(agent_image::AgentImageReport::build(&raw, rootfs_bytes))
}

/// Runs the measuring program (`command`, stderr piped), shows its progress
/// lines and reads the raw samples it wrote to `raw_path`.
fn run_bench_program(
    printer: &Printer,
    command: &mut Command,
    raw_path: &Path,
    what: &str,
) -> Result<Raw> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    for line in BufReader::new(child.stderr.take().expect("piped stderr")).lines() {
        printer.emit(Event::from_child_line(&line?));
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{program}{what} failed ({status}); see its messages above");
    }
    Raw::parse(
        &std::fs::read_to_string(raw_path)
            .with_context(|| format!("reading {}", raw_path.display()))?,
    )
    .with_context(|| format!("reading {}", raw_path.display()))
}

struct Programs {
    bench: PathBuf,
    suite: PathBuf,
}

/// Builds the measuring program and the suite's test binary; returns their paths.
fn build(root: &Path, backend: BackendArg) -> Result<Programs> {
    let features: &[&str] = if backend == BackendArg::Libvirt {
        &["--features", "libvirt"]
    } else {
        &[]
    };
    let found = build_bench_suite(
        root,
        &["--bin", "agentvm-bench", "--test", "trivial"],
        features,
    )?;
    Ok(Programs {
        bench: found.find("agentvm-bench", false)?,
        suite: found.find("trivial", true)?,
    })
}

/// The executables a `cargo build` reported.
pub struct Built {
    command: String,
    executables: Vec<(String, bool, PathBuf)>,
}

impl Built {
    /// The path of executable `name` (a test binary when `test`).
    pub fn find(&self, name: &str, test: bool) -> Result<PathBuf> {
        self.executables
            .iter()
            .find(|(n, t, _)| n == name && *t == test)
            .map(|(_, _, path)| path.clone())
            .with_context(|| format!("`{}` did not report the {name} executable", self.command))
    }
}

/// `cargo build --release -p bench-suite TARGETS… FEATURES…`, compiler
/// messages on stderr.
pub fn build_bench_suite(root: &Path, targets: &[&str], features: &[&str]) -> Result<Built> {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .current_dir(root)
        .args(["build", "--release", "-p", "bench-suite"])
        .args(targets)
        .arg("--message-format=json-render-diagnostics")
        .args(features)
        .stderr(Stdio::inherit());
    let shown = show_command(&command);
    let out = command
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    Ok(Built {
        executables: suite::executables(&String::from_utf8_lossy(&out.stdout)),
        command: shown,
    })
}

type Measured = (Raw, [suite::SuiteRun; 4]);

fn measure(
    printer: &Printer,
    sampler: &procs::Sampler,
    root: &Path,
    out_dir: &Path,
    plan: &Plan,
    programs: &Programs,
    backend: BackendArg,
) -> Result<Measured> {
    // 1-4, 6: the measuring program.
    sampler.set_phase("micro");
    let raw_path = out_dir.join("raw.json");
    let _ = std::fs::remove_file(&raw_path);
    let mut command = Command::new(&programs.bench);
    command
        .args(plan.bench_args(&raw_path))
        .current_dir(root)
        .env("AGENT_VM_BACKEND", backend.name())
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    let raw = run_bench_program(printer, &mut command, &raw_path, "")?;

    // 5: the suite, four ways; `pooled` reuses the golden cache that
    // `pooled_first_run` filled. Without a golden cache (libvirt) every pooled
    // run is a first run: one run stands for both.
    let suite_dir = root.join("examples/bench-suite");
    let n = plan.suite_tests;
    let mut runs = Vec::new();
    let modes: &[(&Mode, &str)] = match backend {
        BackendArg::Qemu => &[
            (&POOLED_FIRST_RUN, "suite-pooled-first-run"),
            (&POOLED, "suite-pooled"),
            (&NAIVE, "suite-naive"),
            (&NAIVE_SERIAL, "suite-naive-serial"),
        ],
        BackendArg::Libvirt => &[
            (&POOLED_NO_CACHE, "suite-pooled"),
            (&NAIVE, "suite-naive"),
            (&NAIVE_SERIAL, "suite-naive-serial"),
        ],
    };
    for &(mode, phase) in modes {
        printer.phase(format!(
            "suite: {n} trivial agent tests, {} (concurrency {})",
            mode.description, mode.test_threads
        ));
        sampler.set_phase(phase);
        let run = suite::run(
            backend.name(),
            printer,
            &programs.suite,
            &suite_dir,
            mode,
            n,
            out_dir,
        )?;
        printer.note(format!("{:.2} s wall, {} VMs", run.wall_s, run.vms));
        runs.push(run);
    }
    sampler.set_phase("end");
    if backend == BackendArg::Libvirt {
        let pooled = runs[0].clone();
        runs.insert(0, pooled);
    }
    let runs: [suite::SuiteRun; 4] = runs.try_into().expect("four suite runs");
    Ok((raw, runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let full = Plan::new(false, None);
        assert!(full.below_minimums().is_empty(), "{full:?}");
        assert_eq!(full.suite_tests, 40);
        let quick = Plan::new(true, None);
        assert_eq!(quick.suite_tests, 10);
        assert_eq!(
            quick.below_minimums(),
            ["cold boots n = 3 < 5", "suite tests n = 10 < 40"]
        );
        assert_eq!(Plan::new(true, Some(40)).below_minimums().len(), 1);
        let args = full.bench_args(Path::new("/x.json"));
        assert_eq!(&args[..4], ["--json", "/x.json", "--boots", "5"]);
    }
}
