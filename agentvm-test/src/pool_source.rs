//! Where the harness's VMs come from: a pool in the test process, or the
//! pool daemon ([`agentvm_runtime::daemon`]) shared by every test process
//! of the workspace.
//!
//! The daemon is used when tests run one per process — under cargo-nextest
//! (`NEXTEST_EXECUTION_MODE=process-per-test`, or `NEXTEST=1` from a nextest
//! without that variable) — and an in-process pool otherwise;
//! `AGENTVM_POOL=daemon|local` forces either. The first test process that
//! finds no daemon starts one: the test binary itself, run again with
//! [`SERVE_ENV`] set, which makes [`run_tests`](crate::run_tests) serve
//! instead of testing. The test binary is always there and is built from
//! the same agentvm as the test (the `agentvm` CLI may be missing, or of
//! another version, or built without the `libvirt` feature).

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use agentvm_runtime::config::{parse_duration, AgentVmConfig};
use agentvm_runtime::daemon::client::{self, RemoteLease};
use agentvm_runtime::daemon::protocol::{LeaseRequest, PoolShape};
use agentvm_runtime::daemon::server::{serve, ServeOptions};
use agentvm_runtime::daemon::{
    fingerprint, DaemonError, DaemonPaths, DEFAULT_IDLE_TIMEOUT, IDLE_TIMEOUT_ENV, POOL_ENV,
};
use agentvm_runtime::pool::{Lease, ReleaseOutcome};
use agentvm_runtime::spec::VmSpec;
use agentvm_runtime::vm::Vm;

/// Set (to `1`) in the environment of a test binary started as the pool
/// daemon: [`run_tests`](crate::run_tests) serves instead of testing.
pub const SERVE_ENV: &str = "AGENTVM_POOL_SERVE";

/// Where the VMs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A pool in this process.
    Local,
    /// The pool daemon.
    Daemon,
}

impl PoolMode {
    /// The mode [`POOL_ENV`] asks for, else the one that fits the runner.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self::choose(
            var(POOL_ENV).as_deref(),
            var("NEXTEST").as_deref(),
            var("NEXTEST_EXECUTION_MODE").as_deref(),
        )
    }

    /// [`PoolMode::from_env`] over given values (unit-testable).
    pub fn choose(
        forced: Option<&str>,
        nextest: Option<&str>,
        execution_mode: Option<&str>,
    ) -> Result<Self, String> {
        match forced.map(str::trim) {
            Some("daemon") => return Ok(Self::Daemon),
            Some("local") => return Ok(Self::Local),
            Some(other) => {
                return Err(format!(
                    "environment variable {POOL_ENV}={other:?} is not valid: expected \"daemon\" or \"local\""
                ))
            }
            None => {}
        }
        Ok(match (nextest, execution_mode) {
            (_, Some("process-per-test")) => Self::Daemon,
            (_, Some(_)) => Self::Local,
            (Some("1"), None) => Self::Daemon,
            _ => Self::Local,
        })
    }
}

/// A VM of either source. Dereferences to [`Vm`].
pub enum AnyLease {
    /// From this process's pool.
    Local(Lease),
    /// From the daemon.
    Remote(RemoteLease),
}

impl AnyLease {
    /// How long the acquire took.
    pub fn waited(&self) -> Duration {
        match self {
            Self::Local(lease) => lease.waited(),
            Self::Remote(lease) => lease.waited(),
        }
    }

    /// Gives the VM back and returns how its revert went.
    pub async fn release(self) -> Result<ReleaseOutcome, String> {
        match self {
            Self::Local(lease) => lease
                .release()
                .await
                .map_err(|_| "release outcome unknown".to_string()),
            Self::Remote(lease) => lease
                .release()
                .await
                .map_err(|e| format!("release outcome unknown: {e}")),
        }
    }
}

impl Deref for AnyLease {
    type Target = Vm;

    fn deref(&self) -> &Vm {
        match self {
            Self::Local(lease) => lease,
            Self::Remote(lease) => lease,
        }
    }
}

impl DerefMut for AnyLease {
    fn deref_mut(&mut self) -> &mut Vm {
        match self {
            Self::Local(lease) => lease,
            Self::Remote(lease) => lease,
        }
    }
}

/// Leases a VM of `shape` from the workspace's daemon, starting it when
/// none runs. A daemon that exits just as we connect (its idle timeout) is
/// started again.
pub async fn lease_from_daemon(
    config: &AgentVmConfig,
    shape: PoolShape,
    spec: VmSpec,
    test: &str,
) -> Result<RemoteLease, String> {
    let paths = DaemonPaths::for_config(config);
    let request = LeaseRequest {
        fingerprint: fingerprint(config),
        shape,
        acquire_timeout: config.acquire_timeout,
        client: format!("pid {} ({test})", std::process::id()),
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let ensure_paths = paths.clone();
        tokio::task::spawn_blocking(move || {
            client::ensure_daemon(&ensure_paths, || start_daemon(&ensure_paths))
        })
        .await
        .map_err(|e| format!("starting the pool daemon: {e}"))?
        .map_err(|e| e.to_string())?;
        match client::lease(&paths.socket, request.clone(), spec.clone()).await {
            Ok(lease) => return Ok(lease),
            Err(e @ (DaemonError::NotRunning { .. } | DaemonError::Wire { .. })) if attempt < 3 => {
                eprintln!("agentvm: the pool daemon went away ({e}); starting it again");
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Starts this test binary as the daemon, detached (see [`client::spawn_detached`]).
fn start_daemon(paths: &DaemonPaths) -> std::io::Result<std::process::Child> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command.env(SERVE_ENV, "1");
    client::spawn_detached(command, &paths.log)
}

/// The daemon's idle timeout from [`IDLE_TIMEOUT_ENV`] (default [`DEFAULT_IDLE_TIMEOUT`]).
pub fn idle_timeout_from_env() -> Result<Duration, String> {
    match std::env::var(IDLE_TIMEOUT_ENV) {
        Ok(text) if !text.trim().is_empty() => parse_duration(&text).ok_or_else(|| {
            format!(
                "environment variable {IDLE_TIMEOUT_ENV}={text:?} is not valid: expected a \
                 duration such as 60, 500ms, 30s or 2m"
            )
        }),
        _ => Ok(DEFAULT_IDLE_TIMEOUT),
    }
}

/// Serves as the pool daemon (this test binary, started with [`SERVE_ENV`] set)
/// and returns the exit code.
pub fn serve_as_daemon() -> i32 {
    let result = AgentVmConfig::load()
        .map_err(|e| format!("configuration error: {e}"))
        .and_then(|config| Ok((config, idle_timeout_from_env()?)));
    let (config, idle_timeout) = match result {
        Ok(found) => found,
        Err(e) => {
            eprintln!("agentvm pool: {e}");
            return 2;
        }
    };
    let options = ServeOptions {
        paths: DaemonPaths::for_config(&config),
        idle_timeout,
        log_leases: true,
    };
    // The VMs' lifecycle events (boots, reverts, crashes) happen here: into
    // the audit log the test processes append their own events to.
    let _audit = match crate::audit::AuditLog::open(&config.audit_log_path()) {
        Ok(log) => Some(agentvm_runtime::events::subscribe(std::sync::Arc::new(log))),
        Err(e) => {
            eprintln!("agentvm pool: cannot open the audit log: {e}");
            None
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("agentvm-pool")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("agentvm pool: cannot start the tokio runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(serve(config, options)) {
        Ok(()) => 0,
        // Another process won the race: nothing to do.
        Err(e @ DaemonError::AlreadyRunning { .. }) => {
            eprintln!("agentvm pool: {e}");
            0
        }
        Err(e) => {
            eprintln!("agentvm pool: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_serves_process_per_test_runs() {
        let choose = PoolMode::choose;
        assert_eq!(choose(None, None, None), Ok(PoolMode::Local));
        assert_eq!(
            choose(None, Some("1"), Some("process-per-test")),
            Ok(PoolMode::Daemon)
        );
        assert_eq!(choose(None, Some("1"), None), Ok(PoolMode::Daemon));
        // A future nextest mode that runs tests in one process.
        assert_eq!(
            choose(None, Some("1"), Some("single-process")),
            Ok(PoolMode::Local)
        );
        assert_eq!(
            choose(Some("local"), Some("1"), Some("process-per-test")),
            Ok(PoolMode::Local)
        );
        assert_eq!(choose(Some("daemon"), None, None), Ok(PoolMode::Daemon));
        let e = choose(Some("remote"), None, None).unwrap_err();
        assert!(e.contains("AGENTVM_POOL=\"remote\""), "{e}");
        assert!(e.contains("\"daemon\" or \"local\""), "{e}");
    }
}
