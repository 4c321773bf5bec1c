//! The `agent` image rows of `cargo xtask bench`: when that image is built,
//! the measuring program runs a second, short time with it (`light` profile)
//! and each revert undoes [`WRITE_MIB`] MiB written outside the workspace.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::report::Raw;
use super::stats::Summary;

/// The image measured.
pub const IMAGE: &str = "agent";
/// Its resource profile (agents need more than the default 256 MiB).
pub const PROFILE: &str = "light";
/// MiB written outside the workspace before each revert.
pub const WRITE_MIB: usize = 50;

/// The measuring program's arguments for this run (few samples: the full
/// run already measured the framework; these show what the image adds).
pub fn bench_args(json: &Path, quick: bool) -> Vec<String> {
    let (boots, reverts, execs) = if quick { (2, 5, 30) } else { (3, 10, 100) };
    let mut args = vec!["--json".to_string(), json.display().to_string()];
    for (flag, n) in [
        ("--boots", boots),
        ("--reverts", reverts),
        ("--execs", execs),
        ("--acquires", 5),
        ("--file-mib", 1),
        ("--file-rounds", 1),
        ("--warmup-vms", 1),
        ("--revert-write-mib", WRITE_MIB),
    ] {
        args.push(flag.to_string());
        args.push(n.to_string());
    }
    args
}

/// The rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentImageReport {
    pub image: String,
    /// Size of the read-only root file system file (MiB).
    pub rootfs_file_mib: f64,
    pub guest_memory_mib: u32,
    pub cold_boot_to_hello_ms: Summary,
    pub golden_snapshot_ms: Summary,
    /// Revert after writing `revert_write_mib` outside the workspace.
    pub revert_ms: Summary,
    pub revert_write_mib: usize,
    /// As the image's default (unprivileged) user.
    pub exec_true_ms: Summary,
}

impl AgentImageReport {
    /// `None` when a phase has no samples.
    pub fn build(raw: &Raw, rootfs_bytes: u64) -> Option<Self> {
        let boots: Vec<f64> = raw.cold_boots.iter().map(|b| b.to_hello_ms).collect();
        let snaps: Vec<f64> = raw.cold_boots.iter().map(|b| b.snapshot_ms).collect();
        let reverts: Vec<f64> = raw.reverts.iter().map(|r| r.total_ms).collect();
        Some(Self {
            image: raw.image.clone(),
            rootfs_file_mib: (rootfs_bytes as f64 / 1048576.0 * 10.0).round() / 10.0,
            guest_memory_mib: raw.guest_memory_mib,
            cold_boot_to_hello_ms: Summary::of(&boots)?,
            golden_snapshot_ms: Summary::of(&snaps)?,
            revert_ms: Summary::of(&reverts)?,
            revert_write_mib: WRITE_MIB,
            exec_true_ms: Summary::of(&raw.exec_true_ms)?,
        })
    }

    /// The table printed after the main report.
    pub fn render(&self) -> String {
        let mut out = format!(
            "\nagent image {:?} ({} MiB guest): read-only root file system {:.1} MiB\n",
            self.image, self.guest_memory_mib, self.rootfs_file_mib
        );
        let _ = writeln!(out, "{:<44} {:>8} {:>8} {:>4}", "", "p50", "p90", "n");
        let revert = format!("revert after writing {} MiB (ms)", self.revert_write_mib);
        for (name, s) in [
            ("cold boot to Hello (ms)", &self.cold_boot_to_hello_ms),
            ("golden snapshot (ms)", &self.golden_snapshot_ms),
            (revert.as_str(), &self.revert_ms),
            ("exec `true` as the default user (ms)", &self.exec_true_ms),
        ] {
            let _ = writeln!(out, "{name:<44} {:>8.1} {:>8.1} {:>4}", s.p50, s.p90, s.n);
        }
        out
    }
}

/// The root file system file of a built image (`manifest.json`'s
/// `rootfs.file`), with its size; `None` when the image or disk is missing.
pub fn rootfs_of(image_dir: &Path) -> Option<(std::path::PathBuf, u64)> {
    let text = std::fs::read_to_string(image_dir.join("manifest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let file = image_dir.join(v["rootfs"]["file"].as_str()?);
    let size = std::fs::metadata(&file).ok()?.len();
    Some((file, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let a = bench_args(Path::new("/t/a.json"), true);
        assert_eq!(&a[..4], ["--json", "/t/a.json", "--boots", "2"]);
        assert_eq!(&a[a.len() - 2..], ["--revert-write-mib", "50"]);
    }

    #[test]
    fn rootfs_from_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(rootfs_of(dir.path()), None);
        std::fs::write(
            dir.path().join("manifest.json"),
            r#"{"rootfs": {"file": "r.erofs"}}"#,
        )
        .unwrap();
        assert_eq!(rootfs_of(dir.path()), None);
        std::fs::write(dir.path().join("r.erofs"), [0u8; 10]).unwrap();
        assert_eq!(
            rootfs_of(dir.path()),
            Some((dir.path().join("r.erofs"), 10))
        );
    }
}
