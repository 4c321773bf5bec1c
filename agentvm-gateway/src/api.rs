//! What the three wire formats have in common: which API a request speaks, the tools it
//! advertises, what is new in it, and the generic reply the gateway renders back.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A model API the gateway speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// Anthropic Messages (`POST /v1/messages`): Claude Code.
    Anthropic,
    /// OpenAI Chat Completions (`POST /v1/chat/completions`): Aider and most others.
    #[serde(rename = "openai_chat")]
    OpenAiChat,
    /// OpenAI Responses (`POST /v1/responses`): Codex.
    #[serde(rename = "openai_responses")]
    OpenAiResponses,
}

impl Api {
    /// The API a `POST` to `path` (without query) is for, if any.
    pub fn from_path(path: &str) -> Option<Self> {
        match path.trim_end_matches('/') {
            "/v1/messages" => Some(Self::Anthropic),
            "/v1/chat/completions" | "/chat/completions" => Some(Self::OpenAiChat),
            "/v1/responses" | "/responses" => Some(Self::OpenAiResponses),
            _ => None,
        }
    }

    /// The JSON error body this API's clients understand, carrying `message`.
    pub fn error_body(self, kind: &str, message: &str) -> Value {
        match self {
            Self::Anthropic => serde_json::json!({
                "type": "error",
                "error": {"type": kind, "message": message},
            }),
            Self::OpenAiChat | Self::OpenAiResponses => serde_json::json!({
                "error": {"message": message, "type": kind, "code": kind},
            }),
        }
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Anthropic => "anthropic",
            Self::OpenAiChat => "openai_chat",
            Self::OpenAiResponses => "openai_responses",
        })
    }
}

/// A tool the agent advertised in its request.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// Tool (function) name, e.g. `Bash` or `exec_command`.
    pub name: String,
    /// Its JSON schema for the input / arguments (`{}` when absent).
    pub schema: Value,
}

/// A piece of input that is new since the model last answered: the user's text or a tool's
/// output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputItem {
    /// Text from the user (or a system/developer message after the last answer).
    UserText {
        /// The text.
        text: String,
    },
    /// The output of a tool call the model asked for.
    ToolResult {
        /// The output as text.
        output: String,
        /// Whether the agent flagged it as an error (Anthropic only; else false).
        is_error: bool,
    },
}

/// What the gateway reads out of a request, whatever its API.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    /// The API.
    pub api: Api,
    /// The `model` field (passed through, never checked).
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Advertised tools, in request order.
    pub tools: Vec<Tool>,
    /// Input after the last assistant output.
    pub new_input: Vec<InputItem>,
    /// Whether this is a side request (title generation and the like) that must not consume
    /// a scripted turn. See [`crate::script`] for the rule.
    pub side: bool,
    /// The agent's working directory if its prompt states it (`… working directory: /x`).
    pub cwd: Option<String>,
    /// Chat Completions: every message's role and text, in order — where the scripted mode
    /// finds a tool-less agent's edit format and the current content of the files in its
    /// chat (see [`crate::script`]). Empty for the other APIs.
    pub chat_messages: Vec<ChatMessage>,
}

/// One message of a Chat Completions request, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of its content (blocks joined by newlines).
    pub text: String,
}

/// A tool call in a reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Tool (function) name.
    pub name: String,
    /// Input / arguments as JSON.
    pub arguments: Value,
}

/// What the model answers, independent of wire format.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reply {
    /// Text, if any (rendered before tool calls).
    pub text: Option<String>,
    /// Tool calls, in order.
    pub tool_calls: Vec<ToolCall>,
}

impl Reply {
    /// A text-only reply.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: Some(text.into()),
            tool_calls: Vec::new(),
        }
    }
}

/// Token counts of one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
}

/// A deterministic, plausible token estimate: one token per four bytes, at least one.
pub fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

/// A rendered response body.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// `Content-Type` header value.
    pub content_type: &'static str,
    /// The body bytes.
    pub body: String,
}

/// Collects the text of a content value that is a string or a list of `{type, text}` blocks.
pub(crate) fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| match b {
                Value::String(s) => Some(s.as_str()),
                _ => b.get("text").and_then(Value::as_str),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Finds `working directory: /path` (any case; Claude Code's system prompt says `Primary
/// working directory: /path`) anywhere in `body`.
pub(crate) fn find_cwd(body: &Value) -> Option<String> {
    const NEEDLE: &str = "working directory: ";
    fn walk(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => s.to_ascii_lowercase().find(NEEDLE).and_then(|i| {
                let rest = &s[i + NEEDLE.len()..];
                let path: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                path.starts_with('/').then_some(path)
            }),
            Value::Array(a) => a.iter().find_map(walk),
            Value::Object(o) => o.values().find_map(walk),
            _ => None,
        }
    }
    walk(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routes_paths() {
        assert_eq!(Api::from_path("/v1/messages"), Some(Api::Anthropic));
        assert_eq!(
            Api::from_path("/v1/chat/completions"),
            Some(Api::OpenAiChat)
        );
        assert_eq!(Api::from_path("/v1/responses"), Some(Api::OpenAiResponses));
        assert_eq!(Api::from_path("/v1/models"), None);
    }

    #[test]
    fn finds_cwd_in_nested_text() {
        let body = json!({"system": [{"type": "text", "text": "x\nWorking directory: /workspace\nIs git: no"}]});
        assert_eq!(find_cwd(&body).as_deref(), Some("/workspace"));
        assert_eq!(find_cwd(&json!({"a": "Working directory: relative"})), None);
        let claude = json!({"system": "<env>\nPrimary working directory: /w/x\nIs a git repo: no"});
        assert_eq!(find_cwd(&claude).as_deref(), Some("/w/x"));
    }

    #[test]
    fn token_estimate_is_quarter_bytes() {
        assert_eq!(estimate_tokens(0), 1);
        assert_eq!(estimate_tokens(9), 3);
    }
}
