//! The network modes in real VMs. In `gateway` (the default) and
//! `allowlist` the guest has no NIC: its only ways out are the model gateway
//! and an egress proxy, both tunnelled over the control channel to the host
//! and offered to the agent through `HTTP_PROXY`/`HTTPS_PROXY`. The proxy
//! refuses every host that is not allowlisted, with an HTTP error the agent
//! can read, and logs every connection into `AgentRun::network()`, the audit
//! log and the metrics.
//!
//! Every server here is on the host's loopback (127.0.0.2, which is not in
//! the agent's `NO_PROXY`, so the guest's tools send it to the proxy);
//! nothing leaves the machine.

use std::net::SocketAddr;

use agentvm_test::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP/1.0 server on `127.0.0.2` answering every request with `body`.
async fn origin(body: &'static str) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// A shell agent: `sh -c script`.
fn shell(script: &str) -> Agent {
    Agent::command(["sh", "-c", script])
}

/// A raw `CONNECT host:port` to the proxy then `GET /` through the tunnel,
/// with busybox `nc` (its stdin stays open long enough for the answers).
fn connect_script(target: &str) -> String {
    format!(
        "(printf 'CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n'; sleep 1; \
         printf 'GET / HTTP/1.0\\r\\nHost: {target}\\r\\n\\r\\n'; sleep 2) \
         | nc 127.0.0.1 \"${{HTTPS_PROXY##*:}}\""
    )
}

/// The default mode refuses a host nobody allowed: the agent reads a 403
/// that names the fix, and the attempt is in the run, its anomalies and the
/// audit log.
#[agent_vm_test(timeout = "60s")]
async fn denied_host_is_refused_and_audited(vm: &mut Vm) -> TestResult {
    let run = vm
        .run_agent(
            &shell(
                "(printf 'CONNECT denied.example:443 HTTP/1.1\\r\\n\\r\\n'; sleep 1) \
                 | nc 127.0.0.1 \"${HTTPS_PROXY##*:}\"",
            ),
            Task::prompt("reach a host"),
        )
        .await?;
    assert!(
        run.stdout().starts_with("HTTP/1.1 403 Forbidden"),
        "{run:#?}"
    );
    assert!(
        run.stdout()
            .contains("denied.example:443 is not on the allowlist")
            && run.stdout().contains(r#"allow = ["denied.example:443"]"#),
        "{run:#?}"
    );
    let network = run.network();
    assert_eq!(network.len(), 1, "{network:?}");
    let record = &network[0];
    assert_eq!(
        (record.host.as_str(), record.port, record.allowed),
        ("denied.example", 443, false),
        "{record:?}"
    );
    assert_eq!((record.bytes_up, record.bytes_down), (0, 0), "{record:?}");
    let limits = agentvm_test::anomaly::RuleLimits::for_vm(vm)?;
    let kinds: Vec<String> = agentvm_test::anomaly::rule_anomalies(&run, 1, &limits)
        .into_iter()
        .map(|a| a.kind)
        .collect();
    assert_eq!(kinds, ["egress_denied"]);
    let config = agentvm_test::agentvm_runtime::config::AgentVmConfig::load()?;
    let audit = std::fs::read_to_string(config.audit_log_path())?;
    let line = audit
        .lines()
        .rev()
        .find(|l| {
            l.contains(r#""event":"connection""#)
                && l.contains(r#""test":"denied_host_is_refused_and_audited""#)
        })
        .ok_or("no connection line for this test in the audit log")?;
    for expected in [
        r#""host":"denied.example""#,
        r#""port":443"#,
        r#""allowed":false"#,
        r#""kind":"connect""#,
    ] {
        assert!(line.contains(expected), "{expected} not in {line}");
    }
    assert!(line.contains(&format!(r#""vm":"{}""#, vm.id())), "{line}");
    // The proxy's answer carries an HTTP date.
    let mut settings = agentvm_test::snapshot::settings();
    settings.add_filter(
        r"date: \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} GMT",
        "date: [date]",
    );
    settings.bind(|| assert_agent_snapshot!(run));
    Ok(())
}

/// An allowlisted host is reached both ways the proxy offers: plain HTTP
/// forwarded by busybox `wget` (which reads `http_proxy`) and a `CONNECT`
/// tunnel; each is logged with its bytes. A host next to it stays refused.
#[agent_vm_test(timeout = "60s", network = "allowlist")]
async fn allowlisted_host_is_reached_and_logged(vm: &mut Vm) -> TestResult {
    let addr = origin("hello from the allowed origin\n").await?;
    let script = format!(
        "wget -q -O - http://{addr}/greeting; echo \"wget: $?\"; {}; \
         wget -q -O - http://127.0.0.2:1/ ; echo \"denied wget: $?\"",
        connect_script(&addr.to_string())
    );
    let agent = shell(&script).allow(addr.to_string());
    let run = vm.run_agent(&agent, Task::prompt("fetch")).await?;
    let stdout = run.stdout();
    assert!(
        stdout.starts_with("hello from the allowed origin\nwget: 0\n"),
        "{run:#?}"
    );
    assert!(
        stdout.contains("HTTP/1.1 200 OK")
            && stdout.matches("hello from the allowed origin").count() == 2,
        "the CONNECT tunnel did not reach the origin: {run:#?}"
    );
    assert!(stdout.contains("denied wget: 1"), "{run:#?}");
    let summary: Vec<(String, u16, bool)> = run
        .network()
        .iter()
        .map(|c| (c.host.clone(), c.port, c.allowed))
        .collect();
    let host = addr.ip().to_string();
    for expected in [(host.clone(), addr.port(), true), (host.clone(), 1, false)] {
        assert!(
            summary.contains(&expected),
            "{expected:?} not in {summary:?}"
        );
    }
    let allowed: Vec<_> = run.network().iter().filter(|c| c.allowed).collect();
    assert_eq!(allowed.len(), 2, "one plain HTTP, one CONNECT: {allowed:?}");
    for c in allowed {
        assert!(c.bytes_up > 0 && c.bytes_down > 0, "{c:?}");
        assert_eq!(c.error, None, "{c:?}");
    }
    Ok(())
}

/// An agent that opens 1 000 streams at once gets at most the guest's 256
/// tunnelled streams (the rest are closed at once, nothing hangs), every
/// stream that got through is answered and logged, and the proxy answers a
/// new stream once they are closed and torn down.
#[agent_vm_test(timeout = "240s", image = "agent", profile = "light")]
async fn a_thousand_streams_are_bounded_and_nothing_hangs(vm: &mut Vm) -> TestResult {
    const SCRIPT: &str = r#"
import os, socket
port = int(os.environ["HTTPS_PROXY"].rsplit(":", 1)[1])
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(1000)]
answered = closed = 0
for s in socks:
    s.settimeout(30)
    try:
        s.sendall(b"CONNECT denied.example:443 HTTP/1.1\r\n\r\n")
        data = s.recv(64)
    except OSError:
        data = b""
    if data.startswith(b"HTTP/1.1 403"):
        answered += 1
    elif not data:
        closed += 1
for s in socks:
    s.close()
# The guest forgets the 256 streams as the host ends them: retry until the
# proxy answers a new one, at most 90 s (seconds under load on 2 cores).
import time
start, again = time.monotonic(), False
while not again and time.monotonic() - start < 90:
    try:
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(10)
        s.sendall(b"CONNECT again.example:443 HTTP/1.1\r\n\r\n")
        again = s.recv(64).startswith(b"HTTP/1.1 403")
        s.close()
    except OSError:
        pass
    if not again:
        time.sleep(0.5)
print(answered, closed, again, round(time.monotonic() - start, 1))
"#;
    let run = vm
        .run_agent(
            &Agent::command(["python3", "-c", SCRIPT]),
            Task::prompt("open many connections"),
        )
        .await?;
    assert!(run.success(), "{run:#?}");
    let fields: Vec<&str> = run.stdout().split_whitespace().collect();
    let [answered, closed, again, recovered_after_s] = fields[..] else {
        return Err(format!("unexpected output: {run:#?}").into());
    };
    let (answered, closed): (usize, usize) = (answered.parse()?, closed.parse()?);
    assert_eq!(answered + closed, 1000, "{run:#?}");
    assert!(
        (1..=256).contains(&answered),
        "{answered} streams got through"
    );
    assert_eq!(again, "True", "the proxy after the flood: {run:#?}");
    eprintln!(
        "1000 streams: {answered} answered, {closed} closed at once; \
         the proxy answered again {recovered_after_s} s after they closed"
    );
    let network = run.network();
    assert_eq!(
        network.len(),
        answered + 1,
        "every answered stream is logged"
    );
    assert!(network.iter().all(|c| !c.allowed));
    Ok(())
}

/// `isolated` means no path at all: no proxy port in the guest, and an
/// agent with a model is refused before it starts.
#[agent_vm_test(timeout = "60s", network = "isolated")]
async fn isolated_vm_has_no_proxy_and_no_model(vm: &mut Vm) -> TestResult {
    let run = vm
        .run_agent(
            &shell("echo $HTTPS_PROXY; nc 127.0.0.1 3128 </dev/null; echo \"nc: $?\""),
            Task::prompt("look around"),
        )
        .await?;
    assert_eq!(run.stdout(), "\nnc: 1\n", "{run:#?}");
    assert!(run.network().is_empty());
    let agent = shell("true").model(Model::scripted([Turn::text("done")]));
    let err = vm
        .run_agent(&agent, Task::prompt("think"))
        .await
        .expect_err("a model in an isolated VM");
    assert!(
        err.to_string()
            .contains("network = \"isolated\" gives the guest no path to the model gateway"),
        "{err}"
    );
    Ok(())
}

agentvm_test::main!();
