//! The host client (`agentvm_runtime::client::GuestClient`) driving the real
//! guest agent binary over a UNIX socket: the same code path the host uses
//! with a VM, minus the VM.

mod common;

use std::time::Duration;

use agentvm_runtime::client::{ClientError, ExecEvent, GuestClient};
use agentvm_runtime::command::Command;
use agentvm_runtime::protocol::{ChangeKind, ErrorKind, ExitStatus, OutputStream};

async fn connect(agent: &common::Agent) -> GuestClient {
    common::connect_client(agent).await
}

#[tokio::test]
async fn hello_reports_the_guest() {
    let agent = common::Agent::start();
    let client = connect(&agent).await;
    let hello = client.guest_hello();
    assert!(hello.software.starts_with("agentvm-guest "), "{hello:?}");
    assert_eq!(
        hello.workspace_root.as_deref(),
        Some(agent.workspace.to_str().unwrap())
    );
    assert!(client.ping().await.unwrap() < Duration::from_secs(5));
}

#[tokio::test]
async fn exec_through_the_client() {
    let agent = common::Agent::start();
    let client = connect(&agent).await;
    let out = client
        .exec_collect(
            Command::shell("read x; echo \"$x-$GREETING\"; echo oops >&2; exit 3")
                .env("GREETING", "hi")
                .stdin(&b"stdin\n"[..])
                .into_request(),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, b"stdin-hi\n");
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!(out.report.status, ExitStatus::Code(3));
    assert!(!out.report.timed_out);
}

#[tokio::test]
async fn output_streams_while_a_file_is_fetched() {
    let agent = common::Agent::start();
    let client = connect(&agent).await;
    client
        .put_file("data.bin", &[7u8; 100_000], 0o600)
        .await
        .unwrap();
    let mut stream = client
        .exec(Command::shell("echo start; sleep 1; echo end").into_request())
        .await
        .unwrap();
    let first = stream.next_event().await.unwrap().unwrap();
    assert_eq!(
        first,
        ExecEvent::Output(OutputStream::Stdout, b"start\n".to_vec())
    );
    // While the command sleeps, another request completes on the same channel.
    let (data, mode) = client.get_file("data.bin").await.unwrap();
    assert_eq!((data.len(), mode & 0o777), (100_000, 0o600));
    let mut rest = Vec::new();
    while let Some(event) = stream.next_event().await.unwrap() {
        rest.push(event);
    }
    assert_eq!(
        rest[0],
        ExecEvent::Output(OutputStream::Stdout, b"end\n".to_vec())
    );
    assert!(matches!(rest.last(), Some(ExecEvent::Exit(r)) if r.status == ExitStatus::Code(0)));
}

#[tokio::test]
async fn timeout_and_kill_through_the_client() {
    let agent = common::Agent::start();
    let client = connect(&agent).await;
    let out = client
        .exec_collect(
            Command::shell("trap '' TERM; while :; do sleep 1; done")
                .timeout(Duration::from_millis(300))
                .kill_grace(Duration::from_millis(100))
                .into_request(),
        )
        .await
        .unwrap();
    assert!(out.report.timed_out);
    assert_eq!(out.report.status, ExitStatus::Signal(libc::SIGKILL));

    let mut stream = client
        .exec(Command::new("sleep").arg("30").into_request())
        .await
        .unwrap();
    client.kill(stream.id(), None).await.unwrap();
    let mut exit = None;
    while let Some(event) = stream.next_event().await.unwrap() {
        if let ExecEvent::Exit(report) = event {
            exit = Some(report);
        }
    }
    assert_eq!(exit.unwrap().status, ExitStatus::Signal(libc::SIGKILL));
}

#[tokio::test]
async fn files_changes_and_refusals_through_the_client() {
    let agent = common::Agent::start_with(|ws| {
        std::fs::write(ws.join("keep.txt"), "same\n").unwrap();
        std::fs::write(ws.join("edit.txt"), "before\n").unwrap();
        std::fs::write(ws.join("gone.txt"), "bye\n").unwrap();
    });
    let client = connect(&agent).await;
    client
        .put_file("new/dir/file.txt", b"hello\n", 0o644)
        .await
        .unwrap();
    client
        .exec_collect(Command::shell("echo after > edit.txt; rm gone.txt").into_request())
        .await
        .unwrap();
    let changes = client.list_changes(true).await.unwrap();
    let summary: Vec<(&str, ChangeKind)> = changes
        .iter()
        .map(|c| (c.path.as_str(), c.change))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("edit.txt", ChangeKind::Modified),
            ("gone.txt", ChangeKind::Deleted),
            ("new", ChangeKind::Created),
            ("new/dir", ChangeKind::Created),
            ("new/dir/file.txt", ChangeKind::Created),
        ]
    );
    let edit = &changes[0];
    assert_eq!(
        edit.before.as_ref().unwrap().text.as_deref(),
        Some("before\n")
    );
    assert_eq!(
        edit.after.as_ref().unwrap().text.as_deref(),
        Some("after\n")
    );

    client.reset_baseline().await.unwrap();
    assert!(client.list_changes(false).await.unwrap().is_empty());

    let err = client
        .put_file("../outside.txt", b"x", 0o644)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Guest {
                kind: ErrorKind::PathOutsideWorkspace,
                ..
            }
        ),
        "{err}"
    );
    let err = client.get_file("/etc/passwd").await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Guest {
                kind: ErrorKind::PathOutsideWorkspace,
                ..
            }
        ),
        "{err}"
    );
    assert!(!agent.dir.path().join("outside.txt").exists());
}

#[tokio::test]
async fn resync_after_stale_traffic() {
    let agent = common::Agent::start();
    let client = connect(&agent).await;
    // Leave a command's output in flight, then resync as after a revert.
    let stream = client
        .exec(Command::shell("head -c 200000 /dev/zero").into_request())
        .await
        .unwrap();
    drop(stream);
    let stats = client.resync(Duration::from_secs(10)).await.unwrap();
    assert!(stats.elapsed < Duration::from_secs(10));
    let out = client
        .exec_collect(Command::new("echo").arg("clean").into_request())
        .await
        .unwrap();
    assert_eq!(out.stdout, b"clean\n");
}
