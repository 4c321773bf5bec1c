//! The test harness: runs every `#[agent_vm_test]` of a test binary built
//! with `harness = false`, through [libtest-mimic](libtest_mimic), so the
//! usual test flags work (filters, `--exact`, `--skip`, `--ignored`,
//! `--include-ignored`, `--list`, `--test-threads`, `--format`, `-q`).
//!
//! * `--list` only prints the registered tests: no configuration is read,
//!   no runtime started, no VM booted (cargo-nextest lists binaries in
//!   parallel).
//! * Otherwise the configuration is loaded ([`AgentVmConfig::load`]) and the
//!   number of test threads is capped at the pool's `max_size`.
//! * One multi-thread tokio runtime serves the whole run; one [`VmPool`] per
//!   distinct VM shape (image, profile, memory, vCPUs, network: the attribute
//!   overrides the configuration) is created when its first test runs, with
//!   `min_size` capped at the number of tests of that shape selected to run.
//! * Each test acquires a VM (`acquire_timeout`), copies the attribute's
//!   `fixtures(...)` into `/workspace` (then resets the change baseline), runs
//!   with its timeout (the attribute's `timeout`, else `exec_timeout` + 30 s),
//!   and gives the VM back, which reverts it to its golden snapshot — also
//!   when the test failed, panicked or timed out. A line per test goes to
//!   stderr: `agentvm: <test> on vm <id>: 1.23s (acquire 0.4ms, revert 95ms)`.
//! * Artifacts of a test go to `<artifacts_dir>/<test name>/` (default
//!   `target/agentvm/<test name>/`): `stdout.txt`, `stderr.txt`, `run.json`
//!   (one set per agent run; the second is `stdout-2.txt`, ...),
//!   `serial.log` (the VM's serial console) and `failure.txt`. They are kept
//!   for failed tests and removed for passing ones unless
//!   `AGENT_VM_KEEP_ARTIFACTS=1`. Secrets are redacted in all of them.
//! * At the end every pool of the process is shut down (no VM outlives the
//!   run; the pool daemon's VMs live until its idle timeout) and the
//!   process exits with libtest's exit code (101 when a test failed).
//!
//! * Observability: every VM lifecycle event and agent run is appended to the
//!   audit log ([audit](crate::audit), `<artifacts_dir>/audit.jsonl`);
//!   with `metrics_port` set, Prometheus metrics are served on
//!   `http://127.0.0.1:<port>/metrics` while the run lasts
//!   ([`agentvm_runtime::metrics`]); each test's runs are checked for
//!   [anomalies](crate::anomaly) (kept in `anomalies.json` with the
//!   artifacts, which are then kept; kinds in `fail_on` fail the test); at
//!   the end a summary table goes to stderr and the [report](crate::report)
//!   to `<artifacts_dir>/report.json` (also `suites/<suite>.json`, with each
//!   test's phases and agent runs) and `<artifacts_dir>/junit.xml`, and the
//!   HTML report of every suite in `suites/` to `<artifacts_dir>/report.html`
//!   ([`agentvm_report`]).
//!
//! Under `cargo nextest run` each test runs in its own process; those
//! processes lease their VMs from the pool daemon
//! ([`pool_source`](crate::pool_source): started by the first of them, shared
//! by all, `AGENTVM_POOL=daemon|local` forces either source), so a test
//! acquires a warm VM instead of booting one. The processes of one run (same
//! `NEXTEST_RUN_ID`) merge their tests into the suite's report, so
//! `report.json` and `report.html` cover the run (`junit.xml` describes the
//! last process's test; the audit log is appended to by all).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use agentvm_runtime::backend::{Backend, BackendError};
use agentvm_runtime::config::{create_backend, parse_network, AgentVmConfig, BackendKind};
use agentvm_runtime::daemon::protocol::PoolShape;
use agentvm_runtime::daemon::DaemonPaths;
use agentvm_runtime::events::{self, emit, Event, Subscription};
use agentvm_runtime::image::locate_image;
use agentvm_runtime::pool::{ReleaseOutcome, VmPool};
use agentvm_runtime::spec::{ImagePaths, NetworkMode, ResourceProfile, VmSpec};
use futures::FutureExt;
use libtest_mimic::{Arguments, Completion, Failed, Trial};

use crate::anomaly::{self, Anomaly, Baseline, RuleLimits, Sample};
use crate::audit::AuditLog;
use crate::context::{self, SharedContext, TestContext};
use crate::pool_source::{lease_from_daemon, serve_as_daemon, AnyLease, PoolMode, SERVE_ENV};
use crate::redact::Secrets;
use crate::registry::{self, TestCase};
use crate::report::{PhaseKind, Report, RunRecord, TestRecord, TestResultKind};
use crate::run::AgentRun;
use crate::vm_ext::VmExt;

/// Printed at the start and the end of every run on the mock backend.
const MOCK_WARNING: &str = "agentvm: WARNING: backend \"mock\": NO TEST RAN IN A VM. The mock \
 backend answers every command with a canned reply; a pass says nothing about an agent. \
 It exists for the framework's own tests: unset AGENT_VM_BACKEND=mock.";

/// Time a test may take beyond the configured exec timeout when its
/// attribute sets no timeout.
pub const TEST_TIMEOUT_SLACK: Duration = Duration::from_secs(30);
/// How long the harness waits for a VM to be reverted after a test.
pub const RELEASE_WAIT: Duration = Duration::from_secs(120);
/// How long the harness waits for each pool to shut down at the end.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);
/// Exit code of a run with failed tests (as libtest's).
pub const FAILURE_EXIT_CODE: i32 = 101;

/// Runs every registered test with the command-line arguments of the process
/// and exits. This is what [`main!`](crate::main) calls.
pub fn run_harness() -> ! {
    let args = Arguments::from_args();
    let tests: Vec<&'static TestCase> = registry::all_tests().collect();
    let code = run_tests(args, &tests);
    std::process::exit(code)
}

/// Runs `tests` with libtest-mimic `args` and returns the process exit code
/// (0, or 101 when a test failed). For custom `main` functions; most test
/// binaries use [`main!`](crate::main).
pub fn run_tests(mut args: Arguments, tests: &[&'static TestCase]) -> i32 {
    if std::env::var_os(SERVE_ENV).is_some() {
        return serve_as_daemon();
    }
    if args.list {
        // Listing must not read configuration or boot anything.
        let trials = tests
            .iter()
            .map(|case| {
                Trial::test(case.full_name(), || Ok(())).with_ignored_flag(case.is_ignored())
            })
            .collect();
        let _ = libtest_mimic::run(&args, trials);
        return 0;
    }
    install_panic_hook();
    let started_at = SystemTime::now();
    let started = Instant::now();
    let mode = PoolMode::from_env();
    let config = AgentVmConfig::load()
        .map_err(|e| e.to_string())
        .and_then(|config| mode.clone().map(|_| config));
    match &config {
        Ok(config) => {
            let requested = args
                .test_threads
                .or_else(|| std::thread::available_parallelism().ok().map(Into::into))
                .unwrap_or(1);
            let threads = requested.clamp(1, config.pool_max_size.max(1));
            args.test_threads = Some(threads);
            let source = match mode {
                Ok(PoolMode::Daemon) => format!(
                    " from the pool daemon {}",
                    DaemonPaths::for_config(config).socket.display()
                ),
                _ => String::new(),
            };
            eprintln!(
                "agentvm: backend {}, image {:?}, pool {}..{} VMs{source}, {threads} test thread{}",
                config.backend.name(),
                config.image,
                config.pool_min_size,
                config.pool_max_size,
                if threads == 1 { "" } else { "s" },
            );
            if config.backend == BackendKind::Mock {
                eprintln!("{MOCK_WARNING}");
            }
        }
        Err(e) => eprintln!("agentvm: configuration error: {e}"),
    }
    let mut planned: HashMap<String, usize> = HashMap::new();
    if let Ok(config) = &config {
        for case in tests {
            if will_run(&args, &case.full_name(), case.is_ignored()) {
                if let Ok(shape) = Shape::of(config, case) {
                    *planned.entry(shape.key).or_default() += 1;
                }
            }
        }
    }
    let baseline = match &config {
        Ok(config) => Baseline::load(&baseline_path(config)),
        Err(_) => Baseline::default(),
    };
    let harness = Arc::new(Harness {
        config,
        mode: mode.unwrap_or(PoolMode::Local),
        runtime: OnceLock::new(),
        backend: OnceLock::new(),
        pools: Mutex::new(HashMap::new()),
        planned,
        keep_artifacts: keep_artifacts(),
        records: Mutex::new(Vec::new()),
        run_started: started,
        baseline: Mutex::new(baseline),
        subscriptions: Mutex::new(Vec::new()),
    });
    harness.observe();
    let run_ignored = args.ignored || args.include_ignored;
    let trials = tests
        .iter()
        .map(|&case| {
            let name = case.full_name();
            match case.config.ignore {
                // Ignored with a reason: libtest-mimic prints reasons only of
                // tests ignored at run time, so report it that way.
                Some(Some(reason)) if !run_ignored => {
                    Trial::ignorable_test(name, move || Ok(Completion::ignored_with(reason)))
                }
                None if missing_image(&harness.config, case).is_some() => {
                    let reason = missing_image(&harness.config, case).unwrap_or_default();
                    Trial::ignorable_test(name, move || Ok(Completion::ignored_with(reason)))
                }
                ignore => {
                    let harness = Arc::clone(&harness);
                    Trial::test(name, move || harness.run(case)).with_ignored_flag(ignore.is_some())
                }
            }
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    harness.shutdown();
    if !run_ignored {
        let mut records = harness.records.lock().unwrap_or_else(|e| e.into_inner());
        for case in tests {
            let name = case.full_name();
            if case.is_ignored() && will_run(&args, &name, false) {
                records.push(TestRecord {
                    name,
                    result: TestResultKind::Ignored,
                    vm: None,
                    duration_seconds: 0.0,
                    acquire_seconds: None,
                    revert_seconds: None,
                    release: None,
                    agent_runs: 0,
                    anomalies: Vec::new(),
                    message: case.config.ignore.flatten().map(str::to_string),
                    start_seconds: None,
                    phases: Vec::new(),
                    runs: Vec::new(),
                    artifacts: None,
                    snapshot_diffs: Vec::new(),
                });
            }
        }
    }
    harness.finish(started_at, started.elapsed());
    if conclusion.has_failed() {
        FAILURE_EXIT_CODE
    } else {
        0
    }
}

/// Whether libtest-mimic will run a test named `name` with these arguments
/// (mirrors its filtering).
fn will_run(args: &Arguments, name: &str, ignored: bool) -> bool {
    if args.bench {
        return false;
    }
    if let Some(filter) = &args.filter {
        let matches = if args.exact {
            name == filter
        } else {
            name.contains(filter.as_str())
        };
        if !matches {
            return false;
        }
    }
    for skip in &args.skip {
        let matches = if args.exact {
            name == skip
        } else {
            name.contains(skip.as_str())
        };
        if matches {
            return false;
        }
    }
    if args.ignored {
        ignored
    } else {
        !ignored || args.include_ignored
    }
}

fn keep_artifacts() -> bool {
    matches!(
        std::env::var("AGENT_VM_KEEP_ARTIFACTS").as_deref(),
        Ok("1" | "true" | "yes")
    )
}

/// The VM a test needs, and the network it gives the test's agents.
#[derive(Debug, Clone, PartialEq)]
struct Shape {
    key: String,
    image: String,
    profile: ResourceProfile,
    /// What the VM is attached to ([`NetworkMode::vm_attachment`]).
    network: NetworkMode,
    /// The test's network mode.
    mode: NetworkMode,
    /// The test's egress allowlist (configured and attribute patterns).
    allow: agentvm_gateway::Allowlist,
}

impl Shape {
    fn of(config: &AgentVmConfig, case: &TestCase) -> Result<Self, String> {
        let attr = &case.config;
        let image = attr
            .image
            .map_or_else(|| config.image.clone(), str::to_string);
        let mut profile = match attr.profile {
            Some(name) => ResourceProfile::from_name(name)
                .ok_or_else(|| format!("unknown profile {name:?} in the test attribute"))?,
            None => config.profile,
        };
        if attr.memory_mib.is_some() || attr.vcpus.is_some() {
            profile = ResourceProfile::Custom {
                vcpus: attr.vcpus.unwrap_or(profile.vcpus()),
                memory_mib: attr.memory_mib.unwrap_or(profile.memory_mib()),
            };
        }
        let mode = match attr.network {
            Some(text) => parse_network(text)
                .ok_or_else(|| format!("unknown network {text:?} in the test attribute"))?,
            None => config.network.clone(),
        };
        let allow = egress_allowlist(&mode, &config.allow, attr.allow)?;
        let network = mode.vm_attachment();
        let key = format!(
            "{image}/{}x{}MiB/{network}",
            profile.vcpus(),
            profile.memory_mib(),
        );
        Ok(Self {
            key,
            image,
            profile,
            network,
            mode,
            allow,
        })
    }
}

impl Shape {
    /// The spec of this shape's VMs.
    fn spec(&self, config: &AgentVmConfig, image: ImagePaths) -> VmSpec {
        let mut spec = config.vm_spec(image);
        spec.profile = self.profile;
        spec.network = self.network.clone();
        spec
    }
}

/// The egress allowlist of a test in `mode`: the configured patterns (in
/// `allowlist` mode) and the attribute's, each checked to parse.
fn egress_allowlist(
    mode: &NetworkMode,
    configured: &[String],
    attribute: &[&str],
) -> Result<agentvm_gateway::Allowlist, String> {
    let mut allow: Vec<String> = match mode {
        NetworkMode::Allowlist => configured.to_vec(),
        _ => Vec::new(),
    };
    allow.extend(attribute.iter().map(|s| s.to_string()));
    if !allow.is_empty() && !mode.offers_egress_proxy() {
        return Err(format!(
            "allow = {allow:?} needs network = \"allowlist\" or \"gateway\"; \
             network = \"{mode}\" has no egress proxy"
        ));
    }
    agentvm_gateway::Allowlist::parse(&allow).map_err(|e| e.to_string())
}

struct Harness {
    config: Result<AgentVmConfig, String>,
    /// Where the VMs come from.
    mode: PoolMode,
    runtime: OnceLock<tokio::runtime::Runtime>,
    backend: OnceLock<Result<Arc<dyn Backend>, String>>,
    pools: Mutex<HashMap<String, VmPool>>,
    planned: HashMap<String, usize>,
    keep_artifacts: bool,
    /// Every test that ran, for the report.
    records: Mutex<Vec<TestRecord>>,
    /// When the run started (the timeline's origin).
    run_started: Instant,
    /// Earlier runs' samples, for the anomaly statistics.
    baseline: Mutex<Baseline>,
    /// The audit log and metrics, registered for the whole run.
    subscriptions: Mutex<Vec<Subscription>>,
}

/// What happened on the VM, for the artifacts and the report.
struct VmOutcome {
    result: Result<(), String>,
    serial_log: Option<Vec<u8>>,
    /// The VM, when the test got one.
    vm: Option<String>,
    /// The test body.
    duration: Duration,
    acquire: Option<Duration>,
    revert: Option<Duration>,
    release: Option<String>,
    /// What the anomaly rules compare the test's agent runs with.
    limits: RuleLimits,
    /// When the test started waiting for its VM, and the harness's timed
    /// steps (acquire, fixtures, revert).
    started: Option<Instant>,
    phases: Vec<(PhaseKind, Instant, Instant)>,
}

impl VmOutcome {
    fn failed(message: String) -> Self {
        Self {
            result: Err(message),
            serial_log: None,
            vm: None,
            duration: Duration::ZERO,
            acquire: None,
            revert: None,
            release: None,
            limits: RuleLimits::default(),
            started: None,
            phases: Vec::new(),
        }
    }
}

fn baseline_path(config: &AgentVmConfig) -> PathBuf {
    config.artifacts_dir.join("baseline.json")
}

/// The test binary's name without cargo's hash suffix (`agents-0123abcd` → `agents`).
fn suite_name() -> String {
    let stem = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "agentvm".to_string());
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name.to_string()
        }
        _ => stem,
    }
}

impl Harness {
    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("agentvm-runtime")
                .build()
                .expect("cannot start the tokio runtime")
        })
    }

    fn backend(&self, config: &AgentVmConfig) -> Result<Arc<dyn Backend>, String> {
        self.backend
            .get_or_init(|| {
                create_backend(config).map_err(|e| {
                    format!("cannot create the {} backend: {e}", config.backend.name())
                })
            })
            .clone()
    }

    /// The pool for `shape`, created on first use. Must run inside the runtime.
    fn pool(
        &self,
        config: &AgentVmConfig,
        shape: &Shape,
        image: ImagePaths,
    ) -> Result<VmPool, String> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = pools.get(&shape.key) {
            return Ok(pool.clone());
        }
        let backend = self.backend(config)?;
        let mut pool_config = config.pool_config(shape.spec(config, image));
        let planned = self.planned.get(&shape.key).copied().unwrap_or(1);
        pool_config.min_size = pool_config.min_size.min(planned);
        let pool = VmPool::new(backend, pool_config).map_err(|e| e.to_string())?;
        pools.insert(shape.key.clone(), pool.clone());
        Ok(pool)
    }

    /// Opens the audit log and, with `metrics_port`, starts the metrics
    /// endpoint; both consume the runtime's events for the whole run.
    fn observe(&self) {
        let Ok(config) = &self.config else { return };
        let mut subscriptions = self.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
        let path = config.audit_log_path();
        match AuditLog::open(&path) {
            Ok(log) => subscriptions.push(events::subscribe(Arc::new(log))),
            Err(e) => eprintln!("agentvm: cannot open the audit log {}: {e}", path.display()),
        }
        if let Some(port) = config.metrics_port {
            let metrics = Arc::new(agentvm_runtime::metrics::Metrics::new());
            let runtime = self.runtime();
            match runtime.block_on(agentvm_runtime::metrics::bind(port)) {
                Ok(listener) => {
                    eprintln!("agentvm: metrics on http://127.0.0.1:{port}/metrics");
                    subscriptions.push(events::subscribe(metrics.clone()));
                    runtime.spawn(agentvm_runtime::metrics::serve(listener, metrics));
                }
                Err(e) => eprintln!("agentvm: cannot serve metrics on 127.0.0.1:{port}: {e}"),
            }
        }
    }

    /// Writes the report (stderr table, report.json, junit.xml) and the baseline.
    fn finish(&self, started_at: SystemTime, duration: Duration) {
        let Ok(config) = &self.config else { return };
        let records = std::mem::take(&mut *self.records.lock().unwrap_or_else(|e| e.into_inner()));
        if records.is_empty() {
            return;
        }
        let suite = suite_name();
        let report = Report::new(&suite, started_at, duration, records);
        eprint!("\nagentvm report:\n{}", report.table());
        if config.backend == BackendKind::Mock {
            eprintln!("{MOCK_WARNING}");
        }
        let dir = &config.artifacts_dir;
        let suite_file = format!("suites/{}.json", crate::report::file_safe(&suite));
        // Under cargo-nextest the run's other processes wrote their tests there.
        let lock = crate::report::FileLock::acquire(&dir.join(format!("{suite_file}.lock")));
        let earlier = std::fs::read_to_string(dir.join(&suite_file)).ok();
        let json = report.merged_json(earlier.as_deref());
        let files = [
            (suite_file.as_str(), json.clone()),
            ("report.json", json),
            ("junit.xml", report.junit_xml(&suite)),
        ];
        for (file, text) in files {
            if let Err(e) = crate::report::write_atomic(&dir.join(file), text.as_bytes()) {
                eprintln!("agentvm: cannot write {}: {e}", dir.join(file).display());
            }
        }
        eprintln!(
            "agentvm: report in {}, {}; audit log {}",
            dir.join("report.json").display(),
            dir.join("junit.xml").display(),
            config.audit_log_path().display()
        );
        drop(lock);
        match agentvm_report::write_report(dir) {
            Ok(path) => eprintln!("agentvm: HTML report {}", path.display()),
            Err(e) => eprintln!("agentvm: cannot write the HTML report: {e}"),
        }
        let baseline = self.baseline.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = baseline.save(&baseline_path(config)) {
            eprintln!("agentvm: cannot write the anomaly baseline: {e}");
        }
    }

    /// The anomalies of a test that ran (rules per agent run, statistics
    /// against the baseline, which gets this run's sample).
    fn anomalies(&self, name: &str, outcome: &VmOutcome, runs: &[AgentRun]) -> Vec<Anomaly> {
        let mut found = Vec::new();
        for (i, run) in runs.iter().enumerate() {
            found.extend(anomaly::rule_anomalies(run, i + 1, &outcome.limits));
        }
        if outcome.vm.is_some() {
            let sample = Sample::of(outcome.duration.as_secs_f64(), runs);
            let mut baseline = self.baseline.lock().unwrap_or_else(|e| e.into_inner());
            found.extend(anomaly::stat_anomalies(baseline.history(name), &sample));
            baseline.record(name, sample);
        }
        found
    }

    /// Runs one test (on a libtest-mimic worker thread).
    fn run(&self, case: &'static TestCase) -> Result<(), Failed> {
        let name = case.full_name();
        let config = self
            .config
            .as_ref()
            .map_err(|e| Failed::from(format!("agentvm configuration error: {e}")))?;
        let artifacts = Artifacts::new(&config.artifacts_dir, &name);
        artifacts.clear();
        let context = TestContext::new(&name, config.exec_timeout);
        let outcome =
            self.runtime()
                .block_on(self.run_on_vm(case, config, &name, Arc::clone(&context)));
        let context = context.lock().unwrap_or_else(|e| e.into_inner());
        let mut failure = outcome
            .result
            .as_ref()
            .err()
            .map(|message| context.secrets.redact(message).into_owned());
        let mut anomalies = self.anomalies(&name, &outcome, &context.runs);
        let fails = anomaly::apply_fail_on(&mut anomalies, &config.fail_on);
        for a in &anomalies {
            emit(Event::Anomaly {
                test: name.clone(),
                kind: a.kind.clone(),
                message: a.message.clone(),
            });
        }
        if fails {
            let listed: Vec<String> = anomalies
                .iter()
                .filter(|a| a.fails)
                .map(|a| format!("{}: {}", a.kind, a.message))
                .collect();
            let message = format!(
                "anomalies that fail the test (fail_on):\n  {}",
                listed.join("\n  ")
            );
            failure = Some(match failure {
                Some(f) => format!("{f}\n{message}"),
                None => message,
            });
        }
        let keeps_artifacts = failure.is_some() || self.keep_artifacts || !anomalies.is_empty();
        emit(Event::TestFinished {
            test: name.clone(),
            result: if failure.is_some() {
                "failed"
            } else {
                "passed"
            }
            .to_string(),
            vm: outcome.vm.clone(),
            duration_seconds: outcome.duration.as_secs_f64(),
            revert_seconds: outcome.revert.map(|d| d.as_secs_f64()),
            anomalies: anomalies.iter().map(|a| a.kind.clone()).collect(),
            failure: failure.clone(),
        });
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(TestRecord {
                name: name.clone(),
                result: if failure.is_some() {
                    TestResultKind::Failed
                } else {
                    TestResultKind::Passed
                },
                vm: outcome.vm.clone(),
                duration_seconds: outcome.duration.as_secs_f64(),
                acquire_seconds: outcome.acquire.map(|d| d.as_secs_f64()),
                revert_seconds: outcome.revert.map(|d| d.as_secs_f64()),
                release: outcome.release.clone(),
                agent_runs: context.runs.len(),
                anomalies: anomalies.clone(),
                message: failure.clone(),
                start_seconds: outcome
                    .started
                    .map(|s| s.saturating_duration_since(self.run_started).as_secs_f64()),
                phases: outcome.started.map_or_else(Vec::new, |start| {
                    let marks: Vec<_> = outcome
                        .phases
                        .iter()
                        .chain(&context.phases)
                        .copied()
                        .collect();
                    crate::report::phases_since(start, &marks)
                }),
                runs: context
                    .runs
                    .iter()
                    .zip(&context.infos)
                    .map(|(run, info)| RunRecord {
                        agent: info.agent.clone(),
                        argv: info.argv.clone(),
                        prompt: info.prompt.clone(),
                        task_files: info.task_files.clone(),
                        run: serde_json::to_value(run).unwrap_or_default(),
                    })
                    .collect(),
                artifacts: keeps_artifacts.then(|| artifacts.relative_name()),
                snapshot_diffs: context
                    .snapshot_diffs
                    .iter()
                    .map(|(name, diff)| crate::report::SnapshotDiff {
                        name: name.clone(),
                        diff: diff.clone(),
                    })
                    .collect(),
            });
        if keeps_artifacts {
            let written = artifacts.write(
                &context.runs,
                failure.as_deref(),
                outcome.serial_log.as_deref(),
                &anomalies,
                &context.secrets,
            );
            if let Err(e) = written {
                eprintln!(
                    "agentvm: {name}: cannot write artifacts to {}: {e}",
                    artifacts.dir.display()
                );
            }
        }
        match failure {
            None => Ok(()),
            Some(message) if artifacts.dir.exists() => {
                Err(format!("{message}\nartifacts: {}", artifacts.dir.display()).into())
            }
            Some(message) => Err(message.into()),
        }
    }

    async fn run_on_vm(
        &self,
        case: &'static TestCase,
        config: &AgentVmConfig,
        name: &str,
        context: SharedContext,
    ) -> VmOutcome {
        let failed = VmOutcome::failed;
        let shape = match Shape::of(config, case) {
            Ok(shape) => shape,
            Err(e) => return failed(e),
        };
        let image = match locate_image(&shape.image, &config.image_dir) {
            Ok(image) => image,
            Err(e) => return failed(image_error(&e)),
        };
        let acquire_started = Instant::now();
        let acquired = match self.mode {
            PoolMode::Local => match self.pool(config, &shape, image) {
                Ok(pool) => pool
                    .acquire(config.acquire_timeout)
                    .await
                    .map(AnyLease::Local)
                    .map_err(|e| e.to_string()),
                Err(e) => return failed(e),
            },
            PoolMode::Daemon => {
                let daemon_shape = PoolShape {
                    image: shape.image.clone(),
                    profile: shape.profile,
                    network: shape.network.clone(),
                };
                lease_from_daemon(config, daemon_shape, shape.spec(config, image), name)
                    .await
                    .map(AnyLease::Remote)
            }
        };
        let mut lease = match acquired {
            Ok(lease) => lease,
            Err(e) => return failed(format!("could not get a VM ({}): {e}", shape.key)),
        };
        let acquire = lease.waited();
        let mut phases = vec![(PhaseKind::Acquire, acquire_started, Instant::now())];
        let vm_id = lease.id().to_string();
        {
            let mut context = context.lock().unwrap_or_else(|e| e.into_inner());
            context.vm = vm_id.clone();
            context.network = shape.mode.clone();
            context.allow = shape.allow.clone();
        }
        emit(Event::TestStarted {
            test: name.to_string(),
            vm: vm_id.clone(),
        });
        let timeout = case
            .config
            .timeout
            .unwrap_or(config.exec_timeout + TEST_TIMEOUT_SLACK);
        let started = Instant::now();
        let result = {
            let vm: &mut agentvm_runtime::vm::Vm = &mut lease;
            let body = async move {
                let inject_started = Instant::now();
                for fixture in case.config.fixtures {
                    vm.copy_dir_into_workspace(Path::new(fixture), "")
                        .await
                        .map_err(|e| format!("copying fixture {fixture}: {e}"))?;
                }
                if !case.config.fixtures.is_empty() {
                    vm.reset_workspace_baseline()
                        .await
                        .map_err(|e| format!("recording the workspace baseline: {e}"))?;
                    context::record_phase(
                        context::current().as_ref(),
                        PhaseKind::Inject,
                        inject_started,
                    );
                }
                (case.run)(vm).await.map_err(|failure| failure.to_string())
            };
            let guarded = context::scope(context, AssertUnwindSafe(body).catch_unwind());
            match tokio::time::timeout(timeout, guarded).await {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => Err(format!("test panicked: {}", panic_message(&*panic))),
                Err(_) => Err(format!(
                    "test timed out after {} ({}); the VM is reverted",
                    fmt_duration(timeout),
                    if case.config.timeout.is_some() {
                        "the attribute's timeout".to_string()
                    } else {
                        format!("exec_timeout + {}", fmt_duration(TEST_TIMEOUT_SLACK))
                    }
                )),
            }
        };
        let elapsed = started.elapsed();
        let serial_log = if result.is_err() || self.keep_artifacts {
            lease
                .serial_log_path()
                .and_then(|path| std::fs::read(path).ok())
        } else {
            None
        };
        let release_started = Instant::now();
        let release = lease.release();
        let mut revert_time = None;
        let revert = match tokio::time::timeout(RELEASE_WAIT, release).await {
            Ok(Ok(ReleaseOutcome::Reverted(timings))) => {
                revert_time = Some(timings.total);
                phases.push((PhaseKind::Revert, release_started, Instant::now()));
                format!("revert {}", fmt_duration(timings.total))
            }
            Ok(Ok(ReleaseOutcome::Recycled)) => "recycled".to_string(),
            Ok(Ok(ReleaseOutcome::Destroyed(reason))) => {
                format!("revert failed, VM destroyed: {reason}")
            }
            Ok(Err(e)) => e,
            Err(_) => format!("revert still running after {}", fmt_duration(RELEASE_WAIT)),
        };
        eprintln!(
            "agentvm: {name} on vm {vm_id}: {} (acquire {}, {revert})",
            fmt_duration(elapsed),
            fmt_duration(acquire)
        );
        VmOutcome {
            result,
            serial_log,
            vm: Some(vm_id),
            duration: elapsed,
            acquire: Some(acquire),
            revert: revert_time,
            release: Some(revert),
            limits: RuleLimits::of(shape.profile, &shape.network, config.process_limit),
            started: Some(acquire_started),
            phases,
        }
    }

    /// Shuts every pool down (destroying its VMs).
    fn shutdown(&self) {
        let pools: Vec<(String, VmPool)> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        if pools.is_empty() {
            return;
        }
        self.runtime().block_on(async {
            let shutdowns = pools.iter().map(|(key, pool)| async move {
                match tokio::time::timeout(SHUTDOWN_WAIT, pool.shutdown()).await {
                    Ok(()) => eprintln!("agentvm: pool {key} shut down ({})", pool.status()),
                    Err(_) => eprintln!(
                        "agentvm: pool {key} did not shut down within {} ({})",
                        fmt_duration(SHUTDOWN_WAIT),
                        pool.status()
                    ),
                }
            });
            futures::future::join_all(shutdowns).await;
        });
    }
}

/// Replaces the default panic message printer while a test with secrets
/// runs, so that a panic message holding a secret prints redacted.
fn install_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let Some(context) = context::current() else {
                return default(info);
            };
            // try_lock: the panic may come from code holding the lock.
            let secrets = match context.try_lock() {
                Ok(context) => Some(context.secrets.clone()),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner().secrets.clone()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            match secrets {
                Some(secrets) if secrets.is_empty() => default(info),
                Some(secrets) => {
                    let thread = std::thread::current();
                    let location = info.location().map_or_else(String::new, |l| {
                        format!(" at {}:{}:{}", l.file(), l.line(), l.column())
                    });
                    eprintln!(
                        "\nthread '{}' panicked{location}:\n{}",
                        thread.name().unwrap_or("<unnamed>"),
                        secrets.redact(&panic_message(info.payload()))
                    );
                }
                None => eprintln!("\na test panicked (message hidden: it may hold a secret)"),
            }
        }));
    });
}

/// Images whose tests are reported ignored at run time (with the command
/// that builds them) when the image is not built: the Debian `agent` image
/// is a large, optional build (`cargo xtask build-image --name agent`). A
/// test of any other missing image fails, saying how to build it.
const OPTIONAL_IMAGES: &[&str] = &["agent"];

/// The ignore reason of a test whose optional image is not built.
fn missing_image(config: &Result<AgentVmConfig, String>, case: &TestCase) -> Option<String> {
    let config = config.as_ref().ok()?;
    let image = case.config.image.filter(|i| OPTIONAL_IMAGES.contains(i))?;
    match locate_image(image, &config.image_dir) {
        Err(e @ BackendError::MissingImage { .. }) => {
            Some(format!("image {image:?} is not built: {e}"))
        }
        _ => None,
    }
}

fn image_error(error: &BackendError) -> String {
    error.to_string()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// `0.4ms`, `95ms`, `1.23s`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1}ms", d.as_secs_f64() * 1000.0)
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

/// Directory names under `target/agentvm/` used by other tools.
const RESERVED_DIRS: &[&str] = &["images", "cache", "guest-build", "run", "tmp"];

/// The artifacts directory of one test.
struct Artifacts {
    dir: PathBuf,
}

impl Artifacts {
    fn new(root: &Path, test_name: &str) -> Self {
        let mut name: String = test_name
            .chars()
            .map(|c| {
                if c == '/' || c == '\\' || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        if name.is_empty() || name.starts_with('.') || RESERVED_DIRS.contains(&name.as_str()) {
            name = format!("test-{name}");
        }
        Self {
            dir: root.join(name),
        }
    }

    /// The directory's name (relative to the artifacts directory).
    fn relative_name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn clear(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!(
                    "agentvm: cannot remove old artifacts {}: {e}",
                    self.dir.display()
                );
            }
        }
    }

    fn write(
        &self,
        runs: &[AgentRun],
        failure: Option<&str>,
        serial_log: Option<&[u8]>,
        anomalies: &[Anomaly],
        secrets: &Secrets,
    ) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let write = |file: String, text: &str| {
            std::fs::write(self.dir.join(file), secrets.redact(text).as_bytes())
        };
        for (i, run) in runs.iter().enumerate() {
            let suffix = if i == 0 {
                String::new()
            } else {
                format!("-{}", i + 1)
            };
            write(format!("stdout{suffix}.txt"), run.stdout())?;
            write(format!("stderr{suffix}.txt"), run.stderr())?;
            write(format!("run{suffix}.json"), &run.to_json())?;
        }
        if let Some(serial) = serial_log {
            write("serial.log".into(), &String::from_utf8_lossy(serial))?;
        }
        if let Some(failure) = failure {
            write("failure.txt".into(), failure)?;
        }
        if !anomalies.is_empty() {
            let json = serde_json::to_string_pretty(anomalies).map_err(std::io::Error::other)?;
            write("anomalies.json".into(), &json)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{TestConfig, TestFuture};

    fn never(_: &mut agentvm_runtime::vm::Vm) -> TestFuture<'_> {
        unreachable!()
    }

    fn case(config: TestConfig) -> TestCase {
        TestCase {
            name: "t",
            module_path: "suite",
            file: file!(),
            line: line!(),
            config,
            run: never,
        }
    }

    fn args(list: &[&str]) -> Arguments {
        Arguments::from_iter(std::iter::once("test").chain(list.iter().copied()))
    }

    #[test]
    fn filtering_mirrors_libtest_mimic() {
        assert!(will_run(&args(&[]), "a::hello", false));
        assert!(!will_run(&args(&[]), "a::hello", true));
        assert!(will_run(&args(&["--include-ignored"]), "a::hello", true));
        assert!(will_run(&args(&["--ignored"]), "a::hello", true));
        assert!(!will_run(&args(&["--ignored"]), "a::hello", false));
        assert!(will_run(&args(&["hell"]), "a::hello", false));
        assert!(!will_run(&args(&["hell", "--exact"]), "a::hello", false));
        assert!(will_run(&args(&["a::hello", "--exact"]), "a::hello", false));
        assert!(!will_run(&args(&["--skip", "hell"]), "a::hello", false));
        assert!(will_run(
            &args(&["--skip", "hell", "--exact"]),
            "a::hello",
            false
        ));
    }

    #[test]
    fn shapes_combine_config_and_attribute() {
        let config = AgentVmConfig::default();
        let plain = Shape::of(&config, &case(TestConfig::DEFAULT)).unwrap();
        assert_eq!(plain.key, "default/1x256MiB/isolated");
        let custom = Shape::of(
            &config,
            &case(TestConfig {
                image: Some("rich"),
                profile: Some("standard"),
                memory_mib: Some(512),
                network: Some("bridge:br0"),
                ..TestConfig::DEFAULT
            }),
        )
        .unwrap();
        assert_eq!(custom.key, "rich/2x512MiB/bridge:br0");
        assert_eq!(
            custom.profile,
            ResourceProfile::Custom {
                vcpus: 2,
                memory_mib: 512
            }
        );
        // Same sizes, same pool.
        let light = Shape::of(
            &config,
            &case(TestConfig {
                vcpus: Some(1),
                ..TestConfig::DEFAULT
            }),
        )
        .unwrap();
        assert_eq!(light.key, plain.key);
    }

    #[test]
    fn network_modes_without_a_nic_share_vms() {
        let mut config = AgentVmConfig {
            allow: vec!["suite.example:443".into()],
            ..AgentVmConfig::default()
        };
        let shape = |config: &AgentVmConfig, network, allow: &'static [&'static str]| {
            Shape::of(
                config,
                &case(TestConfig {
                    network,
                    allow,
                    ..TestConfig::DEFAULT
                }),
            )
        };
        let with = |network, allow| shape(&config, network, allow);
        let gateway = with(None, &[]).unwrap();
        assert_eq!(gateway.mode, NetworkMode::Gateway);
        assert!(
            gateway.allow.is_empty(),
            "the suite's list is for allowlist mode"
        );
        let isolated = with(Some("isolated"), &[]).unwrap();
        let allowlist = with(Some("allowlist"), &["test.example"]).unwrap();
        assert_eq!(allowlist.mode, NetworkMode::Allowlist);
        let parsed = |entries: &[&str]| agentvm_gateway::Allowlist::parse(entries).unwrap();
        assert_eq!(
            allowlist.allow,
            parsed(&["suite.example:443", "test.example"])
        );
        for shape in [&gateway, &isolated, &allowlist] {
            assert_eq!(shape.network, NetworkMode::Isolated);
            assert_eq!(shape.key, "default/1x256MiB/isolated");
        }
        let per_test = with(None, &["test.example:80"]).unwrap();
        assert_eq!(per_test.allow, parsed(&["test.example:80"]));
        let e = with(Some("isolated"), &["test.example"]).unwrap_err();
        assert!(e.contains("needs network = \"allowlist\""), "{e}");
        config.allow = vec!["*bad*.example".into()];
        let e = shape(&config, Some("allowlist"), &[]).unwrap_err();
        assert!(e.contains("bad allowlist entry"), "{e}");
    }

    #[test]
    fn durations_print_compactly() {
        assert_eq!(fmt_duration(Duration::from_micros(400)), "0.4ms");
        assert_eq!(fmt_duration(Duration::from_millis(95)), "95ms");
        assert_eq!(fmt_duration(Duration::from_millis(1234)), "1.23s");
    }

    #[test]
    fn artifact_dirs_avoid_reserved_names() {
        let root = Path::new("/t");
        assert_eq!(Artifacts::new(root, "a::b").dir, Path::new("/t/a::b"));
        assert_eq!(
            Artifacts::new(root, "images").dir,
            Path::new("/t/test-images")
        );
        assert_eq!(Artifacts::new(root, "x/../y").dir, Path::new("/t/x_.._y"));
    }

    #[test]
    fn artifacts_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = Artifacts::new(dir.path(), "t");
        let mut secrets = Secrets::new();
        secrets.add("K", "hunter2");
        artifacts
            .write(
                &[],
                Some("failed: hunter2"),
                Some(b"console hunter2\n"),
                &[],
                &secrets,
            )
            .unwrap();
        let failure = std::fs::read_to_string(artifacts.dir.join("failure.txt")).unwrap();
        assert_eq!(failure, "failed: [secret:K]");
        let serial = std::fs::read_to_string(artifacts.dir.join("serial.log")).unwrap();
        assert_eq!(serial, "console [secret:K]\n");
        artifacts.clear();
        assert!(!artifacts.dir.exists());
    }
}
