//! Exec round trip against the guest agent on the host (no VM):
//! `cargo bench -p agentvm-guest --bench exec_roundtrip`.
//! Prints p50/p90/p99 of a Ping and of running `true`, over a UNIX socket.

use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use agentvm_runtime::client::GuestClient;
use agentvm_runtime::command::Command;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<12} n={:<4} p50 {:>8.3} ms  p90 {:>8.3} ms  p99 {:>8.3} ms",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.9).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
    );
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("ws");
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::create_dir_all(&staging).unwrap();
    let socket = dir.path().join("agent.sock");
    let mut agent = Process::new(env!("CARGO_BIN_EXE_agentvm-guest"))
        .arg("--workspace")
        .arg(&workspace)
        .arg("--staging")
        .arg(&staging)
        .arg("--listen")
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stream = loop {
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(stream) => break stream,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let client = GuestClient::connect(stream, Duration::from_secs(10))
            .await
            .unwrap();
        let mut pings = Vec::new();
        for _ in 0..1000 {
            pings.push(client.ping().await.unwrap());
        }
        report("ping", pings);
        let mut execs = Vec::new();
        for _ in 0..200 {
            let start = Instant::now();
            client
                .exec_collect(Command::new("true").into_request())
                .await
                .unwrap();
            execs.push(start.elapsed());
        }
        report("exec true", execs);
    });
    agent.kill().unwrap();
    agent.wait().unwrap();
}
