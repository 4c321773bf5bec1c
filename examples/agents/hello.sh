#!/bin/sh
# A deterministic fake agent: reads its task (the prompt file and
# $AGENT_PROMPT, which must agree) and creates hello.txt in the workspace.
set -eu

task=""
if [ -n "${AGENT_TASK_FILE:-}" ] && [ -r "$AGENT_TASK_FILE" ]; then
    task=$(cat "$AGENT_TASK_FILE")
fi
if [ "$task" != "${AGENT_PROMPT:-}" ]; then
    echo "hello.sh: the task file and AGENT_PROMPT differ" >&2
    exit 2
fi
echo "task: $task"
printf 'hi\n' >hello.txt
echo "created hello.txt in $(pwd)"
