//! Misbehaving agents, seen from the user's side: each test runs an agent
//! that does something a real agent may do by accident or on purpose, and
//! checks what a user of `agentvm-test` expects of it:
//!
//! * a typed error ([`AgentError`], and the [`VmError`] it carries) or a
//!   faithful [`AgentRun`], within a bounded time (bounds are generous: these
//!   tests run under QEMU TCG on loaded machines);
//! * the VM the next run or test gets is clean (the damaging tests revert the
//!   VM themselves and check it, and `zz_next_test_gets_a_clean_vm`, started
//!   last, checks the VM it is handed);
//! * nothing is written on the host outside the artifact directory
//!   ([`HostWatch`]: the source tree and a canary directory the guest is
//!   pointed at stay as they were).
//!
//! Only the public API is used, as in a user's crate. The well-behaved and
//! the other misbehaving agents (endless loop, `rm -rf /*`, fork bomb, output
//! flood, writes outside the workspace, network attempts) are in
//! `examples/agent-suite/tests/agents.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use agentvm_test::agentvm_runtime::backend::BackendError;
use agentvm_test::agentvm_runtime::vm::VmError;
use agentvm_test::prelude::*;
use agentvm_test::{AgentError, EntryKind, TestFailure};

/// The ids of VMs whose guest a test crashed: the pool must never hand them
/// out again.
static CRASHED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// An agent given as a shell script.
fn sh(script: &str) -> Agent {
    Agent::command(["sh", "-c", script])
}

/// The checks every clean guest passes: nothing of earlier agents is left,
/// the workspace is empty, the root file system has its room back, and an
/// agent runs.
async fn assert_clean_guest(vm: &mut Vm) -> TestResult {
    let out = vm
        .sh("test ! -e /tmp/e2e-was-here && ls -A /workspace | wc -l && df -k / | tail -n 1")
        .await?;
    assert!(out.success(), "guest not clean: {out:?}");
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some("0"), "workspace not empty: {out:?}");
    // `df -k /`: Filesystem 1K-blocks Used Available Use% Mounted-on.
    let used_kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("unexpected df output: {out:?}"))?;
    assert!(
        used_kib < 32 * 1024,
        "the root file system still holds {used_kib} KiB: {out:?}"
    );
    let run = vm
        .run_agent(&sh("echo hi > hello.txt"), Task::prompt("say hi"))
        .await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.created(), ["hello.txt"]);
    assert_eq!(run.file_text("hello.txt"), Some("hi\n"));
    Ok(())
}

/// Watches the host for writes outside the artifact directory: the
/// workspace's source tree (everything but `target/` and `.git/`) and a
/// canary directory, whose absolute path the guest may be told, so that a
/// harness following the guest's symlinks would touch it.
struct HostWatch {
    canary: tempfile::TempDir,
    before: BTreeMap<PathBuf, (u64, Option<SystemTime>)>,
}

impl HostWatch {
    fn new() -> Result<Self, TestFailure> {
        let canary = tempfile::Builder::new()
            .prefix("agentvm-e2e-canary")
            .tempdir()?;
        std::fs::write(canary.path().join("canary.txt"), "canary\n")?;
        std::fs::create_dir(canary.path().join("sub"))?;
        let mut watch = Self {
            canary,
            before: BTreeMap::new(),
        };
        watch.before = watch.state()?;
        Ok(watch)
    }

    /// The canary directory's absolute path.
    fn canary(&self) -> &Path {
        self.canary.path()
    }

    fn source_tree() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the package is in the workspace")
            .to_path_buf()
    }

    fn state(&self) -> Result<BTreeMap<PathBuf, (u64, Option<SystemTime>)>, TestFailure> {
        let mut files = BTreeMap::new();
        walk(&Self::source_tree(), &mut files)?;
        walk(self.canary(), &mut files)?;
        Ok(files)
    }

    /// Fails when a file under the watched trees appeared, vanished or changed.
    fn assert_unchanged(&self) -> TestResult {
        let after = self.state()?;
        let changed: Vec<_> = after
            .iter()
            .filter(|(p, s)| self.before.get(*p) != Some(s))
            .map(|(p, _)| p.display().to_string())
            .chain(
                self.before
                    .keys()
                    .filter(|p| !after.contains_key(*p))
                    .map(|p| format!("{} (removed)", p.display())),
            )
            .collect();
        assert!(
            changed.is_empty(),
            "written on the host outside the artifact directory: {changed:?}"
        );
        let canary = std::fs::read_to_string(self.canary().join("canary.txt"))?;
        assert_eq!(canary, "canary\n");
        Ok(())
    }
}

/// Every file and directory under `dir` (not following symlinks), without
/// `target/` and `.git/`, with its size and modification time.
fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (u64, Option<SystemTime>)>) -> TestResult {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        let meta = entry.path().symlink_metadata()?;
        let path = entry.path();
        if meta.is_dir() {
            out.insert(path.clone(), (0, None));
            walk(&path, out)?;
        } else {
            out.insert(path, (meta.len(), meta.modified().ok()));
        }
    }
    Ok(())
}

/// Crash the guest kernel (`echo c > /proc/sysrq-trigger` as root): the run
/// is an error that says the VM is broken, within seconds rather than at the
/// agent's timeout, and the pool replaces the VM (checked by
/// `zz_next_test_gets_a_clean_vm`, which must not get this VM).
#[agent_vm_test(timeout = "120s")]
async fn crash_the_guest(vm: &mut Vm) -> TestResult {
    let id = vm.id().to_string();
    let agent =
        sh("sync; echo c > /proc/sysrq-trigger; sleep 600").timeout(Duration::from_secs(90));
    let started = Instant::now();
    let result = vm.run_agent(&agent, Task::prompt("crash")).await;
    let took = started.elapsed();
    eprintln!("crash_the_guest: the error came after {took:?}");
    match &result {
        Err(AgentError::VmOperation { source, .. }) => {
            assert!(source.vm_is_broken(), "{source:?}");
            // The error says the VM crashed and shows the guest's panic.
            match source {
                VmError::Backend(BackendError::Crashed { serial_tail, .. }) => {
                    assert!(serial_tail.contains("Kernel panic"), "{serial_tail}")
                }
                other => panic!("expected BackendError::Crashed, got {other:#?}"),
            }
        }
        other => panic!("a crashed guest must be a VM error, got {other:#?}"),
    }
    assert!(
        took < Duration::from_secs(60),
        "the crash took {took:?} to be reported (the agent's timeout is 90 s)"
    );
    CRASHED.lock().unwrap_or_else(|e| e.into_inner()).push(id);
    Ok(())
}

/// Fill the guest's memory with a shell string that doubles until the OOM
/// killer stops it: the run says so, and the guest stays usable.
#[agent_vm_test(timeout = "120s")]
async fn fill_the_memory(vm: &mut Vm) -> TestResult {
    let agent =
        sh(r#"x=0123456789abcdef; while :; do x="$x$x"; done"#).timeout(Duration::from_secs(90));
    let run = vm.run_agent(&agent, Task::prompt("eat memory")).await?;
    assert!(run.oom_killed(), "{run:#?}");
    assert_eq!(run.signal(), Some(9), "{run:#?}");
    assert!(!run.timed_out(), "{run:#?}");
    // The guest survived it, and after the revert is as new.
    let out = vm.sh("echo alive").await?;
    assert_eq!(out.stdout, "alive\n", "{out:?}");
    vm.revert().await?;
    assert_clean_guest(vm).await
}

/// Fill the workspace's file system until `ENOSPC`: the agent sees the
/// error, the run ends and records the big file, and the revert gives the
/// room back.
#[agent_vm_test(timeout = "180s")]
async fn fill_the_disk(vm: &mut Vm) -> TestResult {
    let agent = sh("dd if=/dev/zero of=big bs=1M; echo \"dd exit $?\"; \
         echo more > small.txt || echo 'cannot write more'; sync")
    .timeout(Duration::from_secs(120));
    let run = vm.run_agent(&agent, Task::prompt("fill the disk")).await?;
    assert!(!run.timed_out(), "{run:#?}");
    assert!(run.stdout().contains("dd exit 1"), "{run:#?}");
    let big = run.change("big").ok_or("big not listed")?;
    assert!(big.size > Some(32 << 20), "{big:?}");
    // The error reached the agent (and its stderr, which is not on the disk).
    assert!(run.stderr().contains("No space left on device"), "{run:#?}");
    assert!(run.stdout().contains("cannot write more"), "{run:#?}");
    vm.revert().await?;
    assert_clean_guest(vm).await
}

/// Binary output on stdout: every byte value, then random bytes. The record
/// counts every byte, keeps the text around them, shows what is not UTF-8
/// as U+FFFD, and snapshots deterministically.
#[agent_vm_test(timeout = "90s")]
async fn binary_output(vm: &mut Vm) -> TestResult {
    let watch = HostWatch::new()?;
    let every_byte = r#"printf 'begin\n'; i=0; while [ $i -lt 256 ]; do printf "\\$(printf %o $i)"; i=$((i+1)); done; printf '\nend\n'"#;
    let run = vm
        .run_agent(&sh(every_byte), Task::prompt("print bytes"))
        .await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.stdout_bytes(), 6 + 256 + 5, "{run:#?}");
    // ASCII as it was; each byte that is not UTF-8 (0x80..=0xff: none of
    // them starts a valid sequence here) one U+FFFD.
    let ascii: String = (0u8..128).map(char::from).collect();
    let expected = format!("begin\n{ascii}{}\nend\n", "\u{fffd}".repeat(128));
    assert_eq!(run.stdout(), expected);
    let every_byte_run = run;

    let random = "head -c 300000 /dev/urandom; head -c 1000 /dev/urandom > noise.bin";
    let run = vm
        .run_agent(&sh(random), Task::prompt("print noise"))
        .await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.stdout_bytes(), 300_000);
    assert!(!run.stdout_truncated());
    let noise = run.change("noise.bin").ok_or("noise.bin not listed")?;
    assert_eq!(noise.size, Some(1000));
    assert_eq!(noise.text, None, "binary file shown as text: {noise:?}");
    // The record of the run is valid JSON whatever the agent printed.
    assert!(run.to_json().starts_with('{'));
    watch.assert_unchanged()?;
    // Last: recording a new snapshot writes in the source tree.
    assert_agent_snapshot!(every_byte_run);
    Ok(())
}

/// Background children that keep stdout open (`sleep 100 &`, and
/// `(sleep 101 &)`, reparented to init): the run returns when the agent
/// exits (plus a short drain), not at the children's end nor at the agent's
/// timeout, and the children are killed with it.
#[agent_vm_test(timeout = "90s")]
async fn background_children_holding_stdout(vm: &mut Vm) -> TestResult {
    let agent = sh("sleep 100 & (sleep 101 &); echo started").timeout(Duration::from_secs(60));
    let started = Instant::now();
    let run = vm.run_agent(&agent, Task::prompt("background")).await?;
    let took = started.elapsed();
    assert!(run.success() && !run.timed_out(), "{run:#?}");
    assert_eq!(run.stdout(), "started\n");
    assert!(run.duration() < Duration::from_secs(10), "{run:#?}");
    assert!(
        took < Duration::from_secs(30),
        "the run took {took:?}: it waited for the background children"
    );
    assert_no_sleepers(vm).await
}

/// A child that leaves the agent's process group and session at once
/// (`(setsid sleep 102 &)`, reparented to init before the guest's tree scan
/// sees it): the run still returns at the agent's exit, and the child does
/// not outlive it (the command's cgroup in the guest finds it).
#[agent_vm_test(timeout = "90s")]
async fn daemonized_child_is_killed_with_the_run(vm: &mut Vm) -> TestResult {
    let agent = sh("(setsid sleep 102 &); echo started").timeout(Duration::from_secs(60));
    let started = Instant::now();
    let run = vm.run_agent(&agent, Task::prompt("daemon")).await?;
    let took = started.elapsed();
    assert!(run.success() && !run.timed_out(), "{run:#?}");
    assert!(took < Duration::from_secs(30), "the run took {took:?}");
    assert_no_sleepers(vm).await
}

/// No `sleep 10N` of the background tests is left in the guest.
async fn assert_no_sleepers(vm: &mut Vm) -> TestResult {
    let out = vm
        .sh("ps -o pid,ppid,pgid,args | grep ' sleep 10[0-9]$' || true")
        .await?;
    assert_eq!(out.stdout, "", "children outlived the run: {out:?}");
    Ok(())
}

/// Agents that read stdin (`cat`, `read`) get end-of-file at once: the run
/// does not hang until its timeout.
#[agent_vm_test(timeout = "90s")]
async fn stdin_reads_get_eof(vm: &mut Vm) -> TestResult {
    let agent = sh("cat; read -r line; echo \"read exit $?, line '$line'\"")
        .timeout(Duration::from_secs(60));
    let started = Instant::now();
    let run = vm.run_agent(&agent, Task::prompt("read stdin")).await?;
    let took = started.elapsed();
    assert!(run.success() && !run.timed_out(), "{run:#?}");
    assert_eq!(run.stdout(), "read exit 1, line ''\n");
    assert!(took < Duration::from_secs(30), "stdin reads took {took:?}");
    Ok(())
}

/// An agent that ignores SIGTERM and never ends, with a 2 s timeout: the
/// run is marked timed out and returns within the timeout plus a slack
/// (the kill grace, listing the changes, a loaded TCG host).
#[agent_vm_test(timeout = "90s")]
async fn timeout_ends_the_run(vm: &mut Vm) -> TestResult {
    let timeout = Duration::from_secs(2);
    let agent = sh("trap '' TERM; echo spinning; while :; do :; done").timeout(timeout);
    let started = Instant::now();
    let run = vm.run_agent(&agent, Task::prompt("spin")).await?;
    let took = started.elapsed();
    assert!(run.timed_out(), "{run:#?}");
    assert_eq!(run.exit_code(), None);
    assert_eq!(run.signal(), Some(9), "{run:#?}");
    assert_eq!(run.stdout(), "spinning\n");
    assert!(run.duration() >= timeout, "{run:#?}");
    assert!(
        took < timeout + Duration::from_secs(20),
        "the run took {took:?} with a {timeout:?} timeout"
    );
    // The next run on the same VM is not disturbed.
    let run = vm.run_agent(&sh("echo next"), Task::new()).await?;
    assert!(run.success() && run.stdout() == "next\n", "{run:#?}");
    Ok(())
}

/// Unicode file names (composed and decomposed forms of the same letter,
/// other scripts, an emoji) and names that are not UTF-8: all listed
/// distinctly and readable back by the names the run shows.
#[agent_vm_test(timeout = "90s")]
async fn unicode_file_names(vm: &mut Vm) -> TestResult {
    let watch = HostWatch::new()?;
    let script = r#"
        echo 1 > "$(printf 'caf\303\251')"
        echo 2 > "$(printf 'cafe\314\201')"
        echo 3 > 'данные.txt'
        echo 4 > '日本語.md'
        echo 5 > '🦀.rs'
        mkdir 'répertoire' && echo 6 > 'répertoire/ß'
        echo 7 > "$(printf 'latin1-\351')"
    "#;
    let run = vm.run_agent(&sh(script), Task::prompt("names")).await?;
    assert!(run.success(), "{run:#?}");
    let expected = [
        ("caf\u{e9}", "1\n"),
        ("cafe\u{301}", "2\n"),
        ("данные.txt", "3\n"),
        ("日本語.md", "4\n"),
        ("🦀.rs", "5\n"),
        ("répertoire/ß", "6\n"),
        (r"latin1-\xe9", "7\n"),
    ];
    let mut created = run.created();
    created.sort();
    let mut want: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    want.push("répertoire");
    want.sort();
    assert_eq!(created, want);
    for (name, content) in expected {
        assert_eq!(run.file_text(name), Some(content), "{name}");
        let (data, _) = vm.read_file(name).await?;
        assert_eq!(data, content.as_bytes(), "{name}");
    }
    watch.assert_unchanged()
}

/// Symlinks out of the workspace (to `/etc/passwd`, `../../..`, `/`, and to
/// the host's canary directory by its absolute path): listed as symlinks,
/// never followed, and nothing on the host is read or written through them.
#[agent_vm_test(timeout = "90s")]
async fn symlinks_out_of_the_workspace(vm: &mut Vm) -> TestResult {
    let watch = HostWatch::new()?;
    let canary = watch.canary().display().to_string();
    let agent = sh(
        "ln -s /etc/passwd passwd; ln -s ../../.. up; ln -s / root; \
         ln -s \"$CANARY\" host; ln -s \"$CANARY/canary.txt\" host-file",
    )
    .env("CANARY", canary.clone());
    let run = vm.run_agent(&agent, Task::prompt("escape")).await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.created(), ["host", "host-file", "passwd", "root", "up"]);
    for change in run.changes() {
        assert_eq!(change.kind, EntryKind::Symlink, "{change:?}");
        // No content of what the links point at was read into the record.
        assert_eq!(change.text, None, "{change:?}");
    }
    // Reading or writing through them is refused by the guest...
    for path in ["passwd", "up/etc/passwd", "root/etc/passwd", "host-file"] {
        match vm.read_file(path).await {
            Err(e) => assert!(
                e.guest_error().is_some() && !e.vm_is_broken(),
                "{path}: not a refusal by the guest: {e}"
            ),
            Ok((data, _)) => panic!(
                "{path} read through a symlink: {:?}",
                String::from_utf8_lossy(&data)
            ),
        }
    }
    for path in [
        "host/new.txt",
        "up/tmp/e2e-was-here",
        "root/tmp/e2e-was-here",
    ] {
        match vm.write_file(path, b"written", 0o644).await {
            Err(e) => assert!(
                e.guest_error().is_some() && !e.vm_is_broken(),
                "{path}: not a refusal by the guest: {e}"
            ),
            Ok(()) => panic!("{path} written through a symlink"),
        }
    }
    // Writing to a link itself replaces the link (or is refused), never
    // writes where it points.
    for path in ["passwd", "host-file"] {
        if let Err(e) = vm.write_file(path, b"written", 0o644).await {
            assert!(
                e.guest_error().is_some() && !e.vm_is_broken(),
                "{path}: not a refusal by the guest: {e}"
            );
        }
    }
    let out = vm
        .sh("test ! -e /tmp/e2e-was-here && head -n 1 /etc/passwd")
        .await?;
    assert_eq!(out.stdout, "root:x:0:0:root:/root:/bin/sh\n", "{out:?}");
    // ...a task file cannot name a path outside the workspace...
    let task = Task::new().file("../../tmp/e2e-was-here", "x");
    match vm.run_agent(&sh("true"), task).await {
        Err(AgentError::Invalid { what, .. }) => assert_eq!(what, "task file"),
        other => panic!("a task file outside the workspace must be refused: {other:#?}"),
    }
    // ...and the host's files are as they were.
    watch.assert_unchanged()
}

/// 10 000 files: all listed, each once, within a generous bound.
#[agent_vm_test(timeout = "240s")]
async fn ten_thousand_files(vm: &mut Vm) -> TestResult {
    let watch = HostWatch::new()?;
    let agent = sh("mkdir many && cd many && seq -w 0 9999 | xargs touch && ls | wc -l")
        .timeout(Duration::from_secs(180));
    let started = Instant::now();
    let run = vm.run_agent(&agent, Task::prompt("many files")).await?;
    let took = started.elapsed();
    eprintln!("ten_thousand_files: {took:?}");
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.stdout(), "10000\n");
    let created = run.created();
    assert_eq!(created.len(), 10_001, "many/ and its files");
    let distinct: std::collections::BTreeSet<&str> = created.iter().copied().collect();
    assert_eq!(distinct.len(), created.len(), "a file listed twice");
    assert!(distinct.contains("many/0000") && distinct.contains("many/9999"));
    assert!(
        took < Duration::from_secs(180),
        "10 000 files took {took:?}"
    );
    watch.assert_unchanged()
}

/// Started last: whatever ran before, the VM handed out is clean, and it is
/// not one whose guest was crashed.
#[agent_vm_test(timeout = "90s")]
async fn zz_next_test_gets_a_clean_vm(vm: &mut Vm) -> TestResult {
    let crashed = CRASHED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        !crashed.iter().any(|id| id == vm.id()),
        "handed the crashed VM {} again",
        vm.id()
    );
    assert_clean_guest(vm).await
}

agentvm_test::main!();
