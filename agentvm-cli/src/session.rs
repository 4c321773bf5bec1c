//! `agentvm exec` and `agentvm shell`: boot a VM from the configuration,
//! run commands, destroy it.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use agentvm_runtime::client::ExecEvent;
use agentvm_runtime::command::Command;
use agentvm_runtime::config::{self, AgentVmConfig};
use agentvm_runtime::image::locate_image;
use agentvm_runtime::protocol::{ExitStatus, OutputStream};
use agentvm_runtime::spec::ResourceProfile;
use agentvm_runtime::vm::Vm;
use anyhow::{bail, Context, Result};
use tokio::io::AsyncBufReadExt;

use crate::VmArgs;

/// Loads the configuration and boots one VM as `args` ask.
async fn boot(args: &VmArgs) -> Result<Vm> {
    let mut config = AgentVmConfig::load().context("reading the agentvm configuration")?;
    if let Some(image) = &args.image {
        config.image = image.clone();
    }
    if let Some(profile) = &args.profile {
        config.profile = ResourceProfile::from_name(profile).with_context(|| {
            format!("unknown profile {profile:?}: use minimal, light, standard or intensive")
        })?;
    }
    let image = locate_image(&config.image, &config.image_dir)?;
    let backend = config::create_backend(&config)?;
    if args.verbose {
        eprintln!(
            "agentvm: booting a VM ({} backend, image {})",
            backend.name(),
            config.image
        );
    }
    let vm = Vm::boot(backend.as_ref(), config.vm_spec(image)).await?;
    if args.verbose {
        let t = vm.boot_timings();
        eprintln!(
            "agentvm: VM {} ready in {:?} (snapshot {:?})",
            vm.id(),
            t.to_hello,
            t.snapshot
        );
    }
    Ok(vm)
}

/// Exit code for the host shell: the command's own, or 128 + signal.
pub fn exit_code_of(status: ExitStatus) -> u8 {
    match status {
        ExitStatus::Code(code) => u8::try_from(code & 0xff).unwrap_or(1),
        ExitStatus::Signal(signal) => u8::try_from((128 + signal) & 0xff).unwrap_or(1),
    }
}

/// Runs `command` in a fresh VM, streaming its output.
pub async fn exec(args: &VmArgs, timeout: Option<&str>, command: Vec<String>) -> Result<ExitCode> {
    let mut request = Command::from_argv(command);
    if args.root {
        request = request.as_root();
    }
    if let Some(text) = timeout {
        let Some(timeout) = config::parse_duration(text) else {
            bail!("bad --timeout {text:?}: use a duration like 30s, 5m or 1h");
        };
        request = request.timeout(timeout);
    }
    let mut vm = boot(args).await?;
    let result = stream(&mut vm, request).await;
    let destroyed = vm.destroy().await;
    let status = result?;
    destroyed?;
    Ok(ExitCode::from(exit_code_of(status)))
}

/// Runs one command, copying its output to ours as it arrives.
async fn stream(vm: &mut Vm, command: Command) -> Result<ExitStatus> {
    let mut events = vm.spawn(command).await?;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        match events.next_event().await? {
            Some(ExecEvent::Output(OutputStream::Stdout, data)) => {
                stdout.write_all(&data)?;
                stdout.flush()?;
            }
            Some(ExecEvent::Output(OutputStream::Stderr, data)) => {
                stderr.write_all(&data)?;
            }
            Some(ExecEvent::Exit(report)) => {
                if report.timed_out {
                    eprintln!("agentvm: the command timed out and was killed");
                }
                if report.stdout_truncated || report.stderr_truncated {
                    eprintln!("agentvm: output was truncated at the output limit");
                }
                return Ok(report.status);
            }
            None => bail!("the guest closed the command's stream without an exit status"),
        }
    }
}

/// A line-at-a-time shell: each line runs with `sh -c` in the VM; `cd` is
/// remembered between lines. No TTY: full-screen programs will not work.
pub async fn shell(args: &VmArgs) -> Result<ExitCode> {
    let mut vm = boot(args).await?;
    eprintln!(
        "agentvm shell on VM {} ({}). One command per line; `exit` or Ctrl-D leaves (the VM is destroyed).",
        vm.id(),
        vm.guest_info().kernel.as_deref().unwrap_or("?")
    );
    let mut cwd = vm
        .guest_info()
        .workspace_root
        .clone()
        .unwrap_or_else(|| "/".into());
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut last = ExitStatus::Code(0);
    let result: Result<()> = async {
        loop {
            eprint!("{cwd} # ");
            let Some(line) = lines.next_line().await? else {
                break;
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if line == "exit" {
                break;
            }
            // Run the line, then report the directory it ended in on a marker line.
            let script = format!(
                "{line}\n__s=$?; printf '\\n\\001agentvm-cwd:%s\\n' \"$PWD\" >&2; exit $__s"
            );
            let mut command = Command::shell(script)
                .current_dir(cwd.clone())
                .timeout(Duration::from_secs(3600));
            if args.root {
                command = command.as_root();
            }
            let out = vm.exec(command).await?;
            std::io::stdout().write_all(&out.stdout)?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            let (text, new_cwd) = split_cwd_marker(&stderr);
            eprint!("{text}");
            if let Some(dir) = new_cwd {
                cwd = dir;
            }
            last = out.report.status;
        }
        Ok(())
    }
    .await;
    vm.destroy().await?;
    result?;
    Ok(ExitCode::from(exit_code_of(last)))
}

/// Splits the shell's cwd marker line off its stderr.
fn split_cwd_marker(stderr: &str) -> (String, Option<String>) {
    const MARKER: &str = "\n\u{1}agentvm-cwd:";
    match stderr.rfind(MARKER) {
        Some(at) => {
            let cwd = stderr[at + MARKER.len()..]
                .trim_end_matches('\n')
                .to_string();
            (stderr[..at].to_string(), Some(cwd))
        }
        None => (stderr.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code_of(ExitStatus::Code(0)), 0);
        assert_eq!(exit_code_of(ExitStatus::Code(3)), 3);
        assert_eq!(exit_code_of(ExitStatus::Code(256 + 4)), 4);
        assert_eq!(exit_code_of(ExitStatus::Signal(9)), 137);
    }

    #[test]
    fn cwd_marker_is_split_off() {
        let (text, cwd) = split_cwd_marker("warning\n\n\u{1}agentvm-cwd:/tmp/x\n");
        assert_eq!(
            (text.as_str(), cwd.as_deref()),
            ("warning\n", Some("/tmp/x"))
        );
        let (text, cwd) = split_cwd_marker("no marker");
        assert_eq!((text.as_str(), cwd), ("no marker", None));
    }
}
