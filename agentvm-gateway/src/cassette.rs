//! Cassettes: JSON Lines files of recorded interactions, one per line, and the replay
//! matcher.
//!
//! A line looks like
//! `{"request":{"method":"POST","path":"/v1/messages?beta=true","body":{…normalised…}},
//!   "response":{"status":200,"headers":{"content-type":"text/event-stream"},"body":{"sse":[…]}}}`.
//! Request bodies are stored normalised ([`crate::normalise`]), so re-recording the same run
//! gives the same lines; no request header is stored and only `content-type` of the response,
//! so no key can end up in the file.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use similar::TextDiff;

use crate::api::{Api, Reply, Usage};
use crate::error::CassetteError;
use crate::sse::SseEvent;
use crate::{anthropic, openai_chat, openai_responses, sse};

/// A recorded request (normalised).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query, e.g. `/v1/messages?beta=true`.
    pub path: String,
    /// The normalised JSON body.
    pub body: Value,
}

/// A recorded response body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedBody {
    /// A JSON body.
    Json(Value),
    /// A server-sent event stream.
    Sse(Vec<SseEvent>),
    /// Anything else, as text.
    Text(String),
}

impl RecordedBody {
    /// Classifies raw upstream bytes by content type.
    pub fn from_bytes(content_type: &str, bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(bytes).into_owned();
        if content_type.starts_with("text/event-stream") {
            if let Ok(events) = sse::parse(&text) {
                return Self::Sse(events);
            }
        } else if let Ok(json) = serde_json::from_str(&text) {
            return Self::Json(json);
        }
        Self::Text(text)
    }

    /// The wire bytes.
    pub fn to_wire(&self) -> String {
        match self {
            Self::Json(v) => v.to_string(),
            Self::Sse(events) => sse::encode_all(events),
            Self::Text(t) => t.clone(),
        }
    }

    /// Text, tool calls and usage of this reply, as `api` encodes them.
    pub fn reply(&self, api: Api) -> (Reply, Usage) {
        match (self, api) {
            (Self::Sse(e), Api::Anthropic) => anthropic::reply_from_events(e),
            (Self::Sse(e), Api::OpenAiChat) => openai_chat::reply_from_events(e),
            (Self::Sse(e), Api::OpenAiResponses) => openai_responses::reply_from_events(e),
            (Self::Json(v), Api::Anthropic) => anthropic::reply_from_json(v),
            (Self::Json(v), Api::OpenAiChat) => openai_chat::reply_from_json(v),
            (Self::Json(v), Api::OpenAiResponses) => openai_responses::reply_from_json(v),
            (Self::Text(_), _) => (Reply::default(), Usage::default()),
        }
    }
}

/// A recorded response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedResponse {
    /// HTTP status.
    pub status: u16,
    /// Header subset (`content-type`).
    pub headers: BTreeMap<String, String>,
    /// Body.
    pub body: RecordedBody,
}

impl RecordedResponse {
    /// The recorded `content-type`, or `application/json`.
    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .map_or("application/json", String::as_str)
    }
}

/// One request and its response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// The request.
    pub request: RecordedRequest,
    /// The response.
    pub response: RecordedResponse,
}

impl Interaction {
    /// One cassette line (no trailing newline), with every occurrence of each secret replaced
    /// by `<redacted>`.
    pub fn to_line(&self, secrets: &[&str]) -> String {
        let mut line = serde_json::to_string(self).expect("interactions serialise");
        for secret in secrets.iter().filter(|s| !s.is_empty()) {
            line = line.replace(secret, "<redacted>");
        }
        line
    }
}

/// Parses a cassette's text into interactions with their 1-based line numbers. `path` is
/// only used in errors.
pub fn parse(path: &Path, text: &str) -> Result<Vec<(usize, Interaction)>, CassetteError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| CassetteError::Line {
            path: path.to_owned(),
            line: i + 1,
            message,
        };
        let interaction: Interaction =
            serde_json::from_str(line).map_err(|e| bad(format!("not a valid interaction: {e}")))?;
        validate(&interaction).map_err(bad)?;
        out.push((i + 1, interaction));
    }
    Ok(out)
}

fn validate(i: &Interaction) -> Result<(), String> {
    let sse = i.response.content_type().starts_with("text/event-stream");
    match &i.response.body {
        RecordedBody::Sse(events) if events.is_empty() => Err("empty event stream".into()),
        RecordedBody::Sse(_) if !sse => {
            Err("`sse` body but content-type is not text/event-stream".into())
        }
        RecordedBody::Json(_) | RecordedBody::Text(_) if sse => {
            Err("content-type text/event-stream but the body is not `sse` events".into())
        }
        _ if !(100..=599).contains(&i.response.status) => {
            Err(format!("bad status {}", i.response.status))
        }
        _ => Ok(()),
    }
}

/// Loads a cassette file.
pub fn load(path: &Path) -> Result<Vec<(usize, Interaction)>, CassetteError> {
    let text = std::fs::read_to_string(path).map_err(|source| CassetteError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Replay state: interactions consumed in order per matching key.
#[derive(Debug)]
pub struct Replayer {
    path: PathBuf,
    interactions: Vec<(usize, Interaction)>,
    queues: HashMap<String, VecDeque<usize>>,
}

/// Why a request has no answer in the cassette.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoMatch {
    /// What did not match.
    pub reason: String,
    /// Diff against the nearest recorded request (empty when the cassette is empty).
    pub diff: String,
}

fn key(request: &RecordedRequest) -> String {
    serde_json::to_string(&(&request.method, &request.path, &request.body)).expect("serialisable")
}

impl Replayer {
    /// Replay state for `interactions` loaded from `path`.
    pub fn new(path: PathBuf, interactions: Vec<(usize, Interaction)>) -> Self {
        let mut queues: HashMap<String, VecDeque<usize>> = HashMap::new();
        for (i, (_, interaction)) in interactions.iter().enumerate() {
            queues
                .entry(key(&interaction.request))
                .or_default()
                .push_back(i);
        }
        Self {
            path,
            interactions,
            queues,
        }
    }

    /// The cassette file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the next interaction recorded for `request`: its 1-based cassette line and the
    /// response.
    pub fn next(
        &mut self,
        request: &RecordedRequest,
    ) -> Result<(usize, RecordedResponse), NoMatch> {
        let k = key(request);
        match self.queues.get_mut(&k) {
            Some(queue) => match queue.pop_front() {
                Some(i) => Ok((
                    self.interactions[i].0,
                    self.interactions[i].1.response.clone(),
                )),
                None => {
                    let times = self
                        .interactions
                        .iter()
                        .filter(|(_, x)| key(&x.request) == k)
                        .count();
                    Err(NoMatch {
                        reason: format!("was recorded {times} time(s) and is now asked once more"),
                        diff: String::new(),
                    })
                }
            },
            None => Err(self.nearest(request)),
        }
    }

    fn nearest(&self, request: &RecordedRequest) -> NoMatch {
        let wanted = pretty(request);
        let best = self
            .interactions
            .iter()
            .map(|(line, x)| {
                let text = pretty(&x.request);
                let ratio = TextDiff::from_lines(&text, &wanted).ratio();
                (*line, text, ratio)
            })
            // The first of equally near requests wins.
            .fold(None, |best: Option<(usize, String, f32)>, x| match best {
                Some(b) if b.2 >= x.2 => Some(b),
                _ => Some(x),
            });
        match best {
            None => NoMatch {
                reason: "matches nothing: the cassette is empty".into(),
                diff: String::new(),
            },
            Some((line, text, _)) => NoMatch {
                reason: format!("matches no recorded request; nearest is line {line}"),
                diff: diff(&text, &wanted, line),
            },
        }
    }
}

fn pretty(request: &RecordedRequest) -> String {
    let mut s = serde_json::to_string_pretty(request).expect("serialisable");
    s.push('\n');
    s
}

/// A unified diff of the recorded request text against the live one.
pub fn diff(recorded: &str, live: &str, line: usize) -> String {
    TextDiff::from_lines(recorded, live)
        .unified_diff()
        .context_radius(3)
        .header(&format!("cassette line {line}"), "this request")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn interaction(text: &str) -> Interaction {
        Interaction {
            request: RecordedRequest {
                method: "POST".into(),
                path: "/v1/messages".into(),
                body: json!({"messages": [{"role": "user", "content": text}], "model": "m"}),
            },
            response: RecordedResponse {
                status: 200,
                headers: [("content-type".to_owned(), "text/event-stream".to_owned())].into(),
                body: RecordedBody::Sse(vec![SseEvent::named(
                    "message_stop",
                    json!({"type": "message_stop"}),
                )]),
            },
        }
    }

    #[test]
    fn lines_round_trip_and_secrets_are_redacted() {
        let mut i = interaction("key sk-secret-123 inside");
        let line = i.to_line(&["sk-secret-123"]);
        assert!(!line.contains("sk-secret-123"));
        let back = parse(Path::new("c.jsonl"), &format!("\n{line}\n\n")).unwrap();
        i.request.body["messages"][0]["content"] = json!("key <redacted> inside");
        assert_eq!(back, [(2, i)]);
    }

    #[test]
    fn load_errors_name_file_and_line() {
        let good = interaction("a").to_line(&[]);
        let err = parse(Path::new("x.jsonl"), &format!("{good}\n{{\"request\": 1")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("cassette x.jsonl line 2: not a valid interaction"),
            "{msg}"
        );
        let bad_sse = good.replace("\"sse\":[{", "\"sse\":[{\"x\":1,");
        let bad_sse = bad_sse.replace("\"data\"", "\"dat\"");
        let err = parse(Path::new("x.jsonl"), &bad_sse)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
        let not_sse = good.replace("text/event-stream", "application/json");
        let err = parse(Path::new("x.jsonl"), &not_sse)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`sse` body but content-type"), "{err}");
        let missing = load(Path::new("/nonexistent/c.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("AGENTVM_MODEL=record"), "{missing}");
    }

    #[test]
    fn replays_in_order_per_key_and_diffs_the_nearest() {
        let (a, b) = (interaction("a"), interaction("b"));
        let mut replay = Replayer::new(
            "c.jsonl".into(),
            vec![(1, a.clone()), (2, b.clone()), (4, a.clone())],
        );
        assert_eq!(replay.next(&b.request).unwrap().0, 2);
        assert_eq!(replay.next(&a.request).unwrap().0, 1);
        assert_eq!(replay.next(&a.request).unwrap().0, 4);
        let again = replay.next(&a.request).unwrap_err();
        assert_eq!(
            again.reason,
            "was recorded 2 time(s) and is now asked once more"
        );
        let mut c = interaction("b");
        c.request.body["model"] = json!("m2");
        let miss = replay.next(&c.request).unwrap_err();
        assert!(miss.reason.contains("nearest is line 2"), "{}", miss.reason);
        assert!(
            miss.diff.contains("--- cassette line 2\n+++ this request"),
            "{}",
            miss.diff
        );
        assert!(
            miss.diff
                .contains("-    \"model\": \"m\"\n+    \"model\": \"m2\""),
            "{}",
            miss.diff
        );
    }
}
