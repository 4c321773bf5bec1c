//! Process trees of commands: finding them in `/proc` and signalling them.
//!
//! A command runs in its own process group. Its tree is every process in that
//! group plus every descendant of a member, found by walking the ppid links in
//! `/proc/*/stat` (this catches children that called `setsid`). Processes seen
//! once are remembered (pid + start time), so a descendant that was already
//! seen is still found after its parent died and it was reparented to us.
//! Where the guest has cgroup2, the command also gets a cgroup of its own
//! ([`crate::cgroup`]) and every process in it is a member too: that catches
//! a child that called `setsid` and was orphaned before any walk saw it.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::cgroup::CommandCgroup;

/// A process, identified robustly against pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcId {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
    pub start_time: u64,
}

/// The fields of `/proc/<pid>/stat` the tree walk needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Process id.
    pub pid: i32,
    /// State letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Parent process id.
    pub ppid: i32,
    /// Process group id.
    pub pgrp: i32,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
}

impl ProcStat {
    fn id(&self) -> ProcId {
        ProcId {
            pid: self.pid,
            start_time: self.start_time,
        }
    }

    fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the content of `/proc/<pid>/stat`. The command name (field 2) may
/// contain spaces and parentheses, so fields are counted from its last `)`.
pub fn parse_stat(content: &str) -> Option<ProcStat> {
    let open = content.find('(')?;
    let close = content.rfind(')')?;
    if close < open {
        return None;
    }
    let pid = content[..open].trim().parse().ok()?;
    let fields: Vec<&str> = content[close + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state); field N is fields[N - 3].
    Some(ProcStat {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Reads every process's stat from `/proc`. Processes that vanish while
/// reading are skipped.
pub fn all_processes() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let name = entry.file_name();
        let name = name.to_str()?;
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let content = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        parse_stat(&content)
    })
    .collect()
}

/// The members of a tree among `procs`: processes in group `pgid`, processes
/// in `known` or in `cgroup` (pids of the command's cgroup), and all their
/// descendants, parents before children (among the
/// descendants of one seed). `known` is updated: members are
/// added, processes that no longer exist are dropped. `exclude` (the agent
/// itself) is never a member.
pub fn members(
    procs: &[ProcStat],
    pgid: i32,
    known: &mut HashSet<ProcId>,
    cgroup: &HashSet<i32>,
    exclude: i32,
) -> Vec<ProcStat> {
    let mut children: HashMap<i32, Vec<&ProcStat>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut seen: HashSet<i32> = HashSet::new();
    let mut queue: std::collections::VecDeque<&ProcStat> = procs
        .iter()
        .filter(|p| p.pgrp == pgid || known.contains(&p.id()) || cgroup.contains(&p.pid))
        .collect();
    // Breadth first, so parents come before their children.
    let mut out = Vec::new();
    while let Some(p) = queue.pop_front() {
        if p.pid == exclude || p.pid <= 1 || !seen.insert(p.pid) {
            continue;
        }
        out.push(*p);
        if let Some(kids) = children.get(&p.pid) {
            queue.extend(kids.iter().copied());
        }
    }
    let alive: HashSet<ProcId> = procs.iter().map(ProcStat::id).collect();
    known.retain(|id| alive.contains(id));
    known.extend(out.iter().map(ProcStat::id));
    out
}

/// Whether any process (zombies included) is in process group `pgid`.
fn group_exists(pgid: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks; pgid > 1 targets one group.
    let found = unsafe { libc::kill(-pgid, 0) } == 0;
    found || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The process tree of one command.
#[derive(Debug)]
pub struct Tree {
    pgid: i32,
    known: Mutex<HashSet<ProcId>>,
    cgroup: Option<CommandCgroup>,
}

/// How long to keep sending SIGKILL to a tree that does not go away.
const KILL_GIVE_UP: Duration = Duration::from_secs(5);
const KILL_POLL: Duration = Duration::from_millis(10);
const GRACE_POLL: Duration = Duration::from_millis(20);

impl Tree {
    /// The tree of the command whose main process is `pid` (also its group
    /// id), started in `cgroup` when it has one.
    pub fn new(pid: i32, cgroup: Option<CommandCgroup>) -> Self {
        Self {
            pgid: pid,
            known: Mutex::new(HashSet::new()),
            cgroup,
        }
    }

    /// Rescans `/proc`, remembering new members. Returns how many members
    /// exist (zombies included).
    pub fn refresh(&self) -> usize {
        self.scan().len()
    }

    /// Sends `signal` to every live member and to the process group. Returns
    /// how many members existed (zombies included).
    pub fn signal(&self, signal: i32) -> usize {
        // The group first, in one go: a shell must not see its foreground
        // child die (and exit on its own) before it gets the signal itself.
        if self.pgid > 1 {
            // SAFETY: kill takes plain integers; pgid > 1, so this never
            // targets every process. ESRCH when the group is empty.
            unsafe { libc::kill(-self.pgid, signal) };
        }
        let members = self.scan();
        // Then members outside the group, parents before children.
        for p in members
            .iter()
            .filter(|p| !p.is_dead() && p.pgrp != self.pgid)
        {
            // SAFETY: as above.
            unsafe { libc::kill(p.pid, signal) };
        }
        members.len()
    }

    fn scan(&self) -> Vec<ProcStat> {
        let mut known = self.lock();
        let cgroup: HashSet<i32> = self
            .cgroup
            .as_ref()
            .map(|c| c.pids().into_iter().collect())
            .unwrap_or_default();
        // Every member descends from a process of the group, the cgroup or a
        // known one; with none there is none, and a group that is gone cannot
        // be joined again. This spares the /proc walk (~45 stat files, about
        // 10 ms under TCG) at the end of nearly every command.
        if known.is_empty() && cgroup.is_empty() && !group_exists(self.pgid) {
            return Vec::new();
        }
        let procs = all_processes();
        members(
            &procs,
            self.pgid,
            &mut known,
            &cgroup,
            std::process::id() as i32,
        )
    }

    fn lock(&self) -> MutexGuard<'_, HashSet<ProcId>> {
        self.known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Kills the whole tree: with a grace period, SIGTERM first and SIGKILL
    /// when members remain after it; then SIGKILL until no member is left
    /// (zombies included, so reaped ones are really gone), giving up after a
    /// few seconds on processes that do not die.
    pub async fn kill(&self, grace: Option<Duration>) {
        if let Some(grace) = grace {
            if self.signal(libc::SIGTERM) == 0 {
                return;
            }
            let deadline = Instant::now().checked_add(grace);
            loop {
                let now = Instant::now();
                let left = match deadline {
                    Some(deadline) if deadline > now => deadline - now,
                    Some(_) => break,
                    None => GRACE_POLL,
                };
                tokio::time::sleep(left.min(GRACE_POLL)).await;
                if self.refresh() == 0 {
                    return;
                }
            }
        }
        let give_up = Instant::now() + KILL_GIVE_UP;
        while self.signal(libc::SIGKILL) > 0 {
            if Instant::now() >= give_up {
                log!(
                    "process group {}: members survive SIGKILL; giving up",
                    self.pgid
                );
                return;
            }
            // Lets the reaper collect the dead.
            tokio::time::sleep(KILL_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, pgrp: i32) -> ProcStat {
        ProcStat {
            pid,
            state: 'S',
            ppid,
            pgrp,
            start_time: 1000 + pid as u64,
        }
    }

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "4242 (my (weird) cmd) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                pid: 4242,
                state: 'S',
                ppid: 17,
                pgrp: 4242,
                start_time: 987654
            }
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 0"), None);
    }

    #[test]
    fn tree_is_group_plus_descendants() {
        // 10: agent. 100: main (group 100). 101: child in group. 102: setsid
        // child of 101 (own group). 103: grandchild of 102. 200: unrelated.
        let procs = vec![
            p(10, 1, 10),
            p(100, 10, 100),
            p(101, 100, 100),
            p(102, 101, 102),
            p(103, 102, 102),
            p(200, 10, 200),
        ];
        let mut known = HashSet::new();
        let mut pids: Vec<i32> = members(&procs, 100, &mut known, &HashSet::new(), 10)
            .iter()
            .map(|p| p.pid)
            .collect();
        pids.sort();
        assert_eq!(pids, vec![100, 101, 102, 103]);
        assert_eq!(known.len(), 4);

        // The main process and 101 die; 102 is reparented to the agent and is
        // still found because it was seen before.
        let procs = vec![
            p(10, 1, 10),
            p(102, 10, 102),
            p(103, 102, 102),
            p(200, 10, 200),
        ];
        let mut pids: Vec<i32> = members(&procs, 100, &mut known, &HashSet::new(), 10)
            .iter()
            .map(|p| p.pid)
            .collect();
        pids.sort();
        assert_eq!(pids, vec![102, 103]);
        assert_eq!(known.len(), 2, "dead processes are forgotten");
    }

    #[test]
    fn reused_pid_is_not_a_member() {
        let mut known = HashSet::new();
        members(
            &[p(100, 10, 100), p(150, 100, 150)],
            100,
            &mut known,
            &HashSet::new(),
            10,
        );
        // 150 died and its pid was reused by an unrelated process.
        let mut reused = p(150, 10, 150);
        reused.start_time = 99_999;
        assert!(members(&[reused], 100, &mut known, &HashSet::new(), 10).is_empty());
    }

    #[test]
    fn a_setsid_orphan_in_the_cgroup_is_a_member() {
        // 300 called setsid and was reparented to init before any walk saw
        // it: only its cgroup ties it to the command; its child comes along.
        let procs = vec![
            p(10, 1, 10),
            p(300, 1, 300),
            p(301, 300, 300),
            p(400, 1, 400),
        ];
        let mut known = HashSet::new();
        let cgroup: HashSet<i32> = [300].into();
        let mut pids: Vec<i32> = members(&procs, 100, &mut known, &cgroup, 10)
            .iter()
            .map(|p| p.pid)
            .collect();
        pids.sort();
        assert_eq!(pids, vec![300, 301]);
        let none = members(&procs, 100, &mut HashSet::new(), &HashSet::new(), 10);
        assert!(none.is_empty(), "without the cgroup it escapes: {none:?}");
    }

    #[test]
    fn agent_is_never_a_member() {
        let mut known = HashSet::new();
        let procs = vec![p(100, 10, 100), p(10, 100, 100)];
        let pids: Vec<i32> = members(&procs, 100, &mut known, &HashSet::new(), 10)
            .iter()
            .map(|p| p.pid)
            .collect();
        assert_eq!(pids, vec![100]);
    }
}
