//! Normalising requests so that two runs of the same agent on the same task match: volatile
//! values (ids, uuids, session and cache keys, timestamps, dates, temp paths, wall times) are
//! dropped or replaced by placeholders. Pure functions; the cassette matcher and the
//! transcript use them.

use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value};

use crate::api::Api;

/// Top-level fields dropped per API: per-user, per-session or per-cache values.
fn dropped_fields(api: Api) -> &'static [&'static str] {
    match api {
        Api::Anthropic => &["metadata"],
        Api::OpenAiChat => &["user", "metadata", "prompt_cache_key", "safety_identifier"],
        Api::OpenAiResponses => &[
            "prompt_cache_key",
            "client_metadata",
            "metadata",
            "user",
            "safety_identifier",
        ],
    }
}

/// Keys (at any depth) whose string values are ids, replaced by `<id>`.
const ID_KEYS: [&str; 5] = ["id", "tool_use_id", "call_id", "tool_call_id", "item_id"];

static SCRUBS: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        // Temp paths first: they may contain uuids and dates.
        (r"/tmp/[^\s\x22'`)\]}<>,;:]+", "<tmp>"),
        (
            r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b",
            "<uuid>",
        ),
        (
            r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?",
            "<timestamp>",
        ),
        (r"\b\d{4}-\d{2}-\d{2}\b", "<date>"),
        (r"Wall time: [0-9.]+ ?\w*", "Wall time: <n>"),
        (r"Chunk ID: \w+", "Chunk ID: <id>"),
    ]
    .into_iter()
    .map(|(re, with)| (Regex::new(re).expect("valid normalisation regex"), with))
    .collect()
});

/// Replaces volatile substrings (uuids, timestamps, dates, `/tmp/…` paths, Codex wall times
/// and chunk ids) with placeholders.
pub fn scrub_str(s: &str) -> String {
    let mut out = s.to_owned();
    for (re, with) in SCRUBS.iter() {
        if re.is_match(&out) {
            out = re.replace_all(&out, *with).into_owned();
        }
    }
    out
}

/// The normalised form of a request body of `api`: volatile top-level fields dropped, id
/// values replaced by `<id>`, every string scrubbed with [`scrub_str`]. Keys come out sorted.
pub fn normalise(api: Api, body: &Value) -> Value {
    match body {
        Value::Object(map) => {
            let kept: Map<String, Value> = map
                .iter()
                .filter(|(k, _)| !dropped_fields(api).contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), normalise_value(k, v)))
                .collect();
            Value::Object(kept)
        }
        other => normalise_value("", other),
    }
}

fn normalise_value(key: &str, value: &Value) -> Value {
    match value {
        Value::String(_) if ID_KEYS.contains(&key) => Value::String("<id>".into()),
        Value::String(s) => Value::String(scrub_str(s)),
        Value::Array(items) => Value::Array(items.iter().map(|v| normalise_value("", v)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalise_value(k, v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Recursively scrubs every string of `value` (for transcripts).
pub fn scrub_value(value: &Value) -> Value {
    normalise_value("", value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drops_anthropic_metadata_and_ids() {
        let body = json!({
            "model": "m",
            "metadata": {"user_id": "{\"device_id\":\"abc\",\"session_id\":\"x\"}"},
            "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01X", "name": "Bash"}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01X"}]}],
            "tools": [{"name": "T", "input_schema": {"properties": {"id": {"type": "string"}, "metadata": {}}}}],
        });
        assert_eq!(
            normalise(Api::Anthropic, &body),
            json!({
                "model": "m",
                "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "<id>", "name": "Bash"}]},
                             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "<id>"}]}],
                "tools": [{"name": "T", "input_schema": {"properties": {"id": {"type": "string"}, "metadata": {}}}}],
            })
        );
    }

    #[test]
    fn drops_codex_session_fields_and_scrubs_outputs() {
        let body = json!({
            "prompt_cache_key": "0199-abc", "client_metadata": {"x": 1}, "store": false,
            "input": [{"type": "function_call_output", "call_id": "call_9",
                       "output": "Chunk ID: 5f2a\nWall time: 0.0113 seconds\nProcess exited with code 0"}],
        });
        assert_eq!(
            normalise(Api::OpenAiResponses, &body),
            json!({"store": false, "input": [{"type": "function_call_output", "call_id": "<id>",
                   "output": "Chunk ID: <id>\nWall time: <n>\nProcess exited with code 0"}]})
        );
    }

    #[test]
    fn scrubs_uuids_timestamps_dates_and_tmp_paths() {
        assert_eq!(
            scrub_str("session 123e4567-E89B-12d3-a456-426614174000 at 2026-12-04T04:05:20.123Z"),
            "session <uuid> at <timestamp>"
        );
        assert_eq!(
            scrub_str("Today's date is 2026-12-04."),
            "Today's date is <date>."
        );
        assert_eq!(
            scrub_str("cwd: /tmp/tmp.Xy12/work, \"/tmp/a\""),
            "cwd: <tmp>, \"<tmp>\""
        );
        assert_eq!(
            scrub_str("plain /workspace/hi.txt"),
            "plain /workspace/hi.txt"
        );
    }

    #[test]
    fn normalising_is_idempotent_and_keeps_non_volatile_fields() {
        let body = json!({"model": "gpt", "user": "u1", "messages": [{"role": "user", "content": "hi /tmp/x"}]});
        let once = normalise(Api::OpenAiChat, &body);
        assert_eq!(
            once,
            json!({"model": "gpt", "messages": [{"role": "user", "content": "hi <tmp>"}]})
        );
        assert_eq!(normalise(Api::OpenAiChat, &once), once);
    }
}
