//! How QEMU reads and writes the snapshot-state disk.
//!
//! `loadvm` reads the saved RAM (≈ 60–100 MiB here) from the state qcow2 in
//! 32 KiB requests. With QEMU's default `aio=threads` each request is handed
//! to a worker thread and its completion signalled back (a futex wake and an
//! eventfd write per request), which showed as the largest host-side cost of
//! a revert in `perf`; `aio=io_uring` submits and completes them without the
//! thread hand-off. Measured with `agentvm-bench` on this 2-core machine
//! under load, restore p50 fell from 108–163 ms to 42–64 ms (see the
//! closing note of issue 16). io_uring can be missing (QEMU built without
//! liburing, `kernel.io_uring_disabled`, a seccomp profile), so it is probed
//! once with `qemu-img` and the default is kept when the probe fails.

use std::path::Path;
use std::process::{Command, Stdio};

/// The `aio=` mode of the state drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateIo {
    /// `aio=io_uring`.
    IoUring,
    /// QEMU's default thread pool (`aio=threads`).
    Threads,
}

impl StateIo {
    /// The `-drive` option value.
    pub fn aio(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::Threads => "threads",
        }
    }
}

/// Whether `qemu-img` opens a file with `aio=io_uring` (same block layer
/// and kernel as `qemu-system`). `scratch_dir` must be writable; the probe
/// file is removed again.
pub fn detect(qemu_img: &Path, scratch_dir: &Path) -> StateIo {
    let probe = scratch_dir.join(format!(".io-uring-probe-{}", std::process::id()));
    let usable = std::fs::write(&probe, b"").is_ok()
        && Command::new(qemu_img)
            .arg("info")
            .arg("--image-opts")
            .arg(format!(
                "driver=file,filename={},aio=io_uring",
                super::argv::opt_value(&probe.to_string_lossy())
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(&probe);
    let io = if usable {
        StateIo::IoUring
    } else {
        StateIo::Threads
    };
    tracing::info!(aio = io.aio(), "state disk I/O mode chosen");
    io
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_qemu_img_falls_back_to_threads() {
        let dir = std::env::temp_dir();
        assert_eq!(
            detect(Path::new("/nonexistent/qemu-img"), &dir),
            StateIo::Threads
        );
        assert_eq!(StateIo::IoUring.aio(), "io_uring");
    }
}
