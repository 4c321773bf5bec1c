//! The pool daemon on real VMs (QEMU), driven through test processes as
//! cargo-nextest runs them: one process per test, `AGENTVM_POOL=daemon`.
//!
//! Like `harness.rs`, this binary has two modes: normally it is the
//! *driver* (plain libtest-mimic trials, run one at a time), which runs this
//! same binary as test processes in *fixture* mode (`AGENTVM_DAEMON_FIXTURE=1`,
//! the `#[agent_vm_test]`s of module `fixture`). The daemon those processes
//! start is this binary too (the harness re-runs it with
//! `AGENTVM_POOL_SERVE=1`). Each trial has its own artifacts directory, so
//! its own daemon, with a pool of exactly one VM.
//!
//! What this checks: a SIGKILLed test process's VM is reverted and reused
//! (same VM id, the killed process's file gone); two test processes started
//! together share one daemon (one start under the lock) and its VM; an idle
//! daemon exits and its QEMU processes are gone. The wire protocol and
//! refusals are unit-tested in `agentvm-runtime` (`daemon::server`, mock backend).

use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Output, Stdio};
use std::time::{Duration, Instant};

use agentvm_test::agentvm_runtime::daemon::{client, DaemonPaths};
use agentvm_test::prelude::*;
use libtest_mimic::{Arguments, Completion, Failed, Trial};

const FIXTURE_ENV: &str = "AGENTVM_DAEMON_FIXTURE";
/// File a fixture test writes what it saw to (one per process).
const SIGNAL_ENV: &str = "AGENTVM_DAEMON_TEST_SIGNAL";
/// How long `reports_its_vm` keeps its VM (ms), so that processes overlap.
const HOLD_ENV: &str = "AGENTVM_DAEMON_TEST_HOLD_MS";
/// The file the killed test writes in the guest.
const MARKER: &str = "/workspace/written-by-a-killed-test.txt";

fn main() {
    if std::env::var_os(FIXTURE_ENV).is_some() {
        agentvm_test::run_harness();
    }
    driver::main();
}

mod fixture {
    use super::*;

    /// Writes `text` to the signal file (atomically: the driver polls it).
    fn signal(text: &str) {
        let path = PathBuf::from(std::env::var_os(SIGNAL_ENV).expect("signal file"));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// Leaves a file in the guest, says so, and waits to be killed.
    #[agent_vm_test(network = "isolated")]
    async fn writes_then_hangs(vm: &mut Vm) -> TestResult {
        vm.write_file(MARKER, b"this must not survive the revert", 0o644)
            .await?;
        signal(vm.id());
        tokio::time::sleep(Duration::from_secs(600)).await;
        Ok(())
    }

    /// Reports its VM and whether the killed test's file is there.
    #[agent_vm_test(network = "isolated")]
    async fn reports_its_vm(vm: &mut Vm) -> TestResult {
        let marker = vm.read_file(MARKER).await;
        let hold = std::env::var(HOLD_ENV)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(hold)).await;
        signal(&format!(
            "{} {}",
            vm.id(),
            if marker.is_ok() {
                "marker-present"
            } else {
                "marker-absent"
            }
        ));
        Ok(())
    }
}

mod driver {
    use super::*;

    /// One trial's workspace: its own artifacts directory, so its own daemon.
    struct Env {
        dir: tempfile::TempDir,
        images: PathBuf,
    }

    impl Env {
        fn new(images: &Path) -> Self {
            Self {
                dir: tempfile::tempdir().expect("temp dir"),
                images: images.to_path_buf(),
            }
        }

        fn artifacts(&self) -> PathBuf {
            self.dir.path().join("artifacts")
        }

        fn paths(&self) -> DaemonPaths {
            let mut config =
                agentvm_test::agentvm_runtime::config::AgentVmConfig::defaults_for(self.dir.path());
            config.artifacts_dir = self.artifacts();
            DaemonPaths::for_config(&config)
        }

        fn signal(&self, name: &str) -> PathBuf {
            self.dir.path().join(format!("{name}.signal"))
        }

        /// A test process running fixture test `test`, as nextest would start it.
        fn process(&self, test: &str, signal: &Path, idle: &str, hold_ms: u64) -> Process {
            let mut command = Process::new(std::env::current_exe().expect("current exe"));
            command
                .args([test, "--exact"])
                .env(FIXTURE_ENV, "1")
                .env("AGENTVM_POOL", "daemon")
                .env("AGENTVM_POOL_IDLE_TIMEOUT", idle)
                .env("AGENT_VM_BACKEND", "qemu")
                .env("AGENT_VM_IMAGE", "default")
                .env("AGENT_VM_IMAGE_DIR", &self.images)
                .env("AGENT_VM_ARTIFACTS_DIR", self.artifacts())
                .env("AGENT_VM_POOL_MIN_SIZE", "1")
                .env("AGENT_VM_POOL_MAX_SIZE", "1")
                .env(SIGNAL_ENV, signal)
                .env(HOLD_ENV, hold_ms.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            command
        }

        fn daemon_log(&self) -> String {
            std::fs::read_to_string(self.paths().log).unwrap_or_default()
        }

        /// Stops the daemon (if any) and waits until its process is gone.
        fn stop_daemon(&self) {
            let socket = self.paths().socket;
            let pid = runtime()
                .block_on(client::status(&socket))
                .ok()
                .map(|s| s.pid);
            let _ = runtime().block_on(client::stop(&socket));
            if let Some(pid) = pid {
                wait_until(Duration::from_secs(60), || !alive(pid));
            }
        }
    }

    impl Drop for Env {
        fn drop(&mut self) {
            self.stop_daemon();
        }
    }

    fn runtime() -> &'static tokio::runtime::Runtime {
        static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        RUNTIME.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        })
    }

    fn alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    }

    fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        done()
    }

    fn describe(out: &Output) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn passed(out: Output, what: &str) -> Result<Output, Failed> {
        if out.status.success() {
            Ok(out)
        } else {
            Err(format!("{what} failed: {}", describe(&out)).into())
        }
    }

    fn read_signal(path: &Path) -> Result<(String, String), Failed> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("no signal at {}: {e}", path.display()))?;
        let mut words = text.split_whitespace().map(str::to_string);
        Ok((
            words.next().unwrap_or_default(),
            words.next().unwrap_or_default(),
        ))
    }

    /// Waits for `signal` while `child` runs; its output when it ends first.
    fn wait_for_signal(child: &mut Child, signal: &Path) -> Result<String, Failed> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Ok(text) = std::fs::read_to_string(signal) {
                return Ok(text);
            }
            if let Ok(Some(_)) = child.try_wait() {
                let out = child.wait_with_output_ref();
                return Err(format!("the test process ended before its signal: {out}").into());
            }
            if Instant::now() > deadline {
                return Err("no signal within 300 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    trait OutputRef {
        fn wait_with_output_ref(&mut self) -> String;
    }

    impl OutputRef for Child {
        fn wait_with_output_ref(&mut self) -> String {
            use std::io::Read;
            let mut text = String::new();
            if let Some(mut err) = self.stderr.take() {
                let _ = err.read_to_string(&mut text);
            }
            text
        }
    }

    fn killed_test_processes_vm_is_reverted_and_reused(env: &Env) -> Result<(), Failed> {
        let signal = env.signal("killed");
        let mut victim = env
            .process("fixture::writes_then_hangs", &signal, "60s", 0)
            .spawn()?;
        let killed_vm = wait_for_signal(&mut victim, &signal)?;
        victim.kill()?; // SIGKILL: no destructor, no release message.
        victim.wait()?;

        let signal = env.signal("next");
        let out = passed(
            env.process("fixture::reports_its_vm", &signal, "60s", 0)
                .output()?,
            "the next test process",
        )?;
        let (vm, marker) = read_signal(&signal)?;
        if vm != killed_vm || marker != "marker-absent" {
            return Err(format!(
                "the next lease got vm {vm} ({marker}); the killed process had vm {killed_vm}: \
                 it should get the same VM, reverted\n{}\n--- daemon log\n{}",
                describe(&out),
                env.daemon_log()
            )
            .into());
        }
        let status = runtime().block_on(client::status(&env.paths().socket))?;
        let pool = &status.pools[0];
        if pool.leases != 2 || pool.vms != [killed_vm.clone()] {
            return Err(format!("daemon status {status:?}").into());
        }
        Ok(())
    }

    fn concurrent_test_processes_share_one_daemon_and_its_vm(env: &Env) -> Result<(), Failed> {
        // Both start with no daemon running: one starts it, the other waits.
        let signals = [env.signal("first"), env.signal("second")];
        let children: Vec<Child> = signals
            .iter()
            .map(|signal| {
                env.process("fixture::reports_its_vm", signal, "60s", 1500)
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        for child in children {
            passed(child.wait_with_output()?, "a concurrent test process")?;
        }
        let (first, _) = read_signal(&signals[0])?;
        let (second, _) = read_signal(&signals[1])?;
        let log = env.daemon_log();
        let starts = log.matches("] serving ").count();
        if first != second || starts != 1 {
            return Err(format!(
                "vms {first} and {second}, {starts} daemon(s) started; log:\n{log}"
            )
            .into());
        }
        let status = runtime().block_on(client::status(&env.paths().socket))?;
        if status.pools.len() != 1 || status.pools[0].leases != 2 {
            return Err(format!("daemon status {status:?}").into());
        }
        Ok(())
    }

    fn idle_daemon_exits_and_leaves_no_qemu(env: &Env) -> Result<(), Failed> {
        let signal = env.signal("once");
        passed(
            env.process("fixture::reports_its_vm", &signal, "3s", 0)
                .output()?,
            "the test process",
        )?;
        let socket = env.paths().socket;
        let status = runtime().block_on(client::status(&socket))?;
        if status.vm_pids.is_empty() || !status.vm_pids.iter().all(|&pid| alive(pid)) {
            return Err(format!("expected live QEMU pids in {status:?}").into());
        }
        let gone = wait_until(Duration::from_secs(60), || {
            !alive(status.pid) && status.vm_pids.iter().all(|&pid| !alive(pid))
        });
        if !gone {
            return Err(format!(
                "daemon {} or QEMU {:?} still alive 60 s after a 3 s idle timeout; log:\n{}",
                status.pid,
                status.vm_pids,
                env.daemon_log()
            )
            .into());
        }
        if socket.exists() || client::is_listening(&socket) {
            return Err("the socket is still there".into());
        }
        Ok(())
    }

    pub fn main() {
        let mut args = Arguments::from_args();
        // Each trial boots a VM under TCG: one at a time.
        args.test_threads = Some(1);
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let config = agentvm_test::agentvm_runtime::config::AgentVmConfig::load().ok();
        let images = config
            .as_ref()
            .map(|c| c.image_dir.clone())
            .unwrap_or_else(|| workspace.join("target/agentvm/images"));
        let missing = agentvm_test::agentvm_runtime::image::locate_image("default", &images)
            .err()
            .map(|e| format!("no default guest image: {e}"));
        type Check = fn(&Env) -> Result<(), Failed>;
        let checks: [(&str, Check); 3] = [
            (
                "killed_test_processes_vm_is_reverted_and_reused",
                killed_test_processes_vm_is_reverted_and_reused,
            ),
            (
                "concurrent_test_processes_share_one_daemon_and_its_vm",
                concurrent_test_processes_share_one_daemon_and_its_vm,
            ),
            (
                "idle_daemon_exits_and_leaves_no_qemu",
                idle_daemon_exits_and_leaves_no_qemu,
            ),
        ];
        let trials = checks
            .into_iter()
            .map(|(name, check)| {
                let missing = missing.clone();
                let images = images.clone();
                Trial::ignorable_test(name, move || match missing {
                    Some(reason) => Ok(Completion::ignored_with(reason)),
                    None => {
                        let env = Env::new(&images);
                        check(&env).map(|()| Completion::Completed)
                    }
                })
            })
            .collect();
        libtest_mimic::run(&args, trials).exit();
    }
}
