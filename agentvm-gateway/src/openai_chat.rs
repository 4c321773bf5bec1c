//! OpenAI Chat Completions (`POST /v1/chat/completions`): reading requests, rendering replies
//! as `chat.completion.chunk` streams or JSON, and reading recorded replies back.

use serde_json::{json, Value};

use crate::api::{
    content_text, estimate_tokens, find_cwd, Api, ChatMessage, InputItem, ParsedRequest, Rendered,
    Reply, Tool, ToolCall, Usage,
};
use crate::sse::{encode_all, SseEvent};

/// The fixed `created` timestamp of rendered replies (deterministic output).
const CREATED: u64 = 1_700_000_000;

/// Reads what the gateway needs out of a Chat Completions request body.
///
/// Side request rule: a request asking for structured output (`response_format` of a type
/// other than `text`) is a side request. A request without tools is a main turn: that is
/// how Aider works.
pub fn parse(body: &Value) -> ParsedRequest {
    let tools = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| {
                    let f = t.get("function")?;
                    Some(Tool {
                        name: f.get("name")?.as_str()?.to_owned(),
                        schema: f.get("parameters").cloned().unwrap_or_else(|| json!({})),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let side = body
        .get("response_format")
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t != "text");
    ParsedRequest {
        api: Api::OpenAiChat,
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        tools,
        new_input: new_input(body),
        side,
        cwd: find_cwd(body),
        chat_messages: chat_messages(body),
    }
}

fn chat_messages(body: &Value) -> Vec<ChatMessage> {
    body.get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|m| ChatMessage {
            role: m
                .get("role")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            text: m.get("content").map(content_text).unwrap_or_default(),
        })
        .collect()
}

fn new_input(body: &Value) -> Vec<InputItem> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let start = messages
        .iter()
        .rposition(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .map_or(0, |i| i + 1);
    messages[start..]
        .iter()
        .map(|m| {
            let text = m.get("content").map(content_text).unwrap_or_default();
            if m.get("role").and_then(Value::as_str) == Some("tool") {
                InputItem::ToolResult {
                    output: text,
                    is_error: false,
                }
            } else {
                InputItem::UserText { text }
            }
        })
        .collect()
}

/// Renders `reply` as a chunk stream (ending in `data: [DONE]`) or a JSON completion.
pub fn render(
    reply: &Reply,
    request: &ParsedRequest,
    seq: u64,
    input_tokens: u64,
) -> (Rendered, Usage) {
    let id = format!("chatcmpl-agentvm-{seq:04}");
    let calls: Vec<Value> = reply
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            json!({
                "index": i, "id": format!("call_agentvm_{seq:04}_{i}"), "type": "function",
                "function": {"name": call.name, "arguments": call.arguments.to_string()},
            })
        })
        .collect();
    let output_tokens = estimate_tokens(
        reply.text.as_deref().unwrap_or("").len()
            + serde_json::to_string(&calls).unwrap_or_default().len(),
    );
    let usage = Usage {
        input_tokens,
        output_tokens,
    };
    let usage_json = json!({
        "prompt_tokens": input_tokens, "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    });
    let finish = if calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    if !request.stream {
        let mut message = json!({"role": "assistant", "content": reply.text});
        if !calls.is_empty() {
            let calls: Vec<Value> = calls
                .into_iter()
                .map(|mut c| {
                    c.as_object_mut().map(|o| o.remove("index"));
                    c
                })
                .collect();
            message["tool_calls"] = Value::Array(calls);
        }
        let body = json!({
            "id": id, "object": "chat.completion", "created": CREATED, "model": request.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage_json,
        });
        return (
            Rendered {
                content_type: "application/json",
                body: body.to_string(),
            },
            usage,
        );
    }
    let chunk = |delta: Value, finish: Value| {
        SseEvent::data(json!({
            "id": id, "object": "chat.completion.chunk", "created": CREATED, "model": request.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }))
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    if let Some(text) = &reply.text {
        events.push(chunk(json!({"content": text}), Value::Null));
    }
    if !calls.is_empty() {
        events.push(chunk(json!({"tool_calls": calls}), Value::Null));
    }
    let mut last = chunk(json!({}), json!(finish));
    last.data["usage"] = usage_json;
    events.push(last);
    events.push(SseEvent::data(Value::String("[DONE]".into())));
    (
        Rendered {
            content_type: "text/event-stream",
            body: encode_all(&events),
        },
        usage,
    )
}

/// Reads text, tool calls and usage out of a recorded chunk stream.
pub fn reply_from_events(events: &[SseEvent]) -> (Reply, Usage) {
    let mut text = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut usage = Usage::default();
    for event in events {
        let data = &event.data;
        if let Some(u) = data.get("usage").filter(|u| u.is_object()) {
            usage = usage_of(u);
        }
        let delta = &data["choices"][0]["delta"];
        if let Some(t) = delta["content"].as_str() {
            text.push_str(t);
        }
        for call in delta["tool_calls"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let index = call["index"].as_u64().unwrap_or(0) as usize;
            if calls.len() <= index {
                calls.resize(index + 1, (String::new(), String::new()));
            }
            if let Some(name) = call["function"]["name"].as_str() {
                calls[index].0.push_str(name);
            }
            if let Some(args) = call["function"]["arguments"].as_str() {
                calls[index].1.push_str(args);
            }
        }
    }
    let reply = Reply {
        text: (!text.is_empty()).then_some(text),
        tool_calls: calls
            .into_iter()
            .map(|(name, args)| tool_call(name, &args))
            .collect(),
    };
    (reply, usage)
}

/// Reads text, tool calls and usage out of a recorded JSON completion.
pub fn reply_from_json(body: &Value) -> (Reply, Usage) {
    let message = &body["choices"][0]["message"];
    let reply = Reply {
        text: message["content"]
            .as_str()
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
        tool_calls: message["tool_calls"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .map(|c| {
                tool_call(
                    c["function"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    c["function"]["arguments"].as_str().unwrap_or(""),
                )
            })
            .collect(),
    };
    (reply, usage_of(&body["usage"]))
}

fn tool_call(name: String, arguments: &str) -> ToolCall {
    let arguments =
        serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_owned()));
    ToolCall { name, arguments }
}

fn usage_of(u: &Value) -> Usage {
    Usage {
        input_tokens: u["prompt_tokens"].as_u64().unwrap_or(0),
        output_tokens: u["completion_tokens"].as_u64().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse;

    #[test]
    fn parses_aider_like_request_as_main_turn() {
        let parsed = parse(&json!({
            "model": "gpt-fake", "stream": true, "temperature": 0,
            "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "ex"},
                         {"role": "assistant", "content": "ok"}, {"role": "user", "content": "create hi.txt"}],
        }));
        assert!(parsed.tools.is_empty() && !parsed.side && parsed.stream);
        assert_eq!(
            parsed.new_input,
            [InputItem::UserText {
                text: "create hi.txt".into()
            }]
        );
        assert!(parse(&json!({"response_format": {"type": "json_schema"}})).side);
    }

    #[test]
    fn tool_results_are_new_input() {
        let parsed = parse(&json!({
            "tools": [{"type": "function", "function": {"name": "shell", "parameters": {}}}],
            "messages": [{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": []},
                         {"role": "tool", "tool_call_id": "c", "content": "out"}],
        }));
        assert_eq!(parsed.tools[0].name, "shell");
        assert_eq!(
            parsed.new_input,
            [InputItem::ToolResult {
                output: "out".into(),
                is_error: false
            }]
        );
    }

    #[test]
    fn stream_ends_with_done_and_reads_back() {
        let request = parse(&json!({"model": "m", "stream": true}));
        let reply = Reply {
            text: Some("hi".into()),
            tool_calls: vec![ToolCall {
                name: "shell".into(),
                arguments: json!({"command": "ls"}),
            }],
        };
        let (rendered, usage) = render(&reply, &request, 1, 5);
        assert!(rendered.body.ends_with("data: [DONE]\n\n"));
        let events = sse::parse(&rendered.body).unwrap();
        assert!(events[..events.len() - 1]
            .iter()
            .all(|e| e.data["object"] == "chat.completion.chunk"));
        assert_eq!(
            events[events.len() - 2].data["choices"][0]["finish_reason"],
            "tool_calls"
        );
        assert_eq!(reply_from_events(&events), (reply.clone(), usage));

        let (json_body, usage) = render(&reply, &parse(&json!({"model": "m"})), 1, 5);
        let body: Value = serde_json::from_str(&json_body.body).unwrap();
        assert_eq!(
            body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"command\":\"ls\"}"
        );
        assert_eq!(reply_from_json(&body), (reply, usage));
    }
}
