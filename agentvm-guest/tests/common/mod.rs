//! Test harness: starts the built agent on a UNIX socket with temporary
//! workspace and staging roots, and talks to it with raw frames.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentvm_runtime::protocol::{
    encode_frame, ErrorReply, ExecRequest, ExitReport, Frame, FrameReader, Hello, Message,
    OutputStream,
};
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How long any single answer may take before the test fails.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running agent process with its own directories.
pub struct Agent {
    child: Child,
    pub dir: tempfile::TempDir,
    /// Workspace root (canonical).
    pub workspace: PathBuf,
    /// Staging root (canonical).
    pub staging: PathBuf,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts an agent with an empty workspace.
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// Starts an agent after `prepare` has filled the workspace.
    pub fn start_with(prepare: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // A small "system" tree for the changes outside the workspace; the
        // socket and the log live beside it.
        let root = dir.path().join("root");
        let workspace = root.join("workspace");
        let staging = root.join("opt/agentvm");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let workspace = workspace.canonicalize().unwrap();
        let staging = staging.canonicalize().unwrap();
        prepare(&workspace);
        let socket = dir.path().join("agent.sock");
        let log = dir.path().join("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_agentvm-guest"))
            .arg("--workspace")
            .arg(&workspace)
            .arg("--staging")
            .arg(&staging)
            .arg("--system-root")
            .arg(&root)
            .arg("--listen")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start agentvm-guest");
        Self {
            child,
            dir,
            workspace,
            staging,
            socket,
            log,
        }
    }

    /// Connects (waiting for the socket to appear) and reads the agent's Hello.
    pub async fn connect(&self) -> (Client, Hello) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(&self.socket).await {
                Ok(stream) => break stream,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot connect to the agent: {e}\n{}", self.log()),
            }
        };
        let (read, write) = stream.into_split();
        let mut client = Client {
            reader: FrameReader::new(read),
            write,
        };
        let frame = client.recv().await;
        assert_eq!(frame.request_id, 0, "Hello is unsolicited");
        let Message::Hello(hello) = frame.message else {
            panic!("first frame is not Hello: {:?}", frame.message);
        };
        (client, hello)
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the agent process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}--- end of agent log ---", self.log());
        }
    }
}

/// The host side of a connection, speaking raw frames.
pub struct Client {
    pub reader: FrameReader<OwnedReadHalf>,
    pub write: OwnedWriteHalf,
}

/// Everything an exec produced.
#[derive(Debug)]
pub struct ExecOutcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: ExitReport,
}

impl ExecOutcome {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl Client {
    /// Sends one frame.
    pub async fn send(&mut self, request_id: u64, message: Message) {
        let mut buf = BytesMut::new();
        encode_frame(request_id, &message, &mut buf).expect("encode");
        self.send_raw(&buf).await;
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.write
            .write_all(bytes)
            .await
            .expect("write to the agent");
    }

    /// The next frame (fails the test on timeout, EOF or a decode error).
    pub async fn recv(&mut self) -> Frame {
        match tokio::time::timeout(REPLY_TIMEOUT, self.reader.next()).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => panic!("agent closed the connection"),
            Ok(Err(e)) => panic!("bad frame from the agent: {e}"),
            Err(_) => panic!("no frame from the agent within {REPLY_TIMEOUT:?}"),
        }
    }

    /// Sends a request and returns its single reply.
    pub async fn request(&mut self, request_id: u64, message: Message) -> Message {
        self.send(request_id, message).await;
        let frame = self.recv().await;
        assert_eq!(
            frame.request_id, request_id,
            "reply to another request: {frame:?}"
        );
        frame.message
    }

    /// Sends a request that must fail and returns the error.
    pub async fn request_error(&mut self, request_id: u64, message: Message) -> ErrorReply {
        match self.request(request_id, message).await {
            Message::Error(e) => e,
            other => panic!("expected an Error, got {other:?}"),
        }
    }

    /// Runs a command and collects its output and exit report.
    pub async fn exec(&mut self, request_id: u64, request: ExecRequest) -> ExecOutcome {
        self.send(request_id, Message::Exec(request)).await;
        self.wait_execs(&[request_id])
            .await
            .remove(&request_id)
            .unwrap()
    }

    /// Collects output and exit reports of several running execs.
    pub async fn wait_execs(&mut self, ids: &[u64]) -> HashMap<u64, ExecOutcome> {
        let mut output: HashMap<u64, (Vec<u8>, Vec<u8>)> =
            ids.iter().map(|&id| (id, Default::default())).collect();
        let mut done = HashMap::new();
        while done.len() < ids.len() {
            let frame = self.recv().await;
            let id = frame.request_id;
            let Some((stdout, stderr)) = output.get_mut(&id) else {
                panic!("frame for an unexpected request: {frame:?}");
            };
            match frame.message {
                Message::Output(chunk) => match chunk.stream {
                    OutputStream::Stdout => stdout.extend_from_slice(&chunk.data),
                    OutputStream::Stderr => stderr.extend_from_slice(&chunk.data),
                },
                Message::Exit(exit) => {
                    assert!(!done.contains_key(&id), "two Exit frames for {id}");
                    done.insert(
                        id,
                        ExecOutcome {
                            stdout: std::mem::take(stdout),
                            stderr: std::mem::take(stderr),
                            exit,
                        },
                    );
                }
                other => panic!("unexpected frame for exec {id}: {other:?}"),
            }
        }
        done
    }
}

/// An exec request with test defaults.
pub fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        clear_env: false,
        cwd: None,
        stdin: Vec::new(),
        timeout: Some(Duration::from_secs(30)),
        kill_grace: Duration::from_secs(1),
        output_limit: 16 * 1024 * 1024,
        user: None,
    }
}

/// A shell command.
pub fn sh(script: &str) -> ExecRequest {
    cmd(&["sh", "-c", script])
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Whether a process with this pid exists (zombies included).
pub fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The real host client, connected to `agent` (waits up to 10 s for its socket).
pub async fn connect_client(agent: &Agent) -> agentvm_runtime::client::GuestClient {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(&agent.socket).await {
            Ok(stream) => break stream,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("agent socket never appeared: {e}"),
        }
    };
    agentvm_runtime::client::GuestClient::connect(stream, Duration::from_secs(10))
        .await
        .expect("hello")
}
