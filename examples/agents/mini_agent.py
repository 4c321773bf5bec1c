#!/usr/bin/env python3
"""A minimal home-made coding agent: it sends its task to a model over the
OpenAI Chat Completions API (the model gateway on $OPENAI_BASE_URL), runs
the shell commands the model asks for with its `shell` tool, sends their
output back, and stops when the model answers with text."""
import json
import os
import subprocess
import urllib.request

BASE = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8787/v1")
TOOLS = [{
    "type": "function",
    "function": {
        "name": "shell",
        "description": "Run a shell command in the workspace and return its output.",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
        },
    },
}]


def ask(messages):
    body = json.dumps({"model": "mini-agent", "messages": messages, "tools": TOOLS}).encode()
    request = urllib.request.Request(
        BASE + "/chat/completions",
        data=body,
        headers={
            "content-type": "application/json",
            "authorization": "Bearer " + os.environ.get("OPENAI_API_KEY", "none"),
        },
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["choices"][0]["message"]


def main():
    messages = [
        {"role": "system", "content": "You are a careful coding agent. Use the shell tool."},
        {"role": "user", "content": os.environ["AGENT_PROMPT"]},
    ]
    for _ in range(20):
        message = ask(messages)
        messages.append(message)
        calls = message.get("tool_calls") or []
        if not calls:
            print(message.get("content") or "")
            return
        for call in calls:
            command = json.loads(call["function"]["arguments"])["command"]
            done = subprocess.run(command, shell=True, capture_output=True, text=True)
            print(f"$ {command} (exit {done.returncode})")
            messages.append({
                "role": "tool",
                "tool_call_id": call["id"],
                "content": done.stdout + done.stderr,
            })
    raise SystemExit("mini_agent: the model did not finish in 20 turns")


if __name__ == "__main__":
    main()
