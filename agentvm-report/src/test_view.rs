//! One test's view: facts, failure, snapshot diffs, anomalies, phases, and
//! for each agent run its task, command and exit status, the model
//! transcript as a conversation, the shell commands the model ran, stdout
//! and stderr, workspace changes as diffs, paths changed outside the
//! workspace, the network log and resource use; links to the artifacts.

use maud::{html, Markup};
use serde_json::Value;

use crate::model::{Exchange, RunRecord, Suite, Test};
use crate::text::{bytes, file_href, looks_binary, seconds, truncate};

/// Most bytes of stdout or stderr embedded per run.
pub const MAX_OUTPUT: usize = 64 * 1024;
/// Most bytes of one transcript text, tool argument or message embedded.
pub const MAX_TEXT: usize = 16 * 1024;
/// Most paths outside the workspace listed.
pub const MAX_PATHS: usize = 100;

/// Tool names that run shell commands (Claude Code, Codex, chat agents).
const SHELL_TOOLS: &[&str] = &[
    "Bash",
    "bash",
    "shell",
    "exec_command",
    "run_shell_command",
    "execute_command",
    "run_command",
];

/// Text cut at `max` bytes, rendered as terminal output, with a note (and
/// a link, when given) for what was cut.
fn bounded(text: &str, max: usize, whole: Option<(&str, String)>) -> Markup {
    let t = truncate(text, max);
    html! {
        pre.out { (crate::ansi::render(t.text)) }
        @if t.cut > 0 {
            p.muted.cut {
                (bytes(t.cut as u64)) " more not shown"
                @if let Some((label, href)) = &whole { ": " a href=(href) { (label) } }
            }
        }
    }
}

/// The link to the whole of a run's stdout or stderr: its artifact file
/// when the test's artifacts were kept, else the suite report.
fn whole_output<'a>(suite: &'a Suite, test: &'a Test, file: &'a str) -> (&'a str, String) {
    match &test.artifacts {
        Some(dir) if test.artifact_files.iter().any(|f| f == file) => {
            (file, file_href(&[dir, file]))
        }
        _ => {
            let parts: Vec<&str> = suite.file.split('/').collect();
            (suite.file.as_str(), file_href(&parts))
        }
    }
}

/// A run's exit status in words.
pub fn exit_status(run: &crate::model::Run) -> String {
    let mut s = match (run.exit_code, run.signal) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "no exit status".to_string(),
    };
    if run.timed_out {
        s.push_str(", timed out");
    }
    s
}

/// Pretty JSON of a tool call's arguments (cut at [`MAX_TEXT`]).
fn arguments(value: &Value) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    let t = truncate(&text, MAX_TEXT);
    if t.cut > 0 {
        format!("{}\n… {} more", t.text, bytes(t.cut as u64))
    } else {
        text
    }
}

/// The shell command of a tool call, if it is one.
pub fn shell_command(name: &str, args: &Value) -> Option<String> {
    if !SHELL_TOOLS.contains(&name) {
        return None;
    }
    ["command", "cmd", "script"]
        .iter()
        .find_map(|k| args.get(*k))
        .map(|v| match v {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        })
}

/// The shell commands the model asked for, each with the result the agent
/// sent back (the next request's tool results, in order).
pub fn shell_commands(transcript: &[Exchange]) -> Vec<(String, Option<(String, bool)>)> {
    let mut out = Vec::new();
    for (i, exchange) in transcript.iter().enumerate() {
        let results: Vec<&crate::model::InputItem> = transcript
            .get(i + 1)
            .map(|next| {
                next.new_input
                    .iter()
                    .filter(|item| item.kind == "tool_result")
                    .collect()
            })
            .unwrap_or_default();
        for (j, call) in exchange.tool_calls.iter().enumerate() {
            if let Some(command) = shell_command(&call.name, &call.arguments) {
                let result = results
                    .get(j)
                    .map(|r| (r.output.clone().unwrap_or_default(), r.is_error));
                out.push((command, result));
            }
        }
    }
    out
}

fn transcript(exchanges: &[Exchange]) -> Markup {
    let input: u64 = exchanges
        .iter()
        .filter_map(|e| e.usage.as_ref())
        .map(|u| u.input_tokens)
        .sum();
    let output: u64 = exchanges
        .iter()
        .filter_map(|e| e.usage.as_ref())
        .map(|u| u.output_tokens)
        .sum();
    html! {
        div.transcript {
            p.meta { (exchanges.len()) " requests, " (input) " input and " (output) " output tokens" }
            @for e in exchanges {
                @for item in &e.new_input {
                    @if item.kind == "tool_result" {
                        div class={ "msg tool" @if item.is_error { " error" } } {
                            div.who { "tool result" @if item.is_error { " (error)" } }
                            pre { (crate::ansi::render(truncate(item.output.as_deref().unwrap_or(""), MAX_TEXT).text)) }
                        }
                    } @else {
                        div.msg.user {
                            div.who { "user" }
                            pre { (crate::ansi::visible(truncate(item.text.as_deref().unwrap_or(""), MAX_TEXT).text)) }
                        }
                    }
                }
                div.msg.assistant {
                    div.who { "model" }
                    @if let Some(text) = &e.response_text {
                        pre { (crate::ansi::visible(truncate(text, MAX_TEXT).text)) }
                    }
                    @for call in &e.tool_calls {
                        div.call {
                            "tool call " code { (call.name) }
                            pre { (arguments(&call.arguments)) }
                        }
                    }
                    @if let Some(error) = &e.error {
                        p { span.anom.fails { "error" } " " (error) }
                    }
                    div.meta {
                        "#" (e.seq) " · " (e.api) " · " (e.mode) " · " (e.kind)
                        @if let Some(status) = e.status { " · HTTP " (status) }
                        @if let Some(u) = &e.usage { " · " (u.input_tokens) " in / " (u.output_tokens) " out tokens" }
                    }
                }
            }
        }
    }
}

fn run_view(suite: &Suite, test: &Test, index: usize, record: &RunRecord) -> Markup {
    let run = &record.run;
    let suffix = if index == 0 {
        String::new()
    } else {
        format!("-{}", index + 1)
    };
    let stdout_file = format!("stdout{suffix}.txt");
    let stderr_file = format!("stderr{suffix}.txt");
    let commands = shell_commands(&run.transcript);
    html! {
        div.run data-run=(index + 1) {
            h3 { "Agent run " (index + 1) ": " code { (record.agent) } " " span class={ "status " (if run.exit_code == Some(0) && !run.timed_out { "passed" } else { "failed" }) } { (exit_status(run)) } }
            h4 { "Task" }
            @if let Some(prompt) = &record.prompt {
                pre.prompt { (crate::ansi::visible(truncate(prompt, MAX_TEXT).text)) }
            } @else { p.muted { "No prompt." } }
            @if !record.task_files.is_empty() {
                p { "Files: " @for f in &record.task_files { code { (f) } " " } }
            }
            h4 { "Command" }
            table.commands {
                thead { tr { th { "Command" } th { "Result" } } }
                tbody {
                    tr { td { code { (record.argv.join(" ")) } } td { (exit_status(run)) @if let Some(d) = &run.duration { " after " (d) } } }
                    @for (command, result) in &commands {
                        tr.model-command {
                            td { code { (command) } }
                            td {
                                @match result {
                                    Some((_, true)) => span.anom.fails { "error" },
                                    Some((output, false)) => span.muted { (truncate(output, 200).text) },
                                    None => span.muted { "no result" },
                                }
                            }
                        }
                    }
                }
            }
            @if !run.transcript.is_empty() {
                h4 { "Model transcript" }
                (transcript(&run.transcript))
            }
            h4 { "Stdout" @if run.stdout_truncated { " (cut at the output limit)" } }
            (output(&run.stdout, whole_output(suite, test, &stdout_file)))
            h4 { "Stderr" @if run.stderr_truncated { " (cut at the output limit)" } }
            (output(&run.stderr, whole_output(suite, test, &stderr_file)))
            h4 { "Workspace changes" }
            @if run.changes.is_empty() { p.muted { "None." } }
            @for change in &run.changes {
                div.change {
                    p {
                        span class={ "anom " (change.change) } { (change.change) } " "
                        code.path { (crate::ansi::visible(&change.path)) } " "
                        span.muted { (change.kind) ", mode " (change.mode) @if let Some(size) = change.size { ", " (bytes(size)) } }
                    }
                    @if let Some(diff) = &change.diff { (crate::diff::render(diff)) }
                }
            }
            @if !run.outside_workspace.is_empty() {
                h4 { "Changed outside the workspace" }
                pre { @for path in run.outside_workspace.iter().take(MAX_PATHS) { (crate::ansi::visible(path)) "\n" } }
            }
            h4 { "Network" }
            @if run.network.is_empty() {
                p.muted { "No connections." }
            } @else {
                table.network {
                    thead { tr { th { "Host" } th.num { "Port" } th { "Kind" } th { "Allowed" } th.num { "Up" } th.num { "Down" } th.num { "Duration" } th { "Error" } } }
                    tbody {
                        @for c in &run.network {
                            tr data-allowed=(c.allowed) {
                                td { code { (c.host) } } td.num { (c.port) } td { (c.kind) }
                                td { @if c.allowed { "allowed" } @else { span.anom.fails { "denied" } } }
                                td.num { (bytes(c.bytes_up)) } td.num { (bytes(c.bytes_down)) }
                                td.num { (c.duration) " ms" } td { (c.error.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
            @if let Some(resources) = &run.resources {
                h4 { "Resources" }
                dl.facts {
                    @for (k, v) in resources {
                        dt { (k) } dd { (match v { Value::Null => "-".to_string(), Value::String(s) => s.clone(), v => v.to_string() }) }
                    }
                }
            }
        }
    }
}

/// stdout or stderr: empty, binary (escaped), or terminal text.
fn output(text: &str, whole: (&str, String)) -> Markup {
    html! {
        @if text.is_empty() {
            p.muted { "Empty." }
        } @else if looks_binary(text) {
            p.muted { "Binary output (" (bytes(text.len() as u64)) "), shown with control bytes escaped:" }
            (bounded(text, MAX_OUTPUT, Some(whole)))
        } @else {
            (bounded(text, MAX_OUTPUT, Some(whole)))
        }
    }
}

/// The view of `test` (of `suite`), with element id `id`.
pub fn render(suite: &Suite, test: &Test, id: &str) -> Markup {
    html! {
        section.view.test id=(id) data-test=(test.name) {
            p.back { a href="#index" { "← all tests" } }
            h2 { span class={ "status " (test.result) } { (test.result) } " " span.name { (test.name) } }
            dl.facts {
                dt { "Suite" } dd { code { (suite.suite) } }
                dt { "VM" } dd { (test.vm.as_deref().unwrap_or("-")) }
                dt { "Duration" } dd { (crate::index::duration(test)) }
                dt { "Acquire" } dd { (test.acquire_seconds.map_or("-".into(), seconds)) }
                dt { "After the test" } dd { (test.release.as_deref().unwrap_or("-")) }
            }
            @if let Some(message) = &test.message {
                h4 { @if test.result == "ignored" { "Ignored" } @else { "Failure" } }
                (bounded(message, MAX_TEXT, None))
            }
            @for snapshot in &test.snapshot_diffs {
                h4 { "Snapshot " code { (snapshot.name) } " differs (stored → new)" }
                (crate::diff::render(&snapshot.diff))
            }
            @if !test.anomalies.is_empty() {
                h4 { "Anomalies" }
                ul.anomalies {
                    @for a in &test.anomalies {
                        li { span class={ "anom" @if a.fails { " fails" } } { (a.kind) } " " (a.message) @if a.fails { " (fails the test)" } }
                    }
                }
            }
            @if !test.phases.is_empty() {
                h4 { "Phases" }
                table.phases {
                    thead { tr { th { "Phase" } th.num { "Start" } th.num { "Length" } } }
                    tbody { @for p in &test.phases {
                        tr { td { span class={ "key " (p.phase) } {} (p.phase) } td.num { "+" (seconds(p.start_seconds)) } td.num { (seconds(p.seconds)) } }
                    } }
                }
            }
            @for (i, record) in test.runs.iter().enumerate() {
                (run_view(suite, test, i, record))
            }
            @if let Some(dir) = &test.artifacts {
                h4 { "Artifacts" }
                p { @for file in &test.artifact_files { a href=(file_href(&[dir, file])) { (file) } " " } }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use serde_json::json;

    fn hostile_run() -> RunRecord {
        RunRecord {
            agent: "xss.sh".into(),
            argv: vec!["/opt/agentvm/agent/xss.sh".into(), "<b>".into()],
            prompt: Some("write <script>alert('p')</script>".into()),
            task_files: vec!["<i>.txt".into()],
            run: Run {
                exit_code: Some(0),
                stdout: "<script>alert(1)</script>\n\u{1b}[31mred\u{1b}[0m".into(),
                stderr: "x".repeat(MAX_OUTPUT + 10),
                stderr_truncated: true,
                changes: vec![Change {
                    path: "<img src=x onerror=alert(1)>".into(),
                    change: "created".into(),
                    kind: "file".into(),
                    size: Some(3),
                    mode: "0644".into(),
                    diff: Some("@@ -0,0 +1 @@\n+<svg onload=alert(1)>\n".into()),
                }],
                outside_workspace: vec!["/tmp/<u>".into()],
                duration: Some("0.5s".into()),
                resources: json!({"peak_rss_bytes": 4096, "user_cpu": "0.1s", "oom_kills": null})
                    .as_object()
                    .cloned(),
                transcript: vec![
                    Exchange {
                        seq: 1,
                        api: "openai_chat".into(),
                        mode: "scripted".into(),
                        kind: "turn".into(),
                        new_input: vec![InputItem {
                            kind: "user_text".into(),
                            text: Some("do <it>".into()),
                            ..InputItem::default()
                        }],
                        tool_calls: vec![ToolCall {
                            name: "shell".into(),
                            arguments: json!({"command": "echo '</pre><script>x</script>'"}),
                        }],
                        usage: Some(Usage {
                            input_tokens: 12,
                            output_tokens: 3,
                        }),
                        status: Some(200),
                        ..Exchange::default()
                    },
                    Exchange {
                        seq: 2,
                        new_input: vec![InputItem {
                            kind: "tool_result".into(),
                            output: Some("</pre>".into()),
                            is_error: false,
                            ..InputItem::default()
                        }],
                        response_text: Some("done <b>".into()),
                        usage: Some(Usage {
                            input_tokens: 20,
                            output_tokens: 2,
                        }),
                        ..Exchange::default()
                    },
                ],
                network: vec![Connection {
                    host: "evil.invalid\"><script>".into(),
                    port: 443,
                    kind: "connect".into(),
                    allowed: false,
                    bytes_up: 10,
                    bytes_down: 0,
                    duration: 3,
                    error: Some("denied <by> allowlist".into()),
                }],
                ..Run::default()
            },
        }
    }

    fn hostile_test() -> (Suite, Test) {
        let test = Test {
            name: "suite::<script>alert(2)</script>".into(),
            result: "failed".into(),
            vm: Some("vm<1>".into()),
            duration_seconds: 1.5,
            message: Some("snapshot assertion failed <here>".into()),
            anomalies: vec![Anomaly {
                kind: "timeout".into(),
                message: "killed <after> 1s".into(),
                fails: true,
            }],
            runs: vec![hostile_run()],
            artifacts: Some("suite::<x>".into()),
            artifact_files: vec!["stdout.txt".into(), "stderr.txt".into()],
            snapshot_diffs: vec![SnapshotDiff {
                name: "agents__<x>".into(),
                diff: "@@ -1 +1 @@\n-a\n+<b>\n".into(),
            }],
            phases: vec![Phase {
                phase: "run".into(),
                start_seconds: 0.1,
                seconds: 1.0,
            }],
            ..Test::default()
        };
        let suite = Suite {
            suite: "agents".into(),
            file: "suites/agents.json".into(),
            tests: vec![test.clone()],
            ..Suite::default()
        };
        (suite, test)
    }

    #[test]
    fn every_field_is_shown_and_nothing_is_markup() {
        let (suite, test) = hostile_test();
        let html = render(&suite, &test, "t-0-0").into_string();
        // Only the view's own elements: no tag from the data survives.
        for tag in ["<script", "<img", "<svg", "<i>", "<b>", "<u>", "<it>"] {
            assert!(!html.contains(tag), "{tag} in {html}");
        }
        for shown in [
            "&lt;script&gt;alert(1)&lt;/script&gt;",             // stdout
            "<span class=\"f1\">red</span>",                     // ANSI colour
            "&lt;img src=x onerror=alert(1)&gt;",                // file name
            "+&lt;svg onload=alert(1)&gt;",                      // diff
            "write &lt;script&gt;alert('p')&lt;/script&gt;",     // prompt
            "&lt;i&gt;.txt",                                     // task file
            "/opt/agentvm/agent/xss.sh &lt;b&gt;",               // command
            "echo '&lt;/pre&gt;&lt;script&gt;x&lt;/script&gt;'", // model's shell command
            "do &lt;it&gt;",                                     // user message
            "done &lt;b&gt;",                                    // model text
            "12 in / 3 out tokens",                              // token counts
            "2 requests, 32 input and 5 output tokens",
            "evil.invalid&quot;&gt;&lt;script&gt;", // network host
            "denied &lt;by&gt; allowlist",
            "killed &lt;after&gt; 1s",                // anomaly
            "snapshot assertion failed &lt;here&gt;", // failure
            "agents__&lt;x&gt;",                      // snapshot diff
            "/tmp/&lt;u&gt;",                         // outside the workspace
            "peak_rss_bytes",                         // resources
            "class=\"key run\"",                      // phases
        ] {
            assert!(html.contains(shown), "{shown} not in {html}");
        }
        // Truncated stderr links to its artifact file, path-encoded.
        assert!(
            html.contains(
                "10 B more not shown: <a href=\"./suite%3A%3A%3Cx%3E/stderr.txt\">stderr.txt</a>"
            ),
            "{html}"
        );
        assert!(html.len() < MAX_OUTPUT + 20_000, "{}", html.len());
    }

    #[test]
    fn shell_commands_pair_with_their_results() {
        let run = hostile_run().run;
        let commands = shell_commands(&run.transcript);
        assert_eq!(
            commands,
            [(
                "echo '</pre><script>x</script>'".to_string(),
                Some(("</pre>".to_string(), false))
            )]
        );
        assert_eq!(
            shell_command("exec_command", &json!({"cmd": ["bash", "-lc", "ls"]})),
            Some("bash -lc ls".into())
        );
        assert_eq!(shell_command("Read", &json!({"file_path": "x"})), None);
    }

    #[test]
    fn binary_output_is_escaped_and_named() {
        let html = output(
            "\u{7f}ELF\u{2}\u{1}\u{0}\u{0}\u{fffd}\u{fffd}<",
            ("f", "./f".into()),
        )
        .into_string();
        assert!(html.contains("Binary output (15 B)"), "{html}");
        assert!(
            html.contains("<span class=\"ctl\">\\x7f</span>ELF<span class=\"ctl\">\\x02</span>"),
            "{html}"
        );
        assert!(html.contains("\u{fffd}\u{fffd}&lt;"), "{html}");
    }

    #[test]
    fn output_without_kept_artifacts_links_the_suite_file() {
        let (suite, mut test) = hostile_test();
        test.artifacts = None;
        let html = render(&suite, &test, "t").into_string();
        assert!(
            html.contains("<a href=\"./suites/agents.json\">suites/agents.json</a>"),
            "{html}"
        );
    }
}
