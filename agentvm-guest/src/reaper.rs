//! The one child reaper of the agent.
//!
//! The agent may be PID 1 and is a child subreaper, so it inherits orphaned
//! descendants of the commands it runs and must reap them. Nothing else in the
//! agent waits for children (no `tokio::process`, no `Child::wait`): on SIGCHLD
//! the reaper loops `wait4(-1, WNOHANG)` and hands each status (with its
//! rusage) to the waiter registered for that pid; orphans are just reaped.
//!
//! Children are spawned through [`Reaper::spawn`], which holds the reaper's
//! lock while spawning and registering the waiter. A child that exits at once
//! can therefore not be reaped before its waiter exists.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agentvm_runtime::protocol::{ExitStatus, ResourceUsage};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::spawn::{SpawnSpec, SpawnedChild};

/// How a reaped child ended and what it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Exit code or terminating signal.
    pub status: ExitStatus,
    /// rusage of the child and the descendants it waited for.
    pub resources: ResourceUsage,
}

/// Reaps every child of the process; see the module docs.
#[derive(Debug, Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<libc::pid_t, oneshot::Sender<Reaped>>>,
}

/// Safety net in case a SIGCHLD is ever missed.
const REAP_INTERVAL: Duration = Duration::from_secs(1);

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task. Must be
    /// called inside the tokio runtime, before any child is spawned.
    pub fn start() -> io::Result<Arc<Self>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Self::default());
        let task_reaper = Arc::clone(&reaper);
        tokio::spawn(async move {
            loop {
                task_reaper.reap_all();
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tokio::time::sleep(REAP_INTERVAL) => {}
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns a command ([`crate::spawn::spawn`]) and registers a waiter for
    /// it. The receiver gets the child's status once it is reaped.
    pub fn spawn(
        &self,
        spec: &SpawnSpec<'_>,
    ) -> io::Result<(SpawnedChild, oneshot::Receiver<Reaped>)> {
        let mut waiters = self.lock();
        let child = crate::spawn::spawn(spec)?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.pid, tx);
        Ok((child, rx))
    }

    /// Reaps every child that has exited, without blocking.
    pub fn reap_all(&self) {
        let mut waiters = self.lock();
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: rusage is plain old data; all-zero is a valid value.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: both pointers are valid for writes for the whole call.
            let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut usage) };
            if pid > 0 {
                let reaped = Reaped {
                    status: decode_status(status),
                    resources: resources(&usage),
                };
                if let Some(waiter) = waiters.remove(&pid) {
                    // The waiter may be gone (its connection ended): fine.
                    let _ = waiter.send(reaped);
                }
                continue;
            }
            if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // 0: children remain but none has exited; ECHILD: no children.
            break;
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<libc::pid_t, oneshot::Sender<Reaped>>> {
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Turns a raw wait status into the protocol's exit status.
pub fn decode_status(status: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

fn resources(usage: &libc::rusage) -> ResourceUsage {
    let time = |tv: libc::timeval| {
        Duration::from_secs(tv.tv_sec.max(0) as u64)
            + Duration::from_micros(tv.tv_usec.clamp(0, 999_999) as u64)
    };
    ResourceUsage {
        // Linux reports ru_maxrss in KiB.
        peak_rss_bytes: Some((usage.ru_maxrss.max(0) as u64).saturating_mul(1024)),
        user_cpu: Some(time(usage.ru_utime)),
        system_cpu: Some(time(usage.ru_stime)),
        processes_started: None,
        peak_processes: None,
        unroutable_packets: None,
        oom_kills: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_exit_codes_and_signals() {
        // Encodings as produced by the kernel: code << 8, or the signal number.
        assert_eq!(decode_status(3 << 8), ExitStatus::Code(3));
        assert_eq!(decode_status(0), ExitStatus::Code(0));
        assert_eq!(
            decode_status(libc::SIGKILL),
            ExitStatus::Signal(libc::SIGKILL)
        );
        assert_eq!(
            decode_status(libc::SIGTERM | 0x80),
            ExitStatus::Signal(libc::SIGTERM)
        );
    }
}
