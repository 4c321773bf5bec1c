//! Suite throughput: the 40 trivial agent tests of `examples/bench-suite`
//! (`tests/trivial.rs`) run through the real harness, with a warm pool and
//! with a fresh VM per test; only the test binary's run is timed.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::progress::Printer;
use super::stats::{round3, Summary};

/// Tests registered in `examples/bench-suite/tests/trivial.rs`.
pub const REGISTERED_TESTS: usize = 40;

/// Name of the `i`-th trivial test.
pub fn test_name(i: usize) -> String {
    format!("trivial_{i:02}")
}

/// What a run does with the golden cache (`AGENT_VM_GOLDEN_CACHE`), in the
/// suite runs' own runtime directory (`XDG_RUNTIME_DIR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoldenCache {
    /// Off: every VM boots.
    Off,
    /// On, starting empty: the first VMs boot and share their snapshot.
    Empty,
    /// On, with what the previous run (an [`GoldenCache::Empty`] one) left.
    Reuse,
}

/// How the suite is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Key in the report (`pooled`, `pooled_first_run`, `naive`, `naive_serial`).
    pub key: &'static str,
    pub description: &'static str,
    pub pool_min_size: usize,
    pub pool_max_size: usize,
    /// `AGENT_VM_MAX_USES` (`None`: unset).
    pub max_uses: Option<u64>,
    pub test_threads: usize,
    pub golden_cache: GoldenCache,
}

/// The harness's defaults on a machine that ran it before: a warm pool of 2
/// VMs started from the golden cache.
pub const POOLED: Mode = Mode {
    key: "pooled",
    description: "warm pool of 2 VMs started from the golden cache, reverted after each test",
    pool_min_size: 2,
    pool_max_size: 2,
    max_uses: None,
    test_threads: 2,
    golden_cache: GoldenCache::Reuse,
};

/// The harness's defaults on a fresh machine: the pool's 2 VMs boot.
pub const POOLED_FIRST_RUN: Mode = Mode {
    key: "pooled_first_run",
    description:
        "warm pool of 2 VMs, first run (empty golden cache: they boot), reverted after each test",
    pool_min_size: 2,
    pool_max_size: 2,
    max_uses: None,
    test_threads: 2,
    golden_cache: GoldenCache::Empty,
};

/// The warm pool of 2 on a backend without a golden cache (libvirt): every
/// run is like a first run.
pub const POOLED_NO_CACHE: Mode = Mode {
    key: "pooled",
    description:
        "warm pool of 2 VMs (the backend has no golden cache: they boot), reverted after each test",
    pool_min_size: 2,
    pool_max_size: 2,
    max_uses: None,
    test_threads: 2,
    golden_cache: GoldenCache::Empty,
};

/// A fresh VM per test, 2 at a time (same concurrency as the pool).
pub const NAIVE: Mode = Mode {
    key: "naive",
    description: "a fresh VM booted for each test, 2 tests at a time",
    pool_min_size: 0,
    pool_max_size: 2,
    max_uses: Some(1),
    test_threads: 2,
    golden_cache: GoldenCache::Off,
};

/// A fresh VM per test, one test at a time.
pub const NAIVE_SERIAL: Mode = Mode {
    key: "naive_serial",
    description: "a fresh VM booted for each test, one test at a time",
    pool_min_size: 0,
    pool_max_size: 1,
    max_uses: Some(1),
    test_threads: 1,
    golden_cache: GoldenCache::Off,
};

/// One `agentvm: <test> on vm <id>: <dur> (acquire <dur>, <revert>)` line of
/// the harness.
#[derive(Debug, Clone, PartialEq)]
pub struct HarnessLine {
    pub test: String,
    pub vm: String,
    pub test_ms: f64,
    pub acquire_ms: f64,
    /// `Some` when the VM was reverted; `None` when it was recycled.
    pub revert_ms: Option<f64>,
}

/// Parses the harness's compact durations: `0.4ms`, `95ms`, `1.23s`.
pub fn parse_duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    if let Some(ms) = text.strip_suffix("ms") {
        ms.parse().ok()
    } else if let Some(s) = text.strip_suffix('s') {
        s.parse::<f64>().ok().map(|s| s * 1000.0)
    } else {
        None
    }
}

/// Parses a per-test line of the harness (`None` for other lines).
pub fn parse_harness_line(line: &str) -> Option<HarnessLine> {
    let rest = line.strip_prefix("agentvm: ")?;
    let (test, rest) = rest.split_once(" on vm ")?;
    let (vm, rest) = rest.split_once(": ")?;
    let (duration, rest) = rest.split_once(" (acquire ")?;
    let (acquire, rest) = rest.split_once(", ")?;
    let outcome = rest.strip_suffix(')')?;
    let revert_ms = match outcome.strip_prefix("revert ") {
        Some(d) => Some(parse_duration_ms(d)?),
        None => None,
    };
    Some(HarnessLine {
        test: test.to_string(),
        vm: vm.to_string(),
        test_ms: parse_duration_ms(duration)?,
        acquire_ms: parse_duration_ms(acquire)?,
        revert_ms,
    })
}

/// The arguments of the test binary that run the first `tests` trivial tests.
pub fn test_binary_args(mode: &Mode, tests: usize) -> Vec<String> {
    let mut args = vec![
        "--exact".to_string(),
        "--color".into(),
        "never".into(),
        "--test-threads".into(),
        mode.test_threads.to_string(),
    ];
    for i in tests..REGISTERED_TESTS {
        args.push("--skip".into());
        args.push(test_name(i));
    }
    args
}

/// The result of one run of the suite.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteRun {
    pub description: String,
    pub concurrency: usize,
    pub pool_min_size: usize,
    pub pool_max_size: usize,
    pub max_uses: Option<u64>,
    pub tests: usize,
    /// Wall time of the test binary (start to exit: pool warm-up, tests, shutdown).
    pub wall_s: f64,
    /// `wall_s / tests`.
    pub per_test_s: f64,
    /// Per test, from the harness lines: time on the VM (the test body).
    pub test_ms: Option<Summary>,
    /// Per test: waiting for a VM (a boot in the fresh-VM method).
    pub acquire_ms: Option<Summary>,
    /// Per test: the revert after it (pool method only).
    pub revert_ms: Option<Summary>,
    /// The first test's wait for a VM (the pool's warm-up, or the first boot).
    pub first_acquire_ms: f64,
    /// Distinct VMs used.
    pub vms: usize,
    /// The test binary's output.
    pub log: String,
}

impl SuiteRun {
    pub fn from_lines(
        mode: &Mode,
        tests: usize,
        wall_s: f64,
        lines: &[HarnessLine],
        log: &Path,
    ) -> Self {
        let collect = |f: &dyn Fn(&HarnessLine) -> Option<f64>| -> Vec<f64> {
            lines.iter().filter_map(f).collect()
        };
        let mut vms: Vec<&str> = lines.iter().map(|l| l.vm.as_str()).collect();
        vms.sort_unstable();
        vms.dedup();
        Self {
            description: mode.description.to_string(),
            concurrency: mode.test_threads,
            pool_min_size: mode.pool_min_size,
            pool_max_size: mode.pool_max_size,
            max_uses: mode.max_uses,
            tests,
            wall_s: round3(wall_s),
            per_test_s: round3(wall_s / tests.max(1) as f64),
            test_ms: Summary::of(&collect(&|l| Some(l.test_ms))),
            acquire_ms: Summary::of(&collect(&|l| Some(l.acquire_ms))),
            revert_ms: Summary::of(&collect(&|l| l.revert_ms)),
            first_acquire_ms: lines.first().map_or(0.0, |l| round3(l.acquire_ms)),
            vms: vms.len(),
            log: log.display().to_string(),
        }
    }
}

/// Runs the suite's test binary in `mode` and times it.
pub fn run(
    backend: &str,
    printer: &Printer,
    test_binary: &Path,
    suite_dir: &Path,
    mode: &Mode,
    tests: usize,
    log_dir: &Path,
) -> Result<SuiteRun> {
    run_with_env(
        backend,
        printer,
        test_binary,
        suite_dir,
        mode,
        tests,
        log_dir,
        &[],
    )
}

/// [`run`] with extra environment variables for the test binary.
#[allow(clippy::too_many_arguments)]
pub fn run_with_env(
    backend: &str,
    printer: &Printer,
    test_binary: &Path,
    suite_dir: &Path,
    mode: &Mode,
    tests: usize,
    log_dir: &Path,
    env: &[(&str, String)],
) -> Result<SuiteRun> {
    let log = log_dir.join(format!("suite-{}.log", mode.key));
    // The harness's artifacts, audit log, report and anomaly baseline of this
    // run go to a fresh directory: nothing of the user's runs is overwritten,
    // and no run's baseline is compared with another mode's.
    let artifacts = log_dir.join(format!("suite-{}", mode.key));
    // The VMs' runtime directory (and golden cache) of the suite runs,
    // apart from the user's.
    let runtime = log_dir.join("suite-runtime");
    let mut fresh = vec![&artifacts];
    if mode.golden_cache == GoldenCache::Empty {
        fresh.push(&runtime);
    }
    for dir in fresh {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", dir.display()))
            }
            _ => {}
        }
    }
    std::fs::create_dir_all(&runtime).with_context(|| format!("creating {}", runtime.display()))?;
    let mut command = Command::new(test_binary);
    command
        .args(test_binary_args(mode, tests))
        .current_dir(suite_dir)
        .env("CARGO_MANIFEST_DIR", suite_dir)
        .env("AGENT_VM_BACKEND", backend)
        .env("AGENT_VM_ARTIFACTS_DIR", &artifacts)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env(
            "AGENT_VM_GOLDEN_CACHE",
            if mode.golden_cache == GoldenCache::Off {
                "false"
            } else {
                "true"
            },
        )
        .env_remove("AGENT_VM_METRICS_PORT")
        .env_remove("AGENT_VM_AUDIT_LOG")
        .env("AGENT_VM_POOL_MIN_SIZE", mode.pool_min_size.to_string())
        .env("AGENT_VM_POOL_MAX_SIZE", mode.pool_max_size.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match mode.max_uses {
        Some(n) => command.env("AGENT_VM_MAX_USES", n.to_string()),
        None => command.env_remove("AGENT_VM_MAX_USES"),
    };
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", test_binary.display()))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let stdout_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let mut stderr_text = String::new();
    let mut lines = Vec::new();
    for line in BufReader::new(child.stderr.take().expect("piped stderr")).lines() {
        let line = line.context("reading the test binary's stderr")?;
        if let Some(parsed) = parse_harness_line(&line) {
            lines.push(parsed);
            if lines.len() % 10 == 0 || lines.len() == tests {
                printer.note(format!(
                    "{}/{tests} tests done after {:.1} s",
                    lines.len(),
                    started.elapsed().as_secs_f64()
                ));
            }
        }
        stderr_text.push_str(&line);
        stderr_text.push('\n');
    }
    let status = child.wait().context("waiting for the test binary")?;
    let wall = started.elapsed().as_secs_f64();
    let stdout_text = stdout_reader.join().unwrap_or_default();
    std::fs::write(
        &log,
        format!("--- stdout ---\n{stdout_text}--- stderr ---\n{stderr_text}"),
    )
    .with_context(|| format!("writing {}", log.display()))?;
    if !status.success() {
        bail!(
            "the suite ({}) failed ({status}); its output is in {}",
            mode.description,
            log.display()
        );
    }
    if lines.len() != tests {
        bail!(
            "the suite ({}) reported {} tests instead of {tests}; its output is in {}",
            mode.description,
            lines.len(),
            log.display()
        );
    }
    Ok(SuiteRun::from_lines(mode, tests, wall, &lines, &log))
}

/// Finds the executables in `cargo build --message-format=json` output:
/// `(target name, is a test, path)`.
pub fn executables(cargo_json: &str) -> Vec<(String, bool, PathBuf)> {
    cargo_json
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter_map(|msg| {
            let path = msg["executable"].as_str()?;
            let name = msg["target"]["name"].as_str()?.to_string();
            let is_test = msg["profile"]["test"].as_bool().unwrap_or(false);
            Some((name, is_test, PathBuf::from(path)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("0.4ms"), Some(0.4));
        assert_eq!(parse_duration_ms("95ms"), Some(95.0));
        assert_eq!(parse_duration_ms("1.23s"), Some(1230.0));
        assert_eq!(parse_duration_ms("soon"), None);
    }

    #[test]
    fn harness_lines() {
        assert_eq!(
            parse_harness_line(
                "agentvm: trivial_03 on vm 30283-0: 160ms (acquire 0.0ms, revert 98ms)"
            ),
            Some(HarnessLine {
                test: "trivial_03".into(),
                vm: "30283-0".into(),
                test_ms: 160.0,
                acquire_ms: 0.0,
                revert_ms: Some(98.0),
            })
        );
        let recycled =
            parse_harness_line("agentvm: trivial_06 on vm 30316-6: 56ms (acquire 2.11s, recycled)")
                .unwrap();
        assert_eq!(recycled.acquire_ms, 2110.0);
        assert_eq!(recycled.revert_ms, None);
        assert_eq!(
            parse_harness_line("agentvm: pool default/1x256MiB/isolated shut down (0 available)"),
            None
        );
        assert_eq!(parse_harness_line("test trivial_02 ... ok"), None);
    }

    #[test]
    fn selecting_the_first_tests() {
        let args = test_binary_args(&NAIVE, 38);
        assert_eq!(
            args,
            [
                "--exact",
                "--color",
                "never",
                "--test-threads",
                "2",
                "--skip",
                "trivial_38",
                "--skip",
                "trivial_39"
            ]
        );
        assert_eq!(test_binary_args(&POOLED, REGISTERED_TESTS).len(), 5);
    }

    #[test]
    fn the_test_file_registers_every_name() {
        let source = include_str!("../../../examples/bench-suite/tests/trivial.rs");
        for i in 0..REGISTERED_TESTS {
            assert!(source.contains(&test_name(i)), "{} missing", test_name(i));
        }
        assert!(!source.contains(&test_name(REGISTERED_TESTS)));
    }

    #[test]
    fn suite_run_summaries() {
        let line = |vm: &str, test, acquire, revert| HarnessLine {
            test: "t".into(),
            vm: vm.into(),
            test_ms: test,
            acquire_ms: acquire,
            revert_ms: revert,
        };
        let lines = [
            line("a", 100.0, 2500.0, Some(90.0)),
            line("b", 120.0, 0.1, Some(80.0)),
            line("a", 110.0, 0.0, Some(85.0)),
            line("b", 130.0, 0.0, Some(95.0)),
        ];
        let run = SuiteRun::from_lines(&POOLED, 4, 3.0, &lines, Path::new("x.log"));
        assert_eq!(run.vms, 2);
        assert_eq!(run.per_test_s, 0.75);
        assert_eq!(run.first_acquire_ms, 2500.0);
        assert_eq!(run.revert_ms.unwrap().n, 4);
        assert_eq!(run.test_ms.unwrap().p50, 110.0);
    }

    #[test]
    fn cargo_messages() {
        let out = r#"{"reason":"compiler-artifact","target":{"name":"trivial","kind":["test"]},"profile":{"test":true},"executable":"/t/release/deps/trivial-abc"}
{"reason":"compiler-artifact","target":{"name":"serde","kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"name":"agentvm-bench","kind":["bin"]},"profile":{"test":false},"executable":"/t/release/agentvm-bench"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executables(out),
            [
                (
                    "trivial".to_string(),
                    true,
                    PathBuf::from("/t/release/deps/trivial-abc")
                ),
                (
                    "agentvm-bench".to_string(),
                    false,
                    PathBuf::from("/t/release/agentvm-bench")
                ),
            ]
        );
    }
}
