//! Spawning QEMU so that it never outlives the host process, and reaping it.
//!
//! Three layers make sure no QEMU survives the test process that started it:
//!
//! 1. **PR_SET_PDEATHSIG(SIGKILL)** in the child between fork and exec. The
//!    kernel sends that signal when the *thread* that forked the child exits
//!    — not the process. tokio's blocking-pool and worker threads come and go
//!    (an idle blocking thread exits after 10 s), so a QEMU forked from one of
//!    them would be killed at a random later moment. Every QEMU is therefore
//!    forked by one dedicated, never-exiting *supervisor thread* that receives
//!    spawn requests over a channel and replies with the `Child`. That thread
//!    dies only with the process, which is exactly when the QEMUs must die.
//! 2. **Kill on drop**: dropping a [`QemuProcess`] sends SIGKILL and hands the
//!    child to the supervisor thread, which reaps it (no zombies, no blocking
//!    wait in `Drop`).
//! 3. **Pid files + sweep** (see [`super::rundir`]) for the case where the host
//!    process was killed so hard that even PDEATHSIG could not help (e.g. the
//!    QEMU was started by a process that is gone, from an older build).
//!
//! QEMU is also put in its own process group, so that a terminal's Ctrl-C
//! goes to the test process only (which then dies and takes QEMU with it
//! through PDEATHSIG) instead of racing it.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How often a child being waited for is polled.
const POLL: Duration = Duration::from_millis(5);
/// How often the supervisor thread re-checks children it is reaping.
const REAP_POLL: Duration = Duration::from_millis(50);

/// Process-level failures.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("failed to spawn {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The supervisor thread is gone (cannot happen unless it panicked).
    #[error("the QEMU supervisor thread is not running")]
    SupervisorGone,
    /// Waiting for or signalling the child failed.
    #[error("process {pid}: {source}")]
    Io {
        /// The pid.
        pid: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

enum Request {
    Spawn {
        command: Box<Command>,
        reply: oneshot::Sender<io::Result<Child>>,
    },
    Reap(Child),
}

fn supervisor() -> Result<mpsc::Sender<Request>, ProcessError> {
    static SUPERVISOR: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let sender = SUPERVISOR.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        // The thread is never joined and never exits: see the module docs.
        let spawned = thread::Builder::new()
            .name("agentvm-qemu-supervisor".into())
            .spawn(move || supervise(rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the QEMU supervisor thread");
        }
        tx
    });
    Ok(sender.clone())
}

fn supervise(rx: mpsc::Receiver<Request>) {
    let mut reaping: Vec<Child> = Vec::new();
    loop {
        let request = if reaping.is_empty() {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(REAP_POLL)
        };
        match request {
            Ok(Request::Spawn { mut command, reply }) => {
                // If the requester gave up meanwhile (its future was dropped),
                // nobody owns the child: kill it and reap it here.
                if let Err(Ok(mut orphan)) = reply.send(command.spawn()) {
                    let _ = orphan.kill();
                    reaping.push(orphan);
                }
            }
            Ok(Request::Reap(child)) => reaping.push(child),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The sender lives in a static: never happens, but do not spin.
            Err(mpsc::RecvTimeoutError::Disconnected) if reaping.is_empty() => return,
            Err(mpsc::RecvTimeoutError::Disconnected) => thread::sleep(REAP_POLL),
        }
        reaping.retain_mut(|child| !matches!(child.try_wait(), Ok(Some(_)) | Err(_)));
    }
}

/// Makes the child receive SIGKILL when the thread that forked it exits,
/// and puts it in its own process group.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    let parent = rustix::process::getpid();
    command.process_group(0);
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe operations are allowed. It performs two raw syscalls
    // through rustix (prctl(PR_SET_PDEATHSIG) and getppid), which neither
    // allocate nor take locks, and builds an io::Error from a raw errno /
    // constant kind, which does not allocate either. It captures only a `Pid` (Copy).
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // If the parent died before prctl took effect, the signal will never come.
            if rustix::process::getppid() != Some(parent) {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            Ok(())
        });
    }
}

/// A running QEMU, killed when dropped.
#[derive(Debug)]
pub struct QemuProcess {
    child: Option<Child>,
    pid: u32,
    exit: Option<ExitStatus>,
}

impl QemuProcess {
    /// Starts `program args...` from the supervisor thread, with stdin from
    /// `/dev/null` and stdout/stderr appended to `log`.
    /// With `run_as` (uid, gid) the child drops to that user (and no
    /// supplementary groups) before exec.
    pub async fn spawn(
        program: &Path,
        args: &[String],
        log: &Path,
        run_as: Option<(u32, u32)>,
    ) -> Result<Self, ProcessError> {
        let spawn_err = |source| ProcessError::Spawn {
            program: program.display().to_string(),
            source,
        };
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some((uid, gid)) = run_as {
            // std drops supplementary groups when a root parent sets a uid.
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        // After the uid change (std runs pre_exec hooks last): a credential
        // change would clear the death signal.
        die_with_parent(&mut command);
        let (reply, response) = oneshot::channel();
        supervisor()?
            .send(Request::Spawn {
                command: Box::new(command),
                reply,
            })
            .map_err(|_| ProcessError::SupervisorGone)?;
        let child = response
            .await
            .map_err(|_| ProcessError::SupervisorGone)?
            .map_err(spawn_err)?;
        let pid = child.id();
        tracing::debug!(pid, program = %program.display(), "spawned");
        Ok(Self {
            child: Some(child),
            pid,
            exit: None,
        })
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if the process has exited (reaping it), without blocking.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.exit = child.try_wait().map_err(|source| ProcessError::Io {
                    pid: self.pid,
                    source,
                })?;
            }
        }
        Ok(self.exit)
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends SIGKILL unless the process has already been reaped.
    pub fn kill(&mut self) -> Result<(), ProcessError> {
        if self.try_exit_status()?.is_some() {
            return Ok(());
        }
        match self.child.as_mut() {
            Some(child) => child.kill().map_err(|source| ProcessError::Io {
                pid: self.pid,
                source,
            }),
            None => Ok(()),
        }
    }

    /// SIGKILL, then wait (up to `timeout`) until it is reaped.
    pub async fn kill_and_wait(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, ProcessError> {
        self.kill()?;
        self.wait_exit(timeout).await
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.exit.is_some() {
            return;
        }
        if let Some(mut child) = self.child.take() {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            let _ = child.kill();
            tracing::debug!(pid = self.pid, "killed QEMU on drop");
            match supervisor().and_then(|s| {
                s.send(Request::Reap(child))
                    .map_err(|_| ProcessError::SupervisorGone)
            }) {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "killed QEMU cannot be reaped")
                }
            }
        }
    }
}

/// Describes an exit status for error messages (`exit code 1`, `signal 9`).
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => format!("{status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "agentvm-process-test-{}-{name}.log",
            std::process::id()
        ))
    }

    fn proc_exists(pid: u32) -> bool {
        // A zombie still has /proc/<pid>; its state is 'Z'.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z'),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn spawn_wait_and_log() {
        let log = log_path("echo");
        let mut p = QemuProcess::spawn(
            Path::new("/bin/sh"),
            &["-c".into(), "echo out; echo err >&2; exit 3".into()],
            &log,
            None,
        )
        .await
        .unwrap();
        let status = p
            .wait_exit(Duration::from_secs(10))
            .await
            .unwrap()
            .expect("exited");
        assert_eq!(describe_exit(status), "exit code 3");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "out\nerr\n");
        std::fs::remove_file(&log).unwrap();
    }

    #[tokio::test]
    async fn child_runs_in_its_own_process_group() {
        let log = log_path("sleep");
        let mut p = QemuProcess::spawn(Path::new("/bin/sleep"), &["30".into()], &log, None)
            .await
            .unwrap();
        let pid = p.pid();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        // fields[0] = state (field 3), fields[2] = pgrp (field 5).
        assert_eq!(fields[2], pid.to_string(), "own process group");
        let status = p
            .kill_and_wait(Duration::from_secs(5))
            .await
            .unwrap()
            .expect("killed");
        assert_eq!(describe_exit(status), "signal 9");
        assert!(!proc_exists(pid));
        let _ = std::fs::remove_file(&log);
    }

    #[tokio::test]
    async fn drop_kills_and_reaps() {
        let log = log_path("drop");
        let p = QemuProcess::spawn(Path::new("/bin/sleep"), &["30".into()], &log, None)
            .await
            .unwrap();
        let pid = p.pid();
        drop(p);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "pid {pid} not reaped after drop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_file(&log);
    }

    #[tokio::test]
    async fn spawn_error_names_program() {
        let log = log_path("missing");
        let err = QemuProcess::spawn(Path::new("/nonexistent/qemu"), &[], &log, None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
        let _ = std::fs::remove_file(&log);
    }
}
