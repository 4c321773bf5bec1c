//! Guest-wide kernel counters read around a command: how many processes the
//! kernel created (`processes` in `/proc/stat`) and how many packets it could
//! not route (`OutNoRoutes` in `/proc/net/snmp`, `Ip6OutNoRoutes` in
//! `/proc/net/snmp6`). The differences go into the command's
//! [`ResourceUsage`](agentvm_runtime::protocol::ResourceUsage).

/// The counters at one instant (`None`: not readable here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Processes and threads created since boot.
    pub forks: Option<u64>,
    /// Packets without a route, IPv4 + IPv6 (either alone when only one is there).
    pub unroutable: Option<u64>,
    /// Processes killed by the OOM killer since boot.
    pub oom_kills: Option<u64>,
}

impl Counters {
    /// Reads the counters from `/proc`.
    pub fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let v4 = read("/proc/net/snmp").and_then(|t| snmp_ip_field(&t, "OutNoRoutes"));
        let v6 = read("/proc/net/snmp6").and_then(|t| snmp6_field(&t, "Ip6OutNoRoutes"));
        Self {
            forks: read("/proc/stat").and_then(|t| stat_processes(&t)),
            oom_kills: read("/proc/vmstat").and_then(|t| vmstat_field(&t, "oom_kill")),
            unroutable: match (v4, v6) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
            },
        }
    }

    /// What grew from `self` to `later`.
    pub fn since(self, later: Self) -> Self {
        let delta = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
        Self {
            forks: delta(self.forks, later.forks),
            unroutable: delta(self.unroutable, later.unroutable),
            oom_kills: delta(self.oom_kills, later.oom_kills),
        }
    }
}

/// The `processes N` line of `/proc/stat`.
pub fn stat_processes(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("processes "))
        .and_then(|v| v.trim().parse().ok())
}

/// A `name value` line of `/proc/vmstat`.
pub fn vmstat_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// A field of the `Ip:` table of `/proc/net/snmp` (a header line of names,
/// then a line of values).
pub fn snmp_ip_field(text: &str, name: &str) -> Option<u64> {
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let names = ip.next()?;
    let values = ip.next()?;
    let index = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// A `name value` line of `/proc/net/snmp6`.
pub fn snmp6_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next()? == name).then(|| words.next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_proc_files() {
        let stat =
            "cpu  1 2 3\nintr 5\nctxt 99\nbtime 1700000000\nprocesses 1234\nprocs_running 1\n";
        assert_eq!(stat_processes(stat), Some(1234));
        assert_eq!(stat_processes("cpu 1\n"), None);
        let snmp = "Ip: Forwarding DefaultTTL InReceives OutRequests OutDiscards OutNoRoutes\n\
                    Ip: 2 64 10 20 0 7\n\
                    Icmp: InMsgs\nIcmp: 0\n";
        assert_eq!(snmp_ip_field(snmp, "OutNoRoutes"), Some(7));
        assert_eq!(snmp_ip_field(snmp, "Nope"), None);
        assert_eq!(snmp_ip_field("Ip: A B\n", "A"), None);
        let snmp6 = "Ip6InReceives                   \t3\nIp6OutNoRoutes                  \t4\n";
        assert_eq!(snmp6_field(snmp6, "Ip6OutNoRoutes"), Some(4));
        assert_eq!(snmp6_field(snmp6, "Ip6Other"), None);
    }

    #[test]
    fn differences() {
        let a = Counters {
            forks: Some(10),
            unroutable: Some(1),
            oom_kills: Some(2),
        };
        let b = Counters {
            forks: Some(15),
            unroutable: None,
            oom_kills: Some(3),
        };
        assert_eq!(
            a.since(b),
            Counters {
                forks: Some(5),
                unroutable: None,
                oom_kills: Some(1),
            }
        );
    }

    #[test]
    fn vmstat_lines() {
        let vmstat = "nr_free_pages 1234\noom_kill 2\noom_kill_x 9\n";
        assert_eq!(vmstat_field(vmstat, "oom_kill"), Some(2));
        assert_eq!(vmstat_field(vmstat, "nr_free_pages"), Some(1234));
        assert_eq!(vmstat_field(vmstat, "pgfault"), None);
    }

    #[test]
    fn reads_this_machine() {
        // Linux always has /proc/stat; a child started in between counts.
        let before = Counters::read();
        std::process::Command::new("true").status().unwrap();
        let grown = before.since(Counters::read());
        assert!(grown.forks >= Some(1), "{grown:?}");
    }
}
