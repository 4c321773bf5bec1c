//! The `agentvm` binary end to end, with real VMs (needs the guest image of
//! `cargo xtask build-image` or `agentvm image build`).

use std::process::Command;

fn agentvm() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentvm"));
    // Find the workspace's image and config as from inside the repository.
    command.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    command
}

#[test]
fn exec_runs_in_a_vm_and_passes_the_exit_code_through() {
    let out = agentvm()
        .args(["exec", "--", "sh", "-c", "uname -sr; echo oops >&2; exit 5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "stderr: {stderr}");
    assert!(
        stdout.starts_with("Linux ") && stdout.contains("cloud-amd64"),
        "{stdout}"
    );
    assert!(stderr.contains("oops"), "{stderr}");
}

#[test]
fn exec_timeout_kills_and_reports() {
    let out = agentvm()
        .args(["exec", "--timeout", "1s", "--", "sleep", "30"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "sleep dies of the SIGTERM sent on timeout"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));
}

#[test]
fn shell_runs_lines_and_remembers_cd() {
    use std::io::Write;
    let mut child = agentvm()
        .arg("shell")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"mkdir -p sub && cd sub\npwd\nexit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/workspace/sub\n");
}

#[test]
fn bad_arguments_are_clear_errors() {
    let out = agentvm()
        .args(["exec", "--profile", "huge", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown profile \"huge\""));
    let out = agentvm()
        .args(["exec", "--image", "nope", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The image dir is this checkout's: both the CLI's and the xtask's command.
    assert!(
        stderr.contains("`agentvm image build nope --out ")
            && stderr.contains("cargo xtask build-image --name nope --out "),
        "{stderr}"
    );
}

#[test]
fn doctor_reports_each_part() {
    let out = agentvm().arg("doctor").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    for part in [
        "qemu",
        "qemu-img",
        "accelerator",
        "channel",
        "config",
        "image",
        "runtime dir",
        "libvirt",
    ] {
        assert!(
            stdout.lines().any(|l| l.contains(&format!("] {part}"))),
            "no {part} line in:\n{stdout}"
        );
    }
    assert!(out.status.success(), "{stdout}");
}
