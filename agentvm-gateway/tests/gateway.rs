//! The model gateway driven over loopback HTTP with hyper's client, with requests shaped
//! like Claude Code's, Codex's and Aider's (see real-agents.md).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use agentvm_gateway::sse::{self, SseEvent};
use agentvm_gateway::{
    ChatEditFormat, ExchangeKind, Gateway, GatewayConfig, GatewayError, Model, SetupError, Turn,
    Upstream,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

struct Reply {
    status: u16,
    content_type: String,
    body: String,
}

impl Reply {
    fn events(&self) -> Vec<SseEvent> {
        assert_eq!(
            self.content_type, "text/event-stream",
            "body: {}",
            self.body
        );
        sse::parse(&self.body).expect("the gateway's SSE parses")
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }
    fn names(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| e.event.clone().unwrap_or_default())
            .collect()
    }
}

async fn start(gateway: &Gateway) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    gateway.serve_listener(listener);
    addr
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    Reply {
        status,
        content_type,
        body,
    }
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    let headers = [
        ("content-type", "application/json"),
        ("x-api-key", "sk-fake"),
        ("authorization", "Bearer sk-fake"),
    ];
    send(addr, "POST", path, &headers, body.to_string()).await
}

// ---- request shapes ----------------------------------------------------------------------

fn claude_tools() -> Value {
    let schema = |props: Value| json!({"type": "object", "properties": props});
    json!([
        {"name": "Bash", "input_schema": schema(json!({"command": {"type": "string"}, "timeout": {"type": "number"}, "description": {"type": "string"}}))},
        {"name": "Edit", "input_schema": schema(json!({"file_path": {}, "old_string": {}, "new_string": {}}))},
        {"name": "Read", "input_schema": schema(json!({"file_path": {}}))},
        {"name": "Write", "input_schema": schema(json!({"file_path": {}, "content": {}}))},
    ])
}

fn claude_request(session: &str, extra: Vec<Value>) -> Value {
    let mut messages = vec![
        json!({"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>Today's date is 2026-12-04.</system-reminder>"},
            {"type": "text", "text": "create hi.txt"}]}),
        json!({"role": "system", "content": [{"type": "text", "text": "agents: none"}]}),
    ];
    messages.extend(extra);
    json!({
        "model": "claude-opus-4-8", "max_tokens": 64000, "stream": true,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Working directory: /workspace\nToday's date: 2026-12-04"}],
        "tools": claude_tools(),
        "metadata": {"user_id": format!("{{\"device_id\":\"d\",\"session_id\":\"{session}\"}}")},
        "thinking": {"type": "adaptive"},
        "messages": messages,
    })
}

/// The messages Claude Code appends after a tool_use block: the assistant turn and the result.
fn claude_tool_round(tool_use: &Value, output: &str) -> Vec<Value> {
    vec![
        json!({"role": "assistant", "content": [tool_use]}),
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"],
               "content": output, "is_error": false}]}),
    ]
}

/// Reassembles the tool_use block from a Claude stream.
fn claude_tool_use(events: &[SseEvent]) -> Value {
    let start = events
        .iter()
        .find(|e| e.data["content_block"]["type"] == "tool_use")
        .expect("a tool_use block");
    let json: String = events
        .iter()
        .filter(|e| e.data["delta"]["type"] == "input_json_delta")
        .map(|e| e.data["delta"]["partial_json"].as_str().unwrap())
        .collect();
    let mut block = start.data["content_block"].clone();
    block["input"] = serde_json::from_str(&json).unwrap();
    block
}

fn codex_request(session: &str, extra: Vec<Value>) -> Value {
    let mut input = vec![
        json!({"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions instructions>"}]}),
        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": format!("<environment_context><cwd>/tmp/codex-{session}</cwd></environment_context>")}]}),
        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "create hi.txt"}]}),
    ];
    input.extend(extra);
    json!({
        "model": "gpt-fake", "stream": true, "tool_choice": "auto", "parallel_tool_calls": true,
        "reasoning": {"summary": "auto"}, "store": false, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": session, "client_metadata": {"session_id": session},
        "tools": [
            {"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {
                "cmd": {"type": "string"}, "login": {"type": "boolean"}, "tty": {"type": "boolean"}}}},
            {"type": "function", "name": "write_stdin", "parameters": {"type": "object", "properties": {}}},
            {"type": "web_search"},
        ],
        "input": input,
    })
}

fn codex_item(events: &[SseEvent]) -> Value {
    events
        .iter()
        .find(|e| e.event.as_deref() == Some("response.output_item.done"))
        .unwrap()
        .data["item"]
        .clone()
}

// ---- scripted -----------------------------------------------------------------------------

#[tokio::test]
async fn claude_code_round_trip_with_side_request_and_exhausted_script() {
    let gateway = Gateway::new(GatewayConfig::new(Model::scripted([
        Turn::shell("echo hello > hi.txt"),
        Turn::edit("hi.txt", "hello", "bye"),
        Turn::text("done"),
    ])))
    .unwrap();
    let addr = start(&gateway).await;

    for path in ["/", "/api/hello"] {
        let head = send(addr, "HEAD", path, &[], "").await;
        assert_eq!((head.status, head.body.as_str()), (200, ""));
    }
    let count = post(
        addr,
        "/v1/messages/count_tokens",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert!(count.json()["input_tokens"].as_u64().unwrap() > 0);

    let first = post(
        addr,
        "/v1/messages?beta=true",
        &claude_request("s1", vec![]),
    )
    .await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.names(),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let events = first.events();
    assert_eq!(events[4].data["delta"]["stop_reason"], "tool_use");
    let bash = claude_tool_use(&events);
    assert_eq!(bash["name"], "Bash");
    assert_eq!(bash["input"], json!({"command": "echo hello > hi.txt"}));

    // Title generation: no tools, structured output. Answered, consumes nothing.
    let title = json!({"model": "claude-haiku", "stream": false, "tools": [],
        "output_config": {"format": {"type": "json_schema"}},
        "messages": [{"role": "user", "content": "title for: create hi.txt"}]});
    let side = post(addr, "/v1/messages?beta=true", &title).await;
    assert_eq!(side.json()["content"][0]["text"], "ok");

    let second_req = claude_request(
        "s1",
        claude_tool_round(&bash, "(Bash completed with no output)"),
    );
    let second = post(addr, "/v1/messages?beta=true", &second_req).await;
    let edit_events = second.events();
    let blocks: Vec<&Value> = edit_events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_start"))
        .map(|e| &e.data["content_block"])
        .collect();
    assert_eq!(
        blocks
            .iter()
            .map(|b| b["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["Read", "Edit"]
    );

    // A retry of the same request is answered the same way and consumes nothing.
    let retry = post(addr, "/v1/messages?beta=true", &second_req).await;
    assert_eq!(retry.status, 200);

    let mut third_messages = claude_tool_round(&bash, "(Bash completed with no output)");
    third_messages.extend(claude_tool_round(
        &json!({"type": "tool_use", "id": "toolu_agentvm_0004_1", "name": "Edit", "input": {}}),
        "The file /workspace/hi.txt has been updated.",
    ));
    let third = post(
        addr,
        "/v1/messages?beta=true",
        &claude_request("s1", third_messages.clone()),
    )
    .await;
    let done = third.events();
    assert_eq!(done[1].data["content_block"]["type"], "text");
    assert_eq!(
        done[2].data["delta"],
        json!({"type": "text_delta", "text": "done"})
    );
    assert_eq!(done[4].data["delta"]["stop_reason"], "end_turn");
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

    // One request too many: an error the agent sees and the test can fail on.
    third_messages.extend(claude_tool_round(
        &json!({"type": "tool_use", "id": "x", "name": "Bash", "input": {}}),
        "again",
    ));
    let extra = post(
        addr,
        "/v1/messages?beta=true",
        &claude_request("s1", third_messages),
    )
    .await;
    assert_eq!(extra.status, 400);
    assert_eq!(extra.json()["type"], "error");
    assert!(extra.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("the script has only 3 turns"));
    let errors = gateway.take_errors();
    assert!(
        matches!(
            errors.as_slice(),
            [GatewayError::ScriptExhausted {
                turn: 4,
                turns: 3,
                ..
            }]
        ),
        "{errors:?}"
    );
    assert!(gateway.take_errors().is_empty());

    let kinds: Vec<_> = gateway.transcript().iter().map(|e| e.kind).collect();
    use ExchangeKind as K;
    assert_eq!(
        kinds,
        [K::Turn, K::Side, K::Turn, K::Repeat, K::Turn, K::Error]
    );
    insta::assert_json_snapshot!("claude_code_transcript", gateway.transcript());
}

#[tokio::test]
async fn codex_round_trip_maps_turns_onto_exec_command() {
    let gateway = Gateway::new(GatewayConfig::new(Model::scripted([
        Turn::write("hi.txt", "hello\n"),
        Turn::text("done"),
    ])))
    .unwrap();
    let addr = start(&gateway).await;

    let first = post(addr, "/v1/responses", &codex_request("a", vec![])).await;
    assert_eq!(
        first.names(),
        [
            "response.created",
            "response.output_item.added",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let call = codex_item(&first.events());
    assert_eq!(call["type"], "function_call");
    assert_eq!(call["name"], "exec_command");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(
        args,
        json!({"cmd": "mkdir -p '.' && printf '%s' 'hello\n' > 'hi.txt'"})
    );

    let second = post(
        addr,
        "/v1/responses",
        &codex_request("a", vec![
            json!({"type": "function_call", "name": "exec_command", "arguments": call["arguments"], "call_id": call["call_id"]}),
            json!({"type": "function_call_output", "call_id": call["call_id"], "output": "Chunk ID: ab12\nWall time: 0.0110 seconds\nProcess exited with code 0\nOutput:\n"}),
        ]),
    )
    .await;
    let events = second.events();
    assert_eq!(
        second.names(),
        [
            "response.created",
            "response.output_item.added",
            "response.output_text.delta",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let completed = &events[4].data["response"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["output"][0]["content"][0]["text"], "done");
    assert!(completed["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert!(gateway.errors().is_empty());
    insta::assert_json_snapshot!("codex_transcript", gateway.transcript());
}

#[tokio::test]
async fn chat_completions_aider_whole_format_and_shell_tools() {
    let aider = Gateway::new(
        GatewayConfig::new(Model::scripted([Turn::edit("hi.txt", "hello", "bye")]))
            .chat_edit_format(ChatEditFormat::Diff),
    )
    .unwrap();
    let addr = start(&aider).await;
    let request = json!({"model": "gpt-fake", "stream": true, "temperature": 0, "messages": [
        {"role": "system", "content": "Act as an expert software developer."},
        {"role": "user", "content": "change hello to bye in hi.txt"}]});
    let reply = post(addr, "/v1/chat/completions", &request).await;
    let events = reply.events();
    assert_eq!(events.last().unwrap().data, Value::String("[DONE]".into()));
    let text: String = events
        .iter()
        .filter_map(|e| e.data["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        "hi.txt\n```\n<<<<<<< SEARCH\nhello\n=======\nbye\n>>>>>>> REPLACE\n```\n"
    );

    let tools = Gateway::new(GatewayConfig::new(Model::scripted([
        Turn::shell("ls"),
        Turn::edit("a", "b", "c"),
    ])))
    .unwrap();
    let addr = start(&tools).await;
    let request = json!({"model": "m", "messages": [{"role": "user", "content": "list"}],
        "tools": [{"type": "function", "function": {"name": "run_shell", "parameters": {"properties": {"command": {"type": "string"}}}}}]});
    let reply = post(addr, "/v1/chat/completions", &request).await.json();
    assert_eq!(reply["choices"][0]["finish_reason"], "tool_calls");
    let call = &reply["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "run_shell");
    assert_eq!(call["arguments"], "{\"command\":\"ls\"}");

    // A turn the agent cannot run (no shell tool): an error, and the turn is not consumed.
    let no_shell = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]});
    let err = post(addr, "/v1/chat/completions", &no_shell).await;
    assert_eq!(err.status, 400);
    assert!(err.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("needs a shell tool"));
    assert!(matches!(
        tools.take_errors().as_slice(),
        [GatewayError::Turn { .. }]
    ));
}

// ---- record and replay ------------------------------------------------------------------

/// A loopback stand-in for the vendor: answers Claude-like requests with a tool_use then
/// text, Responses requests with text, and remembers the credentials it saw.
async fn fake_upstream() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let upstream = Gateway::new(GatewayConfig::new(Model::scripted([
        Turn::shell("echo hello > hi.txt"),
        Turn::text("done"),
        Turn::text("codex done"),
    ])))
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (upstream, log) = (upstream.clone(), log.clone());
            tokio::spawn(async move {
                upstream
                    .serve_connection(SpyStream { inner: stream, log })
                    .await
            });
        }
    });
    (addr, seen)
}

/// Records the credential headers of every request that passes.
struct SpyStream {
    inner: tokio::net::TcpStream,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl tokio::io::AsyncRead for SpyStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let text = String::from_utf8_lossy(&buf.filled()[before..]).to_lowercase();
        for line in text
            .lines()
            .filter(|l| l.starts_with("x-api-key:") || l.starts_with("authorization:"))
        {
            self.log.lock().unwrap().push(line.to_owned());
        }
        poll
    }
}

impl tokio::io::AsyncWrite for SpyStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One agent run against `addr`: Claude's two calls and a Codex call. Returns the replies.
async fn agent_run(addr: SocketAddr, session: &str) -> Vec<Reply> {
    let first = post(
        addr,
        "/v1/messages?beta=true",
        &claude_request(session, vec![]),
    )
    .await;
    let bash = claude_tool_use(&first.events());
    let second = post(
        addr,
        "/v1/messages?beta=true",
        &claude_request(session, claude_tool_round(&bash, "ok")),
    )
    .await;
    let codex = post(addr, "/v1/responses", &codex_request(session, vec![])).await;
    vec![first, second, codex]
}

#[tokio::test]
async fn record_then_replay_gives_the_same_answers_and_never_stores_the_key() {
    const SECRET: &str = "sk-host-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let cassette = dir.path().join("cassettes/run.jsonl");
    let (upstream_addr, seen) = fake_upstream().await;

    let upstream = Upstream::at(
        format!("http://{upstream_addr}"),
        Some(SECRET.into()),
        Some(SECRET.into()),
    );
    let recorder = Gateway::new(GatewayConfig::new(Model::record(&cassette, upstream))).unwrap();
    let addr = start(&recorder).await;
    let recorded = agent_run(addr, "123e4567-e89b-12d3-a456-426614174000").await;
    assert!(recorder.errors().is_empty(), "{:?}", recorder.errors());
    assert_eq!(
        claude_tool_use(&recorded[0].events())["input"]["command"],
        "echo hello > hi.txt"
    );

    // The upstream saw the host's key, never the guest's fake one.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter()
            .all(|h| h.contains(&SECRET.to_lowercase()) && !h.contains("sk-fake")),
        "{seen:?}"
    );

    let text = std::fs::read_to_string(&cassette).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert!(!text.contains(SECRET));
    assert!(
        !text.contains("123e4567"),
        "volatile session ids are normalised away"
    );

    // Replay: another session (different volatile values), same answers.
    let replayer = Gateway::new(GatewayConfig::new(Model::replay(&cassette))).unwrap();
    let addr = start(&replayer).await;
    let replayed = agent_run(addr, "99999999-e89b-12d3-a456-426614174000").await;
    assert!(replayer.errors().is_empty(), "{:?}", replayer.errors());
    for (r, p) in recorded.iter().zip(&replayed) {
        assert_eq!((r.status, &r.content_type), (p.status, &p.content_type));
        assert_eq!(r.events(), p.events());
    }
    let lines: Vec<_> = replayer
        .transcript()
        .iter()
        .map(|e| e.cassette_line)
        .collect();
    assert_eq!(lines, [Some(1), Some(2), Some(3)]);
    let (rec, rep) = (recorder.transcript(), replayer.transcript());
    for (a, b) in rec.iter().zip(&rep) {
        assert_eq!(
            (&a.new_input, &a.response_text, &a.tool_calls, a.usage),
            (&b.new_input, &b.response_text, &b.tool_calls, b.usage)
        );
    }

    // A changed prompt matches nothing: an error at once with a readable diff.
    let mut changed = claude_request("s", vec![]);
    changed["messages"][0]["content"][1]["text"] = json!("create bye.txt");
    let miss = post(addr, "/v1/messages?beta=true", &changed).await;
    assert_eq!(miss.status, 400);
    let errors = replayer.take_errors();
    let [GatewayError::Mismatch { diff, reason, .. }] = errors.as_slice() else {
        panic!("{errors:?}")
    };
    assert!(reason.contains("nearest is line 1"), "{reason}");
    assert!(
        diff.starts_with("--- cassette line 1\n+++ this request\n"),
        "{diff}"
    );
    assert!(diff.contains("\n-            \"text\": \"create hi.txt\",\n+            \"text\": \"create bye.txt\",\n"), "{diff}");
    // Each recorded interaction is used once.
    let again = post(addr, "/v1/responses", &codex_request("z", vec![])).await;
    assert_eq!(again.status, 400);
    assert!(
        again.body.contains("was recorded 1 time(s)"),
        "{}",
        again.body
    );
}

#[tokio::test]
async fn record_without_a_host_key_is_an_error_not_a_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::at("http://127.0.0.1:9", None, None);
    let gateway = Gateway::new(GatewayConfig::new(Model::record(
        dir.path().join("c.jsonl"),
        upstream,
    )))
    .unwrap();
    let addr = start(&gateway).await;
    let reply = post(addr, "/v1/messages", &claude_request("s", vec![])).await;
    assert_eq!(reply.status, 502);
    assert!(reply.body.contains("ANTHROPIC_API_KEY"), "{}", reply.body);
    assert!(matches!(
        gateway.take_errors().as_slice(),
        [GatewayError::MissingKey {
            var: "ANTHROPIC_API_KEY"
        }]
    ));
}

// ---- bad input ----------------------------------------------------------------------------

fn scripted() -> Gateway {
    Gateway::new(
        GatewayConfig::new(Model::scripted([Turn::text("done")])).max_body_bytes(64 * 1024),
    )
    .unwrap()
}

#[tokio::test]
async fn malformed_json_is_400_with_the_parse_error() {
    let gateway = scripted();
    let addr = start(&gateway).await;
    let reply = send(
        addr,
        "POST",
        "/v1/messages",
        &[("content-type", "application/json")],
        "{\"model\": ",
    )
    .await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{}",
        reply.body
    );
    assert!(matches!(
        gateway.take_errors().as_slice(),
        [GatewayError::BadRequest { .. }]
    ));
    assert_eq!(gateway.transcript()[0].kind, ExchangeKind::Error);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let gateway = scripted();
    let addr = start(&gateway).await;
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(100 * 1024));
    let reply = send(addr, "POST", "/v1/responses", &[], big).await;
    assert_eq!(reply.status, 413);
    assert!(
        reply.body.contains("larger than 65536 bytes"),
        "{}",
        reply.body
    );
    assert_eq!(agentvm_gateway::DEFAULT_MAX_BODY_BYTES, 32 * 1024 * 1024);
}

#[tokio::test]
async fn garbage_bytes_close_the_connection_and_are_logged() {
    let gateway = scripted();
    let addr = start(&gateway).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("closed, not hung")
        .unwrap();
    for _ in 0..100 {
        if !gateway.errors().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(
        gateway.take_errors().as_slice(),
        [GatewayError::Connection { .. }]
    ));
    // The gateway still serves.
    assert_eq!(send(addr, "HEAD", "/", &[], "").await.status, 200);
}

#[tokio::test]
async fn serve_connection_works_on_any_stream() {
    let gateway = scripted();
    let (client_side, server_side) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn({
        let gateway = gateway.clone();
        async move { gateway.serve_connection(server_side).await }
    });
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client_side))
            .await
            .unwrap();
    tokio::spawn(conn);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "Bash"}]});
    let req = http::Request::post("/v1/messages")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["content"][0]["text"], "done");
    drop(sender);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn malformed_cassettes_are_load_errors_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    let good = r#"{"request":{"method":"POST","path":"/v1/messages","body":{}},"response":{"status":200,"headers":{"content-type":"text/event-stream"},"body":{"sse":[{"event":"message_stop","data":{"type":"message_stop"}}]}}}"#;
    for (text, wants) in [
        (
            format!("{good}\n{}", &good[..40]),
            "line 2: not a valid interaction",
        ),
        (
            good.replace("\"sse\":[{\"event\"", "\"sse\":[{\"evnt\"")
                .replace("\"data\"", "\"dta\""),
            "line 1",
        ),
        (
            good.replace(
                "\"sse\":[{\"event\":\"message_stop\",\"data\":{\"type\":\"message_stop\"}}]",
                "\"sse\":[]",
            ),
            "line 1: empty event stream",
        ),
    ] {
        write(&path, &text);
        let err = Gateway::new(GatewayConfig::new(Model::replay(&path))).unwrap_err();
        assert!(matches!(err, SetupError::Cassette(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("bad.jsonl") && msg.contains(wants), "{msg}");
    }
}

#[tokio::test]
async fn a_configured_header_timeout_closes_idle_connections_without_an_error() {
    let config =
        GatewayConfig::new(Model::scripted([])).header_read_timeout(Duration::from_millis(100));
    let gateway = Gateway::new(config).unwrap();
    let addr = start(&gateway).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /v1/messages HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("closed")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
}
