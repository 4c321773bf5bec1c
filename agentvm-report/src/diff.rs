//! Unified diffs as HTML: one line per element, classed by kind.

use maud::{html, Markup};

use crate::text::{truncate, Truncated};

/// Largest diff text shown, bytes.
pub const MAX_DIFF: usize = 64 * 1024;

/// The CSS class of a unified diff line.
pub fn line_class(line: &str) -> &'static str {
    if line.starts_with("@@") {
        "hunk"
    } else if line.starts_with('+') {
        "add"
    } else if line.starts_with('-') {
        "del"
    } else if line.starts_with('\\') {
        "note"
    } else {
        "ctx"
    }
}

/// A unified diff (hunks only), at most [`MAX_DIFF`] bytes of it.
pub fn render(diff: &str) -> Markup {
    let Truncated { text, cut } = truncate(diff, MAX_DIFF);
    html! {
        pre.diff {
            @for line in text.lines() {
                span class=(line_class(line)) { (crate::ansi::visible(line)) "\n" }
            }
            @if cut > 0 {
                span.note { "… " (cut) " more bytes of the diff not shown\n" }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_classed_and_escaped() {
        let html =
            render("@@ -1 +1 @@\n-a\n+<b>\n c\n\\ No newline at end of file\n").into_string();
        assert_eq!(
            html,
            "<pre class=\"diff\"><span class=\"hunk\">@@ -1 +1 @@\n</span>\
             <span class=\"del\">-a\n</span><span class=\"add\">+&lt;b&gt;\n</span>\
             <span class=\"ctx\"> c\n</span><span class=\"note\">\\ No newline at end of file\n</span></pre>"
        );
    }

    #[test]
    fn long_diffs_are_cut() {
        let long = "+x\n".repeat(MAX_DIFF);
        let html = render(&long).into_string();
        assert!(html.len() < MAX_DIFF * 12, "{}", html.len());
        assert!(html.contains("more bytes of the diff not shown"));
    }
}
