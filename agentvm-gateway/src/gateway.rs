//! The model gateway's HTTP server: routes, body limits, and the three modes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::api::{estimate_tokens, Api, ParsedRequest, Rendered, Reply, Usage};
use crate::cassette::{
    self, Interaction, RecordedBody, RecordedRequest, RecordedResponse, Replayer,
};
use crate::error::{GatewayError, SetupError};
use crate::model::Model;
use crate::normalise::normalise;
use crate::record::Recorder;
use crate::script::{render_turn, ChatEditFormat, Turn, SIDE_REPLY};
use crate::transcript::{Exchange, ExchangeKind, ModeName};
use crate::{anthropic, openai_chat, openai_responses};

/// Default request body limit: 32 MiB (Claude Code's first request is about 76 KB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// How to build a [`Gateway`].
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How the model answers.
    pub model: Model,
    /// Requests with a larger body get `413`.
    pub max_body_bytes: usize,
    /// Edit format for tool-less Chat Completions agents (Aider) whose prompt names none
    /// (Aider's does: see [`crate::script`]).
    pub chat_edit_format: ChatEditFormat,
    /// Close a connection that takes longer than this to send a request's headers — which
    /// includes an idle keep-alive connection waiting for its next request, so keep it longer
    /// than the agent's longest tool run. `None` (the default): no limit; a stalled client
    /// then only holds its own connection's task.
    pub header_read_timeout: Option<Duration>,
}

impl GatewayConfig {
    /// Defaults around `model`.
    pub fn new(model: Model) -> Self {
        Self {
            model,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            chat_edit_format: ChatEditFormat::default(),
            header_read_timeout: None,
        }
    }

    /// Sets the body limit.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Sets the header read timeout (see [`GatewayConfig::header_read_timeout`]).
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = Some(timeout);
        self
    }

    /// Sets the fallback edit format for tool-less chat agents.
    pub fn chat_edit_format(mut self, format: ChatEditFormat) -> Self {
        self.chat_edit_format = format;
        self
    }
}

struct ScriptState {
    turns: Vec<Turn>,
    next: usize,
    chat: ChatEditFormat,
    /// Normalised request → (turn number, reply), to answer repeats without consuming.
    answered: HashMap<String, (usize, Reply)>,
}

enum Engine {
    Scripted(Mutex<ScriptState>),
    Replay(Mutex<Replayer>),
    Record(Recorder),
}

struct Inner {
    engine: Engine,
    max_body_bytes: usize,
    header_read_timeout: Option<Duration>,
    seq: AtomicU64,
    transcript: Mutex<Vec<Exchange>>,
    errors: Mutex<Vec<GatewayError>>,
}

/// The model gateway. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type HttpResponse = Response<Full<Bytes>>;

fn response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> HttpResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// What one model request produced.
struct Outcome {
    status: StatusCode,
    content_type: String,
    body: Bytes,
    kind: ExchangeKind,
    turn: Option<usize>,
    reply: Reply,
    usage: Usage,
    cassette_line: Option<usize>,
    error: Option<GatewayError>,
}

impl Outcome {
    fn rendered(
        kind: ExchangeKind,
        turn: Option<usize>,
        reply: Reply,
        (r, usage): (Rendered, Usage),
    ) -> Self {
        Self {
            status: StatusCode::OK,
            content_type: r.content_type.to_owned(),
            body: r.body.into(),
            kind,
            turn,
            reply,
            usage,
            cassette_line: None,
            error: None,
        }
    }

    fn error(api: Api, status: StatusCode, error: GatewayError) -> Self {
        let body = api.error_body(
            "invalid_request_error",
            &format!("agentvm gateway: {error}"),
        );
        Self {
            status,
            content_type: "application/json".into(),
            body: body.to_string().into(),
            kind: ExchangeKind::Error,
            turn: None,
            reply: Reply::default(),
            usage: Usage::default(),
            cassette_line: None,
            error: Some(error),
        }
    }
}

fn parse_request(api: Api, body: &Value) -> ParsedRequest {
    match api {
        Api::Anthropic => anthropic::parse(body),
        Api::OpenAiChat => openai_chat::parse(body),
        Api::OpenAiResponses => openai_responses::parse(body),
    }
}

fn render(
    reply: &Reply,
    request: &ParsedRequest,
    seq: u64,
    input_tokens: u64,
) -> (Rendered, Usage) {
    match request.api {
        Api::Anthropic => anthropic::render(reply, request, seq, input_tokens),
        Api::OpenAiChat => openai_chat::render(reply, request, seq, input_tokens),
        Api::OpenAiResponses => openai_responses::render(reply, request, seq, input_tokens),
    }
}

impl Gateway {
    /// Builds a gateway: loads the cassette (replay) or creates it (record).
    pub fn new(config: GatewayConfig) -> Result<Self, SetupError> {
        let engine = match config.model {
            Model::Scripted(turns) => Engine::Scripted(Mutex::new(ScriptState {
                turns,
                next: 0,
                chat: config.chat_edit_format,
                answered: HashMap::new(),
            })),
            Model::Replay(path) => {
                let interactions = cassette::load(&path)?;
                Engine::Replay(Mutex::new(Replayer::new(path, interactions)))
            }
            Model::Record { cassette, upstream } => {
                Engine::Record(Recorder::new(cassette, upstream)?)
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                max_body_bytes: config.max_body_bytes,
                header_read_timeout: config.header_read_timeout,
                seq: AtomicU64::new(0),
                transcript: Mutex::new(Vec::new()),
                errors: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Which mode answers.
    pub fn mode(&self) -> ModeName {
        match self.inner.engine {
            Engine::Scripted(_) => ModeName::Scripted,
            Engine::Replay(_) => ModeName::Replay,
            Engine::Record(_) => ModeName::Record,
        }
    }

    /// Every model request answered so far, in arrival order.
    pub fn transcript(&self) -> Vec<Exchange> {
        let mut t = lock(&self.inner.transcript).clone();
        t.sort_by_key(|e| e.seq);
        t
    }

    /// The errors recorded so far (the agent was answered with each of them).
    pub fn errors(&self) -> Vec<GatewayError> {
        lock(&self.inner.errors).clone()
    }

    /// Takes the recorded errors, leaving none.
    pub fn take_errors(&self) -> Vec<GatewayError> {
        std::mem::take(&mut *lock(&self.inner.errors))
    }

    fn record_error(&self, error: GatewayError) {
        tracing::warn!(target: "agentvm_gateway", "{error}");
        lock(&self.inner.errors).push(error);
    }

    /// Serves HTTP/1 requests on one connection until the client closes it. Any stream
    /// works: a tunnelled guest connection or an accepted TCP socket. A connection that
    /// breaks at the HTTP level (garbage, truncated request) is closed and recorded as
    /// [`GatewayError::Connection`].
    pub async fn serve_connection<IO>(&self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let this = self.clone();
        let service = service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(req).await) }
        });
        let mut builder = http1::Builder::new();
        if let Some(timeout) = self.inner.header_read_timeout {
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(timeout);
        }
        match builder.serve_connection(TokioIo::new(io), service).await {
            Ok(()) => {}
            // A configured idle/header timeout closing a connection is not the agent's fault.
            Err(e) if e.is_timeout() => {
                tracing::debug!(target: "agentvm_gateway", "connection closed: {e}")
            }
            Err(e) => self.record_error(GatewayError::Connection {
                message: e.to_string(),
            }),
        }
    }

    /// Accepts connections on `listener` and serves each on its own task, until the returned
    /// handle is aborted.
    pub fn serve_listener(&self, listener: TcpListener) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let this = this.clone();
                        tokio::spawn(async move { this.serve_connection(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!(target: "agentvm_gateway", "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    }

    async fn handle(&self, req: Request<Incoming>) -> HttpResponse {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let path_q = req
            .uri()
            .path_and_query()
            .map_or_else(|| path.clone(), |p| p.as_str().to_owned());
        match (&method, path.as_str()) {
            (&Method::HEAD | &Method::GET, "/" | "/api/hello") => {
                response(StatusCode::OK, "text/plain", "")
            }
            (&Method::POST, "/v1/messages/count_tokens") => match self.read_json(req).await {
                Ok((json, _)) => {
                    let n = estimate_tokens(normalise(Api::Anthropic, &json).to_string().len());
                    let body = serde_json::json!({"input_tokens": n}).to_string();
                    response(StatusCode::OK, "application/json", body)
                }
                Err((status, error)) => {
                    let outcome = Outcome::error(Api::Anthropic, status, error);
                    self.record_error(outcome.error.expect("error outcome"));
                    response(status, &outcome.content_type, outcome.body)
                }
            },
            (&Method::POST, p) if Api::from_path(p).is_some() => {
                let api = Api::from_path(p).expect("checked");
                self.model_request(api, req, &path_q).await
            }
            _ => {
                tracing::info!(target: "agentvm_gateway", "no route for {method} {path_q}");
                response(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("agentvm gateway: no route for {method} {path}; it serves POST /v1/messages, /v1/chat/completions and /v1/responses\n"),
                )
            }
        }
    }

    /// Reads and parses a JSON object body, or the status (400 / 413) and error to answer.
    async fn read_json(
        &self,
        req: Request<Incoming>,
    ) -> Result<(Value, Bytes), (StatusCode, GatewayError)> {
        let (method, path) = (req.method().to_string(), req.uri().to_string());
        let bad = |status: StatusCode, message: String| {
            let error = GatewayError::BadRequest {
                method: method.clone(),
                path: path.clone(),
                message,
            };
            (status, error)
        };
        let limit = self.inner.max_body_bytes;
        let too_large = || format!("request body larger than {limit} bytes");
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(bad(StatusCode::PAYLOAD_TOO_LARGE, too_large()));
        }
        let bytes = match Limited::new(req.into_body(), limit).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(bad(StatusCode::PAYLOAD_TOO_LARGE, too_large()))
            }
            Err(e) => {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {e}"),
                ))
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(json @ Value::Object(_)) => Ok((json, bytes)),
            Ok(_) => Err(bad(
                StatusCode::BAD_REQUEST,
                "the body is JSON but not an object".into(),
            )),
            Err(e) => Err(bad(
                StatusCode::BAD_REQUEST,
                format!("the body is not valid JSON: {e}"),
            )),
        }
    }

    async fn model_request(&self, api: Api, req: Request<Incoming>, path_q: &str) -> HttpResponse {
        let method = req.method().clone();
        let headers = req.headers().clone();
        let seq = self.inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let (outcome, new_input) = match self.read_json(req).await {
            Err((status, error)) => (Outcome::error(api, status, error), Vec::new()),
            Ok((json, raw)) => {
                let parsed = parse_request(api, &json);
                let normalised = normalise(api, &json);
                let outcome = match &self.inner.engine {
                    Engine::Scripted(state) => {
                        self.scripted(state, seq, &parsed, path_q, &normalised)
                    }
                    Engine::Replay(replayer) => {
                        self.replay(replayer, seq, api, &method, path_q, normalised)
                    }
                    Engine::Record(recorder) => {
                        self.record(
                            recorder, seq, api, &method, path_q, &headers, raw, normalised,
                        )
                        .await
                    }
                };
                (outcome, parsed.new_input)
            }
        };
        let error_text = outcome.error.as_ref().map(ToString::to_string);
        self.push_exchange(Exchange::new(
            seq,
            api,
            self.mode(),
            outcome.kind,
            outcome.turn,
            &new_input,
            &outcome.reply,
            outcome.usage,
            outcome.status.as_u16(),
            outcome.cassette_line,
            error_text,
        ));
        if let Some(error) = outcome.error {
            self.record_error(error);
        }
        response(outcome.status, &outcome.content_type, outcome.body)
    }

    fn push_exchange(&self, exchange: Exchange) {
        tracing::debug!(target: "agentvm_gateway", ?exchange, "model exchange");
        lock(&self.inner.transcript).push(exchange);
    }

    fn scripted(
        &self,
        state: &Mutex<ScriptState>,
        seq: u64,
        request: &ParsedRequest,
        path_q: &str,
        normalised: &Value,
    ) -> Outcome {
        let input_tokens = estimate_tokens(normalised.to_string().len());
        if request.side {
            let reply = Reply::text(SIDE_REPLY);
            let rendered = render(&reply, request, seq, input_tokens);
            return Outcome::rendered(ExchangeKind::Side, None, reply, rendered);
        }
        let key = format!("{path_q} {normalised}");
        let mut state = lock(state);
        if let Some((turn, reply)) = state.answered.get(&key).cloned() {
            drop(state);
            let rendered = render(&reply, request, seq, input_tokens);
            return Outcome::rendered(ExchangeKind::Repeat, Some(turn), reply, rendered);
        }
        let number = state.next + 1;
        let Some(turn) = state.turns.get(state.next) else {
            let turns = state.turns.len();
            let error = GatewayError::ScriptExhausted {
                request: seq,
                api: request.api,
                turn: number,
                turns,
            };
            return Outcome::error(request.api, StatusCode::BAD_REQUEST, error);
        };
        match render_turn(turn, number, request, state.chat) {
            Ok(reply) => {
                state.next += 1;
                state.answered.insert(key, (number, reply.clone()));
                drop(state);
                let rendered = render(&reply, request, seq, input_tokens);
                Outcome::rendered(ExchangeKind::Turn, Some(number), reply, rendered)
            }
            Err(source) => Outcome::error(
                request.api,
                StatusCode::BAD_REQUEST,
                GatewayError::Turn {
                    request: seq,
                    api: request.api,
                    source,
                },
            ),
        }
    }

    fn replay(
        &self,
        replayer: &Mutex<Replayer>,
        seq: u64,
        api: Api,
        method: &Method,
        path_q: &str,
        normalised: Value,
    ) -> Outcome {
        let request = RecordedRequest {
            method: method.to_string(),
            path: path_q.to_owned(),
            body: normalised,
        };
        let mut replayer = lock(replayer);
        match replayer.next(&request) {
            Ok((line, recorded)) => {
                let (reply, usage) = recorded.body.reply(api);
                Outcome {
                    status: StatusCode::from_u16(recorded.status).unwrap_or(StatusCode::OK),
                    content_type: recorded.content_type().to_owned(),
                    body: recorded.body.to_wire().into(),
                    kind: ExchangeKind::Turn,
                    turn: None,
                    reply,
                    usage,
                    cassette_line: Some(line),
                    error: None,
                }
            }
            Err(no_match) => {
                let error = GatewayError::Mismatch {
                    request: seq,
                    target: format!("{method} {path_q}"),
                    cassette: PathBuf::from(replayer.path()),
                    reason: no_match.reason,
                    diff: no_match.diff,
                };
                Outcome::error(api, StatusCode::BAD_REQUEST, error)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        recorder: &Recorder,
        seq: u64,
        api: Api,
        method: &Method,
        path_q: &str,
        headers: &HeaderMap,
        raw: Bytes,
        normalised: Value,
    ) -> Outcome {
        let upstream = match recorder
            .forward(seq, api, method, path_q, headers, raw)
            .await
        {
            Ok(u) => u,
            Err(e) => return Outcome::error(api, StatusCode::BAD_GATEWAY, e),
        };
        let body = RecordedBody::from_bytes(&upstream.content_type, &upstream.body);
        let (reply, usage) = body.reply(api);
        let interaction = Interaction {
            request: RecordedRequest {
                method: method.to_string(),
                path: path_q.to_owned(),
                body: normalised,
            },
            response: RecordedResponse {
                status: upstream.status,
                headers: [("content-type".to_owned(), upstream.content_type.clone())].into(),
                body,
            },
        };
        let error = recorder.write(&interaction).err();
        Outcome {
            status: StatusCode::from_u16(upstream.status).unwrap_or(StatusCode::BAD_GATEWAY),
            content_type: upstream.content_type,
            body: upstream.body,
            kind: ExchangeKind::Turn,
            turn: None,
            reply,
            usage,
            cassette_line: None,
            error,
        }
    }
}
