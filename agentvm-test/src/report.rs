//! The end-of-run report: a table on stderr, `<artifacts_dir>/report.json`
//! (also kept as `<artifacts_dir>/suites/<suite>.json`, one per test binary,
//! which `report.html` is built from) and `<artifacts_dir>/junit.xml` (JUnit
//! XML for CI systems).
//!
//! Failure messages are redacted by the harness before they get here.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::anomaly::Anomaly;

/// How a test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TestResultKind {
    /// It passed.
    Passed,
    /// It failed (or panicked, timed out, hit a `fail_on` anomaly).
    Failed,
    /// It did not run (ignored).
    Ignored,
}

impl TestResultKind {
    /// `passed`, `failed`, `ignored`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Ignored => "ignored",
        }
    }
}

/// One test of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TestRecord {
    /// Full name (`module::test`).
    pub name: String,
    /// How it ended.
    pub result: TestResultKind,
    /// The VM it ran on.
    pub vm: Option<String>,
    /// The test body, seconds.
    pub duration_seconds: f64,
    /// Wait for a VM, seconds.
    pub acquire_seconds: Option<f64>,
    /// Revert after the test, seconds (when it was reverted).
    pub revert_seconds: Option<f64>,
    /// What happened to the VM afterwards (`revert 95ms`, `recycled`, ...).
    pub release: Option<String>,
    /// Agent runs of the test.
    pub agent_runs: usize,
    /// What was unusual.
    pub anomalies: Vec<Anomaly>,
    /// Why it failed, or why it was ignored (redacted).
    pub message: Option<String>,
    /// When the test started waiting for its VM, seconds after the run started.
    pub start_seconds: Option<f64>,
    /// Where its time went, in order (for the report's timeline).
    pub phases: Vec<Phase>,
    /// Its agent runs: what ran on which task, and the run record.
    pub runs: Vec<RunRecord>,
    /// Its artifacts directory, relative to the artifacts directory, when
    /// it was kept.
    pub artifacts: Option<String>,
    /// Snapshot assertions that failed, with their diffs.
    pub snapshot_diffs: Vec<SnapshotDiff>,
}

/// A snapshot assertion that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotDiff {
    /// The snapshot's name.
    pub name: String,
    /// Unified diff, stored snapshot → new one (secrets redacted).
    pub diff: String,
}

/// A step of a test, for the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseKind {
    /// Waiting for a VM from the pool.
    Acquire,
    /// Copying the agent, its task and fixtures into the guest.
    Inject,
    /// The agent running.
    Run,
    /// Collecting the workspace changes and the model transcript.
    Capture,
    /// Reverting the VM to its golden snapshot after the test.
    Revert,
}

/// One step of a test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Phase {
    /// Which step.
    pub phase: PhaseKind,
    /// When it started, seconds after the test started.
    pub start_seconds: f64,
    /// How long it took, seconds.
    pub seconds: f64,
}

/// One agent run of a test, as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRecord {
    /// The agent's name (its program's file name).
    pub agent: String,
    /// The command line it ran with (secrets redacted).
    pub argv: Vec<String>,
    /// The task's prompt (secrets redacted).
    pub prompt: Option<String>,
    /// Files the task put into the workspace.
    pub task_files: Vec<String>,
    /// The [`AgentRun`](crate::AgentRun) as in `run.json`.
    pub run: serde_json::Value,
}

/// The timed steps `marks` (kind, start, end) of a test that started at
/// `test_start`, as offsets from it, in order of their start.
pub fn phases_since(
    test_start: std::time::Instant,
    marks: &[(PhaseKind, std::time::Instant, std::time::Instant)],
) -> Vec<Phase> {
    let mut phases: Vec<Phase> = marks
        .iter()
        .map(|&(phase, start, end)| Phase {
            phase,
            start_seconds: start.saturating_duration_since(test_start).as_secs_f64(),
            seconds: end.saturating_duration_since(start).as_secs_f64(),
        })
        .collect();
    phases.sort_by(|a, b| a.start_seconds.total_cmp(&b.start_seconds));
    phases
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The test binary (`agents` for `tests/agents.rs`).
    pub suite: String,
    /// The run this process is part of when a run is made of several
    /// processes: cargo-nextest runs one process per test and gives them
    /// one `NEXTEST_RUN_ID`. Reports of the same run are merged
    /// ([`Report::merged_json`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// When the run started (RFC 3339 UTC).
    pub started: String,
    /// Wall time of the run, seconds.
    pub duration_seconds: f64,
    /// Tests passed.
    pub passed: usize,
    /// Tests failed.
    pub failed: usize,
    /// Tests ignored.
    pub ignored: usize,
    /// Anomalies found, all tests.
    pub anomalies: usize,
    /// Every test, by name.
    pub tests: Vec<TestRecord>,
}

impl Report {
    /// The report of the run of `suite`'s `tests` (sorted by name here).
    pub fn new(
        suite: &str,
        started: SystemTime,
        duration: Duration,
        mut tests: Vec<TestRecord>,
    ) -> Self {
        tests.sort_by(|a, b| a.name.cmp(&b.name));
        let count = |kind| tests.iter().filter(|t| t.result == kind).count();
        Self {
            suite: suite.to_string(),
            run_id: std::env::var("NEXTEST_RUN_ID")
                .ok()
                .filter(|id| !id.is_empty()),
            started: agentvm_runtime::events::rfc3339(started),
            duration_seconds: duration.as_secs_f64(),
            passed: count(TestResultKind::Passed),
            failed: count(TestResultKind::Failed),
            ignored: count(TestResultKind::Ignored),
            anomalies: tests.iter().map(|t| t.anomalies.len()).sum(),
            tests,
        }
    }

    /// `report.json`'s text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    /// The report's JSON merged with `earlier`, the text of the suite's
    /// report written before, when that belongs to the same run (same
    /// `run_id`; under cargo-nextest every test is its own process): its
    /// tests that this process did not run are kept, with the start times
    /// of both moved onto the earlier of the two starts, and the counts and
    /// duration cover both. Otherwise this report alone.
    pub fn merged_json(&self, earlier: Option<&str>) -> String {
        let mine = serde_json::to_value(self).expect("a report serializes");
        let earlier: Option<serde_json::Value> = earlier.and_then(|t| serde_json::from_str(t).ok());
        let (Some(run_id), Some(earlier)) = (&self.run_id, earlier) else {
            return self.to_json();
        };
        if earlier["run_id"].as_str() != Some(run_id.as_str()) {
            return self.to_json();
        }
        let start = |report: &serde_json::Value| {
            report["started"]
                .as_str()
                .and_then(|s| humantime::parse_rfc3339(s).ok())
        };
        let (Some(mine_at), Some(earlier_at)) = (start(&mine), start(&earlier)) else {
            return self.to_json();
        };
        let origin = mine_at.min(earlier_at);
        let offset = |at: SystemTime| at.duration_since(origin).unwrap_or_default().as_secs_f64();
        let end = |report: &serde_json::Value, at: SystemTime| {
            offset(at) + report["duration_seconds"].as_f64().unwrap_or(0.0)
        };
        let shifted = |report: &serde_json::Value, at: SystemTime| -> Vec<serde_json::Value> {
            let by = offset(at);
            let mut tests = report["tests"].as_array().cloned().unwrap_or_default();
            for test in &mut tests {
                if let Some(s) = test["start_seconds"].as_f64() {
                    test["start_seconds"] = serde_json::json!(s + by);
                }
            }
            tests
        };
        let mut tests = shifted(&mine, mine_at);
        for test in shifted(&earlier, earlier_at) {
            if !tests.iter().any(|t| t["name"] == test["name"]) {
                tests.push(test);
            }
        }
        tests.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let count = |result: &str| tests.iter().filter(|t| t["result"] == result).count();
        let mut merged = mine.clone();
        merged["started"] = serde_json::json!(agentvm_runtime::events::rfc3339(origin));
        merged["duration_seconds"] =
            serde_json::json!(end(&mine, mine_at).max(end(&earlier, earlier_at)));
        merged["passed"] = serde_json::json!(count("passed"));
        merged["failed"] = serde_json::json!(count("failed"));
        merged["ignored"] = serde_json::json!(count("ignored"));
        merged["anomalies"] = serde_json::json!(tests
            .iter()
            .map(|t| t["anomalies"].as_array().map_or(0, Vec::len))
            .sum::<usize>());
        merged["tests"] = serde_json::Value::Array(tests);
        serde_json::to_string_pretty(&merged).expect("a report serializes")
    }

    /// The summary table (for stderr).
    pub fn table(&self) -> String {
        let fmt = |s: Option<f64>| {
            s.map_or_else(
                || "-".to_string(),
                |s| crate::harness::fmt_duration(Duration::from_secs_f64(s.max(0.0))),
            )
        };
        let rows: Vec<[String; 5]> = self
            .tests
            .iter()
            .map(|t| {
                let anomalies = if t.anomalies.is_empty() {
                    "-".to_string()
                } else {
                    t.anomalies
                        .iter()
                        .map(|a| {
                            if a.fails {
                                format!("{} (fails)", a.kind)
                            } else {
                                a.kind.clone()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let duration = if t.result == TestResultKind::Ignored {
                    "-".to_string()
                } else {
                    fmt(Some(t.duration_seconds))
                };
                let revert = match (&t.revert_seconds, &t.release) {
                    (Some(s), _) => fmt(Some(*s)),
                    // Only the first line: a VM destroyed after a crash
                    // carries the serial console's tail, which would widen
                    // every row (the whole text is in report.json).
                    (None, Some(release)) => release.lines().next().unwrap_or_default().to_string(),
                    (None, None) => "-".to_string(),
                };
                [
                    t.name.clone(),
                    t.result.as_str().to_string(),
                    duration,
                    revert,
                    anomalies,
                ]
            })
            .collect();
        let header = ["test", "result", "duration", "revert", "anomalies"];
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: [&str; 5]| {
            let mut l = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i == 4 {
                    l.push_str(cell);
                } else {
                    let _ = write!(l, "{cell:<w$}  ");
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(header);
        for row in &rows {
            line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
        }
        let _ = writeln!(
            out,
            "{} passed, {} failed, {} ignored, {} anomal{} in {}",
            self.passed,
            self.failed,
            self.ignored,
            self.anomalies,
            if self.anomalies == 1 { "y" } else { "ies" },
            crate::harness::fmt_duration(Duration::from_secs_f64(self.duration_seconds))
        );
        out
    }

    /// `junit.xml`'s text: one `<testsuite>` named `suite`.
    pub fn junit_xml(&self, suite: &str) -> String {
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            x,
            "<testsuites name=\"{}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
            xml_escape(suite),
            self.tests.len(),
            self.failed,
            self.ignored,
            self.duration_seconds
        );
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"{:.3}\" timestamp=\"{}\">",
            xml_escape(suite),
            self.tests.len(),
            self.failed,
            self.ignored,
            self.duration_seconds,
            xml_escape(&self.started)
        );
        for t in &self.tests {
            let (class, name) = match t.name.rsplit_once("::") {
                Some((class, name)) => (class, name),
                None => (suite, t.name.as_str()),
            };
            let _ = write!(
                x,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">",
                xml_escape(class),
                xml_escape(name),
                t.duration_seconds
            );
            match t.result {
                TestResultKind::Passed => {}
                TestResultKind::Failed => {
                    let message = t.message.as_deref().unwrap_or("failed");
                    let first = message.lines().next().unwrap_or("failed");
                    let _ = write!(
                        x,
                        "\n      <failure message=\"{}\" type=\"failure\">{}</failure>",
                        xml_escape(first),
                        xml_escape(message)
                    );
                }
                TestResultKind::Ignored => {
                    let _ = write!(
                        x,
                        "\n      <skipped message=\"{}\"/>",
                        xml_escape(t.message.as_deref().unwrap_or("ignored"))
                    );
                }
            }
            let mut props = String::new();
            if let Some(vm) = &t.vm {
                let _ = write!(
                    props,
                    "\n        <property name=\"vm\" value=\"{}\"/>",
                    xml_escape(vm)
                );
            }
            if let Some(s) = t.revert_seconds {
                let _ = write!(
                    props,
                    "\n        <property name=\"revert_seconds\" value=\"{s:.3}\"/>"
                );
            }
            for a in &t.anomalies {
                let _ = write!(
                    props,
                    "\n        <property name=\"anomaly.{}\" value=\"{}\"/>",
                    xml_escape(&a.kind),
                    xml_escape(&a.message)
                );
            }
            if !props.is_empty() {
                let _ = write!(x, "\n      <properties>{props}\n      </properties>");
            }
            if t.result != TestResultKind::Passed || !props.is_empty() {
                x.push_str("\n    ");
            }
            x.push_str("</testcase>\n");
        }
        x.push_str("  </testsuite>\n</testsuites>\n");
        x
    }
}

/// `text` escaped for XML attribute values and text; characters XML 1.0
/// does not allow (most control characters) become U+FFFD.
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// `name` usable as a file name: characters other than ASCII letters,
/// digits, `-`, `_` and `.` become `_` (a leading `.` too).
pub fn file_safe(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with('.') {
        out.insert(0, '_');
    }
    out
}

/// A lock file held while a process reads and rewrites a suite report
/// (processes of one nextest run finish at the same time). Created
/// exclusively; removed on drop. A lock older than [`FileLock::STALE`]
/// (its process died) is taken over.
#[derive(Debug)]
pub struct FileLock {
    path: Option<std::path::PathBuf>,
}

impl FileLock {
    /// How long a lock may be held before others take it over.
    pub const STALE: Duration = Duration::from_secs(10);

    /// Waits for the lock at `path` (at most [`FileLock::STALE`]); without
    /// one (say, a read-only directory) the caller goes on unlocked.
    pub fn acquire(path: &Path) -> Self {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let started = std::time::Instant::now();
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(_) => {
                    return Self {
                        path: Some(path.to_path_buf()),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| m.elapsed().ok());
                    if age.is_some_and(|a| a > Self::STALE) || started.elapsed() > Self::STALE {
                        let _ = std::fs::remove_file(path);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => return Self { path: None },
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes `data` to `path` through a temporary file and a rename (creating
/// the directory), so that readers never see half a file.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, result: TestResultKind) -> TestRecord {
        TestRecord {
            name: name.into(),
            result,
            vm: Some("vm-1".into()),
            duration_seconds: 1.5,
            acquire_seconds: Some(0.0001),
            revert_seconds: Some(0.095),
            release: Some("revert 95ms".into()),
            agent_runs: 1,
            anomalies: Vec::new(),
            message: None,
            start_seconds: Some(0.0),
            phases: Vec::new(),
            runs: Vec::new(),
            artifacts: None,
            snapshot_diffs: Vec::new(),
        }
    }

    fn report() -> Report {
        let mut failed = record("suite::b <&> \"q\"", TestResultKind::Failed);
        failed.message = Some("line 1 <tag>\nline 2 & \u{1b}[31m".into());
        failed.anomalies.push(Anomaly {
            kind: "timeout".into(),
            message: "killed".into(),
            fails: true,
        });
        let mut ignored = record("suite::c", TestResultKind::Ignored);
        ignored.message = Some("needs a real VM".into());
        Report::new(
            "agents",
            SystemTime::UNIX_EPOCH,
            Duration::from_secs(3),
            vec![ignored, failed, record("suite::a", TestResultKind::Passed)],
        )
    }

    #[test]
    fn phases_are_offsets_in_start_order() {
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let phases = phases_since(
            t0,
            &[
                (PhaseKind::Revert, at(900), at(1000)),
                (PhaseKind::Acquire, t0, at(100)),
                (PhaseKind::Run, at(150), at(800)),
            ],
        );
        let kinds: Vec<PhaseKind> = phases.iter().map(|p| p.phase).collect();
        assert_eq!(
            kinds,
            [PhaseKind::Acquire, PhaseKind::Run, PhaseKind::Revert]
        );
        assert!((phases[1].start_seconds - 0.15).abs() < 1e-9);
        assert!((phases[1].seconds - 0.65).abs() < 1e-9);
        let json = serde_json::to_value(phases[2]).unwrap();
        assert_eq!(json["phase"], "revert");
    }

    #[test]
    fn reports_of_one_nextest_run_merge() {
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let mut first = Report::new(
            "agents",
            at(100),
            Duration::from_secs(3),
            vec![
                record("suite::a", TestResultKind::Passed),
                record("suite::b", TestResultKind::Failed),
            ],
        );
        first.run_id = Some("run-1".into());
        let mut second = Report::new(
            "agents",
            at(102),
            Duration::from_secs(4),
            vec![
                record("suite::b", TestResultKind::Passed),
                record("suite::c", TestResultKind::Passed),
            ],
        );
        second.run_id = Some("run-1".into());
        let merged: serde_json::Value =
            serde_json::from_str(&second.merged_json(Some(&first.to_json()))).unwrap();
        let names: Vec<&str> = merged["tests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["suite::a", "suite::b", "suite::c"]);
        // This process's own result of b wins; its tests start 2 s later.
        assert_eq!(merged["tests"][1]["result"], "passed");
        assert_eq!(merged["tests"][0]["start_seconds"], 0.0);
        assert_eq!(merged["tests"][2]["start_seconds"], 2.0);
        assert_eq!(merged["started"], "1970-01-01T00:01:40.000Z");
        assert_eq!(merged["duration_seconds"], 6.0);
        assert_eq!(
            (merged["passed"].as_u64(), merged["failed"].as_u64()),
            (Some(3), Some(0))
        );
        // Another run (or none) replaces the file.
        second.run_id = Some("run-2".into());
        let alone: serde_json::Value =
            serde_json::from_str(&second.merged_json(Some(&first.to_json()))).unwrap();
        assert_eq!(alone["tests"].as_array().unwrap().len(), 2);
        second.run_id = None;
        assert_eq!(second.merged_json(Some(&first.to_json())), second.to_json());
    }

    #[test]
    fn the_lock_is_exclusive_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suites/x.json.lock");
        let lock = FileLock::acquire(&path);
        assert!(path.exists());
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let _second = FileLock::acquire(&path);
                started.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        drop(lock);
        let waited = waiter.join().unwrap();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(!path.exists());
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_safe("agents"), "agents");
        assert_eq!(file_safe("../x y"), "_.._x_y");
        assert_eq!(file_safe(""), "_");
    }

    #[test]
    fn escaping() {
        assert_eq!(
            xml_escape("a<b>&\"c\"'\n\u{0}"),
            "a&lt;b&gt;&amp;&quot;c&quot;&apos;&#10;\u{FFFD}"
        );
    }

    #[test]
    fn junit_has_every_test_escaped() {
        let xml = report().junit_xml("agents");
        assert!(xml.contains("tests=\"3\" failures=\"1\""), "{xml}");
        assert!(
            xml.contains("<testcase classname=\"suite\" name=\"a\" time=\"1.500\">"),
            "{xml}"
        );
        assert!(
            xml.contains("name=\"b &lt;&amp;&gt; &quot;q&quot;\""),
            "{xml}"
        );
        assert!(
            xml.contains("<failure message=\"line 1 &lt;tag&gt;\" type=\"failure\">line 1 &lt;tag&gt;&#10;line 2 &amp; \u{FFFD}[31m</failure>"),
            "{xml}"
        );
        assert!(
            xml.contains("<skipped message=\"needs a real VM\"/>"),
            "{xml}"
        );
        assert!(
            xml.contains("<property name=\"anomaly.timeout\" value=\"killed\"/>"),
            "{xml}"
        );
        assert!(!xml.contains('\u{1b}'));
        // Balanced: as many open as closed test cases.
        assert_eq!(
            xml.matches("<testcase ").count(),
            xml.matches("</testcase>").count()
        );
    }

    #[test]
    fn table_shows_the_first_line_of_a_multi_line_release() {
        let mut crashed = record("suite::crash", TestResultKind::Passed);
        crashed.revert_seconds = None;
        crashed.release = Some(
            "revert failed, VM destroyed: VM 1 crashed: panic\n--- last serial console lines ---\n[ 6.4] Kernel panic"
                .into(),
        );
        let r = Report::new(
            "e2e",
            SystemTime::UNIX_EPOCH,
            Duration::from_secs(3),
            vec![crashed, record("suite::next", TestResultKind::Passed)],
        );
        let table = r.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines[1].contains("revert failed, VM destroyed: VM 1 crashed: panic  "),
            "{table}"
        );
        assert!(!table.contains("Kernel panic"), "{table}");
        // The columns are as wide as that first line, not the whole text.
        assert!(lines[2].len() < 120, "{table}");
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert!(json["tests"][0]["release"]
            .as_str()
            .unwrap()
            .contains("Kernel panic"));
    }

    #[test]
    fn table_and_json() {
        let r = report();
        let table = r.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("test "), "{table}");
        assert!(lines[0].ends_with("anomalies"), "{table}");
        assert!(lines[1].starts_with("suite::a "), "{table}");
        assert!(
            lines[2].contains("failed") && lines[2].contains("timeout (fails)"),
            "{table}"
        );
        assert!(lines[3].contains("ignored"), "{table}");
        assert_eq!(
            lines[4],
            "1 passed, 1 failed, 1 ignored, 1 anomaly in 3.00s"
        );
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["failed"], 1);
        assert_eq!(json["tests"][1]["anomalies"][0]["kind"], "timeout");
        assert_eq!(json["started"], "1970-01-01T00:00:00.000Z");
    }
}
