//! OpenAI Responses API (`POST /v1/responses`, Codex): reading requests, rendering replies as
//! the event stream Codex accepts (item shapes as measured in `real-agents.md` §2) or JSON,
//! and reading recorded replies back.

use serde_json::{json, Value};

use crate::api::{
    content_text, estimate_tokens, find_cwd, Api, InputItem, ParsedRequest, Rendered, Reply, Tool,
    ToolCall, Usage,
};
use crate::sse::{encode_all, SseEvent};

/// The fixed `created_at` of rendered replies (deterministic output).
const CREATED_AT: u64 = 1_700_000_000;

/// Reads what the gateway needs out of a Responses request body.
///
/// Side request rule: a request without any `function` tool is a side request.
pub fn parse(body: &Value) -> ParsedRequest {
    let tools: Vec<Tool> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
                .filter_map(|t| {
                    Some(Tool {
                        name: t.get("name")?.as_str()?.to_owned(),
                        schema: t.get("parameters").cloned().unwrap_or_else(|| json!({})),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    ParsedRequest {
        api: Api::OpenAiResponses,
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

fn new_input(body: &Value) -> Vec<InputItem> {
    let items = match body.get("input") {
        Some(Value::String(text)) => return vec![InputItem::UserText { text: text.clone() }],
        Some(Value::Array(items)) => items.as_slice(),
        _ => return Vec::new(),
    };
    let is_output = |item: &Value| match item.get("type").and_then(Value::as_str) {
        Some("function_call" | "reasoning") => true,
        Some("message") | None => item.get("role").and_then(Value::as_str) == Some("assistant"),
        _ => false,
    };
    let start = items.iter().rposition(is_output).map_or(0, |i| i + 1);
    items[start..]
        .iter()
        .filter_map(|item| match item.get("type").and_then(Value::as_str) {
            Some("function_call_output") => Some(InputItem::ToolResult {
                output: item.get("output").map(content_text).unwrap_or_default(),
                is_error: false,
            }),
            Some("message") | None => Some(InputItem::UserText {
                text: item.get("content").map(content_text).unwrap_or_default(),
            }),
            _ => None,
        })
        .collect()
}

/// Renders `reply` as the Responses event stream or a JSON response object.
pub fn render(
    reply: &Reply,
    request: &ParsedRequest,
    seq: u64,
    input_tokens: u64,
) -> (Rendered, Usage) {
    let id = format!("resp_agentvm_{seq:04}");
    let items = items(reply, seq);
    let output_tokens = estimate_tokens(serde_json::to_string(&items).unwrap_or_default().len());
    let usage = Usage {
        input_tokens,
        output_tokens,
    };
    let response = |status: &str, output: Value| {
        json!({
            "id": id, "object": "response", "created_at": CREATED_AT, "model": request.model,
            "status": status, "output": output,
        })
    };
    let mut completed = response("completed", Value::Array(items.clone()));
    completed["usage"] = json!({
        "input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    });
    if !request.stream {
        return (
            Rendered {
                content_type: "application/json",
                body: completed.to_string(),
            },
            usage,
        );
    }
    let mut events = Vec::new();
    let mut push = |name: &str, mut data: Value| {
        data["type"] = json!(name);
        data["sequence_number"] = json!(events.len());
        events.push(SseEvent::named(name, data));
    };
    push(
        "response.created",
        json!({"response": response("in_progress", json!([]))}),
    );
    for (index, item) in items.iter().enumerate() {
        let mut added = item.clone();
        added["status"] = json!("in_progress");
        if item["type"] == "message" {
            added["content"] = json!([]);
        } else {
            added["arguments"] = json!("");
        }
        push(
            "response.output_item.added",
            json!({"output_index": index, "item": added}),
        );
        if item["type"] == "message" {
            push(
                "response.output_text.delta",
                json!({"item_id": item["id"], "output_index": index, "content_index": 0,
                       "delta": item["content"][0]["text"]}),
            );
        }
        push(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
    }
    push("response.completed", json!({"response": completed}));
    (
        Rendered {
            content_type: "text/event-stream",
            body: encode_all(&events),
        },
        usage,
    )
}

fn items(reply: &Reply, seq: u64) -> Vec<Value> {
    let mut items = Vec::new();
    if let Some(text) = &reply.text {
        items.push(json!({
            "type": "message", "role": "assistant", "id": format!("msg_agentvm_{seq:04}"),
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }));
    }
    for (i, call) in reply.tool_calls.iter().enumerate() {
        items.push(json!({
            "type": "function_call", "id": format!("fc_agentvm_{seq:04}_{i}"),
            "call_id": format!("call_agentvm_{seq:04}_{i}"), "name": call.name,
            "arguments": call.arguments.to_string(), "status": "completed",
        }));
    }
    items
}

/// Reads text, tool calls and usage out of a recorded event stream (from its
/// `response.completed` event, or the `output_item.done` events if it has none).
pub fn reply_from_events(events: &[SseEvent]) -> (Reply, Usage) {
    if let Some(done) = events
        .iter()
        .find(|e| e.data["type"] == "response.completed")
    {
        return reply_from_json(&done.data["response"]);
    }
    let output: Vec<Value> = events
        .iter()
        .filter(|e| e.data["type"] == "response.output_item.done")
        .map(|e| e.data["item"].clone())
        .collect();
    reply_from_json(&json!({"output": output}))
}

/// Reads text, tool calls and usage out of a response object.
pub fn reply_from_json(response: &Value) -> (Reply, Usage) {
    let mut reply = Reply::default();
    let mut text = String::new();
    for item in response["output"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        match item["type"].as_str() {
            Some("message") => text.push_str(&content_text(&item["content"])),
            Some("function_call") => {
                let args = item["arguments"].as_str().unwrap_or("");
                reply.tool_calls.push(ToolCall {
                    name: item["name"].as_str().unwrap_or_default().to_owned(),
                    arguments: serde_json::from_str(args)
                        .unwrap_or_else(|_| Value::String(args.to_owned())),
                });
            }
            _ => {}
        }
    }
    reply.text = (!text.is_empty()).then_some(text);
    let usage = Usage {
        input_tokens: response["usage"]["input_tokens"].as_u64().unwrap_or(0),
        output_tokens: response["usage"]["output_tokens"].as_u64().unwrap_or(0),
    };
    (reply, usage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse;

    fn codex_like_second_request() -> Value {
        json!({
            "model": "gpt-fake", "stream": true, "tool_choice": "auto",
            "tools": [{"type": "function", "name": "exec_command", "parameters": {"type": "object",
                        "properties": {"cmd": {"type": "string"}}}},
                      {"type": "web_search"}],
            "input": [
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "dev"}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "create hi.txt"}]},
                {"type": "function_call", "name": "exec_command", "arguments": "{\"cmd\": \"echo\"}", "call_id": "c1"},
                {"type": "function_call_output", "call_id": "c1", "output": "Process exited with code 0\n"}
            ]
        })
    }

    #[test]
    fn parses_function_tools_and_outputs() {
        let parsed = parse(&codex_like_second_request());
        assert_eq!(parsed.tools.len(), 1);
        assert_eq!(parsed.tools[0].name, "exec_command");
        assert_eq!(
            parsed.new_input,
            [InputItem::ToolResult {
                output: "Process exited with code 0\n".into(),
                is_error: false
            }]
        );
        assert!(parse(&json!({"input": "x"})).side);
    }

    #[test]
    fn stream_matches_codex_shapes_and_reads_back() {
        let request = parse(&codex_like_second_request());
        let reply = Reply {
            text: Some("ok".into()),
            tool_calls: vec![ToolCall {
                name: "exec_command".into(),
                arguments: json!({"cmd": "ls"}),
            }],
        };
        let (rendered, usage) = render(&reply, &request, 3, 40);
        let events = sse::parse(&rendered.body).unwrap();
        let names: Vec<_> = events.iter().map(|e| e.event.clone().unwrap()).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.output_item.added",
                "response.output_text.delta",
                "response.output_item.done",
                "response.output_item.added",
                "response.output_item.done",
                "response.completed"
            ]
        );
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.data["sequence_number"], i);
            assert_eq!(e.data["type"], names[i]);
        }
        let call = &events[5].data["item"];
        assert_eq!(call["arguments"], "{\"cmd\":\"ls\"}");
        assert_eq!(call["call_id"], "call_agentvm_0003_0");
        assert_eq!(
            events[6].data["response"]["usage"]["total_tokens"],
            40 + usage.output_tokens
        );
        assert_eq!(reply_from_events(&events), (reply, usage));
    }
}
