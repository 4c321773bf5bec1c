//! The index: every test of every suite with status, duration, VM and
//! anomalies, each suite with its timeline; filter buttons and a search box
//! (driven by the page's script; without it every row stays shown).

use maud::{html, Markup};

use crate::model::{Suite, Test};
use crate::page::test_id;
use crate::text::seconds;

/// The test's duration as the index shows it (`-` when it did not run).
pub fn duration(test: &Test) -> String {
    if test.result == "ignored" {
        "-".to_string()
    } else {
        seconds(test.duration_seconds)
    }
}

/// The index section.
pub fn render(suites: &[Suite]) -> Markup {
    html! {
        section #index .view {
            div #filters {
                button type="button" data-filter="all" aria-pressed="true" { "All" }
                button type="button" data-filter="passed" aria-pressed="false" { "Passed" }
                button type="button" data-filter="failed" aria-pressed="false" { "Failed" }
                button type="button" data-filter="ignored" aria-pressed="false" { "Ignored" }
                button type="button" data-filter="anomalies" aria-pressed="false" { "With anomalies" }
                input #search type="search" placeholder="Search tests by name" aria-label="Search tests by name";
                span.muted { span #shown { (suites.iter().map(|s| s.tests.len()).sum::<usize>()) } " shown" }
            }
            @for (s, suite) in suites.iter().enumerate() {
                div.suite data-suite=(suite.suite) {
                    h2 {
                        "Suite " code { (suite.suite) }
                        " " span.muted { "started " (suite.started) ", " (seconds(suite.duration_seconds)) ", "
                            (suite.passed) " passed, " (suite.failed) " failed, " (suite.ignored) " ignored" }
                    }
                    (crate::timeline::render(suite, s))
                    table.tests {
                        thead { tr {
                            th { "Status" } th { "Test" } th.num { "Duration" } th { "VM" }
                            th.num { "Acquire" } th.num { "Revert" } th.num { "Agent runs" } th { "Anomalies" }
                        } }
                        tbody {
                            @for (t, test) in suite.tests.iter().enumerate() {
                                tr data-status=(test.result) data-name=(test.name.to_lowercase())
                                    data-anomalies=(test.anomalies.len()) {
                                    td { span class={ "status " (test.result) } { (test.result) } }
                                    td { a.test-link href={ "#" (test_id(s, t)) } { (test.name) } }
                                    td.num { (duration(test)) }
                                    td { @if let Some(vm) = &test.vm { code { (vm) } } @else { span.muted { "-" } } }
                                    td.num { (test.acquire_seconds.map_or("-".into(), seconds)) }
                                    td.num { (test.revert_seconds.map_or_else(|| test.release.clone().unwrap_or("-".into()), seconds)) }
                                    td.num { (test.runs.len().max(test.agent_runs)) }
                                    td {
                                        @for a in &test.anomalies {
                                            span class={ "anom" @if a.fails { " fails" } } title=(a.message) { (a.kind) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
