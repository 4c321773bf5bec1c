//! Server-sent events: encoding the gateway's streams and parsing recorded ones.
//!
//! Only the subset the model APIs use: `event:` and `data:` fields, events separated by a
//! blank line, `:` comment lines ignored. Data that is JSON is kept as JSON so cassettes
//! stay readable and diffable.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SseEvent {
    /// The `event:` field, if the stream names its events (Anthropic and Responses do,
    /// Chat Completions does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The `data:` field: JSON when it parses as JSON, else the raw text (e.g. `[DONE]`).
    pub data: Value,
}

impl SseEvent {
    /// A named event with JSON data.
    pub fn named(event: &str, data: Value) -> Self {
        Self {
            event: Some(event.to_owned()),
            data,
        }
    }

    /// An unnamed event with JSON data.
    pub fn data(data: Value) -> Self {
        Self { event: None, data }
    }

    /// The wire form: `event: NAME\ndata: DATA\n\n`.
    pub fn encode(&self) -> String {
        let data = match &self.data {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match &self.event {
            Some(name) => format!("event: {name}\ndata: {data}\n\n"),
            None => format!("data: {data}\n\n"),
        }
    }
}

/// Encodes a whole stream.
pub fn encode_all(events: &[SseEvent]) -> String {
    events.iter().map(SseEvent::encode).collect()
}

/// Why a byte stream is not a well-formed event stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line is neither a field nor a comment.
    #[error(
        "line {line}: expected `event:`, `data:`, `id:`, `retry:` or a `:` comment, got {text:?}"
    )]
    BadLine {
        /// 1-based line number in the stream.
        line: usize,
        /// The offending line (truncated).
        text: String,
    },
    /// An event has a name but no data.
    #[error("line {line}: event {event:?} has no `data:` line")]
    NoData {
        /// 1-based line number where the event ends.
        line: usize,
        /// The event name.
        event: String,
    },
    /// The stream ends in the middle of an event (no blank line after it).
    #[error("stream ends inside an event (truncated?)")]
    Truncated,
}

/// Parses a complete event stream. Multi-line `data:` fields are joined with `\n`.
pub fn parse(text: &str) -> Result<Vec<SseEvent>, SseError> {
    let mut events = Vec::new();
    let mut event: Option<String> = None;
    let mut data: Option<String> = None;
    let mut last = 0;
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        last = i + 1;
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.is_empty() {
            match (event.take(), data.take()) {
                (None, None) => {}
                (event, Some(d)) => events.push(SseEvent {
                    event,
                    data: data_value(d),
                }),
                (Some(e), None) => {
                    return Err(SseError::NoData {
                        line: i + 1,
                        event: e,
                    })
                }
            }
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => event = Some(value.to_owned()),
            "data" => {
                data = Some(match data.take() {
                    Some(prev) => format!("{prev}\n{value}"),
                    None => value.to_owned(),
                })
            }
            "id" | "retry" => {}
            _ => {
                return Err(SseError::BadLine {
                    line: i + 1,
                    text: line.chars().take(80).collect(),
                })
            }
        }
    }
    match (event, data) {
        (None, None) => Ok(events),
        (Some(e), None) => Err(SseError::NoData {
            line: last,
            event: e,
        }),
        _ => Err(SseError::Truncated),
    }
}

fn data_value(data: String) -> Value {
    serde_json::from_str(&data).unwrap_or(Value::String(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_named_and_unnamed_events() {
        let events = vec![
            SseEvent::named("message_start", json!({"type": "message_start"})),
            SseEvent::data(json!({"a": 1})),
            SseEvent::data(Value::String("[DONE]".into())),
        ];
        let text = encode_all(&events);
        assert_eq!(
            text,
            "event: message_start\ndata: {\"type\":\"message_start\"}\n\ndata: {\"a\":1}\n\ndata: [DONE]\n\n"
        );
        assert_eq!(parse(&text).unwrap(), events);
    }

    #[test]
    fn ignores_comments_and_crlf_and_joins_data_lines() {
        let events = parse(": ping\r\nevent: x\r\ndata: a\r\ndata: b\r\n\r\n").unwrap();
        assert_eq!(
            events,
            vec![SseEvent::named("x", Value::String("a\nb".into()))]
        );
    }

    #[test]
    fn rejects_truncated_and_malformed_streams() {
        assert_eq!(parse("event: x\ndata: {}\n"), Err(SseError::Truncated));
        assert!(matches!(
            parse("hello\n\n"),
            Err(SseError::BadLine { line: 1, .. })
        ));
        assert!(matches!(
            parse("event: x\n\n"),
            Err(SseError::NoData { line: 2, .. })
        ));
    }
}
