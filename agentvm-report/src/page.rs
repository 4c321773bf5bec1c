//! The whole page: head (styles, Content-Security-Policy), the index with
//! each suite's timeline, one hidden view per test (shown when its anchor
//! is the URL's fragment, by CSS `:target`), and the inline script.

use maud::{html, Markup, PreEscaped, DOCTYPE};
use sha2::{Digest, Sha256};

use crate::model::Suite;

/// The report's stylesheet.
pub const CSS: &str = include_str!("assets/report.css");
/// The report's only script: filter and search (see `assets/report.js`).
pub const SCRIPT: &str = include_str!("assets/report.js");

/// The element id of test `test` of suite `suite` (numbers only: no text
/// from a test name ends up in an id or a fragment).
pub fn test_id(suite: usize, test: usize) -> String {
    format!("t-{suite}-{test}")
}

/// The Content-Security-Policy: nothing loads from anywhere, inline styles
/// are allowed (the timeline positions bars with them), and the only script
/// that may run is [`SCRIPT`], named by its SHA-256.
pub fn content_security_policy() -> String {
    let hash = base64(&Sha256::digest(SCRIPT.as_bytes()));
    format!(
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; \
         script-src 'sha256-{hash}'; base-uri 'none'; form-action 'none'"
    )
}

/// Standard base64 (RFC 4648, padded).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The report of `suites`.
pub fn render(suites: &[Suite]) -> Markup {
    let count = |result: &str| -> usize {
        suites
            .iter()
            .flat_map(|s| &s.tests)
            .filter(|t| t.result == result)
            .count()
    };
    let anomalies: usize = suites
        .iter()
        .flat_map(|s| &s.tests)
        .map(|t| t.anomalies.len())
        .sum();
    let total: usize = suites.iter().map(|s| s.tests.len()).sum();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="Content-Security-Policy" content=(content_security_policy());
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "agentvm report" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header.top {
                    h1 { a href="#index" { "agentvm report" } }
                    span { (total) " tests: " }
                    span.count.passed { (count("passed")) " passed" }
                    span.count.failed { (count("failed")) " failed" }
                    span.count.ignored { (count("ignored")) " ignored" }
                    span { (anomalies) " anomal" (if anomalies == 1 { "y" } else { "ies" }) }
                }
                main {
                    (crate::index::render(suites))
                    @for (s, suite) in suites.iter().enumerate() {
                        @for (t, test) in suite.tests.iter().enumerate() {
                            (crate::test_view::render(suite, test, &test_id(s, t)))
                        }
                    }
                }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn the_script_cannot_close_its_element() {
        // It is embedded raw: it must not contain what ends a script element.
        assert!(!SCRIPT.to_ascii_lowercase().contains("</script"));
        assert!(!CSS.to_ascii_lowercase().contains("</style"));
    }
}
