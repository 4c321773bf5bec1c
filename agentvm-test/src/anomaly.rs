//! Anomaly detection: pure functions over a test's agent runs.
//!
//! * Rules, per agent run: `timeout` (killed at its timeout), `output_cap`
//!   (stdout or stderr hit its limit), `memory_limit` (peak RSS of the
//!   largest process at least 80 % of the VM's memory), `oom_kill` (the
//!   guest's OOM killer killed a process while the agent ran), `process_count`
//!   (more processes alive at once than `process_limit`), `outside_workspace`
//!   (files changed outside `/workspace`), `network_attempt` (packets the
//!   guest could not route, in a VM without a NIC — `isolated`, `gateway`,
//!   `allowlist` — so attempts to get around the tunnelled paths),
//!   `egress_denied` (connections the egress proxy refused: hosts not on the
//!   allowlist).
//! * Statistics, per test: the test's duration, the CPU time and the peak
//!   RSS of its agent runs against a rolling [`Baseline`] of its last
//!   [`BASELINE_RUNS`] runs (`<artifacts_dir>/baseline.json`): a z-score
//!   beyond ±[`Z_THRESHOLD`] with at least [`MIN_SAMPLES`] earlier samples is
//!   `duration_zscore`, `cpu_zscore` or `memory_zscore`.
//!
//! Findings go to the audit log, `anomalies.json` in the test's artifacts
//! and the run report; `fail_on` (`AGENT_VM_FAIL_ON`) lists the kinds that
//! fail the test.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::run::AgentRun;

/// Earlier runs kept per test in the baseline.
pub const BASELINE_RUNS: usize = 20;
/// Earlier samples needed before a z-score counts.
pub const MIN_SAMPLES: usize = 5;
/// |z| above this is an anomaly.
pub const Z_THRESHOLD: f64 = 3.0;
/// Fraction of the VM's memory a peak RSS must reach to be `memory_limit`.
pub const MEMORY_NEAR_LIMIT: f64 = 0.8;

/// Something unusual about a test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    /// `timeout`, `output_cap`, `memory_limit`, `duration_zscore`,
    /// `cpu_zscore` or `memory_zscore`.
    pub kind: String,
    /// What was seen.
    pub message: String,
    /// Whether it fails the test (its kind is in `fail_on`).
    #[serde(default)]
    pub fails: bool,
}

impl Anomaly {
    fn new(kind: &str, message: String) -> Self {
        Self {
            kind: kind.to_string(),
            message,
            fails: false,
        }
    }
}

/// What the rules compare an agent run with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleLimits {
    /// The VM's memory, bytes.
    pub memory_limit_bytes: Option<u64>,
    /// Most processes an agent run may have at once (`process_limit`).
    pub process_limit: Option<u64>,
    /// The VM has no NIC (`isolated`, `gateway`, `allowlist`): packets
    /// without a route are attempts to get around the tunnelled paths.
    pub network_isolated: bool,
}

impl RuleLimits {
    /// The limits the harness applies to a VM of this profile and network
    /// under a configuration whose `process_limit` is given.
    pub fn of(
        profile: agentvm_runtime::spec::ResourceProfile,
        network: &agentvm_runtime::spec::NetworkMode,
        process_limit: u64,
    ) -> Self {
        Self {
            memory_limit_bytes: Some(u64::from(profile.memory_mib()) << 20),
            process_limit: Some(process_limit),
            network_isolated: !network.has_nic(),
        }
    }

    /// The limits the harness applies to `vm` under the workspace's
    /// configuration (`.config/agentvm.toml` and the environment).
    pub fn for_vm(
        vm: &agentvm_runtime::vm::Vm,
    ) -> Result<Self, agentvm_runtime::config::ConfigError> {
        let config = agentvm_runtime::config::AgentVmConfig::load()?;
        Ok(Self::of(
            vm.spec().profile,
            &vm.spec().network,
            config.process_limit,
        ))
    }
}

/// The rule findings of one agent run (`index`: its number in the test,
/// from 1).
pub fn rule_anomalies(run: &AgentRun, index: usize, limits: &RuleLimits) -> Vec<Anomaly> {
    let memory_limit_bytes = limits.memory_limit_bytes;
    let mut out = Vec::new();
    if run.timed_out() {
        out.push(Anomaly::new(
            "timeout",
            format!(
                "agent run {index} was killed at its timeout after {:.3}s",
                run.duration().as_secs_f64()
            ),
        ));
    }
    if run.stdout_truncated() || run.stderr_truncated() {
        out.push(Anomaly::new(
            "output_cap",
            format!(
                "agent run {index} hit its output cap (stdout {} bytes, stderr {} bytes produced)",
                run.stdout_bytes(),
                run.stderr_bytes()
            ),
        ));
    }
    if let (Some(peak), Some(limit)) = (run.resources().peak_rss_bytes, memory_limit_bytes) {
        if limit > 0 && peak as f64 >= MEMORY_NEAR_LIMIT * limit as f64 {
            out.push(Anomaly::new(
                "memory_limit",
                format!(
                    "agent run {index} peaked at {} MiB RSS, {:.0}% of the VM's {} MiB",
                    peak >> 20,
                    peak as f64 / limit as f64 * 100.0,
                    limit >> 20
                ),
            ));
        }
    }
    if let (Some(peak), Some(limit)) = (run.resources().peak_processes, limits.process_limit) {
        if peak > limit {
            let started = run
                .resources()
                .processes_started
                .map_or("?".to_string(), |n| n.to_string());
            out.push(Anomaly::new(
                "process_count",
                format!(
                    "agent run {index} had {peak} processes at once, more than the limit of {limit} \
                     (process_limit); {started} started in all"
                ),
            ));
        }
    }
    if let Some(kills) = run.resources().oom_kills.filter(|&n| n > 0) {
        out.push(Anomaly::new(
            "oom_kill",
            format!(
                "agent run {index}: the guest ran out of memory and its OOM killer killed \
                 {kills} process(es){}; use a larger profile or memory_mib",
                match run.signal() {
                    Some(9) => " (the agent got SIGKILL)",
                    _ => "",
                }
            ),
        ));
    }
    let outside = run.outside_workspace();
    if !outside.is_empty() {
        const SHOWN: usize = 5;
        let mut list = outside[..outside.len().min(SHOWN)].join(", ");
        if outside.len() > SHOWN || run.outside_workspace_truncated() {
            list.push_str(", ...");
        }
        out.push(Anomaly::new(
            "outside_workspace",
            format!(
                "agent run {index} changed {}{} path(s) outside the workspace: {list}",
                outside.len(),
                if run.outside_workspace_truncated() {
                    "+"
                } else {
                    ""
                }
            ),
        ));
    }
    let denied: Vec<String> = run
        .network()
        .iter()
        .filter(|c| !c.allowed)
        .map(|c| format!("{}:{}", c.host, c.port))
        .collect();
    if !denied.is_empty() {
        let mut list = denied
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if denied.len() > 5 {
            list.push_str(", ...");
        }
        out.push(Anomaly::new(
            "egress_denied",
            format!(
                "agent run {index} was refused {} connection(s) by the egress allowlist: {list}",
                denied.len()
            ),
        ));
    }
    if let Some(packets) = run.resources().unroutable_packets.filter(|&n| n > 0) {
        if limits.network_isolated {
            out.push(Anomaly::new(
                "network_attempt",
                format!(
                    "agent run {index} tried to reach the network from an isolated VM \
                     ({packets} packet(s) without a route)"
                ),
            ));
        }
    }
    out
}

/// One test run's measurements, as kept in the baseline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The test's duration, seconds.
    pub duration_seconds: f64,
    /// User + system CPU of its agent runs, seconds (none: no agent run).
    pub cpu_seconds: Option<f64>,
    /// Largest peak RSS of its agent runs, bytes.
    pub peak_rss_bytes: Option<u64>,
}

impl Sample {
    /// The sample of a test that took `duration_seconds` with these runs.
    pub fn of(duration_seconds: f64, runs: &[AgentRun]) -> Self {
        let cpu: Vec<f64> = runs
            .iter()
            .filter_map(|r| {
                let r = r.resources();
                match (r.user_cpu, r.system_cpu) {
                    (None, None) => None,
                    (u, s) => Some(
                        u.unwrap_or_default().as_secs_f64() + s.unwrap_or_default().as_secs_f64(),
                    ),
                }
            })
            .collect();
        Self {
            duration_seconds,
            cpu_seconds: (!cpu.is_empty()).then(|| cpu.iter().sum()),
            peak_rss_bytes: runs
                .iter()
                .filter_map(|r| r.resources().peak_rss_bytes)
                .max(),
        }
    }
}

/// The z-score of `value` against `history`, when there are at least
/// [`MIN_SAMPLES`] values. The standard deviation has a floor (1 % of the
/// mean, and 1e-6) so that a constant history does not flag noise.
pub fn zscore(history: &[f64], value: f64) -> Option<f64> {
    if history.len() < MIN_SAMPLES {
        return None;
    }
    let n = history.len() as f64;
    let mean = history.iter().sum::<f64>() / n;
    let var = history.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let sd = var.sqrt().max(mean.abs() * 0.01).max(1e-6);
    Some((value - mean) / sd)
}

/// The statistical findings of `current` against `history` (oldest first).
pub fn stat_anomalies(history: &[Sample], current: &Sample) -> Vec<Anomaly> {
    let mut out = Vec::new();
    let mut check = |kind: &str, what: &str, unit: &str, values: Vec<f64>, value: Option<f64>| {
        let Some(value) = value else { return };
        if let Some(z) = zscore(&values, value) {
            if z.abs() > Z_THRESHOLD {
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                out.push(Anomaly::new(
                    kind,
                    format!(
                        "{what} {value:.3}{unit} is {z:+.1} standard deviations from the mean {mean:.3}{unit} of the last {} runs",
                        values.len()
                    ),
                ));
            }
        }
    };
    check(
        "duration_zscore",
        "duration",
        "s",
        history.iter().map(|s| s.duration_seconds).collect(),
        Some(current.duration_seconds),
    );
    check(
        "cpu_zscore",
        "agent CPU time",
        "s",
        history.iter().filter_map(|s| s.cpu_seconds).collect(),
        current.cpu_seconds,
    );
    check(
        "memory_zscore",
        "agent peak RSS",
        " MiB",
        history
            .iter()
            .filter_map(|s| s.peak_rss_bytes.map(|b| b as f64 / 1048576.0))
            .collect(),
        current.peak_rss_bytes.map(|b| b as f64 / 1048576.0),
    );
    out
}

/// Marks the anomalies whose kind is in `fail_on`; returns whether any is.
pub fn apply_fail_on(anomalies: &mut [Anomaly], fail_on: &[String]) -> bool {
    let mut any = false;
    for anomaly in anomalies {
        anomaly.fails = fail_on.contains(&anomaly.kind);
        any |= anomaly.fails;
    }
    any
}

/// The last [`BASELINE_RUNS`] samples of every test, by full test name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Samples per test, oldest first.
    pub tests: BTreeMap<String, Vec<Sample>>,
}

impl Baseline {
    /// Reads `path`; a missing or unreadable file is an empty baseline.
    pub fn load(path: &Path) -> Self {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// Writes it to `path` (through a temporary file and a rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        crate::report::write_atomic(path, text.as_bytes())
    }

    /// The samples of `test`, oldest first.
    pub fn history(&self, test: &str) -> &[Sample] {
        self.tests.get(test).map_or(&[], Vec::as_slice)
    }

    /// Adds a sample of `test`, keeping the last [`BASELINE_RUNS`].
    pub fn record(&mut self, test: &str, sample: Sample) {
        let samples = self.tests.entry(test.to_string()).or_default();
        samples.push(sample);
        let excess = samples.len().saturating_sub(BASELINE_RUNS);
        samples.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_runtime::client::ExecOutput;
    use agentvm_runtime::protocol::{ExitReport, ExitStatus, ResourceUsage};
    use std::time::Duration;

    fn run(timed_out: bool, truncated: bool, rss: Option<u64>, cpu_ms: u64) -> AgentRun {
        run_with(
            timed_out,
            truncated,
            rss,
            cpu_ms,
            ResourceUsage::default(),
            Vec::new(),
        )
    }

    fn run_with(
        timed_out: bool,
        truncated: bool,
        rss: Option<u64>,
        cpu_ms: u64,
        extra: ResourceUsage,
        outside: Vec<String>,
    ) -> AgentRun {
        AgentRun::from_changes(
            ExecOutput {
                stdout: b"x".to_vec(),
                stderr: Vec::new(),
                report: ExitReport {
                    status: if timed_out {
                        ExitStatus::Signal(9)
                    } else {
                        ExitStatus::Code(0)
                    },
                    timed_out,
                    duration: Duration::from_secs(5),
                    resources: ResourceUsage {
                        peak_rss_bytes: rss,
                        user_cpu: Some(Duration::from_millis(cpu_ms)),
                        system_cpu: None,
                        ..extra
                    },
                    stdout_bytes: 1 << 20,
                    stderr_bytes: 0,
                    stdout_truncated: truncated,
                    stderr_truncated: false,
                },
            },
            agentvm_runtime::protocol::ChangeList {
                outside_workspace: outside,
                ..Default::default()
            },
            &crate::redact::Secrets::new(),
        )
    }

    fn limits(memory: Option<u64>) -> RuleLimits {
        RuleLimits {
            memory_limit_bytes: memory,
            process_limit: Some(100),
            network_isolated: true,
        }
    }

    fn kinds(anomalies: &[Anomaly]) -> Vec<&str> {
        anomalies.iter().map(|a| a.kind.as_str()).collect()
    }

    #[test]
    fn rules() {
        let quiet = ResourceUsage {
            processes_started: Some(1000),
            peak_processes: Some(100),
            unroutable_packets: Some(0),
            ..ResourceUsage::default()
        };
        let calm = run_with(false, false, Some(1 << 20), 1, quiet, Vec::new());
        assert!(rule_anomalies(&calm, 1, &limits(Some(256 << 20))).is_empty());
        let found = rule_anomalies(
            &run(true, true, Some(230 << 20), 1),
            2,
            &limits(Some(256 << 20)),
        );
        assert_eq!(kinds(&found), ["timeout", "output_cap", "memory_limit"]);
        assert!(found[0].message.contains("agent run 2"), "{found:?}");
        assert!(found[2].message.contains("230 MiB"), "{found:?}");
        // Unknown limit or RSS: no memory rule.
        let found = rule_anomalies(&run(false, false, Some(230 << 20), 1), 1, &limits(None));
        assert!(found.is_empty());
    }

    #[test]
    fn oom_kill_rule() {
        let killed = ResourceUsage {
            oom_kills: Some(1),
            ..ResourceUsage::default()
        };
        let r = run_with(false, false, None, 1, killed, Vec::new());
        assert!(r.oom_killed());
        let found = rule_anomalies(&r, 3, &limits(None));
        assert_eq!(kinds(&found), ["oom_kill"]);
        assert!(found[0].message.contains("agent run 3"), "{found:?}");
        let spared = ResourceUsage {
            oom_kills: Some(0),
            ..ResourceUsage::default()
        };
        let r = run_with(false, false, None, 1, spared, Vec::new());
        assert!(!r.oom_killed());
        assert!(rule_anomalies(&r, 1, &limits(None)).is_empty());
    }

    #[test]
    fn process_outside_and_network_rules() {
        let busy = ResourceUsage {
            processes_started: Some(340),
            peak_processes: Some(101),
            unroutable_packets: Some(3),
            ..ResourceUsage::default()
        };
        let outside: Vec<String> = (0..7).map(|i| format!("/etc/f{i}")).collect();
        let r = run_with(false, false, None, 1, busy, outside);
        let found = rule_anomalies(&r, 1, &limits(None));
        assert_eq!(
            kinds(&found),
            ["process_count", "outside_workspace", "network_attempt"]
        );
        assert!(
            found[0].message.contains(
                "had 101 processes at once, more than the limit of 100 (process_limit); 340 started in all"
            ),
            "{found:?}"
        );
        assert!(
            found[1]
                .message
                .contains("changed 7 path(s) outside the workspace: /etc/f0, /etc/f1, /etc/f2, /etc/f3, /etc/f4, ..."),
            "{found:?}"
        );
        assert!(found[2].message.contains("3 packet(s)"), "{found:?}");
        // With a network, packets without a route are not attempts to escape;
        // without a limit, no count is too many.
        let open = RuleLimits {
            network_isolated: false,
            process_limit: None,
            ..limits(None)
        };
        assert_eq!(kinds(&rule_anomalies(&r, 1, &open)), ["outside_workspace"]);
    }

    #[test]
    fn refused_connections_are_named() {
        let record = |host: &str, allowed| agentvm_gateway::ConnectionRecord {
            host: host.into(),
            port: 443,
            kind: agentvm_gateway::ConnectionKind::Connect,
            allowed,
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
            error: (!allowed).then(|| "not on the allowlist".into()),
        };
        let quiet = run(false, false, None, 1).with_network(vec![record("ok.example", true)]);
        assert!(rule_anomalies(&quiet, 1, &limits(None)).is_empty());
        let refused = run(false, false, None, 1).with_network(vec![
            record("ok.example", true),
            record("denied.example", false),
        ]);
        let found = rule_anomalies(&refused, 2, &limits(None));
        assert_eq!(kinds(&found), ["egress_denied"]);
        assert!(
            found[0]
                .message
                .contains("agent run 2 was refused 1 connection(s) by the egress allowlist: denied.example:443"),
            "{found:?}"
        );
    }

    #[test]
    fn zscores_need_enough_samples() {
        assert_eq!(zscore(&[1.0, 1.0, 1.0, 1.0], 100.0), None);
        let z = zscore(&[1.0, 2.0, 3.0, 4.0, 5.0], 3.0).unwrap();
        assert!(z.abs() < 1e-9);
        let z = zscore(&[1.0, 2.0, 3.0, 4.0, 5.0], 13.0).unwrap();
        assert!((z - 10.0 / 2.5f64.sqrt()).abs() < 1e-9, "{z}");
        // A constant history: the floor (1 % of the mean) applies.
        let z = zscore(&[1.0; 5], 1.005).unwrap();
        assert!((z - 0.5).abs() < 1e-9, "{z}");
    }

    #[test]
    fn statistics_flag_outliers_only() {
        let history: Vec<Sample> = (0..10)
            .map(|i| Sample {
                duration_seconds: 1.0 + (i % 3) as f64 * 0.1,
                cpu_seconds: Some(0.5 + (i % 2) as f64 * 0.05),
                peak_rss_bytes: Some((10 + i % 2) << 20),
            })
            .collect();
        let normal = Sample {
            duration_seconds: 1.1,
            cpu_seconds: Some(0.52),
            peak_rss_bytes: Some(10 << 20),
        };
        assert!(stat_anomalies(&history, &normal).is_empty());
        let slow = Sample {
            duration_seconds: 30.0,
            cpu_seconds: Some(25.0),
            peak_rss_bytes: Some(200 << 20),
        };
        let found = stat_anomalies(&history, &slow);
        assert_eq!(
            kinds(&found),
            ["duration_zscore", "cpu_zscore", "memory_zscore"]
        );
        assert!(found[0].message.contains("last 10 runs"), "{found:?}");
        assert!(stat_anomalies(&history[..4], &slow).is_empty());
    }

    #[test]
    fn samples_aggregate_runs() {
        let s = Sample::of(
            2.0,
            &[
                run(false, false, Some(5), 100),
                run(false, false, Some(7), 300),
            ],
        );
        assert_eq!(s.peak_rss_bytes, Some(7));
        assert!((s.cpu_seconds.unwrap() - 0.4).abs() < 1e-9);
        assert_eq!(Sample::of(1.0, &[]).cpu_seconds, None);
    }

    #[test]
    fn baseline_keeps_the_last_runs_and_round_trips() {
        let mut b = Baseline::default();
        for i in 0..25 {
            b.record(
                "t",
                Sample {
                    duration_seconds: i as f64,
                    ..Sample::default()
                },
            );
        }
        assert_eq!(b.history("t").len(), BASELINE_RUNS);
        assert_eq!(b.history("t")[0].duration_seconds, 5.0);
        assert!(b.history("other").is_empty());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baseline.json");
        b.save(&path).unwrap();
        assert_eq!(Baseline::load(&path), b);
        assert_eq!(
            Baseline::load(&dir.path().join("none")),
            Baseline::default()
        );
    }

    #[test]
    fn fail_on_marks_kinds() {
        let mut found = vec![
            Anomaly::new("timeout", String::new()),
            Anomaly::new("output_cap", String::new()),
        ];
        assert!(!apply_fail_on(&mut found, &[]));
        assert!(apply_fail_on(&mut found, &["output_cap".to_string()]));
        assert_eq!((found[0].fails, found[1].fails), (false, true));
    }
}
