//! [`AgentRun`]: everything one agent run did, in a shape made for
//! assertions and YAML snapshots.

use std::time::Duration;

use agentvm_runtime::client::ExecOutput;
use agentvm_runtime::protocol::{
    ChangeKind, ChangeList, ExitStatus, FileChange, FileKind, FileState, ResourceUsage,
};
use serde::{Serialize, Serializer};

use crate::redact::Secrets;

/// Largest file text (before or after) a diff is computed for.
pub const MAX_DIFF_TEXT: usize = 64 * 1024;

/// The record of one agent run: exit status, output, workspace changes and
/// resource use. Secrets are already redacted in every text it holds.
///
/// Serialized (YAML snapshots, `run.json` artifacts) it looks like this;
/// `duration` and `resources` vary from run to run, so
/// [`assert_agent_snapshot!`](crate::assert_agent_snapshot) redacts them:
///
/// ```yaml
/// exit_code: 0        # null when killed by a signal
/// signal: ~           # the signal number when killed
/// timed_out: false
/// stdout: "agent: created hello.txt\n"
/// stdout_truncated: false
/// stderr: ""
/// stderr_truncated: false
/// changes:
///   - path: hello.txt
///     change: created # created | modified | deleted
///     kind: file      # file | dir | symlink | other
///     size: 3
///     mode: "0644"
///     sha256: 98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4
///     diff: "@@ -0,0 +1 @@\n+hi\n"
/// outside_workspace:  # only when something outside /workspace changed
///   - /etc
///   - /etc/agentvm-was-here
/// network:            # only when the agent used the egress proxy
///   - host: api.example.com
///     port: 443
///     kind: connect   # connect (a CONNECT tunnel) | http (plain HTTP)
///     allowed: false
///     bytes_up: 0
///     bytes_down: 0
///     duration: 0
///     error: not on the allowlist
/// duration: 0.012s
/// resources:
///   peak_rss_bytes: 2097152
///   user_cpu: 0.001s
///   system_cpu: 0.002s
///   processes_started: 3
///   peak_processes: ~
///   unroutable_packets: 0
///   oom_kills: 0
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentRun {
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    stdout: String,
    stdout_truncated: bool,
    stderr: String,
    stderr_truncated: bool,
    changes: Vec<Change>,
    /// Paths outside the workspace that changed (see
    /// [`AgentRun::outside_workspace`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    outside_workspace: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    outside_workspace_truncated: bool,
    #[serde(serialize_with = "ser_duration")]
    duration: Duration,
    resources: Resources,
    /// The model gateway's record of the run (agents with a model only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    transcript: Vec<agentvm_gateway::Exchange>,
    /// Every connection the agent asked the egress proxy for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    network: Vec<agentvm_gateway::ConnectionRecord>,
    #[serde(skip)]
    stdout_bytes: u64,
    #[serde(skip)]
    stderr_bytes: u64,
}

/// How a workspace entry changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeType {
    /// Not in the baseline.
    Created,
    /// In both, with different content, kind or mode.
    Modified,
    /// In the baseline, gone now.
    Deleted,
}

/// What a workspace entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A fifo, socket or device.
    Other,
}

impl From<FileKind> for EntryKind {
    fn from(kind: FileKind) -> Self {
        match kind {
            FileKind::File => Self::File,
            FileKind::Dir => Self::Dir,
            FileKind::Symlink => Self::Symlink,
            FileKind::Other => Self::Other,
        }
    }
}

/// The state of an entry before it was modified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Before {
    /// What it was.
    pub kind: EntryKind,
    /// Size in bytes (regular files).
    pub size: Option<u64>,
    /// Permission bits in octal, e.g. `"0644"`.
    pub mode: String,
    /// SHA-256 of the content (files) or link target (symlinks).
    pub sha256: Option<String>,
}

/// One changed workspace entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Path relative to `/workspace`, `/`-separated.
    pub path: String,
    /// Created, modified or deleted.
    pub change: ChangeType,
    /// What it is now (deleted: what it was).
    pub kind: EntryKind,
    /// Size in bytes now (deleted: before); `None` for non-files.
    pub size: Option<u64>,
    /// Permission bits now (deleted: before), octal.
    pub mode: String,
    /// SHA-256 now (deleted: before) of the content or link target.
    pub sha256: Option<String>,
    /// The previous state, for modified entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Before>,
    /// Unified diff (hunks only, 3 lines of context) for text files up to
    /// 64 KiB: the whole text as added lines when created, as removed lines
    /// when deleted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    /// The current text (small UTF-8 files), for assertions. Not serialized.
    #[serde(skip)]
    pub text: Option<String>,
}

/// Resources the agent's process tree used, as far as the guest measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Resources {
    /// Peak resident set size of the largest process, in bytes.
    pub peak_rss_bytes: Option<u64>,
    /// User-mode CPU time.
    #[serde(serialize_with = "ser_opt_duration")]
    pub user_cpu: Option<Duration>,
    /// Kernel-mode CPU time.
    #[serde(serialize_with = "ser_opt_duration")]
    pub system_cpu: Option<Duration>,
    /// Processes (and threads) the guest created while the agent ran
    /// (guest-wide fork counter).
    pub processes_started: Option<u64>,
    /// Most processes of the agent's tree alive at once (sampled every
    /// 500 ms; `None` for a run shorter than that).
    pub peak_processes: Option<u64>,
    /// Packets the guest could not route while the agent ran: attempts to
    /// reach the network from a VM without one.
    pub unroutable_packets: Option<u64>,
    /// Processes the guest's OOM killer killed while the agent ran.
    pub oom_kills: Option<u64>,
}

impl From<ResourceUsage> for Resources {
    fn from(r: ResourceUsage) -> Self {
        Self {
            peak_rss_bytes: r.peak_rss_bytes,
            user_cpu: r.user_cpu,
            system_cpu: r.system_cpu,
            processes_started: r.processes_started,
            peak_processes: r.peak_processes,
            unroutable_packets: r.unroutable_packets,
            oom_kills: r.oom_kills,
        }
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{:.3}s", d.as_secs_f64()))
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

fn octal(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

fn size_of(state: &FileState) -> Option<u64> {
    (state.kind == FileKind::File).then_some(state.size)
}

/// Unified diff of two texts, hunks only.
pub fn unified_diff(before: &str, after: &str) -> String {
    similar::TextDiff::from_lines(before, after)
        .unified_diff()
        .context_radius(3)
        .to_string()
}

impl Change {
    /// Builds the record of one change, redacting `secrets` in its path and texts.
    pub fn from_file_change(change: FileChange, secrets: &Secrets) -> Self {
        let FileChange {
            path,
            change,
            before,
            after,
        } = change;
        let path = secrets.redact(&path).into_owned();
        let kind = match change {
            ChangeKind::Created => ChangeType::Created,
            ChangeKind::Modified => ChangeType::Modified,
            ChangeKind::Deleted => ChangeType::Deleted,
        };
        let redact_text = |state: &Option<FileState>| -> Option<String> {
            state
                .as_ref()
                .and_then(|s| s.text.as_deref())
                .map(|t| secrets.redact(t).into_owned())
        };
        let text_before = redact_text(&before);
        let text_after = redact_text(&after);
        let small = |t: &Option<String>| t.as_ref().is_some_and(|t| t.len() <= MAX_DIFF_TEXT);
        let is_file = |s: &Option<FileState>| s.as_ref().is_some_and(|s| s.kind == FileKind::File);
        let diff = match kind {
            ChangeType::Created if small(&text_after) => {
                Some(unified_diff("", text_after.as_deref().unwrap_or_default()))
            }
            ChangeType::Deleted if small(&text_before) => {
                Some(unified_diff(text_before.as_deref().unwrap_or_default(), ""))
            }
            ChangeType::Modified if small(&text_before) && small(&text_after) => {
                Some(unified_diff(
                    text_before.as_deref().unwrap_or_default(),
                    text_after.as_deref().unwrap_or_default(),
                ))
            }
            // A file that became text (or stopped being a file): diff what is known.
            ChangeType::Modified if small(&text_after) && !is_file(&before) => {
                Some(unified_diff("", text_after.as_deref().unwrap_or_default()))
            }
            _ => None,
        }
        .filter(|d| !d.is_empty());
        let current = after.as_ref().or(before.as_ref());
        let (entry_kind, size, mode, sha256) = match current {
            Some(s) => (s.kind.into(), size_of(s), octal(s.mode), s.sha256.clone()),
            None => (EntryKind::Other, None, octal(0), None),
        };
        let before_state = match (kind, &before) {
            (ChangeType::Modified, Some(b)) => Some(Before {
                kind: b.kind.into(),
                size: size_of(b),
                mode: octal(b.mode),
                sha256: b.sha256.clone(),
            }),
            _ => None,
        };
        Self {
            path,
            change: kind,
            kind: entry_kind,
            size,
            mode,
            sha256,
            before: before_state,
            diff,
            text: if kind == ChangeType::Deleted {
                None
            } else {
                text_after
            },
        }
    }
}

impl AgentRun {
    /// Builds the record from a command's raw output and the workspace
    /// changes listed after it, redacting `secrets` everywhere. Output is
    /// decoded as lossy UTF-8.
    pub fn from_exec(output: ExecOutput, changes: Vec<FileChange>, secrets: &Secrets) -> Self {
        Self::from_changes(
            output,
            ChangeList {
                changes,
                ..ChangeList::default()
            },
            secrets,
        )
    }

    /// Like [`AgentRun::from_exec`], with the whole change list (also the
    /// paths outside the workspace).
    pub fn from_changes(output: ExecOutput, list: ChangeList, secrets: &Secrets) -> Self {
        let ChangeList {
            changes,
            outside_workspace,
            outside_truncated,
        } = list;
        let report = output.report;
        let text = |bytes: &[u8], truncated: bool| {
            let lossy = String::from_utf8_lossy(bytes);
            if truncated {
                secrets.redact_truncated(&lossy)
            } else {
                secrets.redact(&lossy).into_owned()
            }
        };
        let (exit_code, signal) = match report.status {
            ExitStatus::Code(code) => (Some(code), None),
            ExitStatus::Signal(signal) => (None, Some(signal)),
        };
        let mut changes: Vec<Change> = changes
            .into_iter()
            .map(|c| Change::from_file_change(c, secrets))
            .collect();
        changes.sort_by(|a, b| a.path.cmp(&b.path));
        Self {
            exit_code,
            signal,
            timed_out: report.timed_out,
            stdout: text(&output.stdout, report.stdout_truncated),
            stdout_truncated: report.stdout_truncated,
            stderr: text(&output.stderr, report.stderr_truncated),
            stderr_truncated: report.stderr_truncated,
            changes,
            outside_workspace: outside_workspace
                .iter()
                .map(|p| secrets.redact(p).into_owned())
                .collect(),
            outside_workspace_truncated: outside_truncated,
            duration: report.duration,
            resources: report.resources.into(),
            transcript: Vec::new(),
            network: Vec::new(),
            stdout_bytes: report.stdout_bytes.max(output.stdout.len() as u64),
            stderr_bytes: report.stderr_bytes.max(output.stderr.len() as u64),
        }
    }

    /// The same run with the model gateway's transcript.
    pub fn with_transcript(mut self, transcript: Vec<agentvm_gateway::Exchange>) -> Self {
        self.transcript = transcript;
        self
    }

    /// What the agent asked its model and got, request by request: the new
    /// user text and tool results, the answer's text and tool calls, token
    /// counts (empty for agents without a [`Agent::model`](crate::Agent::model)).
    /// Serialized into snapshots when not empty.
    pub fn transcript(&self) -> &[agentvm_gateway::Exchange] {
        &self.transcript
    }

    /// The same run with the egress proxy's connection log.
    pub fn with_network(mut self, network: Vec<agentvm_gateway::ConnectionRecord>) -> Self {
        self.network = network;
        self
    }

    /// Every connection the agent asked the egress proxy for (network
    /// modes `gateway` and `allowlist`), allowed or refused, in the order
    /// they ended: host, port, bytes each way, duration, error. Serialized
    /// into snapshots when not empty, bytes and duration redacted.
    pub fn network(&self) -> &[agentvm_gateway::ConnectionRecord] {
        &self.network
    }

    /// Absolute paths outside `/workspace` (and the agent's staging
    /// directory) whose inode changed while the agent ran: files written or
    /// created there, and the directories entries were created in or
    /// deleted from. Sorted; at most 100
    /// ([`AgentRun::outside_workspace_truncated`] says when there were more).
    pub fn outside_workspace(&self) -> &[String] {
        &self.outside_workspace
    }

    /// More paths outside the workspace changed than
    /// [`AgentRun::outside_workspace`] lists.
    pub fn outside_workspace_truncated(&self) -> bool {
        self.outside_workspace_truncated
    }

    /// The exit code, when the agent exited (not killed by a signal).
    pub fn exit_code(&self) -> Option<i32> {
        self.exit_code
    }

    /// The signal that killed the agent, if one did.
    pub fn signal(&self) -> Option<i32> {
        self.signal
    }

    /// Exited with code 0 and did not time out.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// The agent's timeout expired and its process tree was killed.
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// Captured stdout (lossy UTF-8, secrets redacted, at most the output limit).
    pub fn stdout(&self) -> &str {
        &self.stdout
    }

    /// Captured stderr (lossy UTF-8, secrets redacted, at most the output limit).
    pub fn stderr(&self) -> &str {
        &self.stderr
    }

    /// Stdout went over the output limit and was cut.
    pub fn stdout_truncated(&self) -> bool {
        self.stdout_truncated
    }

    /// Stderr went over the output limit and was cut.
    pub fn stderr_truncated(&self) -> bool {
        self.stderr_truncated
    }

    /// Total bytes the agent wrote to stdout (kept or not).
    pub fn stdout_bytes(&self) -> u64 {
        self.stdout_bytes
    }

    /// Total bytes the agent wrote to stderr (kept or not).
    pub fn stderr_bytes(&self) -> u64 {
        self.stderr_bytes
    }

    /// Workspace changes, sorted by path.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// The change of `path` (relative to the workspace), if it changed.
    pub fn change(&self, path: &str) -> Option<&Change> {
        self.changes.iter().find(|c| c.path == path)
    }

    /// Paths of the entries of one change type.
    pub fn paths(&self, change: ChangeType) -> Vec<&str> {
        self.changes
            .iter()
            .filter(|c| c.change == change)
            .map(|c| c.path.as_str())
            .collect()
    }

    /// Paths created by the agent.
    pub fn created(&self) -> Vec<&str> {
        self.paths(ChangeType::Created)
    }

    /// Paths modified by the agent.
    pub fn modified(&self) -> Vec<&str> {
        self.paths(ChangeType::Modified)
    }

    /// Paths deleted by the agent.
    pub fn deleted(&self) -> Vec<&str> {
        self.paths(ChangeType::Deleted)
    }

    /// The current text of a created or modified small text file.
    pub fn file_text(&self, path: &str) -> Option<&str> {
        self.change(path).and_then(|c| c.text.as_deref())
    }

    /// Wall time of the run, as the guest measured it.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The guest's OOM killer killed a process while the agent ran (most
    /// likely one of the agent's: the guest runs little else). A run killed
    /// by signal 9 with this set ran out of memory, not time.
    pub fn oom_killed(&self) -> bool {
        self.resources.oom_kills.unwrap_or(0) > 0
    }

    /// Resource use of the agent's process tree.
    pub fn resources(&self) -> Resources {
        self.resources
    }

    /// A copy with every SHA-256 replaced by `[sha256]`, for snapshots of
    /// runs whose file contents vary while their diffs or sizes do not
    /// matter (or are asserted otherwise).
    pub fn redact_hashes(&self) -> AgentRun {
        let mut run = self.clone();
        for change in &mut run.changes {
            if change.sha256.is_some() {
                change.sha256 = Some("[sha256]".into());
            }
            if let Some(before) = &mut change.before {
                if before.sha256.is_some() {
                    before.sha256 = Some("[sha256]".into());
                }
            }
        }
        run
    }

    /// The run as pretty JSON (the `run.json` artifact).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("AgentRun serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_runtime::protocol::ExitReport;

    fn state(kind: FileKind, text: Option<&str>, mode: u32) -> FileState {
        FileState {
            kind,
            size: text.map_or(0, |t| t.len() as u64),
            mode,
            sha256: (kind == FileKind::File).then(|| format!("sha-of-{}", text.unwrap_or("bin"))),
            text: text.map(str::to_string),
        }
    }

    fn change(
        path: &str,
        kind: ChangeKind,
        before: Option<FileState>,
        after: Option<FileState>,
    ) -> FileChange {
        FileChange {
            path: path.into(),
            change: kind,
            before,
            after,
        }
    }

    fn output(stdout: &[u8], status: ExitStatus, truncated: bool) -> ExecOutput {
        ExecOutput {
            stdout: stdout.to_vec(),
            stderr: b"warn: s3cr3t\n".to_vec(),
            report: ExitReport {
                status,
                timed_out: false,
                duration: Duration::from_millis(1234),
                resources: ResourceUsage {
                    peak_rss_bytes: Some(4096),
                    user_cpu: Some(Duration::from_millis(10)),
                    system_cpu: None,
                    ..ResourceUsage::default()
                },
                stdout_bytes: 100,
                stderr_bytes: 13,
                stdout_truncated: truncated,
                stderr_truncated: false,
            },
        }
    }

    fn secrets() -> Secrets {
        let mut s = Secrets::new();
        s.add("TOKEN", "s3cr3t");
        s
    }

    fn sample() -> AgentRun {
        let changes = vec![
            change(
                "src/main.txt",
                ChangeKind::Modified,
                Some(state(FileKind::File, Some("one\ntwo\nthree\n"), 0o644)),
                Some(state(
                    FileKind::File,
                    Some("one\n2\nthree\ns3cr3t\n"),
                    0o755,
                )),
            ),
            change(
                "hello.txt",
                ChangeKind::Created,
                None,
                Some(state(FileKind::File, Some("hi\n"), 0o644)),
            ),
            change(
                "old.txt",
                ChangeKind::Deleted,
                Some(state(FileKind::File, Some("bye"), 0o644)),
                None,
            ),
            change(
                "notes",
                ChangeKind::Created,
                None,
                Some(state(FileKind::Dir, None, 0o755)),
            ),
            change(
                "blob.bin",
                ChangeKind::Created,
                None,
                Some(state(FileKind::File, None, 0o600)),
            ),
        ];
        AgentRun::from_exec(
            output(b"token=s3cr3t\n\xff", ExitStatus::Code(0), false),
            changes,
            &secrets(),
        )
    }

    #[test]
    fn fields_and_accessors() {
        let run = sample();
        assert_eq!(run.exit_code(), Some(0));
        assert_eq!(run.signal(), None);
        assert!(run.success());
        assert_eq!(run.stdout(), "token=[secret:TOKEN]\n\u{fffd}");
        assert_eq!(run.stderr(), "warn: [secret:TOKEN]\n");
        assert_eq!(run.created(), ["blob.bin", "hello.txt", "notes"]);
        assert_eq!(run.modified(), ["src/main.txt"]);
        assert_eq!(run.deleted(), ["old.txt"]);
        assert_eq!(run.file_text("hello.txt"), Some("hi\n"));
        assert_eq!(
            run.file_text("src/main.txt"),
            Some("one\n2\nthree\n[secret:TOKEN]\n")
        );
        assert_eq!(run.stdout_bytes(), 100);
        assert_eq!(run.duration(), Duration::from_millis(1234));
        let killed = AgentRun::from_exec(
            output(b"", ExitStatus::Signal(9), false),
            vec![],
            &secrets(),
        );
        assert_eq!(
            (killed.exit_code(), killed.signal(), killed.success()),
            (None, Some(9), false)
        );
    }

    #[test]
    fn diffs() {
        let run = sample();
        assert_eq!(
            run.change("hello.txt").unwrap().diff.as_deref(),
            Some("@@ -0,0 +1 @@\n+hi\n")
        );
        assert_eq!(
            run.change("old.txt").unwrap().diff.as_deref(),
            Some("@@ -1 +0,0 @@\n-bye\n\\ No newline at end of file\n")
        );
        assert_eq!(
            run.change("src/main.txt").unwrap().diff.as_deref(),
            Some("@@ -1,3 +1,4 @@\n one\n-two\n+2\n three\n+[secret:TOKEN]\n")
        );
        assert_eq!(run.change("blob.bin").unwrap().diff, None);
        assert_eq!(run.change("notes").unwrap().diff, None);
    }

    #[test]
    fn yaml_shape() {
        let yaml = serde_json::to_value(sample()).unwrap();
        let expected = serde_json::json!({
            "exit_code": 0,
            "signal": null,
            "timed_out": false,
            "stdout": "token=[secret:TOKEN]\n\u{fffd}",
            "stdout_truncated": false,
            "stderr": "warn: [secret:TOKEN]\n",
            "stderr_truncated": false,
            "changes": [
                {"path": "blob.bin", "change": "created", "kind": "file", "size": 0, "mode": "0600", "sha256": "sha-of-bin"},
                {"path": "hello.txt", "change": "created", "kind": "file", "size": 3, "mode": "0644", "sha256": "sha-of-hi\n",
                 "diff": "@@ -0,0 +1 @@\n+hi\n"},
                {"path": "notes", "change": "created", "kind": "dir", "size": null, "mode": "0755", "sha256": null},
                {"path": "old.txt", "change": "deleted", "kind": "file", "size": 3, "mode": "0644", "sha256": "sha-of-bye",
                 "diff": "@@ -1 +0,0 @@\n-bye\n\\ No newline at end of file\n"},
                {"path": "src/main.txt", "change": "modified", "kind": "file", "size": 19, "mode": "0755",
                 "sha256": "sha-of-one\n2\nthree\ns3cr3t\n",
                 "before": {"kind": "file", "size": 14, "mode": "0644", "sha256": "sha-of-one\ntwo\nthree\n"},
                 "diff": "@@ -1,3 +1,4 @@\n one\n-two\n+2\n three\n+[secret:TOKEN]\n"},
            ],
            "duration": "1.234s",
            "resources": {"peak_rss_bytes": 4096, "user_cpu": "0.010s", "system_cpu": null,
                          "processes_started": null, "peak_processes": null, "unroutable_packets": null, "oom_kills": null},
        });
        assert_eq!(yaml, expected);
    }

    #[test]
    fn outside_workspace_paths_are_kept_redacted_and_shown_only_when_there() {
        let list = |outside: Vec<String>, truncated| ChangeList {
            changes: Vec::new(),
            outside_workspace: outside,
            outside_truncated: truncated,
        };
        let run = AgentRun::from_changes(
            output(b"", ExitStatus::Code(0), false),
            list(vec!["/etc".into(), "/tmp/s3cr3t".into()], true),
            &secrets(),
        );
        assert_eq!(run.outside_workspace(), ["/etc", "/tmp/[secret:TOKEN]"]);
        assert!(run.outside_workspace_truncated());
        let json = serde_json::to_value(&run).unwrap();
        assert_eq!(
            json["outside_workspace"],
            serde_json::json!(["/etc", "/tmp/[secret:TOKEN]"])
        );
        assert_eq!(json["outside_workspace_truncated"], true);
        let quiet = AgentRun::from_changes(
            output(b"", ExitStatus::Code(0), false),
            list(Vec::new(), false),
            &secrets(),
        );
        let json = serde_json::to_value(&quiet).unwrap();
        assert!(
            json.get("outside_workspace").is_none()
                && json.get("outside_workspace_truncated").is_none()
        );
    }

    #[test]
    fn secrets_in_paths_and_truncated_output_are_redacted() {
        let changes = vec![change(
            "s3cr3t.txt",
            ChangeKind::Created,
            None,
            Some(state(FileKind::File, Some("x"), 0o644)),
        )];
        let run = AgentRun::from_exec(
            output(b"key: s3c", ExitStatus::Code(0), true),
            changes,
            &secrets(),
        );
        assert_eq!(run.stdout(), "key: [secret:TOKEN]");
        assert!(run.stdout_truncated());
        assert_eq!(run.changes()[0].path, "[secret:TOKEN].txt");
        assert!(!run.to_json().contains("s3cr3t"));
    }

    #[test]
    fn hashes_can_be_redacted() {
        let run = sample().redact_hashes();
        let json = run.to_json();
        assert!(!json.contains("sha-of"), "{json}");
        assert!(json.contains("[sha256]"));
        assert_eq!(run.change("notes").unwrap().sha256, None);
    }
}
