//! A cgroup (v2) per command, so that every process a command starts is
//! found when its tree is killed.
//!
//! The process-tree walk ([`crate::tree`]) finds descendants through the
//! command's process group and the ppid links it has seen. A child that calls
//! `setsid` and whose parent exits before the first walk (`(setsid sleep &)`,
//! a classic daemonisation) is reparented to init with nothing linking it to
//! the command, and escaped the command's kill. A cgroup follows every fork
//! whatever the child does with its session, group or parent.
//!
//! Only when the agent owns the machine's cgroup tree: cgroup2 is mounted at
//! `/sys/fs/cgroup` and the agent sits in its root (the guest's init creates
//! no cgroups). Elsewhere (the agent run on a host for its benches) commands
//! keep the tree walk alone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const ROOT: &str = "/sys/fs/cgroup";

static NEXT: AtomicU64 = AtomicU64::new(0);

/// The cgroup of one command; removed when dropped (once it is empty).
#[derive(Debug)]
pub struct CommandCgroup {
    dir: PathBuf,
}

/// Whether this process may make cgroups for its commands (see the module
/// documentation).
fn usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        Path::new(ROOT).join("cgroup.controllers").exists()
            && std::fs::read_to_string("/proc/self/cgroup")
                .is_ok_and(|own| own.lines().any(|l| l == "0::/"))
    })
}

impl CommandCgroup {
    /// Makes a fresh cgroup for a command about to start (which joins it
    /// itself, [`crate::spawn::SpawnSpec::cgroup`]). `None` when cgroups
    /// are not usable here (the command then relies on the tree walk alone).
    pub fn create() -> Option<Self> {
        if !usable() {
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = Path::new(ROOT).join(format!("agentvm-cmd-{n}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => Some(Self { dir }),
            Err(e) => {
                log!("cannot create cgroup {}: {e}", dir.display());
                None
            }
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The live processes in the cgroup (zombies are not listed).
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|text| parse_pids(&text))
            .unwrap_or_default()
    }
}

impl Drop for CommandCgroup {
    fn drop(&mut self) {
        // Fails while a process that survived SIGKILL is still inside; the
        // revert removes it then.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The pids of a `cgroup.procs` file, one per line.
pub fn parse_pids(text: &str) -> Vec<i32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cgroup_procs() {
        assert_eq!(parse_pids("12\n345\n\n"), [12, 345]);
        assert!(parse_pids("").is_empty());
    }
}
