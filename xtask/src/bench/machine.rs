//! What the benchmark ran on: CPUs, memory, kernel, QEMU, git commit.
//! (The accelerator comes from the measuring program, which asks the runtime.)

use std::path::Path;
use std::process::Command;

use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub hostname: String,
    /// Online CPUs (`nproc`).
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_total_mib: u64,
    pub kernel: String,
    /// `/proc/loadavg` (1, 5, 15 min) when the run started and ended: other
    /// work on the machine skews the numbers.
    pub loadavg_start: Vec<f64>,
    pub loadavg_end: Vec<f64>,
    /// `kvm` or `tcg`, as the runtime's automatic detection (or
    /// `AGENT_VM_ACCEL`) decided.
    pub accelerator: String,
    pub accelerator_reason: String,
    /// Host–guest control channel (`virtio-serial`, `vsock`).
    pub transport: String,
    /// First line of `qemu-system-x86_64 --version`.
    pub qemu_version: String,
    pub git_commit: String,
    /// Uncommitted changes in the work tree.
    pub git_dirty: bool,
}

impl Machine {
    /// Everything but the accelerator and transport.
    pub fn detect(root: &Path) -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(root)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let qemu_version = Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .ok()
            .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "qemu-system-x86_64 not found".into());
        Self {
            hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
            nproc: std::thread::available_parallelism().map_or(1, Into::into),
            cpu_model: cpu_model(&read("/proc/cpuinfo")).unwrap_or_else(|| "unknown".into()),
            memory_total_mib: mem_total_kib(&read("/proc/meminfo")).unwrap_or(0) / 1024,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            loadavg_start: loadavg(&read("/proc/loadavg")),
            loadavg_end: Vec::new(),
            accelerator: String::new(),
            accelerator_reason: String::new(),
            transport: String::new(),
            qemu_version,
            git_commit: git(&["rev-parse", "HEAD"])
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|| "unknown".into()),
            git_dirty: git(&["status", "--porcelain", "--untracked-files=normal"])
                .is_some_and(|s| !s.trim().is_empty()),
        }
    }

    pub fn finish(&mut self) {
        self.loadavg_end = loadavg(&std::fs::read_to_string("/proc/loadavg").unwrap_or_default());
    }
}

pub fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().trim().to_string()
}

/// The first `model name` of `/proc/cpuinfo`.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string())
    })
}

/// `MemTotal` of `/proc/meminfo`, in KiB.
pub fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The three load averages of `/proc/loadavg`.
pub fn loadavg(text: &str) -> Vec<f64> {
    text.split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor : 0\n"), None);
        assert_eq!(
            mem_total_kib("MemTotal:       24567892 kB\nMemFree: 1 kB\n"),
            Some(24_567_892)
        );
        assert_eq!(loadavg("1.87 1.78 2.88 3/120 3071\n"), [1.87, 1.78, 2.88]);
        assert_eq!(
            first_line("QEMU emulator version 10.0.2 (Debian)\nCopyright\n"),
            "QEMU emulator version 10.0.2 (Debian)"
        );
    }
}
