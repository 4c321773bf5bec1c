//! Anthropic Messages API (`POST /v1/messages`): reading requests, rendering replies as SSE
//! or JSON, and reading recorded replies back for the transcript.

use serde_json::{json, Value};

use crate::api::{
    content_text, estimate_tokens, find_cwd, Api, InputItem, ParsedRequest, Rendered, Reply, Tool,
    ToolCall, Usage,
};
use crate::sse::{encode_all, SseEvent};

/// Reads what the gateway needs out of a Messages request body.
///
/// Side request rule: a request that advertises no tools (`tools` absent or `[]`, e.g. Claude
/// Code's title generation) is a side request.
pub fn parse(body: &Value) -> ParsedRequest {
    let tools: Vec<Tool> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| {
                    Some(Tool {
                        name: t.get("name")?.as_str()?.to_owned(),
                        schema: t.get("input_schema").cloned().unwrap_or_else(|| json!({})),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    ParsedRequest {
        api: Api::Anthropic,
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        side: tools.is_empty(),
        tools,
        new_input: new_input(body),
        cwd: find_cwd(body),
        chat_messages: Vec::new(),
    }
}

/// Input after the last assistant message. `<system-reminder>` blocks (harness noise) are
/// left out.
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
    let mut items = Vec::new();
    for message in &messages[start..] {
        match message.get("content") {
            Some(Value::String(text)) => push_text(&mut items, text),
            Some(Value::Array(blocks)) => {
                for block in blocks {
                    match block.get("type").and_then(Value::as_str) {
                        Some("text") => push_text(
                            &mut items,
                            block.get("text").and_then(Value::as_str).unwrap_or(""),
                        ),
                        Some("tool_result") => items.push(InputItem::ToolResult {
                            output: block.get("content").map(content_text).unwrap_or_default(),
                            is_error: block
                                .get("is_error")
                                .and_then(Value::as_bool)
                                .unwrap_or(false),
                        }),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    items
}

fn push_text(items: &mut Vec<InputItem>, text: &str) {
    if !text.trim_start().starts_with("<system-reminder>") {
        items.push(InputItem::UserText {
            text: text.to_owned(),
        });
    }
}

/// Renders `reply` as the stream or JSON body the request asked for. `seq` makes the ids.
pub fn render(
    reply: &Reply,
    request: &ParsedRequest,
    seq: u64,
    input_tokens: u64,
) -> (Rendered, Usage) {
    let id = format!("msg_agentvm_{seq:04}");
    let blocks = blocks(reply, seq);
    let output_tokens = estimate_tokens(serde_json::to_string(&blocks).unwrap_or_default().len());
    let usage = Usage {
        input_tokens,
        output_tokens,
    };
    let stop_reason = if reply.tool_calls.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    };
    let usage_json = json!({
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    });
    if !request.stream {
        let body = json!({
            "id": id, "type": "message", "role": "assistant", "model": request.model,
            "content": blocks, "stop_reason": stop_reason, "stop_sequence": null, "usage": usage_json,
        });
        return (
            Rendered {
                content_type: "application/json",
                body: body.to_string(),
            },
            usage,
        );
    }
    let mut events = vec![SseEvent::named(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": request.model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        }}),
    )];
    for (index, block) in blocks.iter().enumerate() {
        let (start, delta) = if block["type"] == "text" {
            (
                json!({"type": "text", "text": ""}),
                json!({"type": "text_delta", "text": block["text"]}),
            )
        } else {
            (
                json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}),
                json!({"type": "input_json_delta", "partial_json": block["input"].to_string()}),
            )
        };
        events.push(SseEvent::named(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        events.push(SseEvent::named(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
        events.push(SseEvent::named(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
    }
    events.push(SseEvent::named(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
               "usage": {"output_tokens": output_tokens}}),
    ));
    events.push(SseEvent::named(
        "message_stop",
        json!({"type": "message_stop"}),
    ));
    (
        Rendered {
            content_type: "text/event-stream",
            body: encode_all(&events),
        },
        usage,
    )
}

fn blocks(reply: &Reply, seq: u64) -> Vec<Value> {
    let mut blocks = Vec::new();
    if let Some(text) = &reply.text {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for (i, call) in reply.tool_calls.iter().enumerate() {
        blocks.push(json!({
            "type": "tool_use", "id": format!("toolu_agentvm_{seq:04}_{i}"),
            "name": call.name, "input": call.arguments,
        }));
    }
    blocks
}

/// The body of a `POST /v1/messages/count_tokens` answer.
pub fn count_tokens(body_len: usize) -> Value {
    json!({"input_tokens": estimate_tokens(body_len)})
}

/// Reads text, tool calls and usage out of a recorded SSE reply.
pub fn reply_from_events(events: &[SseEvent]) -> (Reply, Usage) {
    let mut reply = Reply::default();
    let mut usage = Usage::default();
    let mut text = String::new();
    let mut current_tool: Option<(String, String)> = None;
    for event in events {
        let data = &event.data;
        match data.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let u = &data["message"]["usage"];
                usage.input_tokens = u["input_tokens"].as_u64().unwrap_or(0);
                usage.output_tokens = u["output_tokens"].as_u64().unwrap_or(0);
            }
            Some("content_block_start") if data["content_block"]["type"] == "tool_use" => {
                let name = data["content_block"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                current_tool = Some((name, String::new()));
            }
            Some("content_block_delta") => match data["delta"]["type"].as_str() {
                Some("text_delta") => text.push_str(data["delta"]["text"].as_str().unwrap_or("")),
                Some("input_json_delta") => {
                    if let Some((_, json)) = current_tool.as_mut() {
                        json.push_str(data["delta"]["partial_json"].as_str().unwrap_or(""));
                    }
                }
                _ => {}
            },
            Some("content_block_stop") => {
                if let Some((name, json)) = current_tool.take() {
                    let arguments = serde_json::from_str(&json).unwrap_or(Value::String(json));
                    reply.tool_calls.push(ToolCall { name, arguments });
                }
            }
            Some("message_delta") => {
                if let Some(n) = data["usage"]["output_tokens"].as_u64() {
                    usage.output_tokens = n;
                }
            }
            _ => {}
        }
    }
    reply.text = (!text.is_empty()).then_some(text);
    (reply, usage)
}

/// Reads text, tool calls and usage out of a recorded JSON reply.
pub fn reply_from_json(body: &Value) -> (Reply, Usage) {
    let mut reply = Reply::default();
    let mut text = String::new();
    for block in body["content"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or("")),
            Some("tool_use") => reply.tool_calls.push(ToolCall {
                name: block["name"].as_str().unwrap_or_default().to_owned(),
                arguments: block["input"].clone(),
            }),
            _ => {}
        }
    }
    reply.text = (!text.is_empty()).then_some(text);
    let usage = Usage {
        input_tokens: body["usage"]["input_tokens"].as_u64().unwrap_or(0),
        output_tokens: body["usage"]["output_tokens"].as_u64().unwrap_or(0),
    };
    (reply, usage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse;

    fn claude_like_second_request() -> Value {
        json!({
            "model": "claude-opus-4-8", "stream": true, "max_tokens": 64000,
            "system": [{"type": "text", "text": "You are Claude Code.\nWorking directory: /workspace"}],
            "tools": [{"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "<system-reminder>x</system-reminder>"},
                                             {"type": "text", "text": "create hi.txt"}]},
                {"role": "system", "content": [{"type": "text", "text": "agents"}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "echo"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                    "content": "(Bash completed with no output)", "is_error": false}]}
            ]
        })
    }

    #[test]
    fn parses_tools_new_input_and_cwd() {
        let parsed = parse(&claude_like_second_request());
        assert_eq!(
            parsed
                .tools
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["Bash"]
        );
        assert!(parsed.stream && !parsed.side);
        assert_eq!(parsed.cwd.as_deref(), Some("/workspace"));
        assert_eq!(
            parsed.new_input,
            [InputItem::ToolResult {
                output: "(Bash completed with no output)".into(),
                is_error: false
            }]
        );
        let first = parse(&json!({"messages": [{"role": "user", "content": "hi"}], "tools": []}));
        assert!(first.side);
        assert_eq!(first.new_input, [InputItem::UserText { text: "hi".into() }]);
    }

    #[test]
    fn stream_has_the_event_order_claude_code_accepts_and_reads_back() {
        let request = parse(&claude_like_second_request());
        let reply = Reply {
            text: Some("running".into()),
            tool_calls: vec![ToolCall {
                name: "Bash".into(),
                arguments: json!({"command": "echo hi"}),
            }],
        };
        let (rendered, usage) = render(&reply, &request, 7, 100);
        assert_eq!(rendered.content_type, "text/event-stream");
        let events = sse::parse(&rendered.body).unwrap();
        let names: Vec<_> = events.iter().map(|e| e.event.clone().unwrap()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[7].data["delta"]["stop_reason"], "tool_use");
        assert_eq!(
            events[4].data["content_block"]["id"],
            "toolu_agentvm_0007_0"
        );
        assert_eq!(reply_from_events(&events), (reply, usage));
    }

    #[test]
    fn json_reply_reads_back() {
        let mut request = parse(&claude_like_second_request());
        request.stream = false;
        let (rendered, usage) = render(&Reply::text("done"), &request, 1, 10);
        let body: Value = serde_json::from_str(&rendered.body).unwrap();
        assert_eq!(body["stop_reason"], "end_turn");
        assert_eq!(reply_from_json(&body), (Reply::text("done"), usage));
    }
}
