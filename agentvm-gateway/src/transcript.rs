//! The transcript: one structured record per request the gateway answered, for assertions
//! and insta snapshots (stable field order, volatile values scrubbed).

use serde::Serialize;

use crate::api::{Api, InputItem, Reply, ToolCall, Usage};
use crate::normalise::{scrub_str, scrub_value};

/// Which mode answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeName {
    /// Scripted turns.
    Scripted,
    /// Cassette replay.
    Replay,
    /// Pass-through with recording.
    Record,
}

/// How a request was treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeKind {
    /// A model turn.
    Turn,
    /// A side request (title generation, …): answered without consuming a scripted turn.
    Side,
    /// A repeat of an earlier request, answered the same way.
    Repeat,
    /// Answered with an error (see `error`).
    Error,
}

/// One request and its answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Exchange {
    /// Request number (1-based, in arrival order).
    pub seq: u64,
    /// API.
    pub api: Api,
    /// Mode.
    pub mode: ModeName,
    /// Treatment.
    pub kind: ExchangeKind,
    /// Scripted turn number (1-based) that answered, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn: Option<usize>,
    /// User text and tool results since the model last answered (scrubbed).
    pub new_input: Vec<InputItem>,
    /// Response text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_text: Option<String>,
    /// Tool calls in the response.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Token counts (estimated in scripted mode, from the response otherwise).
    pub usage: Usage,
    /// HTTP status of the answer.
    pub status: u16,
    /// Replay: the 1-based cassette line that answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cassette_line: Option<usize>,
    /// The error the agent was answered with, if any (first line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Exchange {
    /// Builds a record with scrubbed strings.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        seq: u64,
        api: Api,
        mode: ModeName,
        kind: ExchangeKind,
        turn: Option<usize>,
        new_input: &[InputItem],
        reply: &Reply,
        usage: Usage,
        status: u16,
        cassette_line: Option<usize>,
        error: Option<String>,
    ) -> Self {
        Self {
            seq,
            api,
            mode,
            kind,
            turn,
            new_input: new_input.iter().map(scrub_item).collect(),
            response_text: reply.text.as_deref().map(scrub_str),
            tool_calls: reply
                .tool_calls
                .iter()
                .map(|c| ToolCall {
                    name: c.name.clone(),
                    arguments: scrub_value(&c.arguments),
                })
                .collect(),
            usage,
            status,
            cassette_line,
            error: error.map(|e| e.lines().next().unwrap_or_default().to_owned()),
        }
    }
}

fn scrub_item(item: &InputItem) -> InputItem {
    match item {
        InputItem::UserText { text } => InputItem::UserText {
            text: scrub_str(text),
        },
        InputItem::ToolResult { output, is_error } => InputItem::ToolResult {
            output: scrub_str(output),
            is_error: *is_error,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn serialises_in_stable_order_with_scrubbed_values() {
        let e = Exchange::new(
            1,
            Api::Anthropic,
            ModeName::Scripted,
            ExchangeKind::Turn,
            Some(1),
            &[InputItem::UserText {
                text: "today is 2026-12-04".into(),
            }],
            &Reply {
                text: None,
                tool_calls: vec![ToolCall {
                    name: "Bash".into(),
                    arguments: json!({"command": "ls /tmp/x1"}),
                }],
            },
            Usage {
                input_tokens: 10,
                output_tokens: 2,
            },
            200,
            None,
            None,
        );
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"seq":1,"api":"anthropic","mode":"scripted","kind":"turn","turn":1,"new_input":[{"type":"user_text","text":"today is <date>"}],"tool_calls":[{"name":"Bash","arguments":{"command":"ls <tmp>"}}],"usage":{"input_tokens":10,"output_tokens":2},"status":200}"#
        );
    }
}
