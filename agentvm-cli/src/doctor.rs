//! `agentvm doctor`: checks that this host can run agentvm VMs and says what
//! to fix. Each check is a small function returning a [`Check`].

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use agentvm_runtime::backend::qemu::{accel, transport, QemuBackend, QemuConfig};
use agentvm_runtime::config::{self, AgentVmConfig};
use agentvm_runtime::image::locate_image;
use agentvm_runtime::spec::Accel;
use agentvm_runtime::vm::Vm;
use anyhow::Result;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but worth knowing (e.g. slow path).
    Warn,
    /// Blocks running VMs.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it (for Warn/Fail).
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Runs every check (and a test boot when `boot`), prints the report, and
/// exits non-zero when something blocks running VMs.
pub async fn run(boot: bool) -> Result<ExitCode> {
    let mut checks = vec![
        program_check(
            "qemu",
            "qemu-system-x86_64",
            "apt-get install qemu-system-x86",
        ),
        program_check("qemu-img", "qemu-img", "apt-get install qemu-utils"),
        accelerator_check(),
        transport_check(),
    ];
    let config = AgentVmConfig::load();
    checks.push(match &config {
        Ok(c) => Check::ok(
            "config",
            c.config_file.as_ref().map_or(
                "built-in defaults (no .config/agentvm.toml)".to_string(),
                |p| p.display().to_string(),
            ),
        ),
        Err(e) => Check::fail(
            "config",
            e.to_string(),
            "fix the file or variable named above",
        ),
    });
    if let Ok(config) = &config {
        checks.push(image_check(config));
        checks.push(runtime_dir_check());
        checks.extend(jail_checks(config));
        checks.push(libvirt_check(config.libvirt_uri.as_deref()));
        if boot {
            checks.push(boot_check(config).await);
        }
    }
    print_report(&checks);
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_report(checks: &[Check]) {
    for check in checks {
        let mark = match check.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        println!("[{mark}] {:<12} {}", check.name, check.detail);
        if let Some(fix) = &check.fix {
            println!("       {:<12} -> {fix}", "");
        }
    }
}

/// A program on `PATH` that answers `--version`.
fn program_check(name: &'static str, program: &str, install: &str) -> Check {
    match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            Check::ok(name, version)
        }
        Ok(out) => Check::fail(
            name,
            format!("{program} --version failed ({})", out.status),
            install.to_string(),
        ),
        Err(_) => Check::fail(
            name,
            format!("{program} not found on PATH"),
            install.to_string(),
        ),
    }
}

fn accelerator_check() -> Check {
    let decision = accel::detect(Accel::Auto);
    let detail = format!("{} ({})", decision.accel, decision.reason);
    match decision.accel {
        accel::ResolvedAccel::Kvm => Check::ok("accelerator", detail),
        accel::ResolvedAccel::Tcg => Check::warn(
            "accelerator",
            detail,
            "VMs run under software emulation (slower, always works); AGENT_VM_ACCEL=kvm forces KVM",
        ),
    }
}

fn transport_check() -> Check {
    let decision = transport::detect_transport();
    Check::ok(
        "channel",
        format!("{} ({})", decision.transport, decision.reason),
    )
}

fn image_check(config: &AgentVmConfig) -> Check {
    match locate_image(&config.image, &config.image_dir) {
        Ok(image) => Check::ok(
            "image",
            format!(
                "{} at {}",
                config.image,
                image.kernel.parent().unwrap_or(Path::new("")).display()
            ),
        ),
        Err(e) => Check::fail(
            "image",
            e.to_string(),
            agentvm_runtime::image::build_command(&config.image, &config.image_dir),
        ),
    }
}

/// What each QEMU runs under here: seccomp, its user, its cgroup.
fn jail_checks(config: &AgentVmConfig) -> Vec<Check> {
    let Ok(backend) = QemuBackend::new(QemuConfig::default()) else {
        return Vec::new();
    };
    let jail = backend.jail();
    let mut checks = vec![Check::ok("seccomp", "-sandbox on with every deny group")];
    checks.push(match (&jail.user, &jail.user_unavailable) {
        (Some(user), _) => {
            let readable = locate_image(&config.image, &config.image_dir)
                .map(|img| jail.check_readable(&img.files()));
            match readable {
                Ok(Err(path)) => Check::warn(
                    "qemu user",
                    format!(
                        "QEMU runs as root: {} cannot read {}",
                        user.name,
                        path.display()
                    ),
                    format!("chmod o+rx {} (and o+r the image files)", path.display()),
                ),
                _ => Check::ok(
                    "qemu user",
                    format!("QEMU runs as {} (uid {})", user.name, user.uid),
                ),
            }
        }
        (None, Some(why)) => Check::warn("qemu user", "QEMU runs as root", why.clone()),
        (None, None) => Check::ok("qemu user", "QEMU runs as your own unprivileged user"),
    });
    checks.push(match &jail.cgroup {
        Ok(parent) => Check::ok(
            "cgroup",
            format!(
                "each VM in {}/<vm> with memory, pids and cpu limits",
                parent.dir.display()
            ),
        ),
        Err(why) => Check::warn(
            "cgroup",
            format!("no per-VM cgroup: {why}"),
            "run on a cgroup v2 host that delegates memory, pids and cpu",
        ),
    });
    checks
}

fn runtime_dir_check() -> Check {
    match QemuBackend::new(QemuConfig::default()) {
        Ok(backend) => Check::ok("runtime dir", backend.runtime_dir().display().to_string()),
        Err(e) => Check::fail(
            "runtime dir",
            e.to_string(),
            "make the directory writable or set XDG_RUNTIME_DIR",
        ),
    }
}

/// libvirt is optional: only `backend = "libvirt"` needs it.
fn libvirt_check(uri: Option<&str>) -> Check {
    let mut command = Command::new("virsh");
    if let Some(uri) = uri {
        command.args(["-c", uri]);
    }
    command.args(["version", "--daemon"]);
    match command.output() {
        Err(_) => Check::warn(
            "libvirt",
            "virsh not installed (only needed for backend = \"libvirt\")",
            "apt-get install libvirt-clients libvirt-daemon-driver-qemu, then start libvirtd",
        ),
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            Check::ok(
                "libvirt",
                text.lines()
                    .rfind(|l| !l.trim().is_empty())
                    .unwrap_or("reachable")
                    .trim()
                    .to_string(),
            )
        }
        Ok(out) => Check::warn(
            "libvirt",
            format!(
                "daemon unreachable: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            "start it: virtlogd -d && libvirtd -d (only needed for backend = \"libvirt\")",
        ),
    }
}

async fn boot_check(config: &AgentVmConfig) -> Check {
    let result = async {
        let image = locate_image(&config.image, &config.image_dir)?;
        let backend = config::create_backend(config)?;
        let started = Instant::now();
        let mut vm = Vm::boot(backend.as_ref(), config.vm_spec(image)).await?;
        let booted = started.elapsed();
        let rtt = vm.ping().await?;
        let revert = vm.revert().await?;
        vm.destroy().await?;
        anyhow::Ok((booted, rtt, revert.total))
    }
    .await;
    match result {
        Ok((booted, rtt, revert)) => Check::ok(
            "test boot",
            format!(
                "booted in {}, ping {}, revert {}",
                ms(booted),
                ms(rtt),
                ms(revert)
            ),
        ),
        Err(e) => Check::fail(
            "test boot",
            format!("{e:#}"),
            "see the serial console lines above; `agentvm doctor` without --boot checks the parts",
        ),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}
