//! The suite under `cargo nextest run`, which runs every test in its own
//! process: with the pool daemon (`AGENTVM_POOL=daemon`: the processes
//! lease VMs from one pool) against `cargo test` (one process, one pool;
//! goal: at most [`GOAL_VS_CARGO_TEST`]×) and against nextest with a pool
//! per process (`AGENTVM_POOL=local`).
//!
//! The three commands run the same first N tests of `examples/bench-suite`
//! (`tests/trivial.rs`), 2 at a time, with the harness's default pool sizes
//! and the golden cache the suite runs left; each is timed as a whole
//! (cargo's up-to-date check and nextest's listing included).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;

use super::peers::docker::find_tool;
use super::peers::Outcome;
use super::progress::Printer;
use super::stats::round3;
use super::suite::{test_binary_args, test_name, POOLED};

/// The goal of the issue for nextest with the daemon against `cargo test`.
pub const GOAL_VS_CARGO_TEST: f64 = 1.2;

/// Tests at once in every run (the suite's pooled run uses 2 too).
pub const TEST_THREADS: usize = 2;

/// One timed command.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimedRun {
    pub command: String,
    /// `AGENTVM_POOL` (`null`: unset, the harness chooses).
    pub agentvm_pool: Option<String>,
    pub wall_s: f64,
    pub passed: usize,
    pub log: String,
}

/// The nextest rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NextestReport {
    pub nextest_version: String,
    pub tests: usize,
    pub test_threads: usize,
    pub cargo_test: TimedRun,
    pub nextest_local: TimedRun,
    pub nextest_daemon: TimedRun,
    /// `nextest_daemon.wall_s / cargo_test.wall_s`.
    pub daemon_vs_cargo_test: f64,
    pub goal_daemon_vs_cargo_test: f64,
    pub goal_met: bool,
    /// `nextest_daemon.wall_s / nextest_local.wall_s`.
    pub daemon_vs_local: f64,
    /// Seconds these rows added to the run (the untimed build included).
    pub duration_s: f64,
}

impl NextestReport {
    pub fn new(
        nextest_version: String,
        tests: usize,
        cargo_test: TimedRun,
        nextest_local: TimedRun,
        nextest_daemon: TimedRun,
    ) -> Self {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                (a / b * 100.0).round() / 100.0
            } else {
                f64::NAN
            }
        };
        let daemon_vs_cargo_test = ratio(nextest_daemon.wall_s, cargo_test.wall_s);
        Self {
            nextest_version,
            tests,
            test_threads: TEST_THREADS,
            daemon_vs_local: ratio(nextest_daemon.wall_s, nextest_local.wall_s),
            goal_met: daemon_vs_cargo_test <= GOAL_VS_CARGO_TEST,
            goal_daemon_vs_cargo_test: GOAL_VS_CARGO_TEST,
            daemon_vs_cargo_test,
            cargo_test,
            nextest_local,
            nextest_daemon,
            duration_s: 0.0,
        }
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "\nsuite of {} trivial tests, {} at a time, per runner ({}; {:.0} s)\n",
            self.tests, self.test_threads, self.nextest_version, self.duration_s
        );
        for (label, run) in [
            ("cargo test (one process, one pool)", &self.cargo_test),
            ("cargo nextest run, AGENTVM_POOL=local", &self.nextest_local),
            (
                "cargo nextest run, AGENTVM_POOL=daemon",
                &self.nextest_daemon,
            ),
        ] {
            let _ = writeln!(out, "   {label:<41} {:>8.2} s", run.wall_s);
        }
        let _ = writeln!(
            out,
            "   nextest + daemon: {:.2}× cargo test ({} ≤ {}×), {:.2}× nextest with a pool per process",
            self.daemon_vs_cargo_test,
            if self.goal_met { "met" } else { "MISSED" },
            self.goal_daemon_vs_cargo_test,
            self.daemon_vs_local
        );
        out
    }
}

/// Reads `N passed` from nextest's closing `Summary` line.
pub fn parse_nextest_passed(output: &str) -> Option<usize> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("Summary"))?;
    let (_, rest) = line.split_once(" run: ")?;
    rest.split(", ").find_map(|part| {
        let (n, _) = part.trim().split_once(" passed")?;
        n.trim().parse().ok()
    })
}

/// Reads `N passed` from libtest's `test result: ok. N passed; …` line.
pub fn parse_libtest_passed(output: &str) -> Option<usize> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.starts_with("test result:"))?;
    line.split(['.', ';'])
        .find_map(|part| part.trim().strip_suffix(" passed")?.trim().parse().ok())
}

/// nextest's filter expression for the first `tests` trivial tests.
pub fn filter_expression(tests: usize) -> String {
    (0..tests)
        .map(|i| format!("test(={})", test_name(i)))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The `cargo-nextest` binary: on PATH, or installed under
/// `target/agentvm/peers` (by a full run, when `install`).
fn find_nextest(printer: &Printer, root: &Path, install: bool) -> Result<PathBuf, String> {
    let prefix = root.join("target/agentvm/peers");
    let cached = prefix.join("bin/cargo-nextest");
    if let Some(found) = find_tool("cargo-nextest").or(cached.is_file().then_some(cached.clone())) {
        return Ok(found);
    }
    if !install {
        return Err(
            "cargo-nextest is not installed: `cargo install cargo-nextest --locked`, \
                    or a full `cargo xtask bench` installs it under target/agentvm/peers"
                .into(),
        );
    }
    printer.note(format!(
        "cargo install cargo-nextest --locked --root {} (once; several minutes)",
        prefix.display()
    ));
    let started = Instant::now();
    let status = Command::new(cargo())
        .args(["install", "--locked", "--quiet", "cargo-nextest", "--root"])
        .arg(&prefix)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("starting cargo install: {e}"))?;
    if !status.success() {
        return Err(format!("cargo install cargo-nextest failed ({status})"));
    }
    printer.note(format!(
        "cargo-nextest installed in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(cached)
}

fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Where and how the runs go.
pub struct Setup<'a> {
    pub root: &'a Path,
    pub out_dir: &'a Path,
    pub backend: &'a str,
    /// `--features libvirt` for the libvirt backend.
    pub libvirt: bool,
    pub tests: usize,
    /// Install cargo-nextest when missing (full runs).
    pub install: bool,
}

/// Measures the three runs, or says why not.
pub fn measure(printer: &Printer, setup: &Setup) -> Outcome<NextestReport> {
    printer.phase(format!(
        "suite of {} tests: cargo test, cargo nextest run (AGENTVM_POOL=local, =daemon)",
        setup.tests
    ));
    match measure_inner(printer, setup) {
        Ok(r) => Outcome::Measured(r),
        Err(reason) => {
            printer.note(format!("nextest rows skipped: {reason}"));
            Outcome::skipped(reason)
        }
    }
}

fn measure_inner(printer: &Printer, setup: &Setup) -> Result<NextestReport, String> {
    let started = Instant::now();
    let nextest = find_nextest(printer, setup.root, setup.install)?;
    let version = Command::new(&nextest)
        .args(["nextest", "--version"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .map_err(|e| format!("running {}: {e}", nextest.display()))?;
    let mut package = vec![
        "--release".to_string(),
        "-p".into(),
        "bench-suite".into(),
        "--test".into(),
        "trivial".into(),
    ];
    if setup.libvirt {
        package.extend(["--features".into(), "libvirt".into()]);
    }
    printer.note("building the suite (untimed)");
    build(setup, &nextest, &package)?;
    let mut cargo_test = vec!["test".to_string()];
    cargo_test.extend(package.iter().cloned());
    cargo_test.push("--".into());
    let mut libtest = test_binary_args(&POOLED, setup.tests);
    // The same thread count as the nextest runs.
    if let Some(i) = libtest.iter().position(|a| a == "--test-threads") {
        libtest[i + 1] = TEST_THREADS.to_string();
    }
    cargo_test.extend(libtest);
    let mut nextest_args = vec!["nextest".to_string(), "run".into()];
    nextest_args.extend(package);
    nextest_args.extend([
        "--test-threads".into(),
        TEST_THREADS.to_string(),
        "--no-fail-fast".into(),
        "--color".into(),
        "never".into(),
        "-E".into(),
        filter_expression(setup.tests),
    ]);
    // The daemon last: an idle daemon keeps its VMs until it times out.
    let runs = [
        ("cargo-test", &cargo_test, None),
        ("nextest-local", &nextest_args, Some("local")),
        ("nextest-daemon", &nextest_args, Some("daemon")),
    ];
    let mut timed = Vec::new();
    for (key, args, pool) in runs {
        let shown: Vec<&str> = args
            .iter()
            .map(String::as_str)
            .take_while(|a| !matches!(*a, "--" | "--test-threads"))
            .collect();
        printer.note(format!(
            "cargo {}{}",
            shown.join(" "),
            pool.map_or(String::new(), |p| format!(" (AGENTVM_POOL={p})"))
        ));
        let run = run_one(setup, &nextest, key, args, pool)?;
        printer.note(format!("{:.2} s, {} passed", run.wall_s, run.passed));
        timed.push(run);
    }
    stop_daemon(
        printer,
        setup,
        &nextest,
        &setup.out_dir.join("nextest-daemon"),
    );
    let [cargo_test, local, daemon]: [TimedRun; 3] = timed.try_into().expect("three runs");
    let mut report = NextestReport::new(version, setup.tests, cargo_test, local, daemon);
    report.duration_s = round3(started.elapsed().as_secs_f64());
    Ok(report)
}

/// Stops the pool daemon the `AGENTVM_POOL=daemon` run started (it would
/// otherwise keep its VMs for its idle minute, into the rest of the bench).
fn stop_daemon(printer: &Printer, setup: &Setup, nextest: &Path, artifacts: &Path) {
    let args = ["run", "-q", "-p", "agentvm-cli", "--", "pool", "stop"].map(String::from);
    let stopped = cargo_command(setup, nextest, artifacts, &args, None)
        .and_then(|mut c| c.output().map_err(|e| e.to_string()))
        .map_err(|e| format!("starting `agentvm pool stop`: {e}"))
        .and_then(|out| {
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
            }
        });
    if let Err(why) = stopped {
        printer.note(format!("could not stop the suite's pool daemon: {why}"));
    }
}

/// `cargo args…` in the suite runs' environment.
fn cargo_command(
    setup: &Setup,
    nextest: &Path,
    artifacts: &Path,
    args: &[String],
    pool: Option<&str>,
) -> Result<Command, String> {
    let runtime = setup.out_dir.join("suite-runtime");
    std::fs::create_dir_all(&runtime).map_err(|e| e.to_string())?;
    let mut command = Command::new(cargo());
    command
        .args(args)
        .current_dir(setup.root)
        .env("AGENT_VM_BACKEND", setup.backend)
        .env("AGENT_VM_ARTIFACTS_DIR", artifacts)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("AGENT_VM_GOLDEN_CACHE", "true")
        .env("CARGO_TERM_COLOR", "never")
        .stdin(Stdio::null());
    for var in [
        "AGENT_VM_METRICS_PORT",
        "AGENT_VM_AUDIT_LOG",
        "AGENT_VM_POOL_MIN_SIZE",
        "AGENT_VM_POOL_MAX_SIZE",
        "AGENT_VM_MAX_USES",
        "AGENTVM_POOL",
    ] {
        command.env_remove(var);
    }
    if let Some(pool) = pool {
        command.env("AGENTVM_POOL", pool);
    }
    // A cargo-nextest installed under target/ is found by `cargo nextest`.
    if let Some(dir) = nextest.parent() {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(dirs) {
            command.env("PATH", joined);
        }
    }
    Ok(command)
}

/// Builds the test binary untimed (the environment of a nested cargo may
/// make it rebuild a few crates), so the timed runs only check it is fresh.
fn build(setup: &Setup, nextest: &Path, package: &[String]) -> Result<(), String> {
    let mut args = vec!["test".to_string(), "--no-run".into()];
    args.extend(package.iter().cloned());
    let log = setup.out_dir.join("nextest-build.log");
    let out = cargo_command(setup, nextest, &setup.out_dir.join("build"), &args, None)?
        .output()
        .map_err(|e| format!("starting cargo test --no-run: {e}"))?;
    let _ = std::fs::write(&log, &out.stderr);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`cargo {}` failed ({}); its output is in {}",
            args.join(" "),
            out.status,
            log.display()
        ))
    }
}

fn run_one(
    setup: &Setup,
    nextest: &Path,
    key: &str,
    args: &[String],
    pool: Option<&str>,
) -> Result<TimedRun, String> {
    let log = setup.out_dir.join(format!("{key}.log"));
    let artifacts = setup.out_dir.join(key);
    let _ = std::fs::remove_dir_all(&artifacts);
    let mut command = cargo_command(setup, nextest, &artifacts, args, pool)?;
    let started = Instant::now();
    let out = command
        .output()
        .map_err(|e| format!("starting cargo {}: {e}", args[0]))?;
    let wall_s = started.elapsed().as_secs_f64();
    let text = format!(
        "--- stdout ---\n{}--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::write(&log, &text);
    let passed = if pool.is_some() {
        parse_nextest_passed(&text)
    } else {
        parse_libtest_passed(&text)
    }
    .unwrap_or(0);
    if !out.status.success() || passed != setup.tests {
        return Err(format!(
            "`cargo {}` failed ({}, {passed} of {} passed); its output is in {}",
            args[..2].join(" "),
            out.status,
            setup.tests,
            log.display()
        ));
    }
    Ok(TimedRun {
        command: format!("cargo {}", args.join(" ")),
        agentvm_pool: pool.map(String::from),
        wall_s: round3(wall_s),
        passed,
        log: log.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nextest_summary() {
        let out = "        PASS [   1.234s] bench-suite::trivial trivial_00\n\
                   ────────────\n     Summary [  12.345s] 10 tests run: 10 passed, 0 skipped\n";
        assert_eq!(parse_nextest_passed(out), Some(10));
        let slow = "     Summary [  60.001s] 40 tests run: 38 passed (2 slow), 2 failed, 0 skipped";
        assert_eq!(parse_nextest_passed(slow), Some(38));
        assert_eq!(parse_nextest_passed("no summary"), None);
        let one = "     Summary [   0.5s] 1 test run: 1 passed, 0 skipped";
        assert_eq!(parse_nextest_passed(one), Some(1));
    }

    #[test]
    fn libtest_result() {
        let out = "test trivial_00 ... ok\n\ntest result: ok. 10 passed; 0 failed; 0 ignored; \
                   0 measured; 30 filtered out; finished in 9.87s\n";
        assert_eq!(parse_libtest_passed(out), Some(10));
        assert_eq!(parse_libtest_passed("nothing"), None);
    }

    #[test]
    fn filters_the_first_tests() {
        assert_eq!(
            filter_expression(2),
            "test(=trivial_00) | test(=trivial_01)"
        );
    }

    fn run(wall_s: f64) -> TimedRun {
        TimedRun {
            command: "cargo x".into(),
            agentvm_pool: None,
            wall_s,
            passed: 10,
            log: "l".into(),
        }
    }

    #[test]
    fn ratios_and_goal() {
        let r = NextestReport::new(
            "cargo-nextest 0.9".into(),
            10,
            run(10.0),
            run(30.0),
            run(11.0),
        );
        assert_eq!((r.daemon_vs_cargo_test, r.daemon_vs_local), (1.1, 0.37));
        assert!(r.goal_met);
        let r = NextestReport::new("v".into(), 10, run(10.0), run(30.0), run(12.5));
        assert!(!r.goal_met);
        let table = r.render();
        assert!(
            table.contains("1.25× cargo test (MISSED ≤ 1.2×)"),
            "{table}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["nextest_daemon"]["wall_s"], 12.5);
        assert_eq!(json["goal_daemon_vs_cargo_test"], 1.2);
    }
}
