//! The harness (`agentvm_test::run_harness`) end to end, against the mock
//! backend: no VM is booted, the mock's "guest" only answers Hello, Ping and
//! Exec (`echo` prints its arguments) and acknowledges everything else.
//!
//! This binary has two modes:
//!
//! * normally (`cargo test`), it is the *driver*: its tests (plain
//!   libtest-mimic trials) run this same binary again as a subprocess in
//!   fixture mode, with arguments and environment variables, and check its
//!   exit code, output and artifacts;
//! * with `AGENTVM_HARNESS_FIXTURE=1`, it is the *fixture*: a test binary
//!   whose `main` is `agentvm_test::run_harness()` and whose
//!   `#[agent_vm_test]`s (module `fixture`) pass, fail, panic, time out, are
//!   ignored, miss their image, leak secrets and assert snapshots on purpose.
//!
//! What this checks: listing, filtering, exit codes, ignore reasons, test
//! timeouts, release (revert) of the VM after failures, panics and timeouts,
//! missing images, artifacts, secret redaction in failure messages, snapshot
//! naming and redactions, insta's CI behaviour, and the observability
//! outputs: audit log, report.json, junit.xml, anomalies (the mock's
//! `mock-timeout` program "times out"), `fail_on`, and the metrics endpoint
//! (scraped from inside a fixture test while the run lasts). What it cannot
//! check: workspace changes (the mock lists none), real boots, reverts and
//! timings — those are checked by `examples/agent-suite` on real VMs.

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agentvm_test::agentvm_runtime::client::ExecOutput;
use agentvm_test::agentvm_runtime::protocol::{
    ChangeKind, ExitReport, ExitStatus, FileChange, FileKind, FileState, ResourceUsage,
};
use agentvm_test::prelude::*;
use agentvm_test::redact::Secrets;
use libtest_mimic::{Arguments, Failed, Trial};

const FIXTURE_ENV: &str = "AGENTVM_HARNESS_FIXTURE";
const SECRET: &str = "hunter2-very-secret";

fn main() {
    if std::env::var_os(FIXTURE_ENV).is_some() {
        agentvm_test::run_harness();
    }
    driver::main();
}

/// The tests of the fixture binary. Sorted by name and run on one thread with
/// a pool of one VM, so they run in this order on the same VM.
mod fixture {
    use super::*;

    #[agent_vm_test]
    async fn a_passes(vm: &mut Vm) -> TestResult {
        let out = vm.exec(Command::new("echo").arg("hi")).await?;
        assert_eq!(out.stdout, b"hi\n");
        Ok(())
    }

    #[agent_vm_test]
    async fn b_fails(_vm: &mut Vm) -> TestResult {
        Err("deliberate failure".into())
    }

    #[agent_vm_test]
    async fn c_panics(_vm: &mut Vm) {
        panic!("deliberate panic");
    }

    #[agent_vm_test]
    async fn d_after_panic(vm: &mut Vm) -> TestResult {
        let out = vm
            .exec(Command::new("echo").arg("still").arg("works"))
            .await?;
        assert_eq!(out.stdout, b"still works\n");
        Ok(())
    }

    #[agent_vm_test(ignore = "needs a real VM")]
    async fn e_ignored_with_reason(vm: &mut Vm) -> TestResult {
        vm.exec(Command::new("echo")).await?;
        Ok(())
    }

    #[agent_vm_test(ignore)]
    async fn e_ignored_without_reason(_vm: &mut Vm) {}

    #[agent_vm_test(timeout = "300ms")]
    async fn f_times_out(_vm: &mut Vm) {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }

    #[agent_vm_test(image = "missing-image")]
    async fn g_missing_image(_vm: &mut Vm) {}

    #[agent_vm_test]
    async fn h_snapshot(_vm: &mut Vm) {
        assert_agent_snapshot!(sample_run());
    }

    #[agent_vm_test]
    async fn i_snapshot_unaccepted(_vm: &mut Vm) {
        assert_agent_snapshot!("never_accepted", sample_run());
    }

    #[agent_vm_test]
    async fn j_secret_in_failure(vm: &mut Vm) -> TestResult {
        let agent = Agent::command(["echo", SECRET]).secret_env("TOKEN", SECRET);
        let result = vm.run_agent(&agent, Task::new()).await;
        Err(format!("the token is {SECRET}; run_agent: {:?}", result.err()).into())
    }

    #[agent_vm_test]
    async fn k_secret_in_panic(vm: &mut Vm) {
        let agent = Agent::command(["echo"]).secret_env("TOKEN", SECRET);
        let _ = vm.run_agent(&agent, Task::prompt("p")).await;
        panic!("the token is {SECRET}");
    }

    /// A seeded anomaly: an agent killed at its timeout (the mock's
    /// `mock-timeout`), with a secret in its arguments.
    #[agent_vm_test]
    async fn l_agent_times_out(vm: &mut Vm) -> TestResult {
        let agent = Agent::command(["mock-timeout", SECRET]).secret_env("TOKEN", SECRET);
        let run = vm.run_agent(&agent, Task::prompt("spin")).await?;
        assert!(run.timed_out(), "{run:?}");
        Ok(())
    }

    /// The value of the sample `series` (the full series text before the value).
    pub fn metric(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    /// With `AGENT_VM_METRICS_PORT` set, scrapes the harness's own metrics
    /// endpoint while holding the only VM, runs an agent, and scrapes again.
    #[agent_vm_test]
    async fn m_metrics_endpoint(vm: &mut Vm) -> TestResult {
        use agentvm_test::agentvm_runtime::metrics::http_get;
        let Some(port) = std::env::var("AGENT_VM_METRICS_PORT")
            .ok()
            .and_then(|p| p.parse::<u16>().ok())
        else {
            return Ok(());
        };
        let (status, before) = http_get(port, "/metrics").await?;
        assert_eq!(status, "HTTP/1.1 200 OK");
        let leased: Vec<&str> = before
            .lines()
            .filter(|l| l.starts_with("agent_vm_pool_size{") && l.contains("state=\"leased\""))
            .collect();
        assert_eq!(leased.len(), 1, "{before}");
        assert!(leased[0].ends_with(" 1"), "{before}");
        assert!(
            metric(&before, "agent_vm_boot_duration_seconds_count") >= Some(1.0),
            "{before}"
        );
        assert!(
            metric(&before, "agent_vm_revert_duration_seconds_count") >= Some(1.0),
            "{before}"
        );
        assert!(
            metric(&before, "agent_execution_timeout_total") >= Some(1.0),
            "{before}"
        );
        let ok = r#"agent_execution_total{status="success"}"#;
        let successes = metric(&before, ok).unwrap_or(0.0);
        vm.run_agent(&Agent::command(["echo", "x"]), Task::new())
            .await?;
        let (_, after) = http_get(port, "/metrics").await?;
        assert_eq!(metric(&after, ok), Some(successes + 1.0), "{after}");
        assert!(
            metric(&after, r#"agent_anomaly_total{kind="timeout"}"#) >= Some(1.0),
            "{after}"
        );
        Ok(())
    }

    #[agent_vm_test]
    async fn z_last(vm: &mut Vm) -> TestResult {
        let out = vm.exec(Command::new("echo").arg("last")).await?;
        assert_eq!(out.stdout, b"last\n");
        Ok(())
    }

    /// A run as `run_agent` would build it (the mock cannot produce one).
    pub fn sample_run() -> AgentRun {
        let mut secrets = Secrets::new();
        secrets.add("TOKEN", SECRET);
        let file = |text: &str, mode| FileState {
            kind: FileKind::File,
            size: text.len() as u64,
            mode,
            sha256: Some(format!("{:064}", text.len())),
            text: Some(text.to_string()),
        };
        AgentRun::from_exec(
            ExecOutput {
                stdout: format!("wrote hello.txt with {SECRET}\n").into_bytes(),
                stderr: b"built in /tmp/.tmpAbCdEf\n".to_vec(),
                report: ExitReport {
                    status: ExitStatus::Code(0),
                    timed_out: false,
                    duration: Duration::from_millis(1234),
                    resources: ResourceUsage {
                        peak_rss_bytes: Some(1 << 20),
                        user_cpu: Some(Duration::from_millis(5)),
                        system_cpu: Some(Duration::from_millis(7)),
                        ..ResourceUsage::default()
                    },
                    stdout_bytes: 40,
                    stderr_bytes: 25,
                    stdout_truncated: false,
                    stderr_truncated: false,
                },
            },
            vec![
                FileChange {
                    path: "hello.txt".into(),
                    change: ChangeKind::Created,
                    before: None,
                    after: Some(file("hi\n", 0o644)),
                },
                FileChange {
                    path: "README.md".into(),
                    change: ChangeKind::Modified,
                    before: Some(file("# Demo\n\nold line\n", 0o644)),
                    after: Some(file(&format!("# Demo\n\nnew line {SECRET}\n"), 0o644)),
                },
            ],
            &secrets,
        )
    }
}

mod driver {
    use super::*;

    /// What a fixture run printed.
    #[derive(Debug)]
    pub struct Output {
        pub code: i32,
        pub stdout: String,
        pub stderr: String,
    }

    impl Output {
        fn all(&self) -> String {
            format!(
                "--- exit {} ---\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.code, self.stdout, self.stderr
            )
        }
    }

    pub struct Env {
        dir: tempfile::TempDir,
        full_run: OnceLock<Output>,
    }

    impl Env {
        fn images(&self) -> PathBuf {
            self.dir.path().join("images")
        }

        fn artifacts(&self) -> PathBuf {
            self.dir.path().join("artifacts")
        }

        /// Runs the fixture binary with the mock backend and `args`.
        pub fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
            let mut command = Process::new(std::env::current_exe().expect("current exe"));
            for var in agentvm_test::agentvm_runtime::config::ENV_VARS {
                command.env_remove(var);
            }
            for var in [
                "CI",
                "TF_BUILD",
                "INSTA_UPDATE",
                "INSTA_FORCE_PASS",
                "AGENT_VM_KEEP_ARTIFACTS",
                "RUST_BACKTRACE",
            ] {
                command.env_remove(var);
            }
            command
                .env(FIXTURE_ENV, "1")
                // The fixture's pool is in its process (this driver may run under nextest).
                .env("AGENTVM_POOL", "local")
                .env("AGENT_VM_BACKEND", "mock")
                .env("AGENT_VM_IMAGE_DIR", self.images())
                .env("AGENT_VM_ARTIFACTS_DIR", self.artifacts())
                .env("AGENT_VM_POOL_MIN_SIZE", "1")
                .env("AGENT_VM_POOL_MAX_SIZE", "1")
                .env("AGENT_VM_ACQUIRE_TIMEOUT", "10s")
                .env("AGENT_VM_BOOT_TIMEOUT", "10s")
                .env("CI", "true")
                .args(["--color", "never"])
                .args(args);
            for (k, v) in env {
                command.env(k, v);
            }
            let out = command.output().expect("run the fixture binary");
            Output {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }

        /// All fixture tests, once (shared by several checks).
        pub fn full_run(&self) -> &Output {
            self.full_run.get_or_init(|| {
                // A stale artifacts directory of a passing test must go.
                std::fs::create_dir_all(self.artifacts().join("fixture::a_passes")).unwrap();
                self.run(&[], &[])
            })
        }
    }

    fn check(condition: bool, what: &str, out: &Output) -> Result<(), Failed> {
        if condition {
            Ok(())
        } else {
            Err(format!("{what}\n{}", out.all()).into())
        }
    }

    /// The outcome libtest-mimic printed for `test` (`ok`, `FAILED`, `ignored (...)`).
    fn outcome(out: &Output, test: &str) -> Option<String> {
        let prefix = format!("test {test} ");
        out.stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.split_once(" ... "))
            .map(|(_, outcome)| outcome.trim().to_string())
    }

    fn line_with<'a>(text: &'a str, needle: &str) -> Option<&'a str> {
        text.lines().find(|l| l.contains(needle))
    }

    fn snapshot_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots")
    }

    fn never_accepted_files() -> Vec<PathBuf> {
        std::fs::read_dir(snapshot_dir())
            .map(|dir| {
                dir.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.to_string_lossy().contains("never_accepted"))
                    .collect()
            })
            .unwrap_or_default()
    }

    type Check = fn(&Env) -> Result<(), Failed>;

    pub fn main() {
        let args = Arguments::from_args();
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("images/default");
        std::fs::create_dir_all(&image).unwrap();
        std::fs::write(
            image.join("manifest.json"),
            r#"{"name": "default", "cmdline": "console=ttyS0"}"#,
        )
        .unwrap();
        std::fs::write(image.join("vmlinuz"), b"not a kernel").unwrap();
        std::fs::write(image.join("initramfs.cpio.gz"), b"not an initramfs").unwrap();
        let env = Arc::new(Env {
            dir,
            full_run: OnceLock::new(),
        });
        let checks: &[(&str, Check)] = &[
            (
                "list_prints_tests_and_reads_no_configuration",
                list_prints_tests_and_reads_no_configuration,
            ),
            (
                "list_ignored_lists_only_ignored_tests",
                list_ignored_lists_only_ignored_tests,
            ),
            (
                "failing_tests_give_a_nonzero_exit",
                failing_tests_give_a_nonzero_exit,
            ),
            (
                "test_threads_are_capped_at_the_pool_size",
                test_threads_are_capped_at_the_pool_size,
            ),
            (
                "a_panicking_test_still_releases_its_vm",
                a_panicking_test_still_releases_its_vm,
            ),
            (
                "a_timed_out_test_fails_and_releases_its_vm",
                a_timed_out_test_fails_and_releases_its_vm,
            ),
            (
                "ignored_tests_print_their_reason",
                ignored_tests_print_their_reason,
            ),
            (
                "a_missing_image_fails_with_the_build_command",
                a_missing_image_fails_with_the_build_command,
            ),
            (
                "artifacts_kept_for_failures_only",
                artifacts_kept_for_failures_only,
            ),
            (
                "secrets_never_appear_in_output_or_artifacts",
                secrets_never_appear_in_output_or_artifacts,
            ),
            (
                "snapshots_are_named_after_the_test_and_redacted",
                snapshots_are_named_after_the_test_and_redacted,
            ),
            (
                "new_snapshots_fail_in_ci_without_writing",
                new_snapshots_fail_in_ci_without_writing,
            ),
            (
                "pools_are_shut_down_at_the_end",
                pools_are_shut_down_at_the_end,
            ),
            (
                "exact_filter_runs_one_test_on_one_vm",
                exact_filter_runs_one_test_on_one_vm,
            ),
            (
                "include_ignored_runs_ignored_tests",
                include_ignored_runs_ignored_tests,
            ),
            (
                "configuration_errors_fail_tests_with_the_variable_named",
                configuration_errors_fail_tests_with_the_variable_named,
            ),
            (
                "keep_artifacts_keeps_passing_tests_artifacts",
                keep_artifacts_keeps_passing_tests_artifacts,
            ),
            (
                "observability_outputs_cover_the_run",
                observability_outputs_cover_the_run,
            ),
            (
                "fail_on_makes_an_anomaly_fail_the_test",
                fail_on_makes_an_anomaly_fail_the_test,
            ),
        ];
        let trials = checks
            .iter()
            .map(|&(name, check)| {
                let env = Arc::clone(&env);
                Trial::test(name, move || check(&env))
            })
            .collect();
        let conclusion = libtest_mimic::run(&args, trials);
        drop(env);
        conclusion.exit();
    }

    const ALL_TESTS: &[&str] = &[
        "fixture::a_passes",
        "fixture::b_fails",
        "fixture::c_panics",
        "fixture::d_after_panic",
        "fixture::e_ignored_with_reason",
        "fixture::e_ignored_without_reason",
        "fixture::f_times_out",
        "fixture::g_missing_image",
        "fixture::h_snapshot",
        "fixture::i_snapshot_unaccepted",
        "fixture::j_secret_in_failure",
        "fixture::k_secret_in_panic",
        "fixture::l_agent_times_out",
        "fixture::m_metrics_endpoint",
        "fixture::z_last",
    ];

    fn list_prints_tests_and_reads_no_configuration(env: &Env) -> Result<(), Failed> {
        // A broken configuration and backend: listing must not even look.
        let out = env.run(
            &["--list"],
            &[
                ("AGENT_VM_BACKEND", "no-such-backend"),
                ("AGENT_VM_POOL_MAX_SIZE", "many"),
            ],
        );
        check(out.code == 0, "exit code 0", &out)?;
        let listed: Vec<&str> = out
            .stdout
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .collect();
        check(listed == ALL_TESTS, "every test listed, in order", &out)?;
        check(
            !out.stderr.contains("agentvm:"),
            "no harness activity on stderr",
            &out,
        )?;
        let terse = env.run(
            &["--list", "--format", "terse"],
            &[("AGENT_VM_BACKEND", "no-such-backend")],
        );
        check(
            terse.code == 0 && terse.stdout.lines().count() == ALL_TESTS.len(),
            "nextest's list format",
            &terse,
        )
    }

    fn list_ignored_lists_only_ignored_tests(env: &Env) -> Result<(), Failed> {
        let out = env.run(&["--list", "--ignored"], &[]);
        let listed: Vec<&str> = out
            .stdout
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .collect();
        check(
            listed
                == [
                    "fixture::e_ignored_with_reason",
                    "fixture::e_ignored_without_reason",
                ],
            "only the ignored tests",
            &out,
        )
    }

    fn failing_tests_give_a_nonzero_exit(env: &Env) -> Result<(), Failed> {
        let out = env.full_run();
        check(out.code == 101, "exit code 101", out)?;
        // Tests print between libtest's "test x ... " and its outcome, so
        // failures are read from the final list.
        let failures: Vec<&str> = out
            .stdout
            .rsplit_once("\nfailures:\n")
            .map(|(_, list)| {
                list.lines()
                    .filter_map(|l| l.strip_prefix("    "))
                    .collect()
            })
            .unwrap_or_default();
        let expected_failures = [
            "fixture::b_fails",
            "fixture::c_panics",
            "fixture::f_times_out",
            "fixture::g_missing_image",
            "fixture::i_snapshot_unaccepted",
            "fixture::j_secret_in_failure",
            "fixture::k_secret_in_panic",
        ];
        check(failures == expected_failures, "the failing tests", out)?;
        for test in [
            "a_passes",
            "d_after_panic",
            "h_snapshot",
            "l_agent_times_out",
            "m_metrics_endpoint",
            "z_last",
        ] {
            let name = format!("fixture::{test}");
            check(
                outcome(out, &name).as_deref() == Some("ok"),
                &format!("{name} ... ok"),
                out,
            )?;
        }
        check(
            out.stdout
                .contains("test result: FAILED. 6 passed; 7 failed; 2 ignored"),
            "summary",
            out,
        )?;
        check(
            out.stdout.contains("deliberate failure"),
            "failure message",
            out,
        )
    }

    fn test_threads_are_capped_at_the_pool_size(env: &Env) -> Result<(), Failed> {
        let out = env.run(
            &["--test-threads", "8", "--exact", "fixture::a_passes"],
            &[],
        );
        check(
            out.stderr.contains("pool 1..1 VMs, 1 test thread\n"),
            "one thread for a pool of one",
            &out,
        )?;
        let out = env.run(
            &["--exact", "fixture::a_passes"],
            &[
                ("AGENT_VM_POOL_MAX_SIZE", "3"),
                ("AGENT_VM_POOL_MIN_SIZE", "0"),
            ],
        );
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(3);
        let expected = format!("pool 0..3 VMs, {threads} test thread");
        check(
            out.code == 0 && out.stderr.contains(&expected),
            &expected,
            &out,
        )
    }

    fn a_panicking_test_still_releases_its_vm(env: &Env) -> Result<(), Failed> {
        let out = env.full_run();
        check(
            out.stdout.contains("test panicked: deliberate panic"),
            "panic message in the failure",
            out,
        )?;
        let panicked =
            line_with(&out.stderr, "agentvm: fixture::c_panics on vm ").unwrap_or_default();
        check(
            panicked.contains("on vm mock-0:") && panicked.contains(", revert "),
            "c_panics' VM reverted",
            out,
        )?;
        // The pool holds one VM: the next test got it back.
        let next =
            line_with(&out.stderr, "agentvm: fixture::d_after_panic on vm ").unwrap_or_default();
        check(
            next.contains("on vm mock-0:"),
            "d_after_panic ran on the same VM",
            out,
        )
    }

    fn a_timed_out_test_fails_and_releases_its_vm(env: &Env) -> Result<(), Failed> {
        let out = env.full_run();
        check(
            out.stdout.contains(
                "test timed out after 300ms (the attribute's timeout); the VM is reverted",
            ),
            "timeout message",
            out,
        )?;
        let line =
            line_with(&out.stderr, "agentvm: fixture::f_times_out on vm ").unwrap_or_default();
        check(
            line.contains("on vm mock-0:") && line.contains(", revert "),
            "VM reverted",
            out,
        )?;
        let last = line_with(&out.stderr, "agentvm: fixture::z_last on vm ").unwrap_or_default();
        check(
            last.contains("on vm mock-0:"),
            "the last test still got the VM",
            out,
        )
    }

    fn ignored_tests_print_their_reason(env: &Env) -> Result<(), Failed> {
        let out = env.full_run();
        check(
            outcome(out, "fixture::e_ignored_with_reason").as_deref()
                == Some("ignored (needs a real VM)"),
            "reason printed",
            out,
        )?;
        check(
            outcome(out, "fixture::e_ignored_without_reason").as_deref() == Some("ignored"),
            "plain ignore",
            out,
        )
    }

    fn a_missing_image_fails_with_the_build_command(env: &Env) -> Result<(), Failed> {
        let out = env.full_run();
        check(
            out.stdout
                .contains("guest image \"missing-image\" not found at")
                && out.stdout.contains(&format!(
                    "`agentvm image build missing-image --out {}`",
                    env.images().display()
                ))
                && out.stdout.contains("cargo install --path "),
            "missing image message with the build command, output directory included",
            out,
        )
    }

    fn artifacts_kept_for_failures_only(env: &Env) -> Result<(), Failed> {
        let out = env.full_run();
        let dir = env.artifacts();
        check(
            !dir.join("fixture::a_passes").exists(),
            "stale artifacts of a passing test removed",
            out,
        )?;
        check(
            !dir.join("fixture::z_last").exists(),
            "no artifacts for a passing test",
            out,
        )?;
        let failure =
            std::fs::read_to_string(dir.join("fixture::b_fails/failure.txt")).unwrap_or_default();
        check(
            failure == "deliberate failure",
            "failure.txt of a failed test",
            out,
        )?;
        check(
            out.stdout.contains(&format!(
                "artifacts: {}",
                dir.join("fixture::b_fails").display()
            )),
            "failure message points at the artifacts",
            out,
        )
    }

    fn secrets_never_appear_in_output_or_artifacts(env: &Env) -> Result<(), Failed> {
        let out = env.full_run();
        check(
            !out.stdout.contains(SECRET) && !out.stderr.contains(SECRET),
            "secret not printed",
            out,
        )?;
        check(
            out.stdout.contains("the token is [secret:TOKEN]"),
            "redacted failure message",
            out,
        )?;
        check(
            out.stderr.contains("panicked at")
                && out.stderr.contains("the token is [secret:TOKEN]"),
            "redacted panic message",
            out,
        )?;
        for test in ["fixture::j_secret_in_failure", "fixture::k_secret_in_panic"] {
            for entry in
                std::fs::read_dir(env.artifacts().join(test)).map_err(|e| format!("{test}: {e}"))?
            {
                let path = entry.map_err(|e| e.to_string())?.path();
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                check(
                    !text.contains(SECRET),
                    &format!("secret in {}", path.display()),
                    out,
                )?;
            }
        }
        Ok(())
    }

    fn snapshots_are_named_after_the_test_and_redacted(env: &Env) -> Result<(), Failed> {
        let out = env.full_run();
        let path = snapshot_dir().join("harness__fixture__h_snapshot.snap");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        for expected in [
            "expression: sample_run()",
            "duration: \"[duration]\"",
            "resources: \"[resources]\"",
            "stdout: \"wrote hello.txt with [secret:TOKEN]\\n\"",
            "stderr: \"built in [tempdir]\\n\"",
        ] {
            check(
                text.contains(expected),
                &format!("{expected:?} in {}:\n{text}", path.display()),
                out,
            )?;
        }
        check(
            outcome(out, "fixture::h_snapshot").as_deref() == Some("ok"),
            "it passes",
            out,
        )
    }

    fn new_snapshots_fail_in_ci_without_writing(env: &Env) -> Result<(), Failed> {
        let before = never_accepted_files();
        let out = env.full_run();
        check(before.is_empty(), "no never_accepted snapshot before", out)?;
        check(
            out.stdout
                .contains("snapshot assertion for 'never_accepted' failed"),
            "the unaccepted snapshot fails",
            out,
        )?;
        check(
            never_accepted_files().is_empty(),
            "CI=true: no .snap.new written",
            out,
        )
    }

    fn pools_are_shut_down_at_the_end(env: &Env) -> Result<(), Failed> {
        let out = env.full_run();
        let line = line_with(
            &out.stderr,
            "agentvm: pool default/1x256MiB/isolated shut down",
        )
        .unwrap_or_default();
        check(
            line.contains("0 available, 0 leased, 0 booting, 0 reverting, 0 waiting, 0 failed"),
            "pool empty at the end",
            out,
        )
    }

    fn exact_filter_runs_one_test_on_one_vm(env: &Env) -> Result<(), Failed> {
        let out = env.run(
            &["--exact", "fixture::a_passes"],
            &[("AGENT_VM_POOL_MIN_SIZE", "1")],
        );
        check(out.code == 0, "exit 0", &out)?;
        check(
            out.stdout
                .contains("1 passed; 0 failed; 0 ignored; 0 measured; 14 filtered out"),
            "one test",
            &out,
        )?;
        check(
            out.stderr.matches(" on vm ").count() == 1,
            "one per-test line",
            &out,
        )
    }

    fn include_ignored_runs_ignored_tests(env: &Env) -> Result<(), Failed> {
        let out = env.run(
            &[
                "--include-ignored",
                "--exact",
                "fixture::e_ignored_with_reason",
            ],
            &[],
        );
        check(
            out.code == 0
                && outcome(&out, "fixture::e_ignored_with_reason").as_deref() == Some("ok"),
            "ran",
            &out,
        )
    }

    fn configuration_errors_fail_tests_with_the_variable_named(env: &Env) -> Result<(), Failed> {
        let out = env.run(
            &["--exact", "fixture::a_passes"],
            &[("AGENT_VM_EXEC_TIMEOUT", "soon")],
        );
        check(out.code == 101, "exit 101", &out)?;
        check(
            out.stdout.contains("agentvm configuration error: environment variable AGENT_VM_EXEC_TIMEOUT: invalid exec_timeout \"soon\""),
            "message names the variable",
            &out,
        )
    }

    fn keep_artifacts_keeps_passing_tests_artifacts(env: &Env) -> Result<(), Failed> {
        let artifacts = env.dir.path().join("kept");
        let out = env.run(
            &["--exact", "fixture::z_last"],
            &[
                ("AGENT_VM_KEEP_ARTIFACTS", "1"),
                ("AGENT_VM_ARTIFACTS_DIR", artifacts.to_str().unwrap()),
            ],
        );
        check(out.code == 0, "exit 0", &out)?;
        // The mock has no serial log and the test ran no agent: the directory exists, empty.
        check(
            artifacts.join("fixture::z_last").is_dir(),
            "artifacts directory kept",
            &out,
        )
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    /// Every file under `dir`, recursively.
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    out.push(path);
                }
            }
        }
        out
    }

    fn observability_outputs_cover_the_run(env: &Env) -> Result<(), Failed> {
        use serde_json::Value;
        let dir = env.dir.path().join("observability");
        let port = free_port().to_string();
        let out = env.run(
            &[],
            &[
                ("AGENT_VM_ARTIFACTS_DIR", dir.to_str().unwrap()),
                ("AGENT_VM_METRICS_PORT", &port),
            ],
        );
        check(out.code == 101, "exit code 101", &out)?;
        for test in ["fixture::l_agent_times_out", "fixture::m_metrics_endpoint"] {
            check(
                outcome(&out, test).as_deref() == Some("ok"),
                &format!("{test} ... ok"),
                &out,
            )?;
        }
        check(
            out.stderr.contains(&format!(
                "agentvm: metrics on http://127.0.0.1:{port}/metrics"
            )),
            "metrics endpoint announced",
            &out,
        )?;
        // The summary table.
        let table = out
            .stderr
            .split_once("agentvm report:\n")
            .map(|(_, t)| t)
            .unwrap_or("");
        check(
            table.starts_with("test ")
                && line_with(table, "fixture::l_agent_times_out")
                    .is_some_and(|l| l.contains("passed") && l.ends_with("timeout"))
                && line_with(table, "fixture::b_fails").is_some_and(|l| l.contains("failed"))
                && table.contains("6 passed, 7 failed, 2 ignored, 1 anomaly in "),
            "summary table",
            &out,
        )?;

        // Audit log: every line a JSON object with a UTC timestamp.
        let audit = std::fs::read_to_string(dir.join("audit.jsonl"))
            .map_err(|e| format!("audit log: {e}"))?;
        let mut events = Vec::new();
        for line in audit.lines() {
            let value: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
            let ts = value["ts"].as_str().unwrap_or("");
            check(
                ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
                &format!("RFC 3339 UTC ts in {line}"),
                &out,
            )?;
            check(
                value["event"].is_string(),
                &format!("event in {line}"),
                &out,
            )?;
            events.push(value);
        }
        let field = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_string();
        let a_passes = "fixture::a_passes";
        let vm = events
            .iter()
            .find(|e| field(e, "event") == "test_started" && field(e, "test") == a_passes)
            .map(|e| field(e, "vm"))
            .ok_or("no test_started for a_passes")?;
        // The whole life of a_passes's VM and test, in order.
        let life: Vec<String> = events
            .iter()
            .filter(|e| {
                let ev = field(e, "event");
                if ev.starts_with("test_") {
                    field(e, "test") == a_passes
                } else {
                    field(e, "vm") == vm
                }
            })
            .map(|e| field(e, "event"))
            .collect();
        let expected = [
            "vm_created",
            "vm_booted",
            "vm_snapshotted",
            "vm_acquired",
            "test_started",
            "vm_released",
            "vm_reverted",
            "test_finished",
            "vm_destroyed",
        ];
        let mut rest = life.iter();
        for step in expected {
            check(
                rest.any(|e| e == step),
                &format!("{step} in order in {life:?}"),
                &out,
            )?;
        }
        let finished = events
            .iter()
            .find(|e| field(e, "event") == "test_finished" && field(e, "test") == a_passes)
            .ok_or("no test_finished")?;
        check(
            finished["result"] == "passed" && finished["revert_seconds"].is_f64(),
            "a_passes finished, reverted",
            &out,
        )?;
        let execution = events
            .iter()
            .find(|e| {
                field(e, "event") == "execution" && field(e, "test") == "fixture::l_agent_times_out"
            })
            .ok_or("no execution of l_agent_times_out")?;
        check(
            execution["timed_out"] == true
                && execution["agent"] == "mock-timeout"
                && execution["argv"][1] == "[secret:TOKEN]"
                && execution["duration_seconds"].is_f64()
                && execution["vm"] == vm.as_str(),
            &format!("execution record {execution}"),
            &out,
        )?;
        check(
            events.iter().any(|e| {
                field(e, "event") == "anomaly"
                    && field(e, "kind") == "timeout"
                    && field(e, "test") == "fixture::l_agent_times_out"
            }),
            "timeout anomaly in the audit log",
            &out,
        )?;

        // report.json.
        let report: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("report.json")).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let tests = report["tests"].as_array().ok_or("tests in report.json")?;
        let names: Vec<&str> = tests.iter().filter_map(|t| t["name"].as_str()).collect();
        check(
            names == ALL_TESTS,
            &format!("every test in report.json: {names:?}"),
            &out,
        )?;
        let by_name = |n: &str| tests.iter().find(|t| t["name"] == n).unwrap();
        check(
            by_name("fixture::a_passes")["result"] == "passed"
                && by_name("fixture::a_passes")["revert_seconds"].is_f64()
                && by_name("fixture::b_fails")["result"] == "failed"
                && by_name("fixture::e_ignored_with_reason")["message"] == "needs a real VM"
                && by_name("fixture::l_agent_times_out")["anomalies"][0]["kind"] == "timeout"
                && report["failed"] == 7
                && report["passed"] == 6
                && report["ignored"] == 2,
            "report.json contents",
            &out,
        )?;
        let anomalies = dir.join("fixture::l_agent_times_out/anomalies.json");
        check(anomalies.exists(), "anomalies.json kept", &out)?;
        // The timeline's phases and the agent run, as the HTML report needs them.
        let timed_out = by_name("fixture::l_agent_times_out");
        let phases: Vec<&str> = timed_out["phases"]
            .as_array()
            .map(|p| p.iter().filter_map(|p| p["phase"].as_str()).collect())
            .unwrap_or_default();
        check(
            phases == ["acquire", "inject", "run", "capture", "revert"]
                && timed_out["start_seconds"].is_f64()
                && timed_out["runs"][0]["agent"] == "mock-timeout"
                && timed_out["runs"][0]["run"]["timed_out"] == true
                && timed_out["artifacts"] == "fixture::l_agent_times_out",
            &format!("phases and runs of l_agent_times_out: {timed_out}"),
            &out,
        )?;
        let suite: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("suites/harness.json")).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        check(
            suite == report && report["suite"] == "harness",
            "suites/harness.json is the report",
            &out,
        )?;
        let html = std::fs::read_to_string(dir.join("report.html")).map_err(|e| e.to_string())?;
        check(
            html.starts_with("<!DOCTYPE html>")
                && ALL_TESTS.iter().all(|name| html.contains(name))
                && out.stderr.contains("agentvm: HTML report "),
            "report.html lists every test",
            &out,
        )?;

        // junit.xml.
        let junit = std::fs::read_to_string(dir.join("junit.xml")).map_err(|e| e.to_string())?;
        check(
            junit.starts_with("<?xml")
                && junit.contains("<testsuite name=\"harness\" tests=\"15\" failures=\"7\"")
                && junit.contains("<testcase classname=\"fixture\" name=\"a_passes\"")
                && junit.matches("<failure ").count() == 7
                && junit.matches("<skipped ").count() == 2,
            &format!("junit.xml:\n{junit}"),
            &out,
        )?;

        // No secret anywhere.
        for path in files_under(&dir) {
            let text =
                String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
            check(
                !text.contains(SECRET),
                &format!("secret in {}", path.display()),
                &out,
            )?;
        }
        check(
            !out.stdout.contains(SECRET) && !out.stderr.contains(SECRET),
            "secret not printed",
            &out,
        )
    }

    fn fail_on_makes_an_anomaly_fail_the_test(env: &Env) -> Result<(), Failed> {
        let dir = env.dir.path().join("fail-on");
        let out = env.run(
            &["--exact", "fixture::l_agent_times_out"],
            &[
                ("AGENT_VM_ARTIFACTS_DIR", dir.to_str().unwrap()),
                ("AGENT_VM_FAIL_ON", "timeout"),
            ],
        );
        check(out.code == 101, "exit code 101", &out)?;
        check(
            out.stdout
                .contains("anomalies that fail the test (fail_on):")
                && out
                    .stdout
                    .contains("timeout: agent run 1 was killed at its timeout"),
            "the anomaly is the failure",
            &out,
        )?;
        check(
            line_with(&out.stderr, "fixture::l_agent_times_out")
                .is_some_and(|_| out.stderr.contains("timeout (fails)")),
            "marked in the table",
            &out,
        )
    }
}
