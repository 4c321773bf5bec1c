//! The harness's per-test context: what `run_agent` records for the test's
//! artifacts, and the configured default timeout.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentvm_runtime::spec::NetworkMode;

use crate::redact::Secrets;
use crate::report::PhaseKind;
use crate::run::AgentRun;

/// What an agent run was given, for the report.
#[derive(Debug, Clone)]
pub(crate) struct RunInfo {
    /// The program's file name.
    pub agent: String,
    /// Its command line, secrets redacted.
    pub argv: Vec<String>,
    /// The task's prompt, secrets redacted.
    pub prompt: Option<String>,
    /// Workspace files the task brought.
    pub task_files: Vec<String>,
}

/// What one test recorded.
#[derive(Debug)]
pub(crate) struct TestContext {
    /// The test's full name.
    pub test: String,
    /// The VM the test runs on (once it has one).
    pub vm: String,
    /// Default agent timeout (the configured exec timeout).
    pub exec_timeout: Duration,
    /// Every agent run of the test, in order.
    pub runs: Vec<AgentRun>,
    /// What each of `runs` was given (same order).
    pub infos: Vec<RunInfo>,
    /// Snapshot assertions that failed: name and diff (stored → new).
    pub snapshot_diffs: Vec<(String, String)>,
    /// Steps timed inside the test body (inject, run, capture of each agent run).
    pub phases: Vec<(PhaseKind, Instant, Instant)>,
    /// Every secret the test's agents used.
    pub secrets: Secrets,
    /// The test's network mode (its VM may be attached differently: see
    /// [`NetworkMode::vm_attachment`]).
    pub network: NetworkMode,
    /// The test's egress allowlist: the configured `allow` (in `allowlist`
    /// mode) and the attribute's.
    pub allow: agentvm_gateway::Allowlist,
}

pub(crate) type SharedContext = Arc<Mutex<TestContext>>;

tokio::task_local! {
    static CONTEXT: SharedContext;
}

impl TestContext {
    pub(crate) fn new(test: &str, exec_timeout: Duration) -> SharedContext {
        Arc::new(Mutex::new(Self {
            test: test.to_string(),
            vm: String::new(),
            exec_timeout,
            runs: Vec::new(),
            infos: Vec::new(),
            phases: Vec::new(),
            snapshot_diffs: Vec::new(),
            secrets: Secrets::new(),
            network: NetworkMode::default(),
            allow: agentvm_gateway::Allowlist::default(),
        }))
    }
}

/// Records a timed step of the current test, if under the harness.
pub(crate) fn record_phase(context: Option<&SharedContext>, kind: PhaseKind, started: Instant) {
    if let Some(context) = context {
        context
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .phases
            .push((kind, started, Instant::now()));
    }
}

/// The context of the test running in this task, if under the harness.
pub(crate) fn current() -> Option<SharedContext> {
    CONTEXT.try_with(Arc::clone).ok()
}

/// Runs `future` with `context` as the current test's context.
pub(crate) async fn scope<F: std::future::Future>(context: SharedContext, future: F) -> F::Output {
    CONTEXT.scope(context, future).await
}
