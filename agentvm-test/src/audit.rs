//! The audit log: every [`Event`] as one JSON object per line (JSON Lines),
//! with an RFC 3339 UTC timestamp in `ts`, appended to a file
//! (`<artifacts_dir>/audit.jsonl` by default; `audit_log` /
//! `AGENT_VM_AUDIT_LOG`).
//!
//! ```json
//! {"ts":"2026-11-26T17:20:04.123Z","event":"vm_acquired","pool":"pool-1","vm":"agentvm-1234-1","waited_seconds":0.00001,"uses":1}
//! {"ts":"2026-11-26T17:20:05.456Z","event":"execution","test":"agents::hello","vm":"agentvm-1234-1","agent":"hello.sh","argv":["/opt/agentvm/agent/hello.sh"],"exit_code":0,…}
//! ```
//!
//! Each line is written with a single `write` on a file opened in append
//! mode (so lines of concurrent processes do not interleave) and the file is
//! unbuffered: a crash loses at most the line being written. Every secret
//! any agent of the process used is redacted from every line, whatever the
//! event (its JSON-escaped form too).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use agentvm_runtime::events::{to_json_line, Event, EventSink};

use crate::redact::Secrets;

/// Every secret seen in this process (raw and JSON-escaped values).
static KNOWN_SECRETS: Mutex<Option<Secrets>> = Mutex::new(None);

/// Remembers `secrets` so that every later audit line redacts them.
pub(crate) fn remember_secrets(secrets: &Secrets) {
    if secrets.is_empty() {
        return;
    }
    let mut known = KNOWN_SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    let known = known.get_or_insert_with(Secrets::new);
    for (name, value) in secrets.entries() {
        known.add(name, value);
        let escaped = serde_json::to_string(value).unwrap_or_default();
        let escaped = escaped.trim_matches('"');
        known.add(name, escaped);
    }
}

/// Redacts every remembered secret from `text`.
pub(crate) fn redact_known(text: &str) -> String {
    let known = KNOWN_SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    match known.as_ref() {
        Some(secrets) => secrets.redact(text).into_owned(),
        None => text.to_string(),
    }
}

/// The JSON-lines audit log. An [`EventSink`].
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creates, appends to) the log at `path`, creating its directory.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event (redacted) as one line.
    pub fn write(&self, at: SystemTime, event: &Event) -> std::io::Result<()> {
        let mut line = redact_known(&to_json_line(at, event));
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(line.as_bytes())?;
        file.flush()
    }
}

impl EventSink for AuditLog {
    fn handle(&self, at: SystemTime, event: &Event) {
        if let Err(e) = self.write(at, event) {
            eprintln!(
                "agentvm: cannot write the audit log {}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_and_secrets_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let mut secrets = Secrets::new();
        secrets.add("AUDIT_TOKEN", "au\"dit-s3cret");
        remember_secrets(&secrets);
        log.write(
            SystemTime::now(),
            &Event::VmCrashed {
                vm: "v".into(),
                error: "console said au\"dit-s3cret".into(),
            },
        )
        .unwrap();
        log.write(
            SystemTime::now(),
            &Event::VmReleased {
                pool: "p".into(),
                vm: "v".into(),
            },
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("dit-s3cret"), "{text}");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "vm_crashed");
        assert_eq!(lines[0]["error"], "console said [secret:AUDIT_TOKEN]");
        assert!(lines[1]["ts"].as_str().unwrap().ends_with('Z'));
    }
}
