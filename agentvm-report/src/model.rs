//! What the report reads: the suite reports the harness writes
//! (`<artifacts_dir>/suites/<suite>.json`, or `report.json` alone), in
//! structures that accept older and newer files (every field defaults).

use serde::Deserialize;
use serde_json::Value;

/// One test binary's run (`suites/<suite>.json`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Suite {
    /// The file it was read from, relative to the artifacts directory.
    #[serde(skip)]
    pub file: String,
    /// The test binary (`agents`).
    pub suite: String,
    /// When it started (RFC 3339).
    pub started: String,
    /// Wall time, seconds.
    pub duration_seconds: f64,
    /// Tests passed.
    pub passed: usize,
    /// Tests failed.
    pub failed: usize,
    /// Tests ignored.
    pub ignored: usize,
    /// Every test.
    pub tests: Vec<Test>,
}

/// One test.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Test {
    /// Full name.
    pub name: String,
    /// `passed`, `failed`, `ignored`.
    pub result: String,
    /// The VM it ran on.
    pub vm: Option<String>,
    /// The test body, seconds.
    pub duration_seconds: f64,
    /// Wait for a VM, seconds.
    pub acquire_seconds: Option<f64>,
    /// Revert, seconds.
    pub revert_seconds: Option<f64>,
    /// What happened to the VM afterwards.
    pub release: Option<String>,
    /// Anomalies.
    pub anomalies: Vec<Anomaly>,
    /// Failure (or ignore) message.
    pub message: Option<String>,
    /// Start, seconds after the suite started.
    pub start_seconds: Option<f64>,
    /// Timed steps.
    pub phases: Vec<Phase>,
    /// How many agent runs (also in reports written before `runs` existed).
    pub agent_runs: usize,
    /// Agent runs.
    pub runs: Vec<RunRecord>,
    /// Artifacts directory, relative to the artifacts directory.
    pub artifacts: Option<String>,
    /// Snapshot assertions that failed, with their diffs.
    pub snapshot_diffs: Vec<SnapshotDiff>,
    /// The files in its artifacts directory (filled by [`crate::load`]).
    #[serde(skip)]
    pub artifact_files: Vec<String>,
}

/// A failed snapshot assertion.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SnapshotDiff {
    /// The snapshot's name.
    pub name: String,
    /// Unified diff, stored → new.
    pub diff: String,
}

/// An anomaly.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Anomaly {
    /// Kind (`timeout`, ...).
    pub kind: String,
    /// Why.
    pub message: String,
    /// It failed the test.
    pub fails: bool,
}

/// A timed step of a test.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Phase {
    /// `acquire`, `inject`, `run`, `capture`, `revert`.
    pub phase: String,
    /// Start, seconds after the test started.
    pub start_seconds: f64,
    /// Length, seconds.
    pub seconds: f64,
}

/// One agent run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RunRecord {
    /// The agent's name.
    pub agent: String,
    /// Its command line.
    pub argv: Vec<String>,
    /// The task's prompt.
    pub prompt: Option<String>,
    /// Files the task brought.
    pub task_files: Vec<String>,
    /// The run (`run.json`'s content).
    pub run: Run,
}

/// What the agent did (`AgentRun` as JSON).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Run {
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Killing signal.
    pub signal: Option<i32>,
    /// Killed at its timeout.
    pub timed_out: bool,
    /// Stdout.
    pub stdout: String,
    /// Stdout was cut at the output limit.
    pub stdout_truncated: bool,
    /// Stderr.
    pub stderr: String,
    /// Stderr was cut.
    pub stderr_truncated: bool,
    /// Workspace changes.
    pub changes: Vec<Change>,
    /// Paths changed outside the workspace.
    pub outside_workspace: Vec<String>,
    /// `"1.234s"`.
    pub duration: Option<String>,
    /// Resource use (shown as given).
    pub resources: Option<serde_json::Map<String, Value>>,
    /// The model transcript.
    pub transcript: Vec<Exchange>,
    /// The network log.
    pub network: Vec<Connection>,
}

/// A workspace change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Change {
    /// Path in the workspace.
    pub path: String,
    /// `created`, `modified`, `deleted`.
    pub change: String,
    /// `file`, `dir`, `symlink`, `other`.
    pub kind: String,
    /// Size.
    pub size: Option<u64>,
    /// Mode, octal.
    pub mode: String,
    /// Unified diff (text files).
    pub diff: Option<String>,
}

/// One model request and its answer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Exchange {
    /// Request number.
    pub seq: u64,
    /// API (`anthropic`, `openai_chat`, ...).
    pub api: String,
    /// `scripted`, `replay`, `record`.
    pub mode: String,
    /// `turn`, `side`, `repeat`, `error`.
    pub kind: String,
    /// New user text and tool results.
    pub new_input: Vec<InputItem>,
    /// The answer's text.
    pub response_text: Option<String>,
    /// The answer's tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// Token counts.
    pub usage: Option<Usage>,
    /// HTTP status.
    pub status: Option<u16>,
    /// Error answered with.
    pub error: Option<String>,
}

/// New input of a request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct InputItem {
    /// `user_text` or `tool_result`.
    #[serde(rename = "type")]
    pub kind: String,
    /// User text.
    pub text: Option<String>,
    /// Tool output.
    pub output: Option<String>,
    /// The tool failed.
    pub is_error: bool,
}

/// A tool call.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ToolCall {
    /// Tool name.
    pub name: String,
    /// Arguments.
    pub arguments: Value,
}

/// Token counts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
}

/// One connection through (or refused by) the egress proxy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Connection {
    /// Target host.
    pub host: String,
    /// Target port.
    pub port: u16,
    /// `connect` or `http`.
    pub kind: String,
    /// Let through.
    pub allowed: bool,
    /// Bytes agent → host.
    pub bytes_up: u64,
    /// Bytes host → agent.
    pub bytes_down: u64,
    /// Milliseconds.
    pub duration: u64,
    /// What went wrong.
    pub error: Option<String>,
}
