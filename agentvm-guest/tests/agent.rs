//! End-to-end tests of the guest agent binary over a UNIX socket, driven with
//! raw protocol frames. No VM needed.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use agentvm_runtime::protocol::{
    encode_frame, Ack, ChangeKind, ErrorKind, ExitStatus, FileKind, GetFileRequest, Hello,
    KillRequest, ListChangesRequest, Message, Ping, PutFileChunk, ResetBaselineRequest,
    ShutdownRequest, FILE_CHUNK_LEN, HEADER_LEN, MAGIC, PROTOCOL_VERSION,
};
use bytes::BytesMut;
use common::{cmd, process_exists, random_bytes, sh, Agent, Client};

// ---------------------------------------------------------------- handshake

#[tokio::test]
async fn hello_on_connect_and_on_request() {
    let agent = Agent::start();
    let (mut client, hello) = agent.connect().await;
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert_eq!(
        hello.software,
        format!("agentvm-guest {}", env!("CARGO_PKG_VERSION"))
    );
    for cap in ["exec", "files", "changes", "kill"] {
        assert!(
            hello.capabilities.iter().any(|c| c == cap),
            "missing capability {cap}"
        );
    }
    assert_eq!(
        hello.workspace_root.as_deref(),
        Some(agent.workspace.to_str().unwrap())
    );
    assert!(
        !hello.kernel.unwrap_or_default().is_empty(),
        "kernel release reported"
    );

    let host_hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        software: "test-host".into(),
        capabilities: vec![],
        workspace_root: None,
        kernel: None,
    };
    match client.request(7, Message::Hello(host_hello)).await {
        Message::Hello(reply) => assert_eq!(reply.protocol_version, PROTOCOL_VERSION),
        other => panic!("expected Hello, got {other:?}"),
    }
}

#[tokio::test]
async fn ping_pong() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;
    for (id, nonce) in [(1, 0), (2, u64::MAX), (3, 0xdead_beef)] {
        assert_eq!(
            client.request(id, Message::Ping(Ping { nonce })).await,
            Message::Pong(agentvm_runtime::protocol::Pong { nonce })
        );
    }
}

#[tokio::test]
async fn reconnect_after_disconnect() {
    let agent = Agent::start();
    for round in 0..3u64 {
        let (mut client, hello) = agent.connect().await;
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        let nonce = 100 + round;
        assert_eq!(
            client.request(1, Message::Ping(Ping { nonce })).await,
            Message::Pong(agentvm_runtime::protocol::Pong { nonce })
        );
        drop(client);
    }
    // A disconnect in the middle of a running command does not stop the agent either.
    let (mut client, _) = agent.connect().await;
    client.send(5, Message::Exec(cmd(&["sleep", "1000"]))).await;
    drop(client);
    let (mut client, _) = agent.connect().await;
    let out = client.exec(6, sh("echo still here")).await;
    assert_eq!(out.stdout_text(), "still here\n");
}

#[tokio::test]
async fn shutdown_stops_the_agent() {
    let mut agent = Agent::start();
    let (mut client, _) = agent.connect().await;
    let reply = client
        .request(9, Message::Shutdown(ShutdownRequest { poweroff: false }))
        .await;
    assert_eq!(reply, Message::Ok(Default::default()));
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent exits after Shutdown");
    assert!(status.success(), "exit status {status:?}");
}

// ---------------------------------------------------------------- robustness

/// Garbage in the stream (e.g. left in flight by a VM revert) is skipped up to
/// the next frame magic; a Ping with a fresh nonce resynchronises.
#[tokio::test]
async fn garbage_before_ping_is_skipped() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;

    let mut garbage = random_bytes(10_000, 42);
    for w in 0..garbage.len() - 3 {
        if garbage[w..w + 4] == MAGIC {
            garbage[w] = 0;
        }
    }
    garbage.extend_from_slice(b"AVM"); // a partial magic
    client.send_raw(&garbage).await;
    assert_eq!(
        client.request(1, Message::Ping(Ping { nonce: 77 })).await,
        Message::Pong(agentvm_runtime::protocol::Pong { nonce: 77 })
    );

    // A frame with a bad checksum is dropped as garbage too.
    let mut buf = BytesMut::new();
    encode_frame(2, &Message::Ping(Ping { nonce: 1 }), &mut buf).unwrap();
    buf[HEADER_LEN] ^= 0xff;
    client.send_raw(&buf).await;
    // A header with a foreign version as well.
    let mut buf2 = BytesMut::new();
    encode_frame(3, &Message::Ping(Ping { nonce: 2 }), &mut buf2).unwrap();
    buf2[4] = PROTOCOL_VERSION.wrapping_add(1);
    client.send_raw(&buf2).await;
    assert_eq!(
        client.request(4, Message::Ping(Ping { nonce: 78 })).await,
        Message::Pong(agentvm_runtime::protocol::Pong { nonce: 78 })
    );
    assert!(
        agent.log().contains("resync"),
        "resync is logged:\n{}",
        agent.log()
    );
}

/// Rewrites the kind byte of a valid frame and fixes its checksum.
fn with_kind(mut frame: BytesMut, kind: u8) -> BytesMut {
    frame[5] = kind;
    fix_crc(&mut frame);
    frame
}

fn fix_crc(frame: &mut BytesMut) {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&frame[..20]);
    hasher.update(&frame[HEADER_LEN..]);
    let crc = hasher.finalize();
    frame[20..24].copy_from_slice(&crc.to_le_bytes());
}

#[tokio::test]
async fn frame_local_errors_are_answered_and_serving_continues() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;

    // Unknown kind.
    let mut buf = BytesMut::new();
    encode_frame(55, &Message::Ping(Ping { nonce: 1 }), &mut buf).unwrap();
    client.send_raw(&with_kind(buf, 200)).await;
    let frame = client.recv().await;
    assert_eq!(frame.request_id, 55);
    match frame.message {
        Message::Error(e) => assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}"),
        other => panic!("expected Error, got {other:?}"),
    }

    // Known kind, payload that is not its body (a Ping needs a varint nonce).
    let mut frame = BytesMut::new();
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&[
        PROTOCOL_VERSION,
        Message::Ping(Ping { nonce: 0 }).kind(),
        0,
        0,
    ]);
    frame.extend_from_slice(&56u64.to_le_bytes());
    frame.extend_from_slice(&3u32.to_le_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(&[0xff, 0xff, 0xff]);
    fix_crc(&mut frame);
    client.send_raw(&frame).await;
    let frame = client.recv().await;
    assert_eq!(frame.request_id, 56);
    assert!(
        matches!(frame.message, Message::Error(ref e) if e.kind == ErrorKind::Protocol),
        "{frame:?}"
    );

    // A guest-only message sent to the guest.
    let e = client
        .request_error(
            57,
            Message::Changes(agentvm_runtime::protocol::ChangeList::default()),
        )
        .await;
    assert_eq!(e.kind, ErrorKind::BadRequest);

    assert_eq!(
        client.request(58, Message::Ping(Ping { nonce: 9 })).await,
        Message::Pong(agentvm_runtime::protocol::Pong { nonce: 9 })
    );
}

// ---------------------------------------------------------------- exec

#[tokio::test]
async fn exec_exit_codes_and_output() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;

    let out = client.exec(1, sh("echo out; echo err >&2; exit 3")).await;
    assert_eq!(out.exit.status, ExitStatus::Code(3));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!((out.exit.stdout_bytes, out.exit.stderr_bytes), (4, 4));
    assert!(!out.exit.timed_out && !out.exit.stdout_truncated && !out.exit.stderr_truncated);
    assert!(out.exit.resources.peak_rss_bytes.unwrap() > 0);
    assert!(out.exit.resources.user_cpu.is_some() && out.exit.resources.system_cpu.is_some());

    let out = client.exec(2, cmd(&["true"])).await;
    assert_eq!(out.exit.status, ExitStatus::Code(0));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());

    // A CPU-bound command reports CPU time.
    let out = client
        .exec(3, sh("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"))
        .await;
    let cpu = out.exit.resources.user_cpu.unwrap() + out.exit.resources.system_cpu.unwrap();
    assert!(cpu > Duration::from_millis(10), "cpu {cpu:?}");
    assert!(out.exit.duration >= cpu / 2);
}

/// The process count is the kernel's fork counter around the command: on
/// this (shared) host other processes may add to it, never subtract.
#[tokio::test]
async fn exec_counts_the_processes_it_started() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;
    let out = client
        .exec(1, sh("for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done"))
        .await;
    assert_eq!(out.exit.status, ExitStatus::Code(0));
    let started = out.exit.resources.processes_started.expect("counted");
    assert!(started >= 11, "sh + 10 children, got {started}");
    // No route is not counted on a host with a network; whether the
    // counter is readable is all this can check here.
    assert!(out.exit.resources.unroutable_packets.is_some());
}

#[tokio::test]
async fn exec_killed_by_signal() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;
    let out = client.exec(1, sh("kill -TERM $$")).await;
    assert_eq!(out.exit.status, ExitStatus::Signal(libc::SIGTERM));
    assert!(!out.exit.timed_out);
}

#[tokio::test]
async fn exec_stdin_env_and_cwd() {
    let agent = Agent::start_with(|ws| std::fs::create_dir(ws.join("sub")).unwrap());
    let (mut client, _) = agent.connect().await;

    // stdin is written, then closed.
    let mut req = cmd(&["cat"]);
    req.stdin = b"hello\0world\n".to_vec();
    let out = client.exec(1, req).await;
    assert_eq!(out.stdout, b"hello\0world\n");
    assert_eq!(out.exit.status, ExitStatus::Code(0));

    // A large stdin that the command does not read does not hang the exec.
    let mut req = sh("exit 0");
    req.stdin = vec![b'x'; 900 * 1024]; // far beyond a pipe buffer
    assert_eq!(client.exec(2, req).await.exit.status, ExitStatus::Code(0));

    // clear_env: only the variables given (and PWD).
    let mut req = cmd(&["env"]);
    req.clear_env = true;
    req.env = vec![("FOO".into(), "bar baz".into())];
    let out = client.exec(3, req).await;
    let mut lines: Vec<String> = out.stdout_text().lines().map(String::from).collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "FOO=bar baz".to_string(),
            format!("PWD={}", agent.workspace.display())
        ]
    );

    // Without clear_env the agent's environment is inherited.
    let mut req = sh("echo \"$X|${PATH:+has-path}\"");
    req.env = vec![("X".into(), "1".into())];
    assert_eq!(client.exec(4, req).await.stdout_text(), "1|has-path\n");

    // cwd: default workspace root, relative under it, absolute in staging.
    assert_eq!(
        client.exec(5, cmd(&["pwd", "-P"])).await.stdout_text(),
        format!("{}\n", agent.workspace.display())
    );
    let mut req = cmd(&["pwd", "-P"]);
    req.cwd = Some("sub".into());
    assert_eq!(
        client.exec(6, req).await.stdout_text(),
        format!("{}/sub\n", agent.workspace.display())
    );
    let mut req = cmd(&["pwd", "-P"]);
    req.cwd = Some(agent.staging.to_str().unwrap().into());
    assert_eq!(
        client.exec(7, req).await.stdout_text(),
        format!("{}\n", agent.staging.display())
    );
}

#[tokio::test]
async fn exec_request_errors() {
    let agent = Agent::start();
    std::os::unix::fs::symlink("/etc", agent.workspace.join("etc")).unwrap();
    let (mut client, _) = agent.connect().await;

    let e = client.request_error(1, Message::Exec(cmd(&[]))).await;
    assert_eq!(e.kind, ErrorKind::BadRequest);
    let e = client
        .request_error(2, Message::Exec(cmd(&["/nonexistent/program"])))
        .await;
    assert_eq!(e.kind, ErrorKind::SpawnFailed, "{e:?}");
    let e = client
        .request_error(3, Message::Exec(cmd(&["no-such-command-agentvm"])))
        .await;
    assert_eq!(e.kind, ErrorKind::SpawnFailed, "{e:?}");
    for (id, cwd) in [(4, "../"), (5, "/etc"), (6, "etc")] {
        let mut req = cmd(&["true"]);
        req.cwd = Some(cwd.into());
        let e = client.request_error(id, Message::Exec(req)).await;
        assert_eq!(e.kind, ErrorKind::PathOutsideWorkspace, "cwd {cwd}: {e:?}");
    }
    let mut req = cmd(&["true"]);
    req.cwd = Some("missing".into());
    assert_eq!(
        client.request_error(7, Message::Exec(req)).await.kind,
        ErrorKind::NotFound
    );
    // The agent still works.
    assert_eq!(
        client.exec(8, cmd(&["true"])).await.exit.status,
        ExitStatus::Code(0)
    );
}

fn read_pid(path: &std::path::Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

/// The timeout kills a tree that ignores SIGTERM and forks, including a child
/// that moved to its own session.
#[tokio::test]
async fn timeout_kills_the_whole_tree() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;
    let script = r#"
        trap '' TERM
        sh -c 'echo $$ > child.pid; exec sleep 1000' &
        setsid sh -c 'echo $$ > session.pid; exec sleep 1000' &
        while [ ! -s child.pid ] || [ ! -s session.pid ]; do sleep 0.01; done
        echo started
        sleep 1000
    "#;
    let mut req = sh(script);
    req.timeout = Some(Duration::from_millis(1500));
    req.kill_grace = Duration::from_millis(300);
    let out = client.exec(1, req).await;
    assert!(out.exit.timed_out);
    assert_eq!(
        out.exit.status,
        ExitStatus::Signal(libc::SIGKILL),
        "SIGTERM is ignored, SIGKILL follows"
    );
    assert_eq!(out.stdout_text(), "started\n");
    assert!(
        out.exit.duration >= Duration::from_millis(1500),
        "{:?}",
        out.exit.duration
    );
    assert!(
        out.exit.duration < Duration::from_secs(10),
        "{:?}",
        out.exit.duration
    );
    for file in ["child.pid", "session.pid"] {
        let pid = read_pid(&agent.workspace.join(file));
        assert!(
            !process_exists(pid),
            "{file}: process {pid} survived the timeout"
        );
    }

    // A command that obeys SIGTERM dies of it.
    let mut req = cmd(&["sleep", "1000"]);
    req.timeout = Some(Duration::from_millis(200));
    let out = client.exec(2, req).await;
    assert!(out.exit.timed_out);
    assert_eq!(out.exit.status, ExitStatus::Signal(libc::SIGTERM));
}

/// A background process holding the output pipe does not keep the exec open,
/// and it is killed when the main process exits.
#[tokio::test]
async fn leftover_process_holding_the_pipe_does_not_hang_exit() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;
    let out = client
        .exec(1, sh("sleep 1000 & echo $! > bg.pid; echo done"))
        .await;
    assert_eq!(out.exit.status, ExitStatus::Code(0));
    assert_eq!(out.stdout_text(), "done\n");
    assert!(out.exit.duration < Duration::from_secs(5));
    let pid = read_pid(&agent.workspace.join("bg.pid"));
    assert!(!process_exists(pid), "background process {pid} survived");
}

#[tokio::test]
async fn output_is_capped_and_counted() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;
    let mut req = sh("head -c 10485760 /dev/zero; echo tail >&2");
    req.output_limit = 1024 * 1024;
    let out = client.exec(1, req).await;
    assert_eq!(out.exit.status, ExitStatus::Code(0));
    assert_eq!(out.stdout.len(), 1024 * 1024);
    assert!(out.stdout.iter().all(|&b| b == 0));
    assert_eq!(out.exit.stdout_bytes, 10 * 1024 * 1024);
    assert!(out.exit.stdout_truncated);
    assert_eq!(out.stderr, b"tail\n");
    assert_eq!(out.exit.stderr_bytes, 5);
    assert!(!out.exit.stderr_truncated);
}

/// Two execs run at the same time: the first waits for a file the second creates.
#[tokio::test]
async fn concurrent_execs() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;
    client
        .send(
            10,
            Message::Exec(sh("while [ ! -e flag ]; do sleep 0.01; done; echo A")),
        )
        .await;
    client
        .send(11, Message::Exec(sh("touch flag; echo B")))
        .await;
    client.send(12, Message::Exec(sh("echo C"))).await;
    let results = client.wait_execs(&[10, 11, 12]).await;
    for (id, text) in [(10, "A\n"), (11, "B\n"), (12, "C\n")] {
        assert_eq!(results[&id].stdout_text(), text);
        assert_eq!(results[&id].exit.status, ExitStatus::Code(0));
    }
}

#[tokio::test]
async fn kill_signals_the_tree() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;

    client
        .send(20, Message::Exec(cmd(&["sleep", "1000"])))
        .await;
    let reply = client
        .request(
            21,
            Message::Kill(KillRequest {
                target: 20,
                signal: None,
            }),
        )
        .await;
    assert_eq!(reply, Message::Ok(Default::default()));
    let out = client.wait_execs(&[20]).await.remove(&20).unwrap();
    assert_eq!(out.exit.status, ExitStatus::Signal(libc::SIGKILL));
    assert!(!out.exit.timed_out);

    client
        .send(
            22,
            Message::Exec(sh(
                "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.01; done",
            )),
        )
        .await;
    // Wait until the trap is installed.
    let frame = client.recv().await;
    assert_eq!(frame.request_id, 22);
    assert!(
        matches!(frame.message, Message::Output(ref c) if c.data == b"ready\n"),
        "{frame:?}"
    );
    let reply = client
        .request(
            23,
            Message::Kill(KillRequest {
                target: 22,
                signal: Some(libc::SIGTERM),
            }),
        )
        .await;
    assert_eq!(reply, Message::Ok(Default::default()));
    let out = client.wait_execs(&[22]).await.remove(&22).unwrap();
    assert_eq!(out.exit.status, ExitStatus::Code(7));
    assert_eq!(out.stdout_text(), "got TERM\n");

    let e = client
        .request_error(
            24,
            Message::Kill(KillRequest {
                target: 999,
                signal: None,
            }),
        )
        .await;
    assert_eq!(e.kind, ErrorKind::NotFound);
    let e = client
        .request_error(
            25,
            Message::Kill(KillRequest {
                target: 22,
                signal: Some(0),
            }),
        )
        .await;
    assert_eq!(e.kind, ErrorKind::BadRequest, "signal 0 is refused: {e:?}");
}

// ---------------------------------------------------------------- files

async fn put_file(client: &mut Client, id: u64, path: &str, data: &[u8], mode: u32) -> Message {
    let mut offset = 0;
    let mut chunks = data.chunks(FILE_CHUNK_LEN).peekable();
    if data.is_empty() {
        client
            .send(
                id,
                Message::PutFile(PutFileChunk {
                    path: path.into(),
                    mode,
                    offset: 0,
                    data: vec![],
                    last: true,
                }),
            )
            .await;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let message = Message::PutFile(PutFileChunk {
            path: path.into(),
            mode,
            offset,
            data: chunk.to_vec(),
            last,
        });
        client.send(id, message).await;
        offset += chunk.len() as u64;
    }
    let frame = client.recv().await;
    assert_eq!(frame.request_id, id);
    frame.message
}

/// Fetches a file; returns (data, mode, total_size, chunk count).
async fn get_file(
    client: &mut Client,
    id: u64,
    path: &str,
) -> Result<(Vec<u8>, u32, u64, usize), agentvm_runtime::protocol::ErrorReply> {
    client
        .send(id, Message::GetFile(GetFileRequest { path: path.into() }))
        .await;
    let mut data = Vec::new();
    let mut chunks = 0;
    loop {
        let frame = client.recv().await;
        assert_eq!(frame.request_id, id);
        match frame.message {
            Message::FileData(chunk) => {
                assert_eq!(chunk.offset, data.len() as u64, "chunks in order");
                assert!(chunk.data.len() <= FILE_CHUNK_LEN);
                data.extend_from_slice(&chunk.data);
                chunks += 1;
                if chunk.last {
                    assert_eq!(chunk.total_size, data.len() as u64);
                    return Ok((data, chunk.mode, chunk.total_size, chunks));
                }
            }
            Message::Error(e) => return Err(e),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn put_and_get_a_large_binary_file() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;
    let data = random_bytes(5 * 1024 * 1024 + 123, 7);

    let reply = put_file(&mut client, 1, "dir/sub/blob.bin", &data, 0o750).await;
    assert_eq!(reply, Message::Ok(Default::default()));
    let on_disk = agent.workspace.join("dir/sub/blob.bin");
    assert_eq!(std::fs::read(&on_disk).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&on_disk).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    let leftovers: Vec<_> = std::fs::read_dir(agent.workspace.join("dir/sub"))
        .unwrap()
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left behind");

    let (got, mode, total, chunks) = get_file(&mut client, 2, "dir/sub/blob.bin").await.unwrap();
    assert_eq!(got, data);
    assert_eq!(mode, 0o750);
    assert_eq!(total, data.len() as u64);
    assert_eq!(chunks, data.len().div_ceil(FILE_CHUNK_LEN));

    // Overwrite in place with different content and mode, via an absolute path.
    let absolute = agent.workspace.join("dir/sub/blob.bin");
    let reply = put_file(&mut client, 3, absolute.to_str().unwrap(), b"small", 0o600).await;
    assert_eq!(reply, Message::Ok(Default::default()));
    let (got, mode, _, _) = get_file(&mut client, 4, "dir/sub/blob.bin").await.unwrap();
    assert_eq!((got.as_slice(), mode), (&b"small"[..], 0o600));

    // Files can be staged outside the workspace, in the staging root.
    let staged = agent.staging.join("bin/agent.sh");
    let reply = put_file(
        &mut client,
        5,
        staged.to_str().unwrap(),
        b"#!/bin/sh\necho hi\n",
        0o755,
    )
    .await;
    assert_eq!(reply, Message::Ok(Default::default()));
    assert_eq!(
        client
            .exec(6, cmd(&[staged.to_str().unwrap()]))
            .await
            .stdout_text(),
        "hi\n"
    );
}

#[tokio::test]
async fn empty_and_missing_files() {
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;
    assert_eq!(
        put_file(&mut client, 1, "empty", b"", 0o644).await,
        Message::Ok(Default::default())
    );
    let (data, mode, total, chunks) = get_file(&mut client, 2, "empty").await.unwrap();
    assert_eq!((data.len(), mode, total, chunks), (0, 0o644, 0, 1));

    let e = get_file(&mut client, 3, "missing.txt").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    let e = get_file(&mut client, 4, "").await.unwrap_err();
    assert_eq!(
        e.kind,
        ErrorKind::BadRequest,
        "the workspace root is a directory"
    );

    // Out-of-order chunks are refused, once, and the rest of the upload is dropped.
    let chunk = |offset: u64, last: bool| {
        Message::PutFile(PutFileChunk {
            path: "x".into(),
            mode: 0o644,
            offset,
            data: vec![1; 10],
            last,
        })
    };
    client.send(5, chunk(0, false)).await;
    client.send(5, chunk(20, false)).await;
    client.send(5, chunk(30, true)).await;
    let frame = client.recv().await;
    assert_eq!(frame.request_id, 5);
    assert!(
        matches!(frame.message, Message::Error(ref e) if e.kind == ErrorKind::BadRequest),
        "{frame:?}"
    );
    assert_eq!(
        client.request(6, Message::Ping(Ping { nonce: 1 })).await,
        Message::Pong(agentvm_runtime::protocol::Pong { nonce: 1 }),
        "no second error for the same upload"
    );
    assert!(!agent.workspace.join("x").exists());
}

#[tokio::test]
async fn paths_outside_the_workspace_are_refused() {
    let agent = Agent::start();
    let outside = agent.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), "secret").unwrap();
    std::os::unix::fs::symlink(&outside, agent.workspace.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc", agent.workspace.join("etc")).unwrap();
    let (mut client, _) = agent.connect().await;

    let secret_abs = outside.join("secret");
    for (id, path) in [
        (1, "../outside/secret"),
        (2, "/etc/passwd"),
        (3, "link/secret"),
        (4, "etc/passwd"),
        (5, secret_abs.to_str().unwrap()),
    ] {
        let e = get_file(&mut client, id, path).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::PathOutsideWorkspace, "{path}: {e:?}");
    }
    for (id, path) in [
        (11, "../evil"),
        (12, "link/evil"),
        (13, "link/new/dir/evil"),
    ] {
        let reply = put_file(&mut client, id, path, b"evil", 0o644).await;
        assert!(
            matches!(reply, Message::Error(ref e) if e.kind == ErrorKind::PathOutsideWorkspace),
            "{path}: {reply:?}"
        );
    }
    assert!(!agent.dir.path().join("evil").exists());
    assert!(!outside.join("evil").exists());
    assert!(!outside.join("new").exists());
}

// ---------------------------------------------------------------- changes

async fn list(
    client: &mut Client,
    id: u64,
    include_text: bool,
) -> Vec<agentvm_runtime::protocol::FileChange> {
    match client
        .request(
            id,
            Message::ListChanges(ListChangesRequest {
                include_text,
                outside_workspace: false,
            }),
        )
        .await
    {
        Message::Changes(list) => list.changes,
        other => panic!("expected Changes, got {other:?}"),
    }
}

#[tokio::test]
async fn changes_outside_the_workspace_since_the_baseline() {
    let agent = Agent::start();
    let root = agent.workspace.parent().unwrap().to_path_buf();
    std::fs::write(root.join("etc/before"), "x").unwrap();
    let (mut client, _) = agent.connect().await;
    // The coarse inode clock ticks every few ms: let the baseline be later.
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(
        client
            .request(2, Message::ResetBaseline(ResetBaselineRequest {}))
            .await,
        Message::Ok(Ack {})
    );
    tokio::time::sleep(Duration::from_millis(30)).await;
    let script = format!(
        "echo x > {root}/etc/passwd-like; echo y > inside.txt; echo z > {staging}/task.txt",
        root = root.display(),
        staging = agent.staging.display()
    );
    assert_eq!(
        client.exec(3, sh(&script)).await.exit.status,
        ExitStatus::Code(0)
    );
    let ask = |outside_workspace| {
        Message::ListChanges(ListChangesRequest {
            include_text: false,
            outside_workspace,
        })
    };
    let Message::Changes(list) = client.request(4, ask(true)).await else {
        panic!("expected Changes");
    };
    let etc = root.join("etc");
    assert_eq!(
        list.outside_workspace,
        [
            etc.display().to_string(),
            etc.join("passwd-like").display().to_string()
        ],
        "the workspace and the staging root are not outside changes"
    );
    assert!(!list.outside_truncated);
    assert_eq!(list.changes.len(), 1, "{list:?}");
    // Not asked for: not listed.
    let Message::Changes(list) = client.request(5, ask(false)).await else {
        panic!("expected Changes");
    };
    assert!(list.outside_workspace.is_empty());
}

#[tokio::test]
async fn list_changes_and_reset_baseline() {
    let agent = Agent::start_with(|ws| {
        std::fs::write(ws.join("keep.txt"), "keep\n").unwrap();
        std::fs::write(ws.join("modify.txt"), "before\n").unwrap();
        std::fs::write(ws.join("delete.txt"), "gone soon\n").unwrap();
        std::fs::create_dir(ws.join("dir")).unwrap();
        std::fs::write(ws.join("dir/inner.txt"), "inner\n").unwrap();
    });
    let (mut client, _) = agent.connect().await;
    assert!(
        list(&mut client, 1, true).await.is_empty(),
        "nothing changed yet"
    );

    let ws = &agent.workspace;
    std::fs::write(ws.join("modify.txt"), "after\n").unwrap();
    std::fs::remove_file(ws.join("delete.txt")).unwrap();
    std::fs::write(ws.join("new.txt"), "new\n").unwrap();
    std::fs::create_dir(ws.join("newdir")).unwrap();
    std::fs::write(ws.join("newdir/bin"), [0xffu8, 0, 1]).unwrap();
    assert_eq!(
        put_file(&mut client, 2, "dir/put.txt", b"put\n", 0o644).await,
        Message::Ok(Default::default())
    );
    assert_eq!(
        client
            .exec(3, sh("echo exec > dir/exec.txt"))
            .await
            .exit
            .status,
        ExitStatus::Code(0)
    );

    let changes = list(&mut client, 4, true).await;
    let summary: Vec<(&str, ChangeKind)> = changes
        .iter()
        .map(|c| (c.path.as_str(), c.change))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("delete.txt", ChangeKind::Deleted),
            ("dir/exec.txt", ChangeKind::Created),
            ("dir/put.txt", ChangeKind::Created),
            ("modify.txt", ChangeKind::Modified),
            ("new.txt", ChangeKind::Created),
            ("newdir", ChangeKind::Created),
            ("newdir/bin", ChangeKind::Created),
        ],
        "a directory whose content changed is not itself modified"
    );
    let by_path = |p: &str| changes.iter().find(|c| c.path == p).unwrap();
    let deleted = by_path("delete.txt");
    assert_eq!(
        deleted.before.as_ref().unwrap().text.as_deref(),
        Some("gone soon\n")
    );
    assert!(deleted.after.is_none());
    let modified = by_path("modify.txt");
    assert_eq!(
        modified.before.as_ref().unwrap().text.as_deref(),
        Some("before\n")
    );
    assert_eq!(
        modified.after.as_ref().unwrap().text.as_deref(),
        Some("after\n")
    );
    assert_ne!(
        modified.before.as_ref().unwrap().sha256,
        modified.after.as_ref().unwrap().sha256
    );
    let created = by_path("new.txt").after.as_ref().unwrap();
    assert_eq!(
        (created.kind, created.size, created.text.as_deref()),
        (FileKind::File, 4, Some("new\n"))
    );
    assert_eq!(
        by_path("newdir").after.as_ref().unwrap().kind,
        FileKind::Dir
    );
    assert_eq!(
        by_path("newdir/bin").after.as_ref().unwrap().text,
        None,
        "binary has no text"
    );

    // Without texts.
    let changes = list(&mut client, 5, false).await;
    assert!(changes
        .iter()
        .flat_map(|c| [&c.before, &c.after])
        .flatten()
        .all(|s| s.text.is_none()));

    // Reset: nothing changed since.
    assert_eq!(
        client
            .request(6, Message::ResetBaseline(ResetBaselineRequest {}))
            .await,
        Message::Ok(Default::default())
    );
    assert!(list(&mut client, 7, true).await.is_empty());

    // A mode change is a modification.
    std::fs::set_permissions(ws.join("keep.txt"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let changes = list(&mut client, 8, false).await;
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (changes[0].path.as_str(), changes[0].change),
        ("keep.txt", ChangeKind::Modified)
    );
    assert_eq!(changes[0].after.as_ref().unwrap().mode, 0o755);
}

// ---------------------------------------------------------------- other transports

/// `--stdio`: Hello on stdout, requests on stdin, exit at EOF.
#[tokio::test]
async fn stdio_transport() {
    use agentvm_runtime::protocol::FrameReader;
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentvm-guest"))
        .arg("--workspace")
        .arg(dir.path().join("ws"))
        .arg("--staging")
        .arg(dir.path().join("staging"))
        .arg("--stdio")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut reader = FrameReader::new(child.stdout.take().unwrap());
    let hello = reader.next().await.unwrap().unwrap();
    assert!(matches!(hello.message, Message::Hello(_)), "{hello:?}");
    let mut buf = BytesMut::new();
    encode_frame(3, &Message::Ping(Ping { nonce: 5 }), &mut buf).unwrap();
    stdin.write_all(&buf).await.unwrap();
    let pong = reader.next().await.unwrap().unwrap();
    assert_eq!(pong.request_id, 3);
    assert_eq!(
        pong.message,
        Message::Pong(agentvm_runtime::protocol::Pong { nonce: 5 })
    );
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// `--connect`: the agent dials a host socket and serves that connection.
#[tokio::test]
async fn connect_transport() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("host.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentvm-guest"))
        .arg("--workspace")
        .arg(dir.path().join("ws"))
        .arg("--staging")
        .arg(dir.path().join("staging"))
        .arg("--connect")
        .arg(&socket)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let (read, write) = stream.into_split();
    let mut client = Client {
        reader: agentvm_runtime::protocol::FrameReader::new(read),
        write,
    };
    assert!(matches!(client.recv().await.message, Message::Hello(_)));
    let out = client.exec(1, sh("echo via connect")).await;
    assert_eq!(out.stdout_text(), "via connect\n");
    drop(client);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------- run as a user

/// `user` in an exec request drops to that uid/gid through the agent's
/// run-as helper, and the command gets that user's HOME/USER/LOGNAME.
#[tokio::test]
async fn exec_as_another_user() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: switching users needs the agent to run as root");
        return;
    }
    let agent = Agent::start();
    let (mut client, _) = agent.connect().await;
    let mut req = sh("id -u; id -g; id -G; echo \"$USER\"");
    req.user = Some(agentvm_runtime::protocol::ExecUser {
        uid: 65534,
        gid: 65534,
    });
    let out = client.exec(1, req).await;
    assert_eq!(out.exit.status, ExitStatus::Code(0), "{out:?}");
    let text = out.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(&lines[..3], ["65534", "65534", "65534"], "{text}");
    assert_eq!(lines[3], "nobody", "{text}");
    // Without a user (and no --default-user) the command runs as the agent.
    let out = client.exec(2, sh("id -u")).await;
    assert_eq!(out.stdout_text(), "0\n");
    // A program the user may not run: a clear exit code, not a hang.
    let mut req = cmd(&["/root/../proc/1/exe"]);
    req.user = Some(agentvm_runtime::protocol::ExecUser {
        uid: 65534,
        gid: 65534,
    });
    let out = client.exec(3, req).await;
    assert!(
        matches!(out.exit.status, ExitStatus::Code(126 | 127)),
        "{out:?}"
    );
}
