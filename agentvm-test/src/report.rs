//! The end-of-run report: a table on stderr, `<artifacts_dir>/report.json`
//! and `<artifacts_dir>/junit.xml` (JUnit XML for CI systems).
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
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
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
    /// The report of `tests` (sorted by name here).
    pub fn new(started: SystemTime, duration: Duration, mut tests: Vec<TestRecord>) -> Self {
        tests.sort_by(|a, b| a.name.cmp(&b.name));
        let count = |kind| tests.iter().filter(|t| t.result == kind).count();
        Self {
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
            SystemTime::UNIX_EPOCH,
            Duration::from_secs(3),
            vec![ignored, failed, record("suite::a", TestResultKind::Passed)],
        )
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
