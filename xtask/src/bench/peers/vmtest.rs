//! vmtest (crates.io), a QEMU-based "run this command in a VM" runner: each
//! target boots a fresh VM whose root file system is the host's, shared
//! over 9p, and runs its command through qemu-guest-agent.
//!
//! Installed with `cargo install vmtest --root target/agentvm/peers` (once:
//! kept while the binary reports [`VERSION`]) and run on the kernel of our
//! default image, under TCG like our VMs. vmtest needs 9p, virtio-pci and
//! virtio-console built into that kernel; when they are not, the rows are
//! skipped with that reason.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;

use super::docker::find_tool;
use super::{row, Agentvm, Outcome, Ratio};
use crate::bench::progress::Printer;
use crate::bench::stats::{round3, Summary};

/// The vmtest release measured.
pub const VERSION: &str = "0.18.0";

/// Commands in the suite row.
pub const SUITE_COMMANDS: usize = 10;

/// Kernel options vmtest's guest needs built in: it boots the kernel with no
/// initramfs, mounts the root over 9p and finds qemu-guest-agent's
/// virtio-serial port (vmtest's docs: "all kernel modules need to be built
/// into bzImage").
pub const REQUIRED_BUILTIN: &[&str] = &[
    "CONFIG_VIRTIO",
    "CONFIG_VIRTIO_PCI",
    "CONFIG_VIRTIO_CONSOLE",
    "CONFIG_NET_9P",
    "CONFIG_NET_9P_VIRTIO",
    "CONFIG_9P_FS",
];

/// The vmtest rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmtestRows {
    pub version: String,
    /// The kernel booted (package and release).
    pub kernel: String,
    pub accelerator: String,
    /// Guest size given to vmtest (agentvm's default profile).
    pub guest_memory: String,
    pub guest_vcpus: u32,
    /// One command (`true`) in a fresh VM, start of vmtest to its exit.
    pub one_command_ms: Summary,
    pub one_command_vs_agentvm: Option<Ratio>,
    /// A suite of [`SUITE_COMMANDS`] targets, each a fresh VM, one vmtest run.
    pub suite_commands: usize,
    pub suite_wall_s: f64,
    pub suite_vs_agentvm: Option<Ratio>,
}

impl VmtestRows {
    pub fn compare(&mut self, a: &Agentvm) {
        self.one_command_vs_agentvm = Ratio::of(
            self.one_command_ms.p50,
            a.fresh_vm_and_exec_ms(),
            "cold_boot.to_hello_ms.p50 + exec_true_ms.p50 (a fresh VM and one command)",
        );
        self.suite_vs_agentvm = Ratio::of(
            self.suite_wall_s * 1000.0,
            a.serial_commands_ms(self.suite_commands),
            &format!(
                "cold_boot.ready_ms.p50 + {} × (exec_true_ms.p50 + revert.total_ms.p50), in ms",
                self.suite_commands
            ),
        );
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "vmtest {} on {} ({}, {} vCPU, {})\n",
            self.version, self.kernel, self.accelerator, self.guest_vcpus, self.guest_memory
        );
        row(
            &mut out,
            "   one command in a fresh VM",
            &self.one_command_ms,
            &Ratio::show(&self.one_command_vs_agentvm),
        );
        let _ = writeln!(
            out,
            "{:<44} {:>5} {:>10} {:>10}  {}",
            format!("   suite: {} commands, a VM each", self.suite_commands),
            self.suite_commands,
            format!("{:.2} s", self.suite_wall_s),
            "",
            Ratio::show(&self.suite_vs_agentvm),
        );
        out
    }
}

/// Options of [`REQUIRED_BUILTIN`] that `config` (a kernel `.config`) does
/// not build in (`=m` or absent).
pub fn missing_builtins(config: &str) -> Vec<&'static str> {
    REQUIRED_BUILTIN
        .iter()
        .copied()
        .filter(|opt| {
            !config
                .lines()
                .any(|l| l.strip_prefix(opt).and_then(|r| r.strip_prefix('=')) == Some("y"))
        })
        .collect()
}

/// The default image's kernel: its file and its `.config` (from the
/// image build's cache of the unpacked Debian package).
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub package: String,
    pub release: String,
    pub config: Option<PathBuf>,
}

impl Kernel {
    pub fn of_default_image(root: &Path) -> Result<Self, String> {
        let image = root.join("target/agentvm/images/default");
        let text = std::fs::read_to_string(image.join("manifest.json"))
            .map_err(|_| "the default image is not built (cargo xtask build-image)".to_string())?;
        let m: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let field = |a: &str, b: &str| m[a][b].as_str().unwrap_or_default().to_string();
        let (package, version, release) = (
            field("kernel", "package"),
            field("kernel", "version"),
            field("kernel", "release"),
        );
        let config = root
            .join("target/agentvm/cache/kernel")
            .join(format!("{package}_{version}"))
            .join("boot")
            .join(format!("config-{release}"));
        Ok(Self {
            vmlinuz: image.join(m["vmlinuz"]["file"].as_str().unwrap_or("vmlinuz")),
            package,
            release,
            config: config.exists().then_some(config),
        })
    }
}

/// Why vmtest cannot run here (`None`: it can). `cpuinfo` is
/// /proc/cpuinfo's text, `dev_kvm` whether /dev/kvm exists.
pub fn host_problem(cpuinfo: &str, dev_kvm: bool, qemu_ga: bool) -> Option<String> {
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if dev_kvm && !virt {
        return Some(
            "vmtest uses KVM whenever /dev/kvm exists, and here /dev/kvm is a hypervisor \
             without vmx/svm that hangs stock guest kernels (agentvm detects this and uses TCG)"
                .into(),
        );
    }
    if !qemu_ga {
        return Some(
            "no qemu-ga on the host (vmtest's guest runs the host's): \
             apt-get install qemu-guest-agent"
                .into(),
        );
    }
    None
}

/// Measures the vmtest rows, or says why not.
pub fn measure(printer: &Printer, root: &Path, quick: bool) -> Outcome<VmtestRows> {
    printer.phase("peer: vmtest (a fresh QEMU VM per command)");
    match measure_inner(printer, root, quick) {
        Ok(rows) => Outcome::Measured(rows),
        Err(reason) => {
            printer.note(format!("vmtest skipped: {reason}"));
            Outcome::skipped(reason)
        }
    }
}

fn measure_inner(printer: &Printer, root: &Path, quick: bool) -> Result<VmtestRows, String> {
    let kernel = Kernel::of_default_image(root)?;
    let config = kernel.config.as_ref().ok_or_else(|| {
        format!(
            "the .config of {} is not in the image build's cache \
             (target/agentvm/cache/kernel); rebuild the image: cargo xtask build-image",
            kernel.package
        )
    })?;
    let missing = missing_builtins(&std::fs::read_to_string(config).map_err(|e| e.to_string())?);
    if !missing.is_empty() {
        return Err(format!(
            "the default image's kernel ({}) does not build in {} (vmtest boots it without an \
             initramfs, mounts the root over 9p and reaches qemu-guest-agent over virtio-serial)",
            kernel.package,
            missing.join(", ")
        ));
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(problem) = host_problem(
        &cpuinfo,
        Path::new("/dev/kvm").exists(),
        find_tool("qemu-ga").is_some(),
    ) {
        return Err(problem);
    }
    let vmtest = install(printer, root)?;
    let work = root.join("target/agentvm/peers/vmtest");
    std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;

    let runs = if quick { 1 } else { 3 };
    let mut one = Vec::new();
    for i in 0..runs {
        printer.note(format!("one command in a fresh VM, {}/{runs}", i + 1));
        let config = write_config(&work, "one.toml", &kernel.vmlinuz, 1)?;
        let (wall, targets) = run(&vmtest, &config)?;
        check(&targets, 1)?;
        one.push(wall * 1000.0);
    }
    printer.note(format!("suite: {SUITE_COMMANDS} commands, a fresh VM each"));
    let config = write_config(&work, "suite.toml", &kernel.vmlinuz, SUITE_COMMANDS)?;
    let (suite_wall_s, targets) = run(&vmtest, &config)?;
    check(&targets, SUITE_COMMANDS)?;
    if quick {
        // One more sample per target of the suite: each is a fresh VM.
        one.extend(targets.iter().map(|t| t.ms));
    }
    Ok(VmtestRows {
        version: VERSION.into(),
        kernel: format!("{} ({})", kernel.package, kernel.release),
        accelerator: "tcg".into(),
        guest_memory: GUEST_MEMORY.into(),
        guest_vcpus: 1,
        one_command_ms: Summary::of(&one).ok_or("no samples")?,
        one_command_vs_agentvm: None,
        suite_commands: SUITE_COMMANDS,
        suite_wall_s: round3(suite_wall_s),
        suite_vs_agentvm: None,
    })
}

/// agentvm's default profile.
const GUEST_MEMORY: &str = "256M";

/// vmtest's config: `n` targets on `kernel`, each running `true`.
pub fn config_toml(kernel: &Path, n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let _ = write!(
            out,
            "[[target]]\nname = \"cmd{i:02}\"\nkernel = {kernel:?}\ncommand = \"true\"\n\
             [target.vm]\nnum_cpus = 1\nmemory = \"{GUEST_MEMORY}\"\n\n",
            kernel = kernel.display().to_string()
        );
    }
    out
}

fn write_config(dir: &Path, name: &str, kernel: &Path, n: usize) -> Result<PathBuf, String> {
    let path = dir.join(name);
    std::fs::write(&path, config_toml(kernel, n))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// One target of a vmtest run, as its output shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetRun {
    pub name: String,
    /// From its `=> name` line to its `PASS`/`FAILED` line.
    pub ms: f64,
    pub passed: bool,
}

/// Reads vmtest's plain output (`VMTEST_NO_UI`), each line with the ms at
/// which it arrived: `=> name` starts a target, `PASS`/`FAILED` ends it.
pub fn parse_output(lines: &[(f64, String)]) -> Vec<TargetRun> {
    let mut out = Vec::new();
    let mut current: Option<(String, f64)> = None;
    for (t, line) in lines {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix("=> ") {
            current = Some((name.to_string(), *t));
        } else if line == "PASS" || line == "FAILED" {
            if let Some((name, start)) = current.take() {
                out.push(TargetRun {
                    name,
                    ms: t - start,
                    passed: line == "PASS",
                });
            }
        }
    }
    out
}

fn check(targets: &[TargetRun], n: usize) -> Result<(), String> {
    let passed = targets.iter().filter(|t| t.passed).count();
    if passed == n {
        Ok(())
    } else {
        Err(format!(
            "vmtest ran {} of {n} targets, {passed} passed; its output is in target/agentvm/peers/vmtest/",
            targets.len()
        ))
    }
}

/// Runs `vmtest -c config`; its wall time (s) and its targets.
fn run(vmtest: &Path, config: &Path) -> Result<(f64, Vec<TargetRun>), String> {
    let log = config.with_extension("log");
    let started = Instant::now();
    let mut child = Command::new(vmtest)
        .arg("-c")
        .arg(config)
        .current_dir(config.parent().unwrap_or(Path::new(".")))
        .env("VMTEST_NO_UI", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", vmtest.display()))?;
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.map_err(|e| e.to_string())?;
        lines.push((started.elapsed().as_secs_f64() * 1000.0, line));
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let wall = started.elapsed().as_secs_f64();
    let text: String = lines
        .iter()
        .map(|(t, l)| format!("{t:9.0} {l}\n"))
        .collect();
    let _ = std::fs::write(&log, text);
    let targets = parse_output(&lines);
    if !status.success() && targets.is_empty() {
        return Err(format!(
            "vmtest failed ({status}); its output is in {}",
            log.display()
        ));
    }
    Ok((wall, targets))
}

/// The installed vmtest, installed first when missing or of another version.
fn install(printer: &Printer, root: &Path) -> Result<PathBuf, String> {
    let prefix = root.join("target/agentvm/peers");
    let bin = prefix.join("bin/vmtest");
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if installed.as_deref().map(str::trim) == Some(&format!("vmtest {VERSION}")) {
        return Ok(bin);
    }
    printer.note(format!(
        "cargo install vmtest@{VERSION} --root {} (once; a few minutes)",
        prefix.display()
    ));
    let started = Instant::now();
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["install", "--locked", "--quiet", "vmtest", "--version"])
        .arg(format!("={VERSION}"))
        .arg("--root")
        .arg(&prefix)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("starting cargo install: {e}"))?;
    if !status.success() {
        return Err(format!("cargo install vmtest@{VERSION} failed ({status})"));
    }
    printer.note(format!(
        "vmtest installed in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_requirements() {
        let debian_cloud = "CONFIG_VIRTIO=m\nCONFIG_VIRTIO_PCI=m\nCONFIG_VIRTIO_CONSOLE=m\n\
                            # CONFIG_NET_9P is not set\nCONFIG_SERIAL_8250=y\n";
        assert_eq!(missing_builtins(debian_cloud), REQUIRED_BUILTIN);
        let all: String = REQUIRED_BUILTIN
            .iter()
            .map(|o| format!("{o}=y\n"))
            .collect();
        assert!(missing_builtins(&all).is_empty());
        // CONFIG_VIRTIO=y must not be read as CONFIG_VIRTIO_PCI=y.
        assert_eq!(
            missing_builtins("CONFIG_VIRTIO=y\nCONFIG_VIRTIO_PCI_LIB=y\n")[0],
            "CONFIG_VIRTIO_PCI"
        );
    }

    #[test]
    fn host_problems() {
        let no_virt = "flags\t: fpu sse2 avx\n";
        let vmx = "flags\t: fpu vmx sse2\n";
        assert!(host_problem(no_virt, true, true)
            .unwrap()
            .contains("/dev/kvm"));
        assert_eq!(host_problem(vmx, true, true), None);
        assert_eq!(host_problem(no_virt, false, true), None);
        assert!(host_problem(vmx, true, false)
            .unwrap()
            .contains("qemu-guest-agent"));
    }

    #[test]
    fn the_default_images_kernel() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Kernel::of_default_image(dir.path())
            .unwrap_err()
            .contains("build-image"));
        let image = dir.path().join("target/agentvm/images/default");
        std::fs::create_dir_all(&image).unwrap();
        std::fs::write(
            image.join("manifest.json"),
            r#"{"kernel": {"package": "linux-image-6.1.0-57-cloud-amd64", "version": "6.1.192-3",
                "release": "6.1.0-57-cloud-amd64"}, "vmlinuz": {"file": "vmlinuz"}}"#,
        )
        .unwrap();
        let k = Kernel::of_default_image(dir.path()).unwrap();
        assert_eq!(k.vmlinuz, image.join("vmlinuz"));
        assert_eq!(k.config, None);
        let boot = dir
            .path()
            .join("target/agentvm/cache/kernel/linux-image-6.1.0-57-cloud-amd64_6.1.192-3/boot");
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::write(boot.join("config-6.1.0-57-cloud-amd64"), "").unwrap();
        let k = Kernel::of_default_image(dir.path()).unwrap();
        assert_eq!(k.config, Some(boot.join("config-6.1.0-57-cloud-amd64")));
    }

    #[test]
    fn config_file() {
        let toml = config_toml(Path::new("/k/vmlinuz"), 2);
        assert_eq!(toml.matches("[[target]]").count(), 2);
        assert!(toml.contains("name = \"cmd01\""));
        assert!(toml.contains("kernel = \"/k/vmlinuz\""));
        assert!(toml.contains("memory = \"256M\""));
    }

    #[test]
    fn output_is_timed_per_target() {
        let lines: Vec<(f64, String)> = [
            (0.0, "=> cmd00"),
            (10.0, "===> Booting"),
            (13800.0, "PASS"),
            (13801.0, "=> cmd01"),
            (20000.0, "===> Running command"),
            (27000.0, "Command failed with exit code: 1"),
            (27001.0, "FAILED"),
            (27002.0, "=> cmd02"),
        ]
        .iter()
        .map(|(t, l)| (*t, l.to_string()))
        .collect();
        let runs = parse_output(&lines);
        assert_eq!(
            runs,
            [
                TargetRun {
                    name: "cmd00".into(),
                    ms: 13800.0,
                    passed: true
                },
                TargetRun {
                    name: "cmd01".into(),
                    ms: 13200.0,
                    passed: false
                },
            ]
        );
        assert!(check(&runs, 2).unwrap_err().contains("1 passed"));
        assert!(check(&runs[..1], 1).is_ok());
    }

    #[test]
    fn compares_with_agentvm() {
        let mut rows = VmtestRows {
            version: VERSION.into(),
            kernel: "k".into(),
            accelerator: "tcg".into(),
            guest_memory: GUEST_MEMORY.into(),
            guest_vcpus: 1,
            one_command_ms: Summary::of(&[13800.0]).unwrap(),
            one_command_vs_agentvm: None,
            suite_commands: 10,
            suite_wall_s: 138.0,
            suite_vs_agentvm: None,
        };
        rows.compare(&Agentvm {
            exec_true_ms: Some(10.0),
            revert_ms: Some(90.0),
            cold_boot_ready_ms: Some(2300.0),
            cold_boot_to_hello_ms: Some(2290.0),
            ..Agentvm::default()
        });
        assert_eq!(rows.one_command_vs_agentvm.as_ref().unwrap().ratio, 6.0);
        // 138 s vs 2.3 s + 10 × 0.1 s
        assert_eq!(rows.suite_vs_agentvm.as_ref().unwrap().ratio, 41.82);
        let table = rows.render();
        assert!(
            table.contains("13.80 s") && table.contains("138.00 s"),
            "{table}"
        );
    }
}
