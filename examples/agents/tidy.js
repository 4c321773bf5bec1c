#!/usr/bin/env node
// A deterministic fake agent in Node.js: reads its task, then creates,
// modifies and deletes files in the workspace, as a real one would.
const fs = require("fs");
const path = require("path");

const workspace = process.env.AGENT_WORKSPACE || "/workspace";
console.log(`task: ${process.env.AGENT_PROMPT || ""}`);

fs.mkdirSync(path.join(workspace, "notes"), { recursive: true });
fs.writeFileSync(path.join(workspace, "notes", "todo.md"), "- [x] tidy up\n");
const readme = path.join(workspace, "README.md");
fs.writeFileSync(readme, fs.readFileSync(readme, "utf8").replace("TODO", "Done by tidy.js"));
fs.unlinkSync(path.join(workspace, "old.txt"));
console.log("created notes/todo.md, edited README.md, removed old.txt");
