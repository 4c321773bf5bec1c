//! insta settings for snapshots of [`AgentRun`](crate::AgentRun)s, used by
//! [`assert_agent_snapshot!`](crate::assert_agent_snapshot).
//!
//! Snapshots are YAML files in the test crate's `tests/snapshots/`, named
//! after the test function (insta's default naming), and reviewed with
//! `cargo insta review`. What insta does when a snapshot differs or is new is
//! insta's behaviour, controlled by `INSTA_UPDATE`: by default it writes a
//! `.snap.new` file for review and fails the test; with `CI` set (to anything
//! but `false`/`0`/empty) it writes nothing and fails; `INSTA_UPDATE=always`
//! accepts everything (use it to record a new suite's snapshots, then review
//! the diff in version control).

/// Redactions and filters for agent run snapshots, applied on top of the
/// settings currently bound:
///
/// * `.duration` → `"[duration]"`, `.resources` → `"[resources]"`,
///   `.transcript[].usage` → `"[usage]"` and the byte counts and durations
///   of `.network[]` (they vary from run to run);
/// * host temporary directories made by the `tempfile` crate
///   (`/tmp/.tmpXXXXXX`) → `[tempdir]`, and `mktemp` names
///   (`/tmp/tmp.XXXXXX`) → `[mktemp]`.
pub fn settings() -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.set_comparator(Box::new(RecordingComparator));
    settings.add_redaction(".duration", "[duration]");
    settings.add_redaction(".network[].duration", "[duration]");
    settings.add_redaction(".network[].bytes_up", "[bytes]");
    settings.add_redaction(".network[].bytes_down", "[bytes]");
    settings.add_redaction(".resources", "[resources]");
    // Scripted token counts are estimates from request sizes, which carry
    // dates and paths; recorded ones vary with the model.
    settings.add_redaction(".transcript[].usage", "[usage]");
    let tmp = std::env::temp_dir();
    let tmp = tmp.to_string_lossy();
    let tmp = tmp.trim_end_matches('/');
    for dir in [tmp, "/tmp"] {
        let dir = regex_escape(dir);
        settings.add_filter(&format!(r"{dir}/\.tmp[A-Za-z0-9]{{6,}}"), "[tempdir]");
    }
    settings.add_filter(r"/tmp/tmp\.[A-Za-z0-9]{6,}", "[mktemp]");
    settings
}

/// [`settings`] plus redaction of every SHA-256 of the workspace changes
/// (`[sha256]`). Bind it around the assertion:
///
/// ```ignore
/// agentvm_test::snapshot::redacting_hashes(|| assert_agent_snapshot!(run));
/// ```
///
/// (or snapshot `run.redact_hashes()` instead).
pub fn settings_redacting_hashes() -> insta::Settings {
    let mut settings = settings();
    settings.add_redaction(".changes[].sha256", "[sha256]");
    settings.add_redaction(".changes[].before.sha256", "[sha256]");
    settings
}

/// Runs `f` (an [`assert_agent_snapshot!`](crate::assert_agent_snapshot)) with
/// SHA-256 values redacted.
pub fn redacting_hashes<R>(f: impl FnOnce() -> R) -> R {
    settings_redacting_hashes().bind(f)
}

/// insta's default comparison, which also records the diff of a snapshot
/// that does not match (stored → new) for the test's HTML report.
struct RecordingComparator;

impl insta::Comparator for RecordingComparator {
    fn matches(&self, reference: &insta::Snapshot, test: &insta::Snapshot) -> bool {
        let matches = insta::DefaultComparator.matches(reference, test);
        if !matches {
            record_diff(reference, test);
        }
        matches
    }

    fn matches_fully(&self, reference: &insta::Snapshot, test: &insta::Snapshot) -> bool {
        let matches = insta::DefaultComparator.matches_fully(reference, test);
        if !matches {
            record_diff(reference, test);
        }
        matches
    }

    fn dyn_clone(&self) -> Box<dyn insta::Comparator> {
        Box::new(RecordingComparator)
    }
}

/// Keeps the diff of two text snapshots in the current test's context.
fn record_diff(reference: &insta::Snapshot, test: &insta::Snapshot) {
    let (Some(old), Some(new)) = (reference.contents().as_text(), test.contents().as_text()) else {
        return;
    };
    let Some(context) = crate::context::current() else {
        return;
    };
    let name = test
        .snapshot_name()
        .or(reference.snapshot_name())
        .unwrap_or("unnamed snapshot")
        .to_string();
    let diff = crate::run::unified_diff(&format!("{old}\n"), &format!("{new}\n"));
    let mut context = context.lock().unwrap_or_else(|e| e.into_inner());
    let diff = context.secrets.redact(&diff).into_owned();
    // insta compares twice (normalised, then fully): keep one per snapshot.
    if !context.snapshot_diffs.iter().any(|(n, _)| *n == name) {
        context.snapshot_diffs.push((name, diff));
    }
}

fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Asserts a YAML snapshot of an [`AgentRun`](crate::AgentRun) with insta,
/// redacting what varies between runs (see [`snapshot::settings`](settings)).
///
/// * `assert_agent_snapshot!(run)` names the snapshot after the enclosing
///   test function (insta's naming: `<crate>__<fn>.snap`, with `-2`, `-3`...
///   for further snapshots in the same function);
/// * `assert_agent_snapshot!("name", run)` names it explicitly.
///
/// `run` may be an `AgentRun` or a reference to one (e.g.
/// `run.redact_hashes()`).
#[macro_export]
macro_rules! assert_agent_snapshot {
    ($run:expr $(,)?) => {
        $crate::snapshot::settings().bind(|| {
            $crate::__private::insta::assert_yaml_snapshot!($run);
        })
    };
    ($name:expr, $run:expr $(,)?) => {
        $crate::snapshot::settings().bind(|| {
            $crate::__private::insta::assert_yaml_snapshot!($name, $run);
        })
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_differing_snapshot_records_its_diff_for_the_report() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cmp.snap"),
            "---\nsource: x\nexpression: value\n---\nexit: 0\nstdout: old\n",
        )
        .unwrap();
        let context = crate::context::TestContext::new("t", std::time::Duration::from_secs(1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let panicked = runtime.block_on(crate::context::scope(context.clone(), async {
            let mut settings = settings();
            settings.set_snapshot_path(dir.path());
            settings.set_prepend_module_to_snapshot(false);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                settings.bind(|| {
                    insta::assert_yaml_snapshot!(
                        "cmp",
                        serde_json::json!({"stdout": "new", "exit": 0})
                    );
                })
            }))
            .is_err()
        }));
        assert!(panicked, "the assertion fails");
        let context = context.lock().unwrap();
        assert_eq!(
            context.snapshot_diffs.len(),
            1,
            "{:?}",
            context.snapshot_diffs
        );
        let (name, diff) = &context.snapshot_diffs[0];
        assert_eq!(name, "cmp");
        assert!(diff.contains("-stdout: old\n+stdout: new\n"), "{diff}");
    }

    #[test]
    fn escapes_regex_metacharacters() {
        assert_eq!(regex_escape("/tmp/a.b+c"), r"/tmp/a\.b\+c");
    }

    #[derive(serde::Serialize)]
    struct Fake {
        duration: &'static str,
        resources: u32,
        stdout: String,
    }

    #[test]
    fn redacts_and_filters() {
        let value = Fake {
            duration: "1.234s",
            resources: 7,
            stdout: "made /tmp/.tmpAbC123 and /tmp/tmp.XyZ789q\n".into(),
        };
        settings().bind(|| {
            insta::assert_yaml_snapshot!(value, @r#"
            duration: "[duration]"
            resources: "[resources]"
            stdout: "made [tempdir] and [mktemp]\n"
            "#);
        });
    }
}
