//! The HTML report of an agentvm suite run: `<artifacts_dir>/report.html`,
//! one self-contained static file (no server, no CDN, works offline).
//!
//! It is built from what the harness leaves in the artifacts directory:
//! `suites/<suite>.json` (one per test binary; `report.json` when there is
//! no `suites/`), each test's agent runs (task, transcript, output, changes,
//! network log) and phases, and the per-test artifact directories, which it
//! links to. The harness writes it at the end of every run; `agentvm report
//! [DIR]` rebuilds it.
//!
//! * [`index`]: every test with status, duration, VM, anomalies; filter by
//!   status and search by name (a small inline script);
//! * [`test_view`]: one view per test: task, model transcript, commands,
//!   output with ANSI colours ([`ansi`]), workspace changes ([`diff`]),
//!   network log, anomalies, failed snapshot diffs;
//! * [`timeline`]: one lane per VM, a bar per test split into acquire /
//!   inject / run / capture / revert.
//!
//! All HTML is generated with [maud](https://maud.lambda.xyz), whose
//! `html!` templates escape every interpolated value: text from agents,
//! file names and model output can only ever become text. A
//! Content-Security-Policy allows only the report's own script (by hash)
//! as defence in depth. Outputs are cut at fixed sizes ([`text`]), with a
//! link to the artifact file that has them whole.

pub mod ansi;
pub mod diff;
pub mod index;
pub mod model;
pub mod page;
pub mod test_view;
pub mod text;
pub mod timeline;

use std::path::{Path, PathBuf};

use model::Suite;

/// The report's file name in the artifacts directory.
pub const REPORT_FILE: &str = "report.html";

/// Why the report could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Neither `suites/*.json` nor `report.json` is there.
    #[error(
        "no suite report in {0}: run a suite first (`cargo test` on a crate with agentvm tests), \
         or point at the artifacts directory (default target/agentvm)"
    )]
    NoReport(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A suite report is not valid JSON of the expected shape.
    #[error("{path} is not a suite report: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads every suite report under `dir` (oldest run first), with the list
/// of each kept test's artifact files.
pub fn load(dir: &Path) -> Result<Vec<Suite>, ReportError> {
    let suites_dir = dir.join("suites");
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&suites_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                let name = format!("suites/{}", entry.file_name().to_string_lossy());
                files.push((path, name));
            }
        }
    }
    if files.is_empty() && dir.join("report.json").is_file() {
        files.push((dir.join("report.json"), "report.json".to_string()));
    }
    if files.is_empty() {
        return Err(ReportError::NoReport(dir.to_path_buf()));
    }
    let mut suites = Vec::new();
    for (path, name) in files {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let mut suite: Suite = serde_json::from_str(&text).map_err(|source| ReportError::Json {
            path: path.clone(),
            source,
        })?;
        suite.file = name;
        for test in &mut suite.tests {
            if let Some(rel) = &test.artifacts {
                let mut listed: Vec<String> = std::fs::read_dir(dir.join(rel))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                listed.sort();
                test.artifact_files = listed;
            }
        }
        suites.push(suite);
    }
    suites.sort_by(|a, b| a.started.cmp(&b.started).then(a.suite.cmp(&b.suite)));
    Ok(suites)
}

/// The report of the suites in `dir`, as HTML text.
pub fn render(dir: &Path) -> Result<String, ReportError> {
    Ok(page::render(&load(dir)?).into_string())
}

/// Writes `dir/report.html` (through a temporary file and a rename) and
/// returns its path.
pub fn write_report(dir: &Path) -> Result<PathBuf, ReportError> {
    let html = render(dir)?;
    let path = dir.join(REPORT_FILE);
    let tmp = dir.join(format!("{REPORT_FILE}.tmp.{}", std::process::id()));
    std::fs::write(&tmp, html).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}
