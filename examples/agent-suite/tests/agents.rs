//! The fake agents of `examples/agents/` run in VMs: well-behaved ones whose
//! runs are snapshotted, and misbehaving ones (endless loop, `rm -rf /*`,
//! fork bomb, output flood, writes outside the workspace, network attempts)
//! that the VM and the harness must contain and report.
//!
//! The tests that damage the guest revert the VM themselves (`vm.revert()`)
//! and check, on the same VM, that the damage is gone. Besides,
//! `zz_no_trace_of_earlier_tests` is started last (tests start in name
//! order, on as many threads as the pool has VMs, so it may overlap the last
//! others) and checks that the VM it is handed is clean.

use std::time::Duration;

use agentvm_test::anomaly::{self, RuleLimits};
use agentvm_test::prelude::*;

const HELLO: &str = "examples/agents/hello.sh";
const EDITOR: &str = "examples/agents/editor.sh";
const LOOP: &str = "examples/agents/loop.sh";
const DESTROYER: &str = "examples/agents/destroyer.sh";
const FORKBOMB: &str = "examples/agents/forkbomb.sh";
const FLOOD: &str = "examples/agents/flood.sh";
const ESCAPE: &str = "examples/agents/escape.sh";
const PHONE_HOME: &str = "examples/agents/phone-home.sh";
const HOSTILE: &str = "examples/agents/hostile.sh";

/// The anomaly kinds the library's rules find in `run`, with the limits the
/// harness applies to `vm` (its profile, network and `process_limit`).
fn kinds(vm: &Vm, run: &AgentRun) -> Vec<String> {
    let limits = RuleLimits::for_vm(vm).expect("the suite's configuration loads");
    anomaly::rule_anomalies(run, 1, &limits)
        .into_iter()
        .map(|a| a.kind)
        .collect()
}

const REPO: &str = "tests/fixtures/repo";

/// The checks every clean guest passes: busybox is there, nothing of
/// earlier agents is left, the workspace is empty.
async fn assert_clean_guest(vm: &mut Vm) -> TestResult {
    let out = vm
        .sh("test -x /bin/ls && test ! -e /etc/agentvm-was-here && test ! -e /tmp/x && ls -A /workspace | wc -l")
        .await?;
    assert!(out.success(), "guest not clean: {out:?}");
    assert_eq!(out.stdout.trim(), "0", "workspace not empty: {out:?}");
    Ok(())
}

async fn assert_hello_works(vm: &mut Vm) -> TestResult {
    let run = vm
        .run_agent(&Agent::script(HELLO), Task::prompt("say hi"))
        .await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.file_text("hello.txt"), Some("hi\n"));
    Ok(())
}

#[agent_vm_test(timeout = "60s")]
async fn hello_creates_a_file(vm: &mut Vm) -> TestResult {
    let run = vm
        .run_agent(
            &Agent::script(HELLO),
            Task::prompt("create hello.txt saying hi"),
        )
        .await?;
    assert_eq!(run.exit_code(), Some(0), "{run:#?}");
    assert_eq!(run.created(), ["hello.txt"]);
    assert_eq!(run.file_text("hello.txt"), Some("hi\n"));
    assert!(run.stdout().contains("task: create hello.txt saying hi"));
    assert_agent_snapshot!(run);
    Ok(())
}

#[agent_vm_test(timeout = "60s")]
async fn agent_from_a_directory(vm: &mut Vm) -> TestResult {
    let agent = Agent::dir("examples/agents", "hello.sh");
    let run = vm
        .run_agent(&agent, Task::prompt("from a directory"))
        .await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.created(), ["hello.txt"]);
    // The whole directory was copied next to the entry point.
    let out = vm.sh("ls /opt/agentvm/agent").await?;
    assert!(
        out.stdout.contains("editor.sh") && out.stdout.contains("loop.sh"),
        "{out:?}"
    );
    Ok(())
}

#[agent_vm_test(timeout = "60s")]
async fn editor_changes_the_fixture(vm: &mut Vm) -> TestResult {
    let run = vm
        .run_agent(
            &Agent::script(EDITOR),
            Task::prompt("review the repo").fixture(REPO),
        )
        .await?;
    assert!(run.success(), "{run:#?}");
    // The fixture itself is the baseline: only the agent's edits count.
    assert_eq!(run.created(), ["notes", "notes/todo.txt"]);
    assert_eq!(run.modified(), ["README.md"]);
    assert_eq!(run.deleted(), ["obsolete.txt"]);
    let diff = run
        .change("README.md")
        .and_then(|c| c.diff.as_deref())
        .unwrap_or_default();
    assert!(
        diff.contains("-Status: draft\n+Status: reviewed\n"),
        "{diff}"
    );
    assert_agent_snapshot!(run);
    Ok(())
}

#[agent_vm_test(timeout = "60s", fixtures("tests/fixtures/repo"))]
async fn fixtures_from_the_attribute(vm: &mut Vm) -> TestResult {
    // The harness copied the fixture before the test; it is not a change.
    let out = vm.sh("head -n 1 README.md && test -x src/main.sh").await?;
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, "# Fixture repository\n");
    let run = vm.run_agent(&Agent::script(EDITOR), Task::new()).await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.deleted(), ["obsolete.txt"]);
    Ok(())
}

#[agent_vm_test(timeout = "60s")]
async fn failing_agent_reports_its_exit_code(vm: &mut Vm) -> TestResult {
    let agent = Agent::command([
        "sh",
        "-c",
        "echo working; echo 'cannot continue' >&2; exit 3",
    ]);
    let run = vm.run_agent(&agent, Task::prompt("fail")).await?;
    assert_eq!(run.exit_code(), Some(3));
    assert!(!run.success() && !run.timed_out());
    assert_eq!(run.stderr(), "cannot continue\n");
    assert_agent_snapshot!(run);
    Ok(())
}

#[agent_vm_test(timeout = "60s")]
async fn secrets_are_redacted(vm: &mut Vm) -> TestResult {
    let secret = "sk-test-5f0d6c2a9b8e";
    let agent = Agent::command([
        "sh",
        "-c",
        "echo \"token=$API_TOKEN\"; echo \"$API_TOKEN\" > leaked.txt",
    ])
    .secret_env("API_TOKEN", secret);
    let run = vm.run_agent(&agent, Task::new()).await?;
    assert!(run.success(), "{run:#?}");
    // The agent saw the real value...
    let (content, _mode) = vm.read_file("leaked.txt").await?;
    assert_eq!(content, format!("{secret}\n").as_bytes());
    // ...the record never holds it.
    assert_eq!(run.stdout(), "token=[secret:API_TOKEN]\n");
    assert_eq!(run.file_text("leaked.txt"), Some("[secret:API_TOKEN]\n"));
    // The hash of the leaked file would vary with the secret: redact it.
    assert_agent_snapshot!(run.redact_hashes());
    Ok(())
}

/// An agent whose output and file name are HTML and script: the run keeps
/// them byte for byte (the HTML report must show them as text and run
/// nothing: `cargo xtask report-check` checks that in a real browser).
#[agent_vm_test(timeout = "60s")]
async fn hostile_output_is_kept_as_text(vm: &mut Vm) -> TestResult {
    let run = vm
        .run_agent(&Agent::script(HOSTILE), Task::prompt("<b>say hi</b>"))
        .await?;
    assert!(run.success(), "{run:#?}");
    assert!(
        run.stdout().starts_with("<script>alert(1)</script>\n"),
        "{run:#?}"
    );
    assert!(run.stdout().contains("\u{1b}[31mred\u{1b}[0m"), "{run:#?}");
    assert_eq!(run.created(), ["<img src=x onerror=alert(1)>"]);
    assert_agent_snapshot!(run);
    Ok(())
}

#[agent_vm_test(timeout = "60s")]
async fn loop_is_killed_at_its_timeout(vm: &mut Vm) -> TestResult {
    let agent = Agent::script(LOOP).timeout(Duration::from_secs(3));
    let run = vm.run_agent(&agent, Task::prompt("never finish")).await?;
    assert!(run.timed_out(), "{run:#?}");
    assert_eq!(run.exit_code(), None);
    assert!(run.signal().is_some());
    assert!(run.duration() >= Duration::from_secs(3));
    assert_agent_snapshot!(run);
    Ok(())
}

/// Observability on a real VM: a spinning agent's run is a `timeout`
/// anomaly, its execution is in the audit log as soon as it ends (secrets
/// redacted), and the host can sample the VM's QEMU process.
#[agent_vm_test(timeout = "60s")]
async fn spinning_agent_is_audited_as_an_anomaly(vm: &mut Vm) -> TestResult {
    const TOKEN: &str = "spin-s3cret-value";
    let agent = Agent::script(LOOP)
        .arg(TOKEN)
        .secret_env("SPIN_TOKEN", TOKEN)
        .timeout(Duration::from_secs(2));
    let run = vm.run_agent(&agent, Task::prompt("spin")).await?;
    assert!(run.timed_out(), "{run:#?}");
    assert_eq!(kinds(vm, &run), ["timeout"]);
    let config = agentvm_test::agentvm_runtime::config::AgentVmConfig::load()?;
    let audit = std::fs::read_to_string(config.audit_log_path())?;
    assert!(!audit.contains(TOKEN), "secret in the audit log");
    let line = audit
        .lines()
        .rev()
        .find(|l| {
            l.contains(r#""event":"execution""#)
                && l.contains(r#""test":"spinning_agent_is_audited_as_an_anomaly""#)
        })
        .ok_or("no execution line in the audit log")?;
    assert!(line.contains(r#""timed_out":true"#), "{line}");
    assert!(line.contains(r#""agent":"loop.sh""#), "{line}");
    assert!(line.contains("[secret:SPIN_TOKEN]"), "{line}");
    assert!(line.contains(&format!(r#""vm":"{}""#, vm.id())), "{line}");
    let usage = vm.sample_resources().ok_or("no QEMU process to sample")?;
    assert!(usage.rss_bytes > 0 && usage.cpu_seconds > 0.0, "{usage:?}");
    Ok(())
}

#[agent_vm_test(timeout = "60s")]
async fn flood_is_capped(vm: &mut Vm) -> TestResult {
    let agent = Agent::script(FLOOD).output_limit(120);
    let run = vm.run_agent(&agent, Task::prompt("flood")).await?;
    assert!(run.success(), "{run:#?}");
    assert!(run.stdout_truncated() && run.stderr_truncated());
    assert_eq!(run.stdout().len(), 120);
    assert_eq!(
        run.stdout_bytes(),
        10_000_000 + "flooding done\n".len() as u64
    );
    assert_eq!(run.stderr_bytes(), 1_000_000);
    assert_agent_snapshot!(run);
    Ok(())
}

#[agent_vm_test(timeout = "120s")]
async fn forkbomb_is_contained(vm: &mut Vm) -> TestResult {
    let agent = Agent::script(FORKBOMB).timeout(Duration::from_secs(5));
    match vm.run_agent(&agent, Task::prompt("fork")).await {
        Ok(run) => {
            assert!(run.timed_out(), "{run:#?}");
            let r = run.resources();
            eprintln!(
                "fork bomb: {:?} processes at once, {:?} started",
                r.peak_processes, r.processes_started
            );
            assert_eq!(kinds(vm, &run), ["timeout", "process_count"], "{run:#?}");
        }
        // A guest too busy to answer is acceptable; the revert below is not optional.
        Err(e) => eprintln!("fork bomb run ended with a VM error: {e}"),
    }
    vm.revert().await?;
    assert_clean_guest(vm).await?;
    assert_hello_works(vm).await
}

#[agent_vm_test(timeout = "120s")]
async fn destroyer_is_undone_by_the_revert(vm: &mut Vm) -> TestResult {
    let agent = Agent::script(DESTROYER).timeout(Duration::from_secs(30));
    match vm.run_agent(&agent, Task::prompt("destroy")).await {
        Ok(run) => assert!(run.stdout().contains("/bin/ls is gone"), "{run:#?}"),
        // The workspace itself is gone, so listing its changes may fail.
        Err(e) => eprintln!("destroyer run ended with: {e}"),
    }
    let out = vm.sh("echo still here").await;
    assert!(
        !matches!(out, Ok(ref o) if o.success()),
        "busybox survived rm -rf /*: {out:?}"
    );
    vm.revert().await?;
    assert_clean_guest(vm).await?;
    assert_hello_works(vm).await
}

#[agent_vm_test(timeout = "60s")]
async fn escape_outside_the_workspace_is_undone(vm: &mut Vm) -> TestResult {
    let run = vm
        .run_agent(&Agent::script(ESCAPE), Task::prompt("escape"))
        .await?;
    assert!(run.success(), "{run:#?}");
    // Outside the workspace: not a workspace change, but real in the guest,
    // and reported.
    assert!(run.changes().is_empty(), "{run:#?}");
    assert_eq!(
        run.outside_workspace(),
        ["/etc", "/etc/agentvm-was-here", "/tmp", "/tmp/x"]
    );
    assert_eq!(kinds(vm, &run), ["outside_workspace"]);
    assert!(vm
        .sh("test -e /etc/agentvm-was-here && test -e /tmp/x")
        .await?
        .success());
    assert_agent_snapshot!(run);
    vm.revert().await?;
    assert_clean_guest(vm).await
}

#[agent_vm_test(timeout = "60s")]
async fn network_attempt_from_an_isolated_vm_is_reported(vm: &mut Vm) -> TestResult {
    let run = vm
        .run_agent(&Agent::script(PHONE_HOME), Task::prompt("phone home"))
        .await?;
    assert!(run.success(), "{run:#?}");
    assert!(run.stdout().contains("no network"), "{run:#?}");
    assert!(run.resources().unroutable_packets >= Some(1), "{run:#?}");
    assert_eq!(kinds(vm, &run), ["network_attempt"]);
    // A well-behaved agent tries nothing of the kind.
    let run = vm
        .run_agent(&Agent::script(HELLO), Task::prompt("say hi"))
        .await?;
    assert_eq!(run.resources().unroutable_packets, Some(0), "{run:#?}");
    assert!(kinds(vm, &run).is_empty(), "{run:#?}");
    Ok(())
}

#[agent_vm_test(timeout = "60s")]
async fn memory_hog_is_named_an_oom_kill(vm: &mut Vm) -> TestResult {
    // `tail` keeps the whole of an endless line in memory.
    let run = vm
        .run_agent(
            &Agent::command(["tail", "/dev/zero"]),
            Task::prompt("eat memory"),
        )
        .await?;
    assert_eq!(run.signal(), Some(9), "{run:#?}");
    assert!(!run.timed_out(), "{run:#?}");
    assert!(run.oom_killed(), "{run:#?}");
    assert!(
        kinds(vm, &run).contains(&"oom_kill".to_string()),
        "{run:#?}"
    );
    // The guest survived it; a well-behaved agent is not OOM-flagged.
    let run = vm
        .run_agent(&Agent::script(HELLO), Task::prompt("say hi"))
        .await?;
    assert!(run.success() && !run.oom_killed(), "{run:#?}");
    Ok(())
}

#[agent_vm_test(timeout = "60s")]
async fn non_utf8_file_names_stay_apart_and_read_back(vm: &mut Vm) -> TestResult {
    let script =
        r#"echo 1 > "$(printf 'a\377')"; echo 2 > "$(printf 'a\376')"; echo 3 > 'back\slash'"#;
    let run = vm
        .run_agent(
            &Agent::command(["sh", "-c", script]),
            Task::prompt("odd names"),
        )
        .await?;
    assert!(run.success(), "{run:#?}");
    // Bytes that are not UTF-8 show as \xHH, a backslash as \\.
    assert_eq!(run.created(), [r"a\xfe", r"a\xff", r"back\\slash"]);
    assert_eq!(vm.read_file(r"a\xff").await?.0, b"1\n");
    assert_eq!(vm.read_file(r"a\xfe").await?.0, b"2\n");
    assert_eq!(vm.read_file(r"back\\slash").await?.0, b"3\n");
    // And the host can write such a name.
    vm.write_file(r"b\xff", b"4", 0o644).await?;
    let out = vm.sh(r#"cat "$(printf 'b\377')""#).await?;
    assert_eq!(out.stdout, "4", "{out:?}");
    Ok(())
}

#[agent_vm_test(timeout = "60s")]
async fn zz_no_trace_of_earlier_tests(vm: &mut Vm) -> TestResult {
    assert_clean_guest(vm).await?;
    assert_hello_works(vm).await
}

agentvm_test::main!();
