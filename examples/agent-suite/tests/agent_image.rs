//! The Debian `agent` image (`cargo xtask build-image --name agent --with
//! claude-code,codex`) in real VMs: its toolchain runs as the unprivileged
//! `agent` user, a revert restores the whole root file system (all writes
//! live in the tmpfs overlay, in guest RAM), and the agent CLIs installed by
//! recipes start.
//!
//! When the image is not built, every test here is reported ignored with the
//! command that builds it (see the harness).

use agentvm_test::prelude::*;
use agentvm_test::ShellOutput;

/// `sh -c script` as root (the image's default user is `agent`).
async fn sh_as_root(
    vm: &mut Vm,
    script: &str,
) -> Result<ShellOutput, Box<dyn std::error::Error + Send + Sync>> {
    Ok(vm.exec(Command::shell(script).as_root()).await?.into())
}

/// Files whose checksums must survive damage + revert.
const CHECKED: &str = "/usr/bin/git /usr/bin/python3.11 /etc/passwd /usr/lib/os-release";

#[agent_vm_test(image = "agent", profile = "light", timeout = "120s")]
async fn toolchain_runs_as_the_agent_user(vm: &mut Vm) -> TestResult {
    let out = vm
        .sh("id -un; id -u; id -g; echo \"$HOME $USER $LOGNAME\"; stat -c %U /workspace")
        .await?;
    assert!(out.success(), "{out:?}");
    assert_eq!(
        out.stdout,
        "agent\n1000\n1000\n/home/agent agent agent\nagent\n"
    );

    let out = vm
        .sh("python3 -c 'import sys, venv, ssl; print(sys.version_info[:2])'")
        .await?;
    assert_eq!(out.stdout, "(3, 11)\n", "{out:?}");
    let out = vm
        .sh("node -e 'console.log(process.versions.node.split(\".\")[0] >= 18)'")
        .await?;
    assert_eq!(out.stdout, "true\n", "{out:?}");
    let out = vm.sh("npm --version").await?;
    assert!(out.success() && out.stdout.starts_with("9."), "{out:?}");
    for tool in [
        "rg --version",
        "curl --version",
        "less --version",
        "patch --version",
        "xz --version",
    ] {
        let out = vm.sh(tool).await?;
        assert!(out.success(), "{tool}: {out:?}");
    }

    let out = vm
        .sh(
            "git init -q repo && cd repo && git config user.email a@example.com \
             && git config user.name agent && echo hi > f && git add f \
             && git commit -qm first && git log --format='%an %s' && stat -c %U .git",
        )
        .await?;
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, "agent first\nagent\n");

    // The agent user cannot touch the system; root (opt-in) can.
    let out = vm.sh("touch /usr/bin/x 2>&1; echo $?").await?;
    assert!(out.stdout.contains("Permission denied"), "{out:?}");
    let out = sh_as_root(vm, "id -u && touch /usr/bin/x && rm /usr/bin/x").await?;
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, "0\n");
    Ok(())
}

#[agent_vm_test(image = "agent", profile = "light", timeout = "180s")]
async fn revert_restores_the_root_file_system(vm: &mut Vm) -> TestResult {
    let sums = format!("sha256sum {CHECKED}");
    let golden = vm.sh(&sums).await?;
    assert!(golden.success(), "{golden:?}");

    // Damage as root: 100 MB outside the workspace, git deleted.
    let damage = "dd if=/dev/urandom of=/var/tmp/big bs=1M count=100 status=none \
                  && rm /usr/bin/git && echo broken >> /etc/passwd && sync \
                  && df -m / | tail -1";
    let out = sh_as_root(vm, damage).await?;
    assert!(out.success(), "{out:?}");
    let out = vm.sh("git --version").await?;
    assert!(!out.success(), "git survived its deletion: {out:?}");

    vm.revert().await?;

    let out = vm.sh("git --version && test ! -e /var/tmp/big").await?;
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.starts_with("git version 2.39"), "{out:?}");
    let after = vm.sh(&sums).await?;
    assert_eq!(after.stdout, golden.stdout);
    // The overlay's upper layer holds nothing of the 100 MB any more.
    let out = vm.sh("df -m / | awk 'NR==2 {print $3}'").await?;
    let used: u64 = out.stdout.trim().parse().unwrap_or(u64::MAX);
    assert!(used < 50, "overlay still uses {used} MiB: {out:?}");
    Ok(())
}

#[agent_vm_test(image = "agent", profile = "light", timeout = "120s")]
async fn recipe_agents_start(vm: &mut Vm) -> TestResult {
    let out = vm.sh("ls /usr/local/bin").await?;
    let installed = out.stdout;
    assert!(
        installed.contains("claude") && installed.contains("codex"),
        "the agent image was built without the claude-code and codex recipes \
         (rebuild it with `cargo xtask build-image --name agent --with claude-code,codex`): \
         /usr/local/bin has {installed:?}"
    );
    let out = vm.sh("claude --version").await?;
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("2.1.197"), "{out:?}");
    let out = vm.sh("codex --version").await?;
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("0.171.0"), "{out:?}");
    Ok(())
}

/// Fixture files the harness puts into the workspace belong to `agent`, so
/// an unprivileged agent can edit them (and its own files are its own).
#[agent_vm_test(
    image = "agent",
    profile = "light",
    timeout = "120s",
    fixtures("tests/fixtures/repo")
)]
async fn unprivileged_agent_edits_its_fixtures(vm: &mut Vm) -> TestResult {
    let out = vm.sh("stat -c '%U %n' README.md src src/main.sh").await?;
    assert_eq!(
        out.stdout, "agent README.md\nagent src\nagent src/main.sh\n",
        "{out:?}"
    );
    let run = vm
        .run_agent(&Agent::script("examples/agents/editor.sh"), Task::new())
        .await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.deleted(), ["obsolete.txt"]);
    assert!(run.modified().contains(&"README.md"), "{run:#?}");
    let out = vm.sh("stat -c '%U' notes/todo.txt").await?;
    assert_eq!(out.stdout, "agent\n");
    Ok(())
}

/// The same task for the Python and the Node.js fake agent: a README to
/// edit and a file to delete.
fn tidy_task() -> Task {
    Task::prompt("tidy up")
        .file("README.md", "# project\n\nTODO\n")
        .file("old.txt", "stale\n")
}

/// A Python agent script changes the workspace; the run records exactly
/// what it created, modified and deleted.
#[agent_vm_test(image = "agent", profile = "light", timeout = "180s")]
async fn python_agent_changes_the_workspace(vm: &mut Vm) -> TestResult {
    let run = vm
        .run_agent(&Agent::script("examples/agents/tidy.py"), tidy_task())
        .await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.created(), ["src", "src/app.py"]);
    assert_eq!(run.modified(), ["README.md"]);
    assert_eq!(run.deleted(), ["old.txt"]);
    assert_eq!(
        run.file_text("README.md"),
        Some("# project\n\nDone by tidy.py\n")
    );
    assert_agent_snapshot!(run);
    Ok(())
}

/// A home-made Python agent (`examples/agents/mini_agent.py`) asks a
/// scripted model what to do over the OpenAI Chat Completions API, runs the
/// shell commands it is given and reports back: the run has the model
/// transcript (what the report shows as a conversation).
#[agent_vm_test(image = "agent", profile = "light", timeout = "180s")]
async fn home_made_agent_follows_its_model(vm: &mut Vm) -> TestResult {
    let model = Model::scripted([
        Turn::shell("printf 'hello\\n' > notes.txt && ls"),
        Turn::shell("sed -i s/hello/hi/ notes.txt && cat notes.txt"),
        Turn::text("Done: notes.txt says hi."),
    ]);
    let agent = Agent::script("examples/agents/mini_agent.py")
        .env("OPENAI_BASE_URL", "http://127.0.0.1:8787/v1")
        .env("OPENAI_API_KEY", "sk-not-a-real-key")
        .model(model);
    let run = vm
        .run_agent(
            &agent,
            Task::prompt("Create notes.txt saying hello, then make it say hi."),
        )
        .await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.file_text("notes.txt"), Some("hi\n"));
    let transcript = run.transcript();
    assert_eq!(transcript.len(), 3, "{transcript:#?}");
    assert_eq!(transcript[0].tool_calls[0].name, "shell");
    assert_eq!(
        transcript[2].response_text.as_deref(),
        Some("Done: notes.txt says hi.")
    );
    assert!(
        run.stdout().ends_with("Done: notes.txt says hi.\n"),
        "{run:#?}"
    );
    assert_agent_snapshot!(run);
    Ok(())
}

/// A Node.js agent script does the same.
#[agent_vm_test(image = "agent", profile = "light", timeout = "180s")]
async fn node_agent_changes_the_workspace(vm: &mut Vm) -> TestResult {
    let run = vm
        .run_agent(&Agent::script("examples/agents/tidy.js"), tidy_task())
        .await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.created(), ["notes", "notes/todo.md"]);
    assert_eq!(run.modified(), ["README.md"]);
    assert_eq!(run.deleted(), ["old.txt"]);
    assert_eq!(
        run.file_text("README.md"),
        Some("# project\n\nDone by tidy.js\n")
    );
    assert_agent_snapshot!(run);
    Ok(())
}

/// pip installs a wheel shipped in the repository, with no index and no
/// network, as the `agent` user (`tests/fixtures/wheels/`: a pure-Python
/// wheel made by hand).
#[agent_vm_test(image = "agent", profile = "light", timeout = "180s")]
async fn pip_installs_a_wheel_from_the_repository_offline(vm: &mut Vm) -> TestResult {
    const WHEEL: &str = "agentvm_hello-0.1-py3-none-any.whl";
    let wheel = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/wheels")
            .join(WHEEL),
    )?;
    vm.write_file(&format!("/workspace/{WHEEL}"), &wheel, 0o644)
        .await?;
    let out = vm
        .sh(&format!(
            "python3 -m pip install --user --break-system-packages --no-index --no-cache-dir \
             --quiet ./{WHEEL} && cd / && python3 -c 'import agentvm_hello; print(agentvm_hello.hello())' \
             && python3 -c 'import agentvm_hello; print(agentvm_hello.__file__)'"
        ))
        .await?;
    assert!(out.success(), "{out:?}");
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some("hello from a wheel"), "{out:?}");
    assert!(
        lines
            .next()
            .is_some_and(|f| f.starts_with("/home/agent/.local/")),
        "installed into the agent user's site-packages: {out:?}"
    );
    Ok(())
}

agentvm_test::main!();
