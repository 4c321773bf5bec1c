//! Host memory of the whole benchmark run: a thread samples `/proc` every
//! [`INTERVAL`] and follows this process and all its descendants (the
//! measuring program, the suite's test binaries, and every QEMU they start),
//! plus the QEMUs libvirtd runs for them (children of the daemon, found by
//! their domain name `agentvm-<owner pid>-<n>`).
//!
//! * the peak of the summed `VmRSS` of the whole tree, and of the QEMU
//!   processes alone (both overall and per phase);
//! * each QEMU process's `VmHWM` (its own peak RSS; the kernel keeps it, so a
//!   sample shortly before the process exits is exact up to the last
//!   [`INTERVAL`]);
//! * the `VmHWM` of the other processes, by name.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often `/proc` is read.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// One line of `/proc/<pid>/stat`: `(pid, comm, ppid)`. The name may
/// contain spaces and parentheses, so it is taken up to the *last* `)`.
pub fn parse_stat(stat: &str) -> Option<(u32, String, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let pid = stat[..open].trim().parse().ok()?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut rest = stat[close + 1..].split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((pid, comm, ppid))
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `root` and every process below it, given `(pid, ppid)` pairs.
pub fn descendants(parents: &[(u32, u32)], root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(pid, ppid) in parents {
        if pid != ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        for &kid in children.get(&tree[i]).into_iter().flatten() {
            if !tree.contains(&kid) {
                tree.push(kid);
            }
        }
        i += 1;
    }
    tree
}

/// The owner pid in a libvirt QEMU's command line (`-name guest=agentvm-<pid>-<n>,...`,
/// NUL-separated as in `/proc/<pid>/cmdline`).
pub fn libvirt_owner(cmdline: &str) -> Option<u32> {
    let rest = cmdline.split_once("guest=agentvm-")?.1;
    let (pid, rest) = rest.split_once('-')?;
    rest.starts_with(|c: char| c.is_ascii_digit())
        .then(|| pid.parse().ok())
        .flatten()
}

/// Whether a process name (`comm`, at most 15 bytes) is a QEMU system emulator.
pub fn is_qemu(comm: &str) -> bool {
    comm.starts_with("qemu-system")
}

/// Peaks seen during one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhasePeak {
    /// Summed `VmRSS` of the whole process tree.
    pub total_rss_kib: u64,
    /// Summed `VmRSS` of the QEMU processes.
    pub qemu_rss_kib: u64,
    /// Most QEMU processes alive at once.
    pub qemu_processes: usize,
}

/// One QEMU process seen during the run.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuSeen {
    /// Its `VmHWM` when last sampled.
    pub hwm_kib: u64,
    /// The phase it was first seen in.
    pub phase: String,
}

/// What the sampler found.
#[derive(Debug, Clone, Default)]
pub struct MemoryStats {
    pub samples: u64,
    pub peak: PhasePeak,
    pub phases: BTreeMap<String, PhasePeak>,
    pub qemu: BTreeMap<u32, QemuSeen>,
    /// Highest `VmHWM` of the non-QEMU processes, by name.
    pub others_hwm_kib: BTreeMap<String, u64>,
}

impl MemoryStats {
    fn record(&mut self, phase: &str, procs: &[Sampled]) {
        self.samples += 1;
        let mut now = PhasePeak::default();
        for p in procs {
            now.total_rss_kib += p.rss_kib;
            if is_qemu(&p.comm) {
                now.qemu_rss_kib += p.rss_kib;
                now.qemu_processes += 1;
                let seen = self.qemu.entry(p.pid).or_insert_with(|| QemuSeen {
                    hwm_kib: 0,
                    phase: phase.to_string(),
                });
                seen.hwm_kib = seen.hwm_kib.max(p.hwm_kib);
            } else {
                let hwm = self.others_hwm_kib.entry(p.comm.clone()).or_default();
                *hwm = (*hwm).max(p.hwm_kib);
            }
        }
        for peak in [
            &mut self.peak,
            self.phases.entry(phase.to_string()).or_default(),
        ] {
            peak.total_rss_kib = peak.total_rss_kib.max(now.total_rss_kib);
            peak.qemu_rss_kib = peak.qemu_rss_kib.max(now.qemu_rss_kib);
            peak.qemu_processes = peak.qemu_processes.max(now.qemu_processes);
        }
    }
}

struct Sampled {
    pid: u32,
    comm: String,
    rss_kib: u64,
    hwm_kib: u64,
}

/// Reads the process tree under `root` from `/proc`.
fn sample_tree(root: u32) -> Vec<Sampled> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parents = Vec::new();
    let mut names = HashMap::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((pid, comm, ppid)) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            parents.push((pid, ppid));
            names.insert(pid, comm);
        }
    }
    let mut ours = descendants(&parents, root);
    let libvirt_qemus: Vec<u32> = names
        .iter()
        .filter(|(pid, comm)| is_qemu(comm) && !ours.contains(pid))
        .filter_map(|(&pid, _)| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let owner = libvirt_owner(&String::from_utf8_lossy(&cmdline))?;
            ours.contains(&owner).then_some(pid)
        })
        .collect();
    ours.extend(libvirt_qemus);
    ours.into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            Some(Sampled {
                pid,
                comm: names.remove(&pid).unwrap_or_default(),
                rss_kib: status_kib(&status, "VmRSS").unwrap_or(0),
                hwm_kib: status_kib(&status, "VmHWM").unwrap_or(0),
            })
        })
        .collect()
}

/// The sampling thread. [`Sampler::finish`] stops it and returns the stats.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    phase: Arc<Mutex<String>>,
    thread: JoinHandle<MemoryStats>,
}

impl Sampler {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(Mutex::new(String::from("start")));
        let thread = {
            let stop = Arc::clone(&stop);
            let phase = Arc::clone(&phase);
            std::thread::Builder::new()
                .name("rss-sampler".into())
                .spawn(move || {
                    let root = std::process::id();
                    let mut stats = MemoryStats::default();
                    loop {
                        let current = phase.lock().map(|p| p.clone()).unwrap_or_default();
                        stats.record(&current, &sample_tree(root));
                        if stop.load(Ordering::Relaxed) {
                            return stats;
                        }
                        std::thread::sleep(INTERVAL);
                    }
                })
                .expect("spawning the memory sampler")
        };
        Self {
            stop,
            phase,
            thread,
        }
    }

    /// Attributes the following samples to `phase`.
    pub fn set_phase(&self, phase: &str) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase.to_string();
        }
    }

    pub fn finish(self) -> MemoryStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_owners() {
        let cmdline =
            "/usr/bin/qemu-system-x86_64\0-name\0guest=agentvm-4242-3,debug-threads=on\0-S";
        assert_eq!(libvirt_owner(cmdline), Some(4242));
        assert_eq!(libvirt_owner("qemu\0-name\0guest=other-1-2"), None);
        assert_eq!(libvirt_owner("qemu\0-name\0guest=agentvm-x-2"), None);
        assert_eq!(libvirt_owner("qemu\0-name\0guest=agentvm-12-"), None);
    }

    #[test]
    fn stat_lines() {
        assert_eq!(
            parse_stat("123 (qemu-system-x86) S 45 123 7 0 -1"),
            Some((123, "qemu-system-x86".to_string(), 45))
        );
        assert_eq!(
            parse_stat("9 (a (weird) name) R 1 9"),
            Some((9, "a (weird) name".to_string(), 1))
        );
        assert_eq!(parse_stat("garbage"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        let (pid, _, ppid) = parse_stat(&own).unwrap();
        assert_eq!(pid, std::process::id());
        assert!(ppid > 0);
    }

    #[test]
    fn status_fields() {
        let status = "Name:\tqemu\nVmHWM:\t  251924 kB\nVmRSS:\t  200000 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(251_924));
        assert_eq!(status_kib(status, "VmRSS"), Some(200_000));
        assert_eq!(status_kib(status, "VmSwap"), None);
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status_kib(&own, "VmHWM").unwrap() > 0);
    }

    #[test]
    fn process_trees() {
        let parents = [
            (1, 0),
            (10, 1),
            (11, 10),
            (12, 10),
            (13, 11),
            (20, 1),
            (21, 20),
        ];
        let mut tree = descendants(&parents, 10);
        tree.sort_unstable();
        assert_eq!(tree, [10, 11, 12, 13]);
        assert_eq!(descendants(&parents, 99), [99]);
    }

    #[test]
    fn stats_keep_peaks_per_phase() {
        let proc = |pid, comm: &str, rss, hwm| Sampled {
            pid,
            comm: comm.into(),
            rss_kib: rss,
            hwm_kib: hwm,
        };
        let mut stats = MemoryStats::default();
        stats.record(
            "a",
            &[
                proc(1, "xtask", 10, 10),
                proc(2, "qemu-system-x86", 100, 120),
            ],
        );
        stats.record(
            "b",
            &[
                proc(1, "xtask", 12, 12),
                proc(2, "qemu-system-x86", 90, 130),
                proc(3, "qemu-system-x86", 50, 50),
            ],
        );
        assert_eq!(stats.samples, 2);
        assert_eq!(
            stats.peak,
            PhasePeak {
                total_rss_kib: 152,
                qemu_rss_kib: 140,
                qemu_processes: 2
            }
        );
        assert_eq!(stats.phases["a"].qemu_rss_kib, 100);
        assert_eq!(stats.qemu[&2].hwm_kib, 130);
        assert_eq!(stats.qemu[&2].phase, "a");
        assert_eq!(stats.qemu[&3].phase, "b");
        assert_eq!(stats.others_hwm_kib["xtask"], 12);
    }

    #[test]
    fn sampler_sees_its_own_process() {
        let sampler = Sampler::start();
        sampler.set_phase("test");
        std::thread::sleep(INTERVAL * 2);
        let stats = sampler.finish();
        assert!(stats.samples >= 2);
        assert!(stats.peak.total_rss_kib > 0);
    }
}
