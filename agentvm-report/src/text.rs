//! Bounded text: what the report embeds of outputs and messages.

/// Text cut to a byte budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncated<'a> {
    /// The kept text (whole characters).
    pub text: &'a str,
    /// Bytes left out.
    pub cut: usize,
}

/// The first `max` bytes of `text` (at a character boundary).
pub fn truncate(text: &str, max: usize) -> Truncated<'_> {
    if text.len() <= max {
        return Truncated { text, cut: 0 };
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Truncated {
        text: &text[..end],
        cut: text.len() - end,
    }
}

/// Whether `text` looks like binary data decoded lossily: many replacement
/// characters or control characters other than whitespace and escapes.
pub fn looks_binary(text: &str) -> bool {
    let sample: Vec<char> = text.chars().take(4096).collect();
    if sample.is_empty() {
        return false;
    }
    let odd = sample
        .iter()
        .filter(|&&c| {
            c == '\u{fffd}' || (c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\u{1b}'))
        })
        .count();
    odd * 10 > sample.len()
}

/// `1.5 KiB`, `3 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `0.4ms`, `95ms`, `1.23s`, `2m05s`.
pub fn seconds(s: f64) -> String {
    let s = s.max(0.0);
    if s < 0.001 {
        format!("{:.1}ms", s * 1000.0)
    } else if s < 1.0 {
        format!("{}ms", (s * 1000.0) as u64)
    } else if s < 120.0 {
        format!("{s:.2}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

/// A relative URL of a file under the report's directory: every path
/// segment percent-encoded (so a test named `javascript:x` or `a#b` stays a
/// path), prefixed with `./`.
pub fn file_href(segments: &[&str]) -> String {
    let mut out = String::from(".");
    for segment in segments {
        out.push('/');
        for b in segment.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(
            truncate("abc", 3),
            Truncated {
                text: "abc",
                cut: 0
            }
        );
        assert_eq!(truncate("aé", 2), Truncated { text: "a", cut: 2 });
        assert_eq!(
            truncate("héllo", 3),
            Truncated {
                text: "hé", cut: 3
            }
        );
    }

    #[test]
    fn binary_is_recognised() {
        assert!(!looks_binary("plain text\n\u{1b}[31mred\u{1b}[0m\n"));
        assert!(looks_binary("\u{fffd}\u{fffd}\u{0}ELF\u{1}\u{2}"));
        assert!(!looks_binary(""));
    }

    #[test]
    fn units() {
        assert_eq!(bytes(3), "3 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(seconds(0.0004), "0.4ms");
        assert_eq!(seconds(0.095), "95ms");
        assert_eq!(seconds(1.234), "1.23s");
        assert_eq!(seconds(125.0), "2m05s");
    }

    #[test]
    fn hrefs_are_encoded_paths() {
        assert_eq!(
            file_href(&["javascript:alert(1)", "std out.txt"]),
            "./javascript%3Aalert%281%29/std%20out.txt"
        );
        assert_eq!(file_href(&["a::b", "x\"<y>"]), "./a%3A%3Ab/x%22%3Cy%3E");
    }
}
