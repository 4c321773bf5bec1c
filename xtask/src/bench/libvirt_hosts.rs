//! The two-host row of `cargo xtask bench --backend libvirt`: the trivial
//! suite with a warm pool of 2 on one libvirt host, then with the same pool
//! spread over two hosts (`AGENT_VM_LIBVIRT_HOSTS`): the pool's warm-up
//! (the first test's wait for a VM) and the suite's wall time.
//!
//! The two hosts are `AGENT_VM_LIBVIRT_HOSTS` when it lists two or more
//! URIs (the first is the one-host run's); otherwise, as root, the system
//! daemon and a second daemon this bench starts and stops
//! (`scripts/libvirt-host2.sh`: same machine, but reached like a remote
//! host, with the image uploaded to it). Without either the row is skipped
//! with the reason.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use super::progress::Printer;
use super::suite::{self, GoldenCache, Mode};
use super::BackendArg;

/// The variable the harness reads the hosts from.
const HOSTS_ENV: &str = "AGENT_VM_LIBVIRT_HOSTS";
/// The second daemon's name (its directories under /run and /var/lib).
const HOST2_NAME: &str = "agentvm-libvirt2-bench";

const ONE_HOST: Mode = Mode {
    key: "hosts-one",
    description: "warm pool of 2 VMs on one libvirt host",
    pool_min_size: 2,
    pool_max_size: 2,
    max_uses: None,
    test_threads: 2,
    golden_cache: GoldenCache::Empty,
};

const TWO_HOSTS: Mode = Mode {
    key: "hosts-two",
    description: "warm pool of 2 VMs spread over two libvirt hosts",
    ..ONE_HOST
};

/// One of the two runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostsRun {
    pub hosts: Vec<String>,
    /// The first test's wait for a VM: the pool's warm-up.
    pub warmup_ms: f64,
    /// The test binary's wall time.
    pub suite_s: f64,
    pub vms: usize,
}

/// The row (`libvirt_two_hosts` in the JSON report).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TwoHostsReport {
    /// Why it was not measured (`null` when it was).
    pub skipped: Option<String>,
    /// Where the second host came from.
    pub second_host: Option<String>,
    pub tests: usize,
    pub one_host: Option<HostsRun>,
    pub two_hosts: Option<HostsRun>,
    /// Two hosts / one host.
    pub warmup_ratio: Option<f64>,
    pub suite_ratio: Option<f64>,
}

impl TwoHostsReport {
    fn skipped(reason: impl Into<String>, tests: usize) -> Self {
        Self {
            skipped: Some(reason.into()),
            second_host: None,
            tests,
            one_host: None,
            two_hosts: None,
            warmup_ratio: None,
            suite_ratio: None,
        }
    }

    /// The rows as text.
    pub fn render(&self) -> String {
        let mut out = String::from("two libvirt hosts (pool of 2, 2 tests at a time):\n");
        match (&self.skipped, &self.one_host, &self.two_hosts) {
            (Some(reason), _, _) => out.push_str(&format!("  skipped: {reason}\n")),
            (None, Some(one), Some(two)) => {
                out.push_str(&format!(
                    "  {:<10} {:>12} {:>14}   hosts\n",
                    "", "warm-up", "suite"
                ));
                for (what, run) in [("one host", one), ("two hosts", two)] {
                    out.push_str(&format!(
                        "  {what:<10} {:>10.0} ms {:>12.2} s   {}\n",
                        run.warmup_ms,
                        run.suite_s,
                        run.hosts.join(", ")
                    ));
                }
                if let (Some(w), Some(s)) = (self.warmup_ratio, self.suite_ratio) {
                    out.push_str(&format!(
                        "  two/one    {w:>10.2} x  {s:>11.2} x   ({} tests; second host: {})\n",
                        self.tests,
                        self.second_host.as_deref().unwrap_or("?")
                    ));
                }
            }
            _ => out.push_str("  no result\n"),
        }
        out
    }
}

/// The hosts of the comparison: from `AGENT_VM_LIBVIRT_HOSTS` (2 or more)
/// or `None` (start a second daemon). Pure.
pub fn hosts_from_env(value: Option<&str>) -> Option<Vec<String>> {
    let hosts: Vec<String> = value?
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .collect();
    (hosts.len() >= 2).then_some(hosts)
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| super::stats::round3(a / b))
}

/// The second daemon of `scripts/libvirt-host2.sh`, stopped when dropped.
struct Host2 {
    script: std::path::PathBuf,
}

impl Host2 {
    fn start(root: &Path) -> Result<(Self, String), String> {
        let script = root.join("scripts/libvirt-host2.sh");
        let sh = |action: &str| {
            Command::new("sh")
                .arg(&script)
                .arg(action)
                .env("AGENTVM_HOST2_NAME", HOST2_NAME)
                .output()
                .map_err(|e| format!("running {}: {e}", script.display()))
        };
        let out = sh("start")?;
        if !out.status.success() {
            return Err(format!(
                "scripts/libvirt-host2.sh start failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let host2 = Self {
            script: script.clone(),
        };
        let uri = String::from_utf8_lossy(&sh("uri")?.stdout)
            .trim()
            .to_owned();
        Ok((host2, uri))
    }
}

impl Drop for Host2 {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg(&self.script)
            .arg("stop")
            .env("AGENTVM_HOST2_NAME", HOST2_NAME)
            .output();
    }
}

/// Measures the row (or says why not).
pub fn measure(
    printer: &Printer,
    backend: BackendArg,
    root: &Path,
    out_dir: &Path,
    test_binary: &Path,
    tests: usize,
) -> TwoHostsReport {
    if backend != BackendArg::Libvirt {
        return TwoHostsReport::skipped("needs --backend libvirt", tests);
    }
    let from_env = hosts_from_env(std::env::var(HOSTS_ENV).ok().as_deref());
    let (hosts, second_host, _host2) = match from_env {
        Some(hosts) => (hosts, HOSTS_ENV.to_owned(), None),
        None => {
            if !is_root() {
                return TwoHostsReport::skipped(
                    format!(
                        "no second host: set {HOSTS_ENV} to two URIs, or run as root to start \
                         one (scripts/libvirt-host2.sh)"
                    ),
                    tests,
                );
            }
            printer.phase("two libvirt hosts: starting a second daemon (scripts/libvirt-host2.sh)");
            match Host2::start(root) {
                Ok((host2, uri)) => {
                    let first = std::env::var("LIBVIRT_DEFAULT_URI")
                        .ok()
                        .filter(|u| !u.trim().is_empty())
                        .unwrap_or_else(|| "qemu:///system".to_owned());
                    (
                        vec![first, uri],
                        "a second libvirtd on this machine (scripts/libvirt-host2.sh), reached \
                         like a remote host"
                            .to_owned(),
                        Some(host2),
                    )
                }
                Err(reason) => return TwoHostsReport::skipped(reason, tests),
            }
        }
    };
    let suite_dir = root.join("examples/bench-suite");
    let mut runs = Vec::new();
    for (mode, hosts) in [(&ONE_HOST, &hosts[..1]), (&TWO_HOSTS, &hosts[..2])] {
        printer.phase(format!(
            "suite: {tests} trivial agent tests, {} ({})",
            mode.description,
            hosts.join(", ")
        ));
        let env = [(HOSTS_ENV, hosts.join(","))];
        match suite::run_with_env(
            "libvirt",
            printer,
            test_binary,
            &suite_dir,
            mode,
            tests,
            out_dir,
            &env,
        ) {
            Ok(run) => {
                printer.note(format!(
                    "warm-up {:.0} ms, suite {:.2} s",
                    run.first_acquire_ms, run.wall_s
                ));
                runs.push(HostsRun {
                    hosts: hosts.to_vec(),
                    warmup_ms: run.first_acquire_ms,
                    suite_s: run.wall_s,
                    vms: run.vms,
                });
            }
            Err(e) => return TwoHostsReport::skipped(format!("{} failed: {e:#}", mode.key), tests),
        }
    }
    let (one, two) = (runs[0].clone(), runs[1].clone());
    TwoHostsReport {
        skipped: None,
        second_host: Some(second_host),
        tests,
        warmup_ratio: ratio(two.warmup_ms, one.warmup_ms),
        suite_ratio: ratio(two.suite_s, one.suite_s),
        one_host: Some(one),
        two_hosts: Some(two),
    }
}

fn is_root() -> bool {
    // xtask links no libc binding: `id -u` answers.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_the_variable() {
        assert_eq!(hosts_from_env(None), None);
        assert_eq!(hosts_from_env(Some("qemu:///system")), None);
        assert_eq!(
            hosts_from_env(Some("qemu:///system, qemu+ssh://ci@b.example/system,")),
            Some(vec![
                "qemu:///system".to_string(),
                "qemu+ssh://ci@b.example/system".to_string()
            ])
        );
    }

    #[test]
    fn skipped_row_says_why() {
        let r = TwoHostsReport::skipped("needs --backend libvirt", 10);
        assert!(
            r.render().contains("skipped: needs --backend libvirt"),
            "{}",
            r.render()
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["skipped"], "needs --backend libvirt");
        assert!(json["two_hosts"].is_null());
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
    }
}
