//! Scripted mode: the test gives generic turns; each one is mapped onto the tools the agent
//! advertised in the request it answers.
//!
//! # Mapping
//!
//! | turn | Anthropic (Claude Code) | Responses (Codex) | Chat with tools | Chat without tools (Aider) |
//! |---|---|---|---|---|
//! | `shell` | `Bash {command}` | shell tool | shell tool | a `bash` fenced block |
//! | `edit` | `Read` (if advertised) + `Edit {file_path, old_string, new_string}`, else shell | shell (python3) | shell (python3) | SEARCH/REPLACE block, or the whole edited file |
//! | `write` | `Write {file_path, content}`, else shell | shell (printf) | shell (printf) | SEARCH/REPLACE block with an empty SEARCH, or the whole file |
//! | `text` | text | text | text | text |
//!
//! The *shell tool* is the first advertised tool named `Bash`, `exec_command`, `shell`,
//! `bash`, `run_shell_command`, `execute_command` or `run_command` (else the first whose name
//! contains `shell`, `bash`, `exec` or `command`); its argument is the first of `command`,
//! `cmd`, `script` in its schema, given `["bash", "-lc", cmd]` when the schema says `array`.
//! On a shell tool an edit becomes a `python3` heredoc that replaces the first occurrence of
//! `old` (and exits 1 if `old` is absent) — so the guest needs python3 — and a write becomes
//! `mkdir -p DIR && printf '%s' 'CONTENT' > PATH` (byte-exact, no trailing newline added).
//! Relative paths are made absolute with the agent's working directory when its prompt states
//! it (Claude Code: `Primary working directory: /x`; not with `--bare`, where relative paths
//! also work). Claude Code refuses to `Edit` a file it has not read, hence the `Read` first:
//! both go in one assistant message and Claude Code runs them in order. Checked with Claude
//! Code 2.1.197 (also `--bare`, where `Write` is missing and the printf fallback applies) and
//! Codex 0.171.0 against `examples/serve.rs`: shell, edit and write turns all changed the
//! files as scripted.
//!
//! A Chat Completions agent without tools (Aider) edits by writing its edits as text in the
//! format its system prompt teaches: [`ChatEditFormat::Diff`] when the prompt names the
//! `*SEARCH/REPLACE block*` format, [`ChatEditFormat::Whole`] when it names the `*file
//! listing*` format (Aider 0.86.2's `diff` and `whole` prompts), else the gateway's
//! configured format. In the whole format an edit needs the file's current content: it is
//! taken from the file listing the agent sent for the files in its chat (`aider notes.txt`
//! adds `notes.txt`), `old` is replaced there, and the whole file is written back in the
//! same fence. A shell turn becomes a `bash` block, which only the diff format reads as a
//! suggested command (the whole format has none: a shell turn there is an error), and which
//! Aider runs only on an explicit yes (`--yes-always` answers no).
//!
//! # Which requests consume a turn
//!
//! * A **side request** (Anthropic / Responses: no tools advertised; Chat: a structured
//!   `response_format`) is answered with [`SIDE_REPLY`] and consumes nothing.
//! * A **repeat** (its normalised body equals one already answered, e.g. a client retry) gets
//!   the same answer again and consumes nothing.
//! * Every other request consumes the next turn. When none is left, or a turn needs a tool the
//!   agent did not advertise, the gateway answers 400 with the reason and records an error.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::{Api, ParsedRequest, Reply, Tool, ToolCall};

/// The text a side request gets.
pub const SIDE_REPLY: &str = "ok";

/// One scripted model turn. As JSON: `{"turn": "shell", "command": "ls"}`,
/// `{"turn": "edit", "path", "old", "new"}`, `{"turn": "write", "path", "content"}`,
/// `{"turn": "text", "text"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "turn", rename_all = "snake_case")]
pub enum Turn {
    /// Run a shell command.
    Shell {
        /// The command line.
        command: String,
    },
    /// Replace the first occurrence of `old` by `new` in `path`.
    Edit {
        /// File path (relative to the agent's working directory, or absolute).
        path: String,
        /// Exact text to replace.
        old: String,
        /// Replacement.
        new: String,
    },
    /// Create or overwrite `path` with `content`.
    Write {
        /// File path (relative to the agent's working directory, or absolute).
        path: String,
        /// Full file content.
        content: String,
    },
    /// Answer with text and no tool call (usually the last turn: the agent stops).
    Text {
        /// The text.
        text: String,
    },
}

impl Turn {
    /// A shell command turn.
    pub fn shell(command: impl Into<String>) -> Self {
        Self::Shell {
            command: command.into(),
        }
    }
    /// An exact-replacement edit turn.
    pub fn edit(path: impl Into<String>, old: impl Into<String>, new: impl Into<String>) -> Self {
        Self::Edit {
            path: path.into(),
            old: old.into(),
            new: new.into(),
        }
    }
    /// A whole-file write turn.
    pub fn write(path: impl Into<String>, content: impl Into<String>) -> Self {
        Self::Write {
            path: path.into(),
            content: content.into(),
        }
    }
    /// A text-only turn.
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text { text: text.into() }
    }
}

/// How edits are written for a Chat Completions agent that advertises no tools (Aider's
/// `--edit-format`). The request's own prompt decides when it names a format (see the module
/// docs); this is the fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChatEditFormat {
    /// `path\n```\ncontent\n```\n` (Aider's default `whole` format). An edit turn needs the
    /// file in the agent's chat (its content is in the request).
    #[default]
    Whole,
    /// SEARCH/REPLACE blocks (Aider's `diff` format); writes use an empty SEARCH.
    Diff,
}

/// Why a turn cannot be rendered for a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TurnError {
    /// The turn needs a kind of tool the request does not advertise.
    #[error("turn {turn} needs {needs}, but the agent advertised {advertised:?}; script a turn this agent can run")]
    ToolNotAdvertised {
        /// 1-based turn number.
        turn: usize,
        /// What was needed.
        needs: &'static str,
        /// The tool names the agent advertised.
        advertised: Vec<String>,
    },
    /// A shell turn in the whole-file format, which has no way to suggest a command.
    #[error("turn {turn} is a shell command, which Aider's whole-file format cannot suggest (it reads a bash block as a file listing without a file name); use the diff edit format (--edit-format diff)")]
    ShellNeedsDiffFormat {
        /// 1-based turn number.
        turn: usize,
    },
    /// An edit turn in the whole-file format for a file whose content the request lacks.
    #[error("turn {turn} edits {path} in Aider's whole-file format, which needs the file's current content, but {path} is not in the agent's chat; add it (Agent::aider().arg(\"{path}\")), script Turn::write, or use the diff edit format (--edit-format diff)")]
    EditFileNotInChat {
        /// 1-based turn number.
        turn: usize,
        /// The file.
        path: String,
    },
    /// An edit turn in the whole-file format whose `old` text is not in the file.
    #[error("turn {turn} replaces {old:?} in {path}, but the content of {path} the agent sent does not contain it")]
    EditOldNotFound {
        /// 1-based turn number.
        turn: usize,
        /// The file.
        path: String,
        /// The text to replace.
        old: String,
    },
}

/// Maps turn number `number` (1-based) onto `request`'s tools.
pub fn render_turn(
    turn: &Turn,
    number: usize,
    request: &ParsedRequest,
    chat: ChatEditFormat,
) -> Result<Reply, TurnError> {
    if let Turn::Text { text } = turn {
        return Ok(Reply::text(text.clone()));
    }
    if request.api == Api::OpenAiChat && request.tools.is_empty() {
        let format = chat_edit_format(request).unwrap_or(chat);
        return aider_text(turn, number, request, format).map(Reply::text);
    }
    let abs = |path: &str| absolute(path, request.cwd.as_deref());
    let find = |name: &str| request.tools.iter().find(|t| t.name == name);
    let not_advertised = |needs| TurnError::ToolNotAdvertised {
        turn: number,
        needs,
        advertised: request.tools.iter().map(|t| t.name.clone()).collect(),
    };
    if request.api == Api::Anthropic {
        match turn {
            Turn::Edit { path, old, new } if find("Edit").is_some() => {
                let file_path = abs(path);
                let mut tool_calls = Vec::new();
                if find("Read").is_some() {
                    tool_calls.push(call("Read", json!({"file_path": file_path})));
                }
                tool_calls.push(call(
                    "Edit",
                    json!({"file_path": file_path, "old_string": old, "new_string": new}),
                ));
                return Ok(Reply {
                    text: None,
                    tool_calls,
                });
            }
            Turn::Write { path, content } if find("Write").is_some() => {
                return Ok(tool_reply(call(
                    "Write",
                    json!({"file_path": abs(path), "content": content}),
                )));
            }
            _ => {}
        }
    }
    let shell = shell_tool(&request.tools).ok_or_else(|| not_advertised("a shell tool"))?;
    let command = match turn {
        Turn::Shell { command } => command.clone(),
        Turn::Edit { path, old, new } => edit_command(&abs(path), old, new),
        Turn::Write { path, content } => write_command(&abs(path), content),
        Turn::Text { .. } => unreachable!("handled above"),
    };
    Ok(tool_reply(call(
        &shell.name,
        shell_arguments(shell, &command),
    )))
}

fn call(name: &str, arguments: Value) -> ToolCall {
    ToolCall {
        name: name.to_owned(),
        arguments,
    }
}

fn tool_reply(call: ToolCall) -> Reply {
    Reply {
        text: None,
        tool_calls: vec![call],
    }
}

fn absolute(path: &str, cwd: Option<&str>) -> String {
    match cwd {
        Some(cwd) if !path.starts_with('/') => format!("{}/{path}", cwd.trim_end_matches('/')),
        _ => path.to_owned(),
    }
}

/// The advertised tool used for shell commands (see the module docs for the rule).
pub fn shell_tool(tools: &[Tool]) -> Option<&Tool> {
    const PREFERRED: [&str; 7] = [
        "Bash",
        "exec_command",
        "shell",
        "bash",
        "run_shell_command",
        "execute_command",
        "run_command",
    ];
    PREFERRED
        .iter()
        .find_map(|name| tools.iter().find(|t| t.name == *name))
        .or_else(|| {
            tools.iter().find(|t| {
                let n = t.name.to_lowercase();
                ["shell", "bash", "exec", "command"]
                    .iter()
                    .any(|k| n.contains(k))
            })
        })
}

/// The arguments for `tool` that run `command`.
pub fn shell_arguments(tool: &Tool, command: &str) -> Value {
    let props = tool.schema.get("properties").and_then(Value::as_object);
    let key = ["command", "cmd", "script"]
        .into_iter()
        .find(|k| props.is_some_and(|p| p.contains_key(*k)))
        .unwrap_or("command");
    let is_array = props
        .and_then(|p| p.get(key))
        .and_then(|p| p.get("type"))
        .and_then(Value::as_str)
        == Some("array");
    let value = if is_array {
        json!(["bash", "-lc", command])
    } else {
        json!(command)
    };
    json!({ key: value })
}

/// Quotes `s` for a POSIX shell (single quotes).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A shell command that writes `content` to `path` byte-exactly.
pub fn write_command(path: &str, content: &str) -> String {
    let dir = match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => ".",
    };
    format!(
        "mkdir -p {} && printf '%s' {} > {}",
        shell_quote(dir),
        shell_quote(content),
        shell_quote(path)
    )
}

/// A shell command (python3 heredoc) that replaces the first `old` by `new` in `path`.
pub fn edit_command(path: &str, old: &str, new: &str) -> String {
    // JSON string literals are valid Python string literals.
    let lit = |s: &str| Value::String(s.to_owned()).to_string();
    format!(
        "python3 - <<'AGENTVM_EDIT'\nimport pathlib, sys\np = pathlib.Path({path})\ns = p.read_text()\nold, new = {old}, {new}\nif old not in s:\n    sys.exit('edit: old text not found in ' + str(p))\np.write_text(s.replace(old, new, 1))\nAGENTVM_EDIT",
        path = lit(path),
        old = lit(old),
        new = lit(new)
    )
}

/// The edit format the request's prompt teaches, if it names one (system messages first).
pub fn chat_edit_format(request: &ParsedRequest) -> Option<ChatEditFormat> {
    let detect = |text: &str| {
        if text.contains("*SEARCH/REPLACE block*") {
            Some(ChatEditFormat::Diff)
        } else if text.contains("*file listing*") {
            Some(ChatEditFormat::Whole)
        } else {
            None
        }
    };
    let messages = &request.chat_messages;
    messages
        .iter()
        .filter(|m| m.role == "system")
        .find_map(|m| detect(&m.text))
        .or_else(|| messages.iter().find_map(|m| detect(&m.text)))
}

/// The fences Aider puts around a file's content (it picks the first that no line of the
/// files in its chat starts with).
const FENCES: [(&str, &str); 7] = [
    ("```", "```"),
    ("````", "````"),
    ("<source>", "</source>"),
    ("<code>", "</code>"),
    ("<pre>", "</pre>"),
    ("<codeblock>", "</codeblock>"),
    ("<sourcecode>", "</sourcecode>"),
];

/// A file's content as the agent last sent it in a file listing (`path`, the opening fence
/// on its own line, the content, the closing fence at the start of a line), with that fence.
pub fn file_listing<'a>(
    request: &'a ParsedRequest,
    path: &str,
) -> Option<(&'a str, (&'static str, &'static str))> {
    request.chat_messages.iter().rev().find_map(|m| {
        let text = m.text.as_str();
        FENCES.iter().find_map(|&(open, close)| {
            let head = format!("{path}\n{open}\n");
            text.match_indices(&head)
                .filter(|(i, _)| *i == 0 || text[..*i].ends_with('\n'))
                .find_map(|(i, _)| {
                    let start = i + head.len();
                    let body = &text[start..];
                    let end = body.match_indices(close).map(|(j, _)| j).find(|&j| {
                        (j == 0 || body[..j].ends_with('\n'))
                            && matches!(body[j + close.len()..].chars().next(), None | Some('\n'))
                    })?;
                    Some((&body[..end], (open, close)))
                })
        })
    })
}

fn aider_text(
    turn: &Turn,
    number: usize,
    request: &ParsedRequest,
    format: ChatEditFormat,
) -> Result<String, TurnError> {
    Ok(match (turn, format) {
        (Turn::Shell { .. }, ChatEditFormat::Whole) => {
            return Err(TurnError::ShellNeedsDiffFormat { turn: number })
        }
        (Turn::Shell { command }, ChatEditFormat::Diff) => format!("```bash\n{command}\n```\n"),
        (Turn::Write { path, content }, ChatEditFormat::Whole) => {
            whole_file(path, content, FENCES[0])
        }
        (Turn::Write { path, content }, ChatEditFormat::Diff) => search_replace(path, "", content),
        (Turn::Edit { path, old, new }, ChatEditFormat::Diff) => search_replace(path, old, new),
        (Turn::Edit { path, old, new }, ChatEditFormat::Whole) => {
            let (content, fence) =
                file_listing(request, path).ok_or_else(|| TurnError::EditFileNotInChat {
                    turn: number,
                    path: path.clone(),
                })?;
            if !content.contains(old.as_str()) {
                return Err(TurnError::EditOldNotFound {
                    turn: number,
                    path: path.clone(),
                    old: old.clone(),
                });
            }
            whole_file(path, &content.replacen(old.as_str(), new, 1), fence)
        }
        (Turn::Text { text }, _) => text.clone(),
    })
}

/// A whole-file listing: `path`, the opening fence, `content` (ending in a newline), the
/// closing fence.
fn whole_file(path: &str, content: &str, (open, close): (&str, &str)) -> String {
    let body = match content.strip_suffix('\n').unwrap_or(content) {
        "" => String::new(),
        lines => format!("{lines}\n"),
    };
    format!("{path}\n{open}\n{body}{close}\n")
}

fn search_replace(path: &str, old: &str, new: &str) -> String {
    let line = |s: &str| {
        if s.is_empty() || s.ends_with('\n') {
            s.to_owned()
        } else {
            format!("{s}\n")
        }
    };
    format!(
        "{path}\n```\n<<<<<<< SEARCH\n{}=======\n{}>>>>>>> REPLACE\n```\n",
        line(old),
        line(new)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{anthropic, openai_chat, openai_responses};

    fn claude(tools: &[&str]) -> ParsedRequest {
        let tools: Vec<Value> = tools
            .iter()
            .map(|n| json!({"name": n, "input_schema": {"properties": {"command": {"type": "string"}}}}))
            .collect();
        anthropic::parse(&json!({"tools": tools, "system": "Working directory: /workspace"}))
    }

    #[test]
    fn anthropic_turns_use_claude_code_tools() {
        let req = claude(&["Bash", "Read", "Edit", "Write"]);
        let c = ChatEditFormat::Whole;
        let shell = render_turn(&Turn::shell("echo hi > hi.txt"), 1, &req, c).unwrap();
        assert_eq!(
            shell.tool_calls,
            [call("Bash", json!({"command": "echo hi > hi.txt"}))]
        );
        let edit = render_turn(&Turn::edit("README.md", "a", "b"), 2, &req, c).unwrap();
        assert_eq!(
            edit.tool_calls,
            [
                call("Read", json!({"file_path": "/workspace/README.md"})),
                call(
                    "Edit",
                    json!({"file_path": "/workspace/README.md", "old_string": "a", "new_string": "b"})
                ),
            ]
        );
        let write = render_turn(&Turn::write("/x/y", "z"), 3, &req, c).unwrap();
        assert_eq!(
            write.tool_calls,
            [call("Write", json!({"file_path": "/x/y", "content": "z"}))]
        );
        let text = render_turn(&Turn::text("done"), 4, &req, c).unwrap();
        assert_eq!(text, Reply::text("done"));
    }

    #[test]
    fn bare_claude_write_falls_back_to_bash_and_missing_tools_are_errors() {
        let req = claude(&["Bash", "Read", "Edit"]);
        let write =
            render_turn(&Turn::write("a.txt", "hi"), 1, &req, ChatEditFormat::Whole).unwrap();
        assert_eq!(write.tool_calls[0].name, "Bash");
        assert_eq!(
            write.tool_calls[0].arguments["command"],
            "mkdir -p '/workspace' && printf '%s' 'hi' > '/workspace/a.txt'"
        );
        let err = render_turn(
            &Turn::shell("ls"),
            5,
            &claude(&["Read"]),
            ChatEditFormat::Whole,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "turn 5 needs a shell tool, but the agent advertised [\"Read\"]; script a turn this agent can run"
        );
    }

    #[test]
    fn codex_uses_exec_command_cmd() {
        let req = openai_responses::parse(&json!({"tools": [
            {"type": "function", "name": "write_stdin", "parameters": {}},
            {"type": "function", "name": "exec_command", "parameters": {"properties": {"cmd": {"type": "string"}}}}]}));
        let r = render_turn(&Turn::shell("echo hi"), 1, &req, ChatEditFormat::Whole).unwrap();
        assert_eq!(
            r.tool_calls,
            [call("exec_command", json!({"cmd": "echo hi"}))]
        );
        let e = render_turn(
            &Turn::edit("f", "a'b", "c\"d"),
            2,
            &req,
            ChatEditFormat::Whole,
        )
        .unwrap();
        let cmd = e.tool_calls[0].arguments["cmd"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(cmd.starts_with("python3 - <<'AGENTVM_EDIT'\n"), "{cmd}");
        assert!(cmd.contains("old, new = \"a'b\", \"c\\\"d\""), "{cmd}");
    }

    #[test]
    fn chat_shell_function_with_array_argument() {
        let req = openai_chat::parse(
            &json!({"tools": [{"type": "function", "function": {"name": "shell",
            "parameters": {"properties": {"command": {"type": "array"}}}}}]}),
        );
        let r = render_turn(&Turn::shell("ls"), 1, &req, ChatEditFormat::Whole).unwrap();
        assert_eq!(
            r.tool_calls,
            [call("shell", json!({"command": ["bash", "-lc", "ls"]}))]
        );
    }

    #[test]
    fn aider_gets_edit_format_text() {
        let req = openai_chat::parse(&json!({"messages": []}));
        let whole = render_turn(
            &Turn::write("hi.txt", "hello\n"),
            1,
            &req,
            ChatEditFormat::Whole,
        )
        .unwrap();
        assert_eq!(whole, Reply::text("hi.txt\n```\nhello\n```\n"));
        let diff = render_turn(
            &Turn::edit("hi.txt", "hello", "bye"),
            1,
            &req,
            ChatEditFormat::Diff,
        )
        .unwrap();
        assert_eq!(
            diff,
            Reply::text("hi.txt\n```\n<<<<<<< SEARCH\nhello\n=======\nbye\n>>>>>>> REPLACE\n```\n")
        );
        let new_file = render_turn(
            &Turn::write("hi.txt", "hello"),
            1,
            &req,
            ChatEditFormat::Diff,
        )
        .unwrap();
        assert_eq!(
            new_file,
            Reply::text("hi.txt\n```\n<<<<<<< SEARCH\n=======\nhello\n>>>>>>> REPLACE\n```\n")
        );
        let err =
            render_turn(&Turn::edit("a", "b", "c"), 3, &req, ChatEditFormat::Whole).unwrap_err();
        assert_eq!(
            err,
            TurnError::EditFileNotInChat {
                turn: 3,
                path: "a".into()
            }
        );
        assert!(
            err.to_string().contains("Agent::aider().arg(\"a\")"),
            "{err}"
        );
    }

    /// An Aider-like request: its system prompt names `format`, a few-shot example lists
    /// another file, and the chat holds `notes.txt` in `fence`.
    fn aider_request(format: &str, fence: (&str, &str), notes: &str) -> ParsedRequest {
        let (open, close) = fence;
        openai_chat::parse(&json!({"messages": [
            {"role": "system", "content": format!("Act as an expert. Use the {format} format.")},
            {"role": "user", "content": "Change the greeting"},
            {"role": "assistant", "content": "notes.txt.bak\n```\nold example\n```\n"},
            {"role": "user", "content": format!("I have *added these files to the chat*.\n\nnotes.txt\n{open}\n{notes}{close}\n")},
            {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": "Change hello to hi in notes.txt."},
        ]}))
    }

    #[test]
    fn the_request_names_its_edit_format() {
        let fence = FENCES[0];
        let diff = aider_request("*SEARCH/REPLACE block*", fence, "hello\n");
        assert_eq!(chat_edit_format(&diff), Some(ChatEditFormat::Diff));
        let whole = aider_request("*file listing*", fence, "hello\n");
        assert_eq!(chat_edit_format(&whole), Some(ChatEditFormat::Whole));
        assert_eq!(chat_edit_format(&aider_request("?", fence, "")), None);
        // The prompt wins over the configured fallback.
        let edit = Turn::edit("notes.txt", "hello", "hi");
        let r = render_turn(&edit, 1, &diff, ChatEditFormat::Whole).unwrap();
        assert_eq!(
            r,
            Reply::text(
                "notes.txt\n```\n<<<<<<< SEARCH\nhello\n=======\nhi\n>>>>>>> REPLACE\n```\n"
            )
        );
        let r = render_turn(&edit, 1, &whole, ChatEditFormat::Diff).unwrap();
        assert_eq!(r, Reply::text("notes.txt\n```\nhi\n```\n"));
        // Only the diff format reads a bash block as a suggested command.
        let shell = Turn::shell("echo hi > shell.txt");
        let r = render_turn(&shell, 2, &diff, ChatEditFormat::Whole).unwrap();
        assert_eq!(r, Reply::text("```bash\necho hi > shell.txt\n```\n"));
        let err = render_turn(&shell, 2, &whole, ChatEditFormat::Diff).unwrap_err();
        assert_eq!(err, TurnError::ShellNeedsDiffFormat { turn: 2 });
    }

    #[test]
    fn whole_format_edits_the_content_the_agent_sent_in_its_fence() {
        let fence = ("````", "````");
        let content = "# Notes\n```\nhello\n```\nhello again\n";
        let req = aider_request("*file listing*", fence, content);
        assert_eq!(file_listing(&req, "notes.txt"), Some((content, fence)));
        // Not a prefix or a suffix of another name.
        assert_eq!(file_listing(&req, "notes"), None);
        assert_eq!(file_listing(&req, "s.txt"), None);
        let r = render_turn(
            &Turn::edit("notes.txt", "hello", "hi"),
            1,
            &req,
            ChatEditFormat::Whole,
        )
        .unwrap();
        assert_eq!(
            r,
            Reply::text("notes.txt\n````\n# Notes\n```\nhi\n```\nhello again\n````\n")
        );
        let err = render_turn(
            &Turn::edit("notes.txt", "bye", "hi"),
            2,
            &req,
            ChatEditFormat::Whole,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "turn 2 replaces \"bye\" in notes.txt, but the content of notes.txt the agent sent does not contain it"
        );
        // An empty file in the chat, emptied by a write.
        let empty = aider_request("*file listing*", FENCES[0], "");
        assert_eq!(file_listing(&empty, "notes.txt"), Some(("", FENCES[0])));
        let r = render_turn(
            &Turn::write("notes.txt", ""),
            1,
            &empty,
            ChatEditFormat::Whole,
        );
        assert_eq!(r.unwrap(), Reply::text("notes.txt\n```\n```\n"));
    }

    #[test]
    fn shell_quote_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(
            write_command("x", "a"),
            "mkdir -p '.' && printf '%s' 'a' > 'x'"
        );
    }
}
