//! vmtest (crates.io), a QEMU-based "run this command in a VM" runner: each
//! target boots a fresh VM whose root file system is the host's, shared
//! over 9p, and runs its command through qemu-guest-agent.
//!
//! Installed with `cargo install vmtest --root target/agentvm/peers` (once:
//! kept while the binary reports [`VERSION`]; a `--quick` run does not
//! install it) and run under TCG like our VMs, on the kernel of our default
//! image when it builds in what vmtest needs (9p, virtio-pci,
//! virtio-console). Debian's cloud kernel does not (no 9p at all, virtio as
//! modules), so the bench takes the same release's generic flavour
//! (`apt-get download`, cached under `target/agentvm/cache/peers/`) and
//! gives it a small initramfs that loads those modules, mounts vmtest's 9p
//! root and hands over to vmtest's init.
//!
//! vmtest uses KVM whenever /dev/kvm exists; where that device cannot run
//! guests (no vmx/svm: agentvm's own detection), vmtest is given a QEMU
//! wrapper that drops `-enable-kvm` and `-cpu host`. As vmtest does by
//! design, its guest shares the host's root file system over 9p.

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

/// Modules the initramfs loads, in dependency order (as the generic
/// Debian 6.1 kernel's `depends=` fields give it).
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
];

/// The initramfs's /init: load the modules, mount vmtest's 9p root (tag
/// `/dev/root`, its `rootflags=`) and run its `init=` there.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules); do
    $B insmod "/lib/modules/$m.ko" || echo "initramfs: insmod $m failed"
done
opts=trans=virtio
init=/sbin/init
for a in $($B cat /proc/cmdline); do
    case "$a" in
        rootflags=*) opts="${a#rootflags=}" ;;
        init=*) init="${a#init=}" ;;
    esac
done
$B mount -t 9p -o "$opts" /dev/root /newroot || echo "initramfs: mounting the 9p root failed"
$B umount /dev
$B umount /proc
exec $B switch_root /newroot "$init"
"#;

/// The QEMU wrapper for hosts whose /dev/kvm cannot run guests.
pub const QEMU_TCG_WRAPPER: &str = r#"#!/bin/bash
# vmtest asks for KVM whenever /dev/kvm exists; this host's cannot run
# guests, so run under TCG (written by cargo xtask bench).
args=()
prev=
for a in "$@"; do
    if [ "$a" = "-enable-kvm" ]; then continue; fi
    if [ "$prev" = "-cpu" ] && [ "$a" = "host" ]; then a=max; fi
    args+=("$a")
    prev=$a
done
exec qemu-system-x86_64 -accel tcg "${args[@]}"
"#;

/// The vmtest rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmtestRows {
    pub version: String,
    /// The kernel booted (package and version) and how.
    pub kernel: String,
    pub accelerator: String,
    /// Guest size given to vmtest (agentvm's default profile).
    pub guest_memory: String,
    pub guest_vcpus: u32,
    /// One command (`true`) in a fresh VM: start of vmtest to its exit
    /// (full runs add the suite's targets, each its own VM).
    pub one_command_ms: Summary,
    pub one_command_vs_agentvm: Option<Ratio>,
    /// A suite of [`SUITE_COMMANDS`] targets, each a fresh VM, one vmtest
    /// run (`null` in `--quick` runs: 10 VMs take minutes under TCG).
    pub suite: Option<VmtestSuite>,
}

/// The suite row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmtestSuite {
    pub commands: usize,
    pub wall_s: f64,
    pub vs_agentvm: Option<Ratio>,
}

impl VmtestRows {
    pub fn compare(&mut self, a: &Agentvm) {
        self.one_command_vs_agentvm = Ratio::of(
            self.one_command_ms.p50,
            a.fresh_vm_and_exec_ms(),
            "cold_boot.to_hello_ms.p50 + exec_true_ms.p50 (a fresh VM and one command)",
        );
        if let Some(s) = &mut self.suite {
            s.vs_agentvm = Ratio::of(
                s.wall_s * 1000.0,
                a.serial_commands_ms(s.commands),
                &format!(
                    "cold_boot.ready_ms.p50 + {} × (exec_true_ms.p50 + revert.total_ms.p50), in ms",
                    s.commands
                ),
            );
        }
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
        match &self.suite {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "{:<44} {:>5} {:>10} {:>10}  {}",
                    format!("   suite: {} commands, a VM each", s.commands),
                    s.commands,
                    format!("{:.2} s", s.wall_s),
                    "",
                    Ratio::show(&s.vs_agentvm),
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "   suite of {SUITE_COMMANDS} commands: full runs only (minutes under TCG)"
                );
            }
        }
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
    pub version: String,
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
            version,
            release,
            config: config.exists().then_some(config),
        })
    }
}

/// Whether /dev/kvm exists but cannot run guests (`cpuinfo`: the text of
/// /proc/cpuinfo, without vmx/svm): vmtest would use it and hang.
pub fn kvm_unusable(cpuinfo: &str, dev_kvm: bool) -> bool {
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    dev_kvm && !virt
}

/// The generic flavour of a Debian cloud kernel package
/// (`linux-image-6.1.0-57-cloud-amd64` → `linux-image-6.1.0-57-amd64`).
pub fn generic_flavour(package: &str) -> Option<String> {
    package
        .contains("-cloud-")
        .then(|| package.replacen("-cloud-", "-", 1))
}

/// Options of [`REQUIRED_BUILTIN`] that `config` has neither built in nor
/// as a module.
pub fn missing_entirely(config: &str) -> Vec<&'static str> {
    REQUIRED_BUILTIN
        .iter()
        .copied()
        .filter(|opt| {
            !config.lines().any(|l| {
                matches!(
                    l.strip_prefix(opt).and_then(|r| r.strip_prefix('=')),
                    Some("y" | "m")
                )
            })
        })
        .collect()
}

/// What vmtest boots.
#[derive(Debug, Clone, PartialEq)]
struct Boot {
    vmlinuz: PathBuf,
    initrd: Option<PathBuf>,
    description: String,
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
    if find_tool("qemu-ga").is_none() {
        return Err("no qemu-ga on the host (vmtest's guest runs the host's): \
                    apt-get install qemu-guest-agent (scripts/install-deps.sh does)"
            .into());
    }
    let vmtest = install(printer, root, !quick)?;
    let kernel = Kernel::of_default_image(root)?;
    let config = kernel.config.as_ref().ok_or_else(|| {
        format!(
            "the .config of {} is not in the image build's cache \
             (target/agentvm/cache/kernel); rebuild the image: cargo xtask build-image",
            kernel.package
        )
    })?;
    let missing = missing_builtins(&std::fs::read_to_string(config).map_err(|e| e.to_string())?);
    let boot = if missing.is_empty() {
        Boot {
            vmlinuz: kernel.vmlinuz.clone(),
            initrd: None,
            description: format!(
                "{} {} (the default image's kernel)",
                kernel.package, kernel.version
            ),
        }
    } else {
        let generic = generic_flavour(&kernel.package).ok_or_else(|| {
            format!(
                "the default image's kernel ({}) does not build in {} and has no generic \
                 flavour to fall back on",
                kernel.package,
                missing.join(", ")
            )
        })?;
        printer.note(format!(
            "{} does not build in {}: booting {generic} {} with an initramfs that loads them",
            kernel.package,
            missing.join(", "),
            kernel.version
        ));
        let (vmlinuz, initrd) = generic_kernel(printer, root, &generic, &kernel.version)?;
        Boot {
            vmlinuz,
            initrd: Some(initrd),
            description: format!(
                "{generic} {} (the generic flavour of the default image's {}, which does not \
                 build in {}; an initramfs loads them)",
                kernel.version,
                kernel.package,
                missing.join(", ")
            ),
        }
    };
    let work = root.join("target/agentvm/peers/vmtest");
    std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let tcg_wrapper = kvm_unusable(&cpuinfo, Path::new("/dev/kvm").exists());
    let qemu = if tcg_wrapper {
        let path = work.join("qemu-tcg");
        write_executable(&path, QEMU_TCG_WRAPPER)?;
        Some(path)
    } else {
        None
    };
    let accelerator = if tcg_wrapper || !Path::new("/dev/kvm").exists() {
        "tcg"
    } else {
        "kvm"
    };

    let runs = 3;
    let mut one = Vec::new();
    for i in 0..runs {
        printer.note(format!("one command in a fresh VM, {}/{runs}", i + 1));
        let config = write_config(&work, "one.toml", &boot, qemu.as_deref(), 1)?;
        let (wall, targets) = run(&vmtest, &config)?;
        check(&targets, 1, &config)?;
        one.push(wall * 1000.0);
        printer.note(format!("{:.1} s", wall));
    }
    let suite = if quick {
        None
    } else {
        printer.note(format!("suite: {SUITE_COMMANDS} commands, a fresh VM each"));
        let config = write_config(&work, "suite.toml", &boot, qemu.as_deref(), SUITE_COMMANDS)?;
        let (wall_s, targets) = run(&vmtest, &config)?;
        check(&targets, SUITE_COMMANDS, &config)?;
        // Each target is a fresh VM too: more samples of the first row.
        one.extend(targets.iter().map(|t| t.ms));
        printer.note(format!("{wall_s:.1} s"));
        Some(VmtestSuite {
            commands: SUITE_COMMANDS,
            wall_s: round3(wall_s),
            vs_agentvm: None,
        })
    };
    Ok(VmtestRows {
        version: VERSION.into(),
        kernel: boot.description,
        accelerator: accelerator.into(),
        guest_memory: GUEST_MEMORY.into(),
        guest_vcpus: 1,
        one_command_ms: Summary::of(&one).ok_or("no samples")?,
        one_command_vs_agentvm: None,
        suite,
    })
}

fn write_executable(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// The generic kernel `package`=`version` and its initramfs, cached under
/// `target/agentvm/cache/peers/`: `(vmlinuz, initramfs)`.
fn generic_kernel(
    printer: &Printer,
    root: &Path,
    package: &str,
    version: &str,
) -> Result<(PathBuf, PathBuf), String> {
    let dir = root
        .join("target/agentvm/cache/peers")
        .join(format!("vmtest-{package}_{version}"));
    let (vmlinuz, initrd) = (dir.join("vmlinuz"), dir.join("initramfs.cpio"));
    if dir.join(".complete").exists() {
        return Ok((vmlinuz, initrd));
    }
    printer.note(format!("apt-get download {package}={version} (once)"));
    let _ = std::fs::remove_dir_all(&dir);
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let result = (|| {
        sh(Command::new("apt-get")
            .args(["download", "-q"])
            .arg(format!("{package}={version}"))
            .current_dir(&tmp))?;
        let deb = std::fs::read_dir(&tmp)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or("apt-get download produced no .deb")?;
        let unpacked = tmp.join("root");
        sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
        let boot = unpacked.join("boot");
        let find_boot = |prefix: &str| {
            std::fs::read_dir(&boot)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
                })
        };
        let config = find_boot("config-").ok_or("the package has no boot/config-*")?;
        let missing =
            missing_entirely(&std::fs::read_to_string(&config).map_err(|e| e.to_string())?);
        if !missing.is_empty() {
            return Err(format!("{package} has no {} at all", missing.join(", ")));
        }
        std::fs::copy(
            find_boot("vmlinuz-").ok_or("the package has no boot/vmlinuz-*")?,
            &vmlinuz,
        )
        .map_err(|e| e.to_string())?;
        let ir = tmp.join("initramfs");
        for d in ["bin", "lib/modules", "proc", "dev", "newroot"] {
            std::fs::create_dir_all(ir.join(d)).map_err(|e| e.to_string())?;
        }
        let busybox = find_tool("busybox").ok_or("no busybox: apt-get install busybox-static")?;
        std::fs::copy(busybox, ir.join("bin/busybox")).map_err(|e| e.to_string())?;
        let modules = unpacked.join("lib/modules");
        let mut loaded = Vec::new();
        for m in MODULES {
            // Built-in ones have no file; a module compressed with xz
            // would need an insmod that reads it: not supported here.
            if let Some(file) = find_file(&modules, &format!("{m}.ko")) {
                std::fs::copy(file, ir.join(format!("lib/modules/{m}.ko")))
                    .map_err(|e| e.to_string())?;
                loaded.push(*m);
            }
        }
        std::fs::write(ir.join("modules"), loaded.join("\n") + "\n").map_err(|e| e.to_string())?;
        write_executable(&ir.join("init"), INIT_SCRIPT)?;
        let cpio = std::fs::File::create(&initrd).map_err(|e| e.to_string())?;
        sh(Command::new("sh")
            .args(["-c", "find . | cpio -o -H newc --quiet"])
            .current_dir(&ir)
            .stdout(cpio))?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    std::fs::write(dir.join(".complete"), "").map_err(|e| e.to_string())?;
    Ok((vmlinuz, initrd))
}

/// The first file named `name` below `dir`.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

/// Runs a command; an error with its stderr when it fails.
fn sh(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("starting {shown}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// agentvm's default profile.
const GUEST_MEMORY: &str = "256M";

/// vmtest's config: `n` targets booting `boot`, each running `true`.
fn config_toml(boot: &Boot, qemu: Option<&Path>, n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let _ = writeln!(out, "[[target]]\nname = \"cmd{i:02}\"");
        let _ = writeln!(out, "kernel = {:?}", boot.vmlinuz.display().to_string());
        let _ = writeln!(out, "command = \"true\"");
        if let Some(q) = qemu {
            let _ = writeln!(out, "qemu_command = {:?}", q.display().to_string());
        }
        let _ = writeln!(
            out,
            "[target.vm]\nnum_cpus = 1\nmemory = \"{GUEST_MEMORY}\""
        );
        if let Some(initrd) = &boot.initrd {
            let _ = writeln!(
                out,
                "extra_args = [\"-initrd\", {:?}]",
                initrd.display().to_string()
            );
        }
        out.push('\n');
    }
    out
}

fn write_config(
    dir: &Path,
    name: &str,
    boot: &Boot,
    qemu: Option<&Path>,
    n: usize,
) -> Result<PathBuf, String> {
    let path = dir.join(name);
    std::fs::write(&path, config_toml(boot, qemu, n))
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

fn check(targets: &[TargetRun], n: usize, config: &Path) -> Result<(), String> {
    let passed = targets.iter().filter(|t| t.passed).count();
    if passed == n {
        Ok(())
    } else {
        Err(format!(
            "vmtest ran {} of {n} targets, {passed} passed; its output is in {}",
            targets.len(),
            config.with_extension("log").display()
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

/// The installed vmtest, installed first (when `may_install`) if missing
/// or of another version.
fn install(printer: &Printer, root: &Path, may_install: bool) -> Result<PathBuf, String> {
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
    if !may_install {
        return Err(format!(
            "vmtest {VERSION} is not installed under {} and a --quick run does not install it \
             (a full `cargo xtask bench` does: cargo install vmtest, a few minutes on 2 cores)",
            prefix.display()
        ));
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
    fn kvm_that_cannot_run_guests() {
        let no_virt = "flags\t: fpu sse2 avx\n";
        let vmx = "flags\t: fpu vmx sse2\n";
        assert!(kvm_unusable(no_virt, true));
        assert!(!kvm_unusable(vmx, true));
        assert!(!kvm_unusable(no_virt, false));
    }

    #[test]
    fn generic_flavour_and_modules() {
        assert_eq!(
            generic_flavour("linux-image-6.1.0-57-cloud-amd64").as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(generic_flavour("linux-image-6.1.0-57-amd64"), None);
        let generic: String = REQUIRED_BUILTIN
            .iter()
            .map(|o| format!("{o}=m\n"))
            .collect();
        assert!(missing_entirely(&generic).is_empty());
        assert_eq!(missing_builtins(&generic), REQUIRED_BUILTIN);
        assert_eq!(
            missing_entirely("CONFIG_VIRTIO=m\n").len(),
            REQUIRED_BUILTIN.len() - 1
        );
        // Every module a 9p root needs is loaded, dependencies first.
        let pos = |m| MODULES.iter().position(|x| *x == m).unwrap();
        assert!(pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_pci"));
        assert!(pos("netfs") < pos("fscache") && pos("fscache") < pos("9p"));
        assert!(pos("9pnet") < pos("9pnet_virtio") && pos("9pnet_virtio") < pos("9p"));
        assert!(INIT_SCRIPT.contains("switch_root /newroot \"$init\""));
        assert!(
            QEMU_TCG_WRAPPER.contains("-enable-kvm") && QEMU_TCG_WRAPPER.contains("-accel tcg")
        );
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
        let mut boot = Boot {
            vmlinuz: "/k/vmlinuz".into(),
            initrd: None,
            description: String::new(),
        };
        let toml = config_toml(&boot, None, 2);
        assert_eq!(toml.matches("[[target]]").count(), 2);
        assert!(toml.contains("name = \"cmd01\""));
        assert!(toml.contains("kernel = \"/k/vmlinuz\""));
        assert!(toml.contains("memory = \"256M\""));
        assert!(!toml.contains("qemu_command") && !toml.contains("-initrd"));
        boot.initrd = Some("/k/initramfs.cpio".into());
        let toml = config_toml(&boot, Some(Path::new("/w/qemu-tcg")), 1);
        assert!(toml.contains("qemu_command = \"/w/qemu-tcg\""), "{toml}");
        assert!(
            toml.contains("extra_args = [\"-initrd\", \"/k/initramfs.cpio\"]"),
            "{toml}"
        );
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
        let config = Path::new("/w/suite.toml");
        assert!(check(&runs, 2, config).unwrap_err().contains("1 passed"));
        assert!(check(&runs[..1], 1, config).is_ok());
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
            suite: Some(VmtestSuite {
                commands: 10,
                wall_s: 138.0,
                vs_agentvm: None,
            }),
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
        let suite = rows.suite.as_ref().unwrap();
        assert_eq!(suite.vs_agentvm.as_ref().unwrap().ratio, 41.82);
        let table = rows.render();
        assert!(
            table.contains("13.80 s") && table.contains("138.00 s"),
            "{table}"
        );
        rows.suite = None;
        assert!(rows.render().contains("full runs only"));
    }
}
