#!/usr/bin/env python3
"""A deterministic fake agent in Python: reads its task, then creates,
modifies and deletes files in the workspace, as a real one would."""
import os
import pathlib

workspace = pathlib.Path(os.environ.get("AGENT_WORKSPACE", "/workspace"))
prompt = os.environ.get("AGENT_PROMPT", "")
print(f"task: {prompt}")

(workspace / "src").mkdir(exist_ok=True)
(workspace / "src" / "app.py").write_text('def main():\n    print("hello")\n')
readme = workspace / "README.md"
readme.write_text(readme.read_text().replace("TODO", "Done by tidy.py"))
(workspace / "old.txt").unlink()
print("created src/app.py, edited README.md, removed old.txt")
