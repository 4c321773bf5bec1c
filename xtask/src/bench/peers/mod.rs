//! Peer rows of `cargo xtask bench`: the same work done by the tools people
//! would otherwise use, measured in the same run as agentvm's own rows and
//! reported as ratios against agentvm's equivalent figure.
//!
//! * [`docker`]: a container per test (Debian's `docker.io`, an image
//!   imported locally, no registry);
//! * [`vmtest`]: the `vmtest` crate, a QEMU "run this in a VM" runner.
//!
//! A peer that cannot be set up is reported as skipped with the reason,
//! never with a made-up number and never by failing the whole bench.

pub mod docker;
pub mod vmtest;

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::progress::Printer;
use super::report::Report;
use super::stats::Summary;

/// A peer's rows, or why there are none.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome<T> {
    /// Measured in this run.
    Measured(T),
    /// Not measured; `reason` says why and what to do.
    Skipped { reason: String },
}

impl<T> Outcome<T> {
    pub fn skipped(reason: impl Into<String>) -> Self {
        Self::Skipped {
            reason: reason.into(),
        }
    }

    pub fn as_measured_mut(&mut self) -> Option<&mut T> {
        match self {
            Self::Measured(t) => Some(t),
            Self::Skipped { .. } => None,
        }
    }
}

/// One peer figure set against agentvm's equivalent from the same run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratio {
    /// agentvm's figure (same unit as the peer's).
    pub agentvm: f64,
    /// What agentvm's figure is, in the report's field names.
    pub agentvm_is: String,
    /// `peer / agentvm`: above 1, agentvm is that many times faster.
    pub ratio: f64,
}

impl Ratio {
    /// `None` when agentvm's figure is missing or not positive.
    pub fn of(peer: f64, agentvm: Option<f64>, agentvm_is: &str) -> Option<Self> {
        let agentvm = agentvm.filter(|a| *a > 0.0 && a.is_finite())?;
        Some(Self {
            agentvm: round3(agentvm),
            agentvm_is: agentvm_is.to_string(),
            ratio: (peer / agentvm * 100.0).round() / 100.0,
        })
    }

    /// `4.1× agentvm (…)`: the table's note.
    pub fn show(ratio: &Option<Self>) -> String {
        match ratio {
            Some(r) => format!("{:.2}× agentvm's {}", r.ratio, r.agentvm_is),
            None => "no agentvm figure in this run".to_string(),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// agentvm's figures the peers are compared with, taken from the report of
/// the same run (all in ms except where the name says otherwise).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Agentvm {
    /// `exec_true_ms.p50`.
    pub exec_true_ms: Option<f64>,
    /// `revert.total_ms.p50`.
    pub revert_ms: Option<f64>,
    /// `cold_boot.ready_ms.p50` (boot to Hello + golden snapshot).
    pub cold_boot_ready_ms: Option<f64>,
    /// `cold_boot.to_hello_ms.p50`.
    pub cold_boot_to_hello_ms: Option<f64>,
    /// `suite.tests` and `suite.pooled.wall_s`.
    pub suite: Option<(usize, f64)>,
}

impl Agentvm {
    pub fn from_report(r: &Report) -> Self {
        Self {
            exec_true_ms: Some(r.exec_true_ms.p50),
            revert_ms: Some(r.revert.total_ms.p50),
            cold_boot_ready_ms: Some(r.cold_boot.ready_ms.p50),
            cold_boot_to_hello_ms: Some(r.cold_boot.to_hello_ms.p50),
            suite: Some((r.suite.tests, r.suite.pooled.wall_s)),
        }
    }

    /// A clean VM and one command on it, as a pooled test gets it: the
    /// revert that gives a clean VM + the exec.
    pub fn clean_vm_and_exec_ms(&self) -> Option<f64> {
        Some(self.revert_ms? + self.exec_true_ms?)
    }

    /// A freshly booted VM and one command on it (no pool, no cache).
    pub fn fresh_vm_and_exec_ms(&self) -> Option<f64> {
        Some(self.cold_boot_to_hello_ms? + self.exec_true_ms?)
    }

    /// `n` commands, each on a clean VM, one after the other: one VM boots
    /// (and takes its golden snapshot), then `n` × (exec + revert).
    pub fn serial_commands_ms(&self, n: usize) -> Option<f64> {
        Some(self.cold_boot_ready_ms? + n as f64 * (self.exec_true_ms? + self.revert_ms?))
    }
}

/// The peer rows of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeersReport {
    pub docker: Outcome<docker::DockerRows>,
    pub vmtest: Outcome<vmtest::VmtestRows>,
    /// Seconds the peer rows added to the run (set-up included).
    pub duration_s: f64,
}

impl PeersReport {
    /// Measures every peer; `tests` is the size of agentvm's suite.
    pub fn measure(printer: &Printer, root: &Path, quick: bool, tests: usize) -> Self {
        let started = std::time::Instant::now();
        let docker = docker::measure(printer, root, quick, tests);
        let vmtest = vmtest::measure(printer, root, quick);
        Self {
            docker,
            vmtest,
            duration_s: round3(started.elapsed().as_secs_f64()),
        }
    }

    /// Fills in the ratios against agentvm's figures.
    pub fn compare(&mut self, agentvm: &Agentvm) {
        if let Some(d) = self.docker.as_measured_mut() {
            d.compare(agentvm);
        }
        if let Some(v) = self.vmtest.as_measured_mut() {
            v.compare(agentvm);
        }
    }

    /// The table printed after the main report.
    pub fn render(&self) -> String {
        let mut out = format!(
            "\npeers: the same work with other tools, same run ({:.0} s)\n",
            self.duration_s
        );
        let _ = writeln!(
            out,
            "{:<44} {:>5} {:>10} {:>10}  vs agentvm",
            "", "n", "p50", "p90"
        );
        match &self.docker {
            Outcome::Measured(d) => out.push_str(&d.render()),
            Outcome::Skipped { reason } => {
                let _ = writeln!(out, "docker: skipped — {reason}");
            }
        }
        match &self.vmtest {
            Outcome::Measured(v) => out.push_str(&v.render()),
            Outcome::Skipped { reason } => {
                let _ = writeln!(out, "vmtest: skipped — {reason}");
            }
        }
        out
    }
}

/// A table row: `name  n  p50  p90  note` (ms shown as ms or s).
pub fn row(out: &mut String, name: &str, s: &Summary, note: &str) {
    let _ = writeln!(
        out,
        "{:<44} {:>5} {:>10} {:>10}  {note}",
        name,
        s.n,
        show_ms(s.p50),
        show_ms(s.p90)
    );
}

/// `13.8 s`, `379 ms`, `9.1 ms`.
pub fn show_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// The last lines of a log file, for a skip reason.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios() {
        let r = Ratio::of(379.0, Some(100.0), "x").unwrap();
        assert_eq!((r.ratio, r.agentvm), (3.79, 100.0));
        assert_eq!(Ratio::of(1.0, None, "x"), None);
        assert_eq!(Ratio::of(1.0, Some(0.0), "x"), None);
        assert_eq!(Ratio::of(1.0, Some(f64::NAN), "x"), None);
        assert_eq!(Ratio::show(&None), "no agentvm figure in this run");
        assert!(Ratio::show(&Some(r)).starts_with("3.79× agentvm's x"));
    }

    #[test]
    fn agentvm_equivalents() {
        let a = Agentvm {
            exec_true_ms: Some(10.0),
            revert_ms: Some(100.0),
            cold_boot_ready_ms: Some(2200.0),
            cold_boot_to_hello_ms: Some(2000.0),
            suite: Some((40, 8.0)),
        };
        assert_eq!(a.clean_vm_and_exec_ms(), Some(110.0));
        assert_eq!(a.fresh_vm_and_exec_ms(), Some(2010.0));
        assert_eq!(a.serial_commands_ms(10), Some(3300.0));
        assert_eq!(Agentvm::default().clean_vm_and_exec_ms(), None);
    }

    #[test]
    fn figures_come_from_the_same_runs_report() {
        let mut report = crate::bench::report::tests::report();
        let a = Agentvm::from_report(&report);
        // The fixture: exec p50 8 ms (of 8, 9), revert 100 ms, 10-test pooled suite 4 s.
        assert_eq!(a.exec_true_ms, Some(8.0));
        assert_eq!(a.revert_ms, Some(100.0));
        assert_eq!(a.cold_boot_ready_ms, Some(2120.0));
        assert_eq!(a.suite, Some((10, 4.0)));
        let mut peers = PeersReport {
            docker: Outcome::Measured(docker::tests::rows(10, 8.0)),
            vmtest: Outcome::skipped("no 9p"),
            duration_s: 1.0,
        };
        peers.compare(&a);
        report.peers = Some(peers);
        let json = serde_json::to_value(&report).unwrap();
        let d = &json["peers"]["docker"];
        assert_eq!(d["status"], "measured");
        assert_eq!(d["suite_vs_agentvm"]["ratio"], 2.0);
        assert_eq!(d["exec_true_vs_agentvm"]["agentvm"], 8.0);
        assert_eq!(json["peers"]["vmtest"]["reason"], "no 9p");
    }

    #[test]
    fn outcomes_serialize_with_a_status() {
        let skipped: Outcome<u32> = Outcome::skipped("no dockerd");
        assert_eq!(
            serde_json::to_value(&skipped).unwrap(),
            serde_json::json!({"status": "skipped", "reason": "no dockerd"})
        );
        #[derive(Serialize)]
        struct Rows {
            x: u32,
        }
        assert_eq!(
            serde_json::to_value(Outcome::Measured(Rows { x: 1 })).unwrap(),
            serde_json::json!({"status": "measured", "x": 1})
        );
    }

    #[test]
    fn units_and_tails() {
        assert_eq!(show_ms(13800.0), "13.80 s");
        assert_eq!(show_ms(379.4), "379 ms");
        assert_eq!(show_ms(9.14), "9.1 ms");
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("l");
        std::fs::write(&log, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&log, 2), "b | c");
        assert_eq!(tail(&dir.path().join("none"), 2), "");
    }
}
