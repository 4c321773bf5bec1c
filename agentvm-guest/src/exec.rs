//! Running one command: spawn, feed stdin, stream capped output, enforce the
//! timeout by killing the process tree, and build the exit report.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_runtime::protocol::{
    ErrorKind, ErrorReply, ExecRequest, ExitReport, ExitStatus, Message, OutputChunk, OutputStream,
    ResourceUsage,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use crate::counters::Counters;
use crate::files::{io_error, resolve, Roots};
use crate::reaper::{Reaped, Reaper};
use crate::server::{error_reply, Outbox};
use crate::spawn::{command_env, SpawnSpec};

/// The user commands run as when a request names none (`--default-user`);
/// unset: the agent's own user (root).
pub static DEFAULT_USER: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();

/// `HOME`, `USER` and `LOGNAME` of `uid` from `passwd` text (`/etc/passwd`).
pub fn user_env(passwd: &str, uid: u32) -> Vec<(String, String)> {
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 7 && f[2].parse() == Ok(uid)).then(|| {
                vec![
                    ("HOME".to_string(), f[5].to_string()),
                    ("USER".to_string(), f[0].to_string()),
                    ("LOGNAME".to_string(), f[0].to_string()),
                ]
            })
        })
        .unwrap_or_default()
}
use crate::cgroup::CommandCgroup;
use crate::tree::Tree;

/// After the main process exits, how long output is still drained (from
/// descendants holding the pipes) before the rest of the tree is killed, and
/// again after it was killed before the pipes are given up.
const DRAIN: Duration = Duration::from_millis(200);
/// How often the tree is rescanned while the command runs, to remember
/// descendants that might be reparented later.
const SCAN_INTERVAL: Duration = Duration::from_millis(500);
/// Output is read in pieces of at most this size (one Output frame each).
const READ_CHUNK: usize = 64 * 1024;
/// Longest kill grace honoured.
const MAX_GRACE: Duration = Duration::from_secs(3600);

/// A spawned command, ready to be run to completion by [`run`].
#[derive(Debug)]
pub struct Spawned {
    /// The command's process tree (shared with Kill requests).
    pub tree: Arc<Tree>,
    stdin: Option<(pipe::Sender, Vec<u8>)>,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    exited: oneshot::Receiver<Reaped>,
    started: Instant,
    timeout: Option<Duration>,
    kill_grace: Duration,
    output_limit: u64,
    counters_before: Counters,
}

/// Validates an exec request and spawns its command in its own process group.
pub fn spawn(request: ExecRequest, roots: &Roots, reaper: &Reaper) -> Result<Spawned, ErrorReply> {
    let Some((program, args)) = request.argv.split_first() else {
        return Err(error_reply(
            ErrorKind::BadRequest,
            "exec with an empty argv",
        ));
    };
    let cwd = resolve(roots, request.cwd.as_deref().unwrap_or(""))?;
    match std::fs::metadata(&cwd) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(error_reply(
                ErrorKind::BadRequest,
                format!("working directory {} is not a directory", cwd.display()),
            ))
        }
        Err(e) => return Err(io_error("working directory", &cwd, &e)),
    }

    let user = request
        .user
        .map(|u| (u.uid, u.gid))
        .or_else(|| DEFAULT_USER.get().copied());
    // Another user gets its own HOME/USER/LOGNAME (the request still wins).
    let mut request_env = request.env.clone();
    if let Some((uid, _)) = user {
        // SAFETY: getuid cannot fail.
        if uid != unsafe { libc::getuid() } {
            let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
            let mut env = user_env(&passwd, uid);
            env.retain(|(k, _)| !request.env.iter().any(|(rk, _)| rk == k));
            env.extend(request_env);
            request_env = env;
        }
    }
    let env = command_env(std::env::vars_os(), request.clear_env, &cwd, &request_env);
    let counters_before = Counters::read();
    let cgroup = CommandCgroup::create();
    let (child, exited) = reaper
        .spawn(&SpawnSpec {
            program,
            args,
            env,
            cwd: &cwd,
            stdin_pipe: !request.stdin.is_empty(),
            user,
            cgroup: cgroup.as_ref().map(CommandCgroup::dir),
        })
        .map_err(|e| {
            error_reply(
                ErrorKind::SpawnFailed,
                format!("cannot start {program:?} in {}: {e}", cwd.display()),
            )
        })?;
    let started = Instant::now();
    let pid = child.pid;
    let tree = Arc::new(Tree::new(pid, cgroup));

    let pipes = (|| -> std::io::Result<_> {
        let stdin = match child.stdin {
            Some(stdin) => Some((pipe::Sender::from_owned_fd(stdin)?, request.stdin)),
            None => None,
        };
        Ok((
            stdin,
            pipe::Receiver::from_owned_fd(child.stdout)?,
            pipe::Receiver::from_owned_fd(child.stderr)?,
        ))
    })();
    let (stdin, stdout, stderr) = match pipes {
        Ok(pipes) => pipes,
        Err(e) => {
            // SAFETY: kill takes plain integers; the group is the child's own.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            return Err(error_reply(
                ErrorKind::Io,
                format!("cannot set up the pipes of {program:?}: {e}"),
            ));
        }
    };
    Ok(Spawned {
        tree,
        stdin,
        stdout,
        stderr,
        exited,
        started,
        timeout: request.timeout,
        kill_grace: request.kill_grace.min(MAX_GRACE),
        output_limit: request.output_limit,
        counters_before,
    })
}

/// Byte count of one output stream.
#[derive(Debug, Default)]
struct StreamStats {
    total: AtomicU64,
    truncated: AtomicBool,
}

/// How many bytes of a read of `n` bytes are sent, when `already` bytes of
/// the stream were read before and at most `limit` may be sent in all.
pub fn capped_len(already: u64, n: usize, limit: u64) -> usize {
    limit.saturating_sub(already).min(n as u64) as usize
}

/// Reads a stream to its end, sending the first `limit` bytes as Output
/// chunks and counting (and dropping) the rest, so the writer never blocks on
/// a full pipe once the cap is reached.
async fn pump(
    mut rx: pipe::Receiver,
    stream: OutputStream,
    limit: u64,
    request_id: u64,
    out: Outbox,
    stats: Arc<StreamStats>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut connected = true;
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let already = stats.total.fetch_add(n as u64, Ordering::Relaxed);
        let keep = capped_len(already, n, limit);
        if keep < n {
            stats.truncated.store(true, Ordering::Relaxed);
        }
        if keep > 0 && connected {
            let chunk = OutputChunk {
                stream,
                data: buf[..keep].to_vec(),
            };
            connected = out.send(request_id, Message::Output(chunk)).await;
        }
    }
}

async fn feed_stdin(mut tx: pipe::Sender, data: Vec<u8>) {
    // EPIPE when the command does not read it all: fine.
    let _ = tx.write_all(&data).await;
}

/// Runs a spawned command to its end, streaming its output to `out` under
/// `request_id`, and returns its exit report. The report is ready only when
/// the main process was reaped, the output was drained (or given up on) and
/// no process of the tree is left.
pub async fn run(spawned: Spawned, request_id: u64, out: Outbox) -> ExitReport {
    let Spawned {
        tree,
        stdin,
        stdout,
        stderr,
        mut exited,
        started,
        timeout,
        kill_grace,
        output_limit,
        counters_before,
    } = spawned;

    let stdin_task = stdin.map(|(tx, data)| tokio::spawn(feed_stdin(tx, data)));
    let out_stats = Arc::new(StreamStats::default());
    let err_stats = Arc::new(StreamStats::default());
    let pumps = async {
        tokio::join!(
            pump(
                stdout,
                OutputStream::Stdout,
                output_limit,
                request_id,
                out.clone(),
                Arc::clone(&out_stats)
            ),
            pump(
                stderr,
                OutputStream::Stderr,
                output_limit,
                request_id,
                out.clone(),
                Arc::clone(&err_stats)
            ),
        )
    };
    tokio::pin!(pumps);
    let mut pumps_done = false;

    let deadline = timeout.and_then(|t| tokio::time::Instant::from_std(started).checked_add(t));
    let timeout_sleep =
        tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now));
    tokio::pin!(timeout_sleep);
    let mut timed_out = false;
    let mut killer: Option<tokio::task::JoinHandle<()>> = None;
    // The first scan waits a whole interval: a short command (the common
    // case) then costs one /proc scan (at the end) instead of two.
    let mut scan =
        tokio::time::interval_at(tokio::time::Instant::now() + SCAN_INTERVAL, SCAN_INTERVAL);
    let mut peak_processes: Option<u64> = None;
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let reaped = loop {
        tokio::select! {
            reaped = &mut exited => break reaped.ok(),
            _ = &mut pumps, if !pumps_done => pumps_done = true,
            _ = &mut timeout_sleep, if deadline.is_some() && !timed_out => {
                timed_out = true;
                let tree = Arc::clone(&tree);
                killer = Some(tokio::spawn(async move { tree.kill(Some(kill_grace)).await }));
            }
            _ = scan.tick() => {
                let members = tree.refresh() as u64;
                peak_processes = Some(peak_processes.map_or(members, |p| p.max(members)));
            }
        }
    };
    let duration = started.elapsed();

    // Descendants may still hold the pipes: drain for a bounded time, then
    // kill whatever is left of the tree and drain what they wrote.
    if !pumps_done {
        pumps_done = tokio::time::timeout(DRAIN, &mut pumps).await.is_ok();
    }
    if let Some(killer) = killer {
        killer.abort();
    }
    tree.kill(None).await;
    if !pumps_done {
        let _ = tokio::time::timeout(DRAIN, &mut pumps).await;
    }
    if let Some(task) = stdin_task {
        task.abort();
    }

    let Reaped {
        status,
        mut resources,
    } = reaped.unwrap_or(Reaped {
        status: ExitStatus::Code(-1),
        resources: ResourceUsage::default(),
    });
    let grown = counters_before.since(Counters::read());
    resources.processes_started = grown.forks;
    resources.peak_processes = peak_processes;
    resources.unroutable_packets = grown.unroutable;
    resources.oom_kills = grown.oom_kills;
    let stdout_bytes = out_stats.total.load(Ordering::Relaxed);
    let stderr_bytes = err_stats.total.load(Ordering::Relaxed);
    ExitReport {
        status,
        timed_out,
        duration,
        resources,
        stdout_bytes,
        stderr_bytes,
        stdout_truncated: out_stats.truncated.load(Ordering::Relaxed),
        stderr_truncated: err_stats.truncated.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::{capped_len, user_env};

    #[test]
    fn user_env_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nagent:x:1000:1000::/home/agent:/bin/bash\n";
        assert_eq!(
            user_env(passwd, 1000),
            [
                ("HOME".to_string(), "/home/agent".to_string()),
                ("USER".into(), "agent".into()),
                ("LOGNAME".into(), "agent".into())
            ]
        );
        assert!(user_env(passwd, 4242).is_empty());
        assert!(user_env("garbage\n", 0).is_empty());
    }

    #[test]
    fn caps_output_at_the_limit() {
        assert_eq!(capped_len(0, 100, 1000), 100);
        assert_eq!(capped_len(950, 100, 1000), 50);
        assert_eq!(capped_len(1000, 100, 1000), 0);
        assert_eq!(capped_len(5000, 100, 1000), 0);
        assert_eq!(capped_len(0, 100, 0), 0);
        assert_eq!(capped_len(u64::MAX - 1, 100, u64::MAX), 1);
    }
}
