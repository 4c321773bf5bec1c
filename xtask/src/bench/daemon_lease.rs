//! The pool daemon row: a lease over its UNIX socket with the VM already
//! warm — acquire (connect, the daemon's pool acquire, the spliced channel,
//! the `Vm` handle) and release (until the daemon reported its revert) —
//! measured by `agentvm-lease-bench` (`examples/bench-suite/src/lease.rs`),
//! which starts a daemon of one VM of its own.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::progress::Printer;
use super::stats::Summary;

/// Leases measured (`--quick`: fewer).
const LEASES: usize = 100;
const LEASES_QUICK: usize = 20;

#[derive(Debug, Deserialize)]
struct Raw {
    format: u32,
    acquire_s: Vec<f64>,
    release_s: Vec<f64>,
    revert_s: Vec<f64>,
    ping_s: Vec<f64>,
}

/// The row in the JSON report (`daemon_lease`).
#[derive(Debug, Clone, Serialize)]
pub struct DaemonLeaseReport {
    /// Lease granted and the `Vm` attached, over the socket (ms).
    pub acquire_ms: Summary,
    /// Release until the daemon reported the revert (ms).
    pub release_ms: Summary,
    /// The daemon's revert, as it reported it (ms).
    pub revert_ms: Summary,
    /// acquire + release per lease: what a test process pays around its test (ms).
    pub round_trip_ms: Summary,
    /// A ping answered by the guest agent through the daemon's splice (ms;
    /// compare `channel_ping_ms`, the channel in-process).
    pub ping_ms: Summary,
}

impl DaemonLeaseReport {
    fn build(raw: &Raw) -> Option<Self> {
        let ms = |s: &[f64]| Summary::of(&s.iter().map(|x| x * 1000.0).collect::<Vec<_>>());
        let round_trip: Vec<f64> = raw
            .acquire_s
            .iter()
            .zip(&raw.release_s)
            .map(|(a, r)| a + r)
            .collect();
        Some(Self {
            acquire_ms: ms(&raw.acquire_s)?,
            release_ms: ms(&raw.release_s)?,
            revert_ms: ms(&raw.revert_s)?,
            round_trip_ms: ms(&round_trip)?,
            ping_ms: ms(&raw.ping_s)?,
        })
    }

    /// The rows of the printed table.
    pub fn render(&self) -> String {
        let mut out = String::from("\npool daemon: a lease over its UNIX socket, VM warm\n");
        let _ = writeln!(out, "{:<44} {:>8} {:>8} {:>4}", "", "p50", "p99", "n");
        for (name, s) in [
            ("lease acquire over the socket (ms)", &self.acquire_ms),
            ("lease release, daemon reverts (ms)", &self.release_ms),
            ("lease acquire + release (ms)", &self.round_trip_ms),
            ("ping through the daemon's splice (ms)", &self.ping_ms),
        ] {
            let _ = writeln!(out, "{name:<44} {:>8.2} {:>8.2} {:>4}", s.p50, s.p99, s.n);
        }
        out
    }
}

/// Builds and runs `agentvm-lease-bench` (QEMU backend); `None` when it
/// wrote no samples.
pub fn measure(
    printer: &Printer,
    root: &Path,
    out_dir: &Path,
    quick: bool,
) -> Result<Option<DaemonLeaseReport>> {
    let program = build(root)?;
    let raw_path = out_dir.join("raw-daemon-lease.json");
    let _ = std::fs::remove_file(&raw_path);
    let leases = if quick { LEASES_QUICK } else { LEASES };
    let mut command = Command::new(&program);
    command
        .args(["--json", &raw_path.display().to_string()])
        .args(["--leases", &leases.to_string()])
        .current_dir(root)
        .env("AGENT_VM_BACKEND", "qemu")
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("piped stderr");
    for line in std::io::BufReader::new(stderr).lines() {
        printer.emit(super::progress::Event::from_child_line(&line?));
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "{} failed ({status}); see its messages above",
            program.display()
        );
    }
    let text = std::fs::read_to_string(&raw_path)
        .with_context(|| format!("reading {}", raw_path.display()))?;
    let raw: Raw =
        serde_json::from_str(&text).with_context(|| format!("reading {}", raw_path.display()))?;
    if raw.format != 1 {
        bail!(
            "{} has format {}, expected 1",
            raw_path.display(),
            raw.format
        );
    }
    Ok(DaemonLeaseReport::build(&raw))
}

fn build(root: &Path) -> Result<PathBuf> {
    super::build_bench_suite(root, &["--bin", "agentvm-lease-bench"], &[])?
        .find("agentvm-lease-bench", false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_from_samples() {
        let raw: Raw = serde_json::from_str(
            r#"{"format":1,"acquire_s":[0.001,0.002],"release_s":[0.1,0.2],"revert_s":[0.09,0.19],"ping_s":[0.0005]}"#,
        )
        .unwrap();
        let report = DaemonLeaseReport::build(&raw).unwrap();
        assert_eq!(report.acquire_ms.p50, 1.0);
        assert_eq!(report.round_trip_ms.p99, 202.0);
        assert_eq!(report.revert_ms.n, 2);
        assert_eq!(report.ping_ms.p50, 0.5);
        let text = report.render();
        assert!(
            text.contains("lease acquire over the socket (ms)"),
            "{text}"
        );
        let empty: Raw = serde_json::from_str(
            r#"{"format":1,"acquire_s":[],"release_s":[],"revert_s":[],"ping_s":[]}"#,
        )
        .unwrap();
        assert!(DaemonLeaseReport::build(&empty).is_none());
    }
}
