//! `cargo xtask report-check [DIR]`: loads the suite run's `report.html` in
//! a real browser (headless Chromium, Debian's `chromium` package) and
//! checks through the DOM, after the page's script ran, that every test is
//! listed, every model transcript renders as a conversation, each suite's
//! timeline has one lane per VM, and that an agent whose output is
//! `<script>alert(1)</script>` and whose file is named `<img src=x
//! onerror=alert(1)>` (the example suite's `hostile_output_is_kept_as_text`)
//! executes nothing: the page is loaded a second time without its
//! Content-Security-Policy and with `alert` replaced by a sentinel that
//! marks the document, which must stay unmarked. Screenshots of the index
//! and of one test's view go to `DIR/report-index.png` and
//! `DIR/report-test.png`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentvm_report::model::Suite;
use anyhow::{bail, Context, Result};

use crate::util::{find_in_path, workspace_root, Progress};

/// What the hostile example agent prints and the file it creates.
pub const HOSTILE_OUTPUT: &str = "<script>alert(1)</script>";
/// The hostile example agent's file name.
pub const HOSTILE_FILE: &str = "<img src=x onerror=alert(1)>";

/// How long one browser run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, clap::Args)]
pub struct ReportCheckArgs {
    /// The artifacts directory holding report.html (default target/agentvm).
    pub dir: Option<PathBuf>,
    /// Also copy the screenshots to docs/ (the README shows them).
    #[arg(long)]
    pub update_docs: bool,
}

/// The browser: `$CHROMIUM`, else `chromium` or `chromium-browser` on PATH.
fn browser() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    for name in ["chromium", "chromium-browser"] {
        if let Some(path) = find_in_path(name) {
            return Ok(path);
        }
    }
    bail!(
        "no headless browser: install Debian's `chromium` package (`bash scripts/install-deps.sh` \
         does), or set CHROMIUM to its path"
    )
}

/// Runs headless Chromium on `url` with `args`; its stdout.
fn chromium(browser: &Path, profile: &Path, args: &[String], url: &str) -> Result<String> {
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox", // CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", browser.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} did not finish within {BROWSER_TIMEOUT:?}",
                browser.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("{} failed ({status}): {err}", browser.display());
    }
    Ok(out)
}

/// A file URL for `path`.
fn file_url(path: &Path) -> String {
    let mut url = String::from("file://");
    for b in path.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// Text as Chromium serialises a text node.
fn dom_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\u{a0}', "&nbsp;")
}

/// The markup of the element with id `id` up to the next section.
fn section<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[start..];
    let end = rest[1..].find("<section").map_or(rest.len(), |i| i + 1);
    Some(&rest[..end])
}

/// The test whose agent printed [`HOSTILE_OUTPUT`] and created
/// [`HOSTILE_FILE`]: (suite index, test index).
pub fn hostile_test(suites: &[Suite]) -> Option<(usize, usize)> {
    suites.iter().enumerate().find_map(|(s, suite)| {
        suite
            .tests
            .iter()
            .position(|t| {
                t.runs.iter().any(|r| {
                    r.run.stdout.contains(HOSTILE_OUTPUT)
                        && r.run.changes.iter().any(|c| c.path == HOSTILE_FILE)
                })
            })
            .map(|t| (s, t))
    })
}

/// What is wrong with the DOM `dom` of the report of `suites` (empty: all good).
pub fn check_dom(dom: &str, suites: &[Suite]) -> Vec<String> {
    use agentvm_report::page::test_id;
    let mut problems = Vec::new();
    if !dom.contains("data-ready=\"1\"") {
        problems.push("the page's own script did not run (no data-ready on body)".into());
    }
    // Every test, listed and with its view.
    let total: usize = suites.iter().map(|s| s.tests.len()).sum();
    let rows = dom.matches("<tr data-status=").count();
    if rows != total {
        problems.push(format!("{rows} rows in the index for {total} tests"));
    }
    for (s, suite) in suites.iter().enumerate() {
        for (t, test) in suite.tests.iter().enumerate() {
            let id = test_id(s, t);
            let link = format!("href=\"#{id}\">{}</a>", dom_text(&test.name));
            if !dom.contains(&link) {
                problems.push(format!("test {:?} not listed in the index", test.name));
            }
            if section(dom, &id).is_none() {
                problems.push(format!("test {:?} has no view", test.name));
            }
        }
    }
    // Transcripts render as conversations.
    let mut transcripts = 0;
    for (s, suite) in suites.iter().enumerate() {
        for (t, test) in suite.tests.iter().enumerate() {
            let exchanges: usize = test.runs.iter().map(|r| r.run.transcript.len()).sum();
            if exchanges == 0 {
                continue;
            }
            transcripts += 1;
            let view = section(dom, &test_id(s, t)).unwrap_or_default();
            let shown = view.matches("class=\"msg assistant\"").count();
            if shown != exchanges {
                problems.push(format!(
                    "test {:?}: {shown} model messages shown for {exchanges} exchanges",
                    test.name
                ));
            }
        }
    }
    if transcripts == 0 {
        problems.push("no test of the report has a model transcript".into());
    }
    // One timeline lane per VM, per suite.
    let expected: Vec<usize> = suites
        .iter()
        .map(|suite| {
            suite
                .tests
                .iter()
                .filter(|t| t.start_seconds.is_some())
                .filter_map(|t| t.vm.as_deref())
                .collect::<BTreeSet<_>>()
                .len()
        })
        .filter(|n| *n > 0)
        .collect();
    let declared: Vec<usize> = dom
        .match_indices("class=\"timeline\" data-lanes=\"")
        .filter_map(|(i, m)| {
            let rest = &dom[i + m.len()..];
            rest[..rest.find('"')?].parse().ok()
        })
        .collect();
    let lanes = dom.matches("class=\"lane\"").count();
    if declared != expected || lanes != expected.iter().sum::<usize>() {
        problems.push(format!(
            "timeline lanes: {declared:?} declared and {lanes} drawn, expected one per VM: {expected:?}"
        ));
    }
    // Injected markup stays text.
    match hostile_test(suites) {
        None => problems.push(format!(
            "no test printed {HOSTILE_OUTPUT} and created {HOSTILE_FILE}: run the example suite \
             (cargo test -p agent-suite --test agents hostile)"
        )),
        Some((s, t)) => {
            let view = section(dom, &test_id(s, t)).unwrap_or_default();
            for text in [HOSTILE_OUTPUT, HOSTILE_FILE] {
                if !view.contains(&dom_text(text)) {
                    problems.push(format!("{text} is not shown as text in its test's view"));
                }
            }
        }
    }
    let scripts = dom.matches("<script").count();
    if scripts != 1 {
        problems.push(format!(
            "{scripts} script elements (only the report's own may exist)"
        ));
    }
    for element in [
        "<img",
        "<svg",
        "<iframe",
        "<object",
        "<embed",
        " onerror=\"",
        " onload=\"",
    ] {
        if dom.contains(element) {
            problems.push(format!(
                "the DOM has {element:?}: markup from the data became HTML"
            ));
        }
    }
    problems
}

/// The report with its Content-Security-Policy removed and `alert`
/// replaced by a sentinel that marks the document when called: loaded, it
/// shows whether anything from the data would run without the CSP.
pub fn with_sentinel(html: &str) -> Result<String> {
    let csp_start = html
        .find("<meta http-equiv=\"Content-Security-Policy\"")
        .context("report.html has no Content-Security-Policy")?;
    let csp_end = csp_start + html[csp_start..].find('>').context("unterminated meta")? + 1;
    let sentinel = "<script>window.alert=function(m){document.documentElement\
                    .setAttribute('data-alerted',String(m));};</script>";
    Ok(format!(
        "{}{sentinel}{}",
        &html[..csp_start],
        &html[csp_end..]
    ))
}

pub fn run(args: &ReportCheckArgs) -> Result<()> {
    let progress = Progress::new();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/agentvm"));
    let report = dir.join(agentvm_report::REPORT_FILE);
    if !report.is_file() {
        bail!(
            "{} not found: run a suite first (`cargo xtask demo`), or rebuild it with \
             `cargo run -p agentvm-cli -- report {}`",
            report.display(),
            dir.display()
        );
    }
    let suites = agentvm_report::load(&dir)?;
    let browser = browser()?;
    let profile = tempfile_dir()?;
    progress.step(format!(
        "loading {} in {}",
        report.display(),
        browser.display()
    ));
    let dom = chromium(
        &browser,
        &profile,
        &["--dump-dom".into()],
        &file_url(&report),
    )?;
    let mut problems = check_dom(&dom, &suites);

    progress.step("the same page without its CSP, alert() replaced by a sentinel");
    let html = std::fs::read_to_string(&report)?;
    let bare = profile.join("report-without-csp.html");
    std::fs::write(&bare, with_sentinel(&html)?)?;
    let dom = chromium(&browser, &profile, &["--dump-dom".into()], &file_url(&bare))?;
    // The attribute, not the sentinel's own source text.
    if dom.contains("data-alerted=\"") {
        problems.push("alert() was called: script from the data ran".into());
    }
    if !dom.contains("data-ready=\"1\"") {
        problems.push(
            "without the CSP the page's script did not run: the sentinel check proves nothing"
                .into(),
        );
    }

    progress.step("screenshots");
    let shot = |file: &str, fragment: &str, height: u32| -> Result<PathBuf> {
        let path = dir.join(file);
        chromium(
            &browser,
            &profile,
            &[
                format!("--screenshot={}", path.display()),
                format!("--window-size=1280,{height}"),
            ],
            &format!("{}{fragment}", file_url(&report)),
        )?;
        progress.note(path.display().to_string());
        Ok(path)
    };
    let index = shot("report-index.png", "", 900)?;
    // The view of a test with a transcript, else the hostile one.
    let shown = suites
        .iter()
        .enumerate()
        .find_map(|(s, suite)| {
            suite
                .tests
                .iter()
                .position(|t| t.runs.iter().any(|r| !r.run.transcript.is_empty()))
                .map(|t| (s, t))
        })
        .or_else(|| hostile_test(&suites));
    let test = match shown {
        Some((s, t)) => Some(shot(
            "report-test.png",
            &format!("#{}", agentvm_report::page::test_id(s, t)),
            1800,
        )?),
        None => None,
    };
    let _ = std::fs::remove_dir_all(&profile);
    if args.update_docs {
        let docs = workspace_root().join("docs");
        std::fs::create_dir_all(&docs)?;
        std::fs::copy(&index, docs.join("report-index.png"))?;
        if let Some(test) = &test {
            std::fs::copy(test, docs.join("report-test.png"))?;
        }
        progress.note(format!("copied to {}", docs.display()));
    }
    if !problems.is_empty() {
        bail!(
            "the report failed its browser check:\n  {}",
            problems.join("\n  ")
        );
    }
    let tests: usize = suites.iter().map(|s| s.tests.len()).sum();
    println!(
        "report-check: {} ok in a real browser ({} suites, {tests} tests)",
        report.display(),
        suites.len()
    );
    Ok(())
}

/// A fresh directory for the browser's profile.
fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("agentvm-report-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_report::model::{Change, Exchange, Run, RunRecord, Test};

    fn suites() -> Vec<Suite> {
        let hostile = Test {
            name: "hostile".into(),
            result: "passed".into(),
            vm: Some("vm-1".into()),
            start_seconds: Some(0.0),
            runs: vec![RunRecord {
                run: Run {
                    stdout: format!("{HOSTILE_OUTPUT}\n"),
                    changes: vec![Change {
                        path: HOSTILE_FILE.into(),
                        ..Change::default()
                    }],
                    ..Run::default()
                },
                ..RunRecord::default()
            }],
            ..Test::default()
        };
        let talker = Test {
            name: "talker".into(),
            result: "failed".into(),
            vm: Some("vm-2".into()),
            start_seconds: Some(1.0),
            runs: vec![RunRecord {
                run: Run {
                    transcript: vec![Exchange::default(), Exchange::default()],
                    ..Run::default()
                },
                ..RunRecord::default()
            }],
            ..Test::default()
        };
        vec![Suite {
            suite: "agents".into(),
            duration_seconds: 2.0,
            tests: vec![hostile, talker],
            ..Suite::default()
        }]
    }

    /// The rendered page, as the browser would have it after its script ran.
    fn dom(suites: &[Suite]) -> String {
        agentvm_report::page::render(suites).into_string().replacen(
            "<body>",
            "<body data-ready=\"1\">",
            1,
        )
    }

    #[test]
    fn a_good_report_passes() {
        let suites = suites();
        assert_eq!(check_dom(&dom(&suites), &suites), Vec::<String>::new());
    }

    #[test]
    fn injected_elements_missing_tests_and_lanes_are_caught() {
        let suites = suites();
        let bad =
            dom(&suites).replacen("</main>", "<img src=\"x\" onerror=\"alert(1)\"></main>", 1);
        let problems = check_dom(&bad, &suites);
        assert!(
            problems.iter().any(|p| p.contains("\"<img\"")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("onerror")),
            "{problems:?}"
        );
        let mut more = suites.clone();
        more[0].tests.push(Test {
            name: "missing".into(),
            vm: Some("vm-3".into()),
            start_seconds: Some(0.0),
            ..Test::default()
        });
        let problems = check_dom(&dom(&suites), &more);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("\"missing\" not listed")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("timeline lanes")),
            "{problems:?}"
        );
        let unscripted = agentvm_report::page::render(&suites).into_string();
        assert!(check_dom(&unscripted, &suites)
            .iter()
            .any(|p| p.contains("script did not run")));
    }

    #[test]
    fn the_sentinel_copy_has_no_csp() {
        let html = agentvm_report::page::render(&suites()).into_string();
        let bare = with_sentinel(&html).unwrap();
        assert!(!bare.contains("Content-Security-Policy"));
        assert!(bare.contains("data-alerted"));
        assert_eq!(bare.matches("<script").count(), 2);
    }
}
