//! The timeline of one suite run: one lane per VM, a bar per test at its
//! place in time, split into its phases (acquire, inject, run, capture,
//! revert; the rest of the test body is the bar's own colour). Positions
//! are percentages of the run's span, computed here from numbers.

use std::collections::BTreeMap;

use maud::{html, Markup};

use crate::model::{Suite, Test};
use crate::page::test_id;
use crate::text::seconds;

/// The phases the timeline colours, in legend order.
pub const PHASES: [&str; 5] = ["acquire", "inject", "run", "capture", "revert"];

/// Where a test's bar goes: start and end, seconds after the suite started.
pub fn span(test: &Test) -> Option<(f64, f64)> {
    let start = test.start_seconds?;
    let from_phases = test
        .phases
        .iter()
        .map(|p| p.start_seconds + p.seconds)
        .fold(0.0, f64::max);
    let whole = test.acquire_seconds.unwrap_or(0.0)
        + test.duration_seconds
        + test.revert_seconds.unwrap_or(0.0);
    Some((start, start + from_phases.max(whole)))
}

/// The VMs of a suite's run, each with its tests (those that got a VM and
/// have a start time), lanes in name order.
pub fn lanes(suite: &Suite) -> BTreeMap<&str, Vec<(usize, &Test)>> {
    let mut lanes: BTreeMap<&str, Vec<(usize, &Test)>> = BTreeMap::new();
    for (i, test) in suite.tests.iter().enumerate() {
        if let (Some(vm), Some(_)) = (&test.vm, test.start_seconds) {
            lanes.entry(vm.as_str()).or_default().push((i, test));
        }
    }
    lanes
}

fn pct(x: f64, total: f64) -> String {
    format!("{:.3}%", (x / total * 100.0).clamp(0.0, 100.0))
}

/// A tick spacing giving about 6–10 ticks over `total` seconds.
fn tick_step(total: f64) -> f64 {
    let raw = total / 8.0;
    let steps = [
        0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ];
    steps.into_iter().find(|s| *s >= raw).unwrap_or(1200.0)
}

/// The timeline of suite number `index`.
pub fn render(suite: &Suite, index: usize) -> Markup {
    let lanes = lanes(suite);
    if lanes.is_empty() {
        return html! { p.muted { "No timeline: no test of this run has timings." } };
    }
    let total = suite
        .tests
        .iter()
        .filter_map(span)
        .map(|(_, end)| end)
        .fold(suite.duration_seconds, f64::max)
        .max(0.001);
    let step = tick_step(total);
    let ticks: Vec<f64> = (0..)
        .map(|i| i as f64 * step)
        .take_while(|t| *t <= total)
        .collect();
    html! {
        div.timeline data-lanes=(lanes.len()) {
            @for (vm, tests) in &lanes {
                div.lane data-vm=(vm) {
                    div.vm title=(vm) { (vm) }
                    div.track {
                        @for (t, test) in tests {
                            @if let Some((start, end)) = span(test) {
                                @let length = (end - start).max(0.000_001);
                                @let title = bar_title(test);
                                a class={ "bar " (test.result) } href={ "#" (test_id(index, *t)) }
                                    title=(title)
                                    style={ "left:" (pct(start, total)) ";width:" (pct(length, total)) } {
                                    @for phase in &test.phases {
                                        @if PHASES.contains(&phase.phase.as_str()) {
                                            span class={ "seg " (phase.phase) }
                                                style={ "left:" (pct(phase.start_seconds, length)) ";width:" (pct(phase.seconds, length)) } {}
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            div.axis {
                @for tick in &ticks {
                    span style={ "left:" (pct(*tick, total)) } { (seconds(*tick)) }
                }
            }
            div.legend {
                @for phase in PHASES { span { span class={ "key " (phase) } {} (phase) } }
                span { span.key.body {} "rest of the test" }
            }
        }
    }
}

/// The bar's tooltip: the test and where its time went.
fn bar_title(test: &Test) -> String {
    let mut title = format!("{} ({})", test.name, test.result);
    let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
    for p in &test.phases {
        *totals.entry(p.phase.as_str()).or_default() += p.seconds;
    }
    for phase in PHASES {
        if let Some(s) = totals.get(phase) {
            title.push_str(&format!("\n{phase}: {}", seconds(*s)));
        }
    }
    title
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Phase;

    fn test(name: &str, vm: &str, start: f64, phases: &[(&str, f64, f64)]) -> Test {
        Test {
            name: name.into(),
            result: "passed".into(),
            vm: Some(vm.into()),
            duration_seconds: 1.0,
            start_seconds: Some(start),
            phases: phases
                .iter()
                .map(|&(p, s, l)| Phase {
                    phase: p.into(),
                    start_seconds: s,
                    seconds: l,
                })
                .collect(),
            ..Test::default()
        }
    }

    #[test]
    fn one_lane_per_vm_and_bars_placed_by_time() {
        let suite = Suite {
            duration_seconds: 4.0,
            tests: vec![
                test(
                    "a",
                    "vm-1",
                    0.0,
                    &[("acquire", 0.0, 1.0), ("run", 1.0, 1.0)],
                ),
                test(
                    "b",
                    "vm-2",
                    2.0,
                    &[("acquire", 0.0, 0.5), ("revert", 1.5, 0.5)],
                ),
                test("c", "vm-1", 2.0, &[]),
                Test {
                    name: "ignored".into(),
                    result: "ignored".into(),
                    ..Test::default()
                },
            ],
            ..Suite::default()
        };
        assert_eq!(lanes(&suite).len(), 2);
        let html = render(&suite, 0).into_string();
        assert!(html.contains("data-lanes=\"2\""), "{html}");
        assert_eq!(html.matches("class=\"bar ").count(), 3, "{html}");
        // b starts at 2 s of a 4 s run, is 2 s long; its revert is its last quarter.
        assert!(html.contains("href=\"#t-0-1\" title=\"b (passed)\nacquire: 500ms\nrevert: 500ms\" style=\"left:50.000%;width:50.000%\""), "{html}");
        assert!(
            html.contains("class=\"seg revert\" style=\"left:75.000%;width:25.000%\""),
            "{html}"
        );
    }

    #[test]
    fn names_are_escaped_in_titles() {
        let suite = Suite {
            duration_seconds: 1.0,
            tests: vec![test("<img src=x onerror=alert(1)>", "\"vm", 0.0, &[])],
            ..Suite::default()
        };
        let html = render(&suite, 0).into_string();
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains("title=\"&lt;img src=x onerror=alert(1)&gt; (passed)"),
            "{html}"
        );
        assert!(html.contains("data-vm=\"&quot;vm\""), "{html}");
    }
}
