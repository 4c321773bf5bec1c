//! Redaction of secret values from captured text.
//!
//! Every secret given with [`Agent::secret_env`](crate::Agent::secret_env)
//! is replaced by `[secret:NAME]` wherever it appears in what agentvm
//! captures and keeps: stdout, stderr, file paths, file texts and diffs of an
//! [`AgentRun`](crate::AgentRun), the per-test artifacts (serial console log
//! included) and failure messages.
//!
//! Only the literal value is found. A secret the agent transforms (base64,
//! reversed, split over lines) is not recognised; keep secrets out of
//! transformations you snapshot.

use std::borrow::Cow;

/// The text that replaces the secret called `name`.
pub fn placeholder(name: &str) -> String {
    format!("[secret:{name}]")
}

/// A set of secrets (`name`, `value`) to redact.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// Sorted longest value first, so that a secret containing another is
    /// replaced as a whole.
    entries: Vec<(String, String)>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(name, _)| placeholder(name)))
            .finish()
    }
}

impl Secrets {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret. Empty values are ignored (there is nothing to find).
    pub fn add(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let (name, value) = (name.into(), value.into());
        if value.is_empty() || self.entries.iter().any(|(n, v)| *n == name && *v == value) {
            return;
        }
        self.entries.push((name, value));
        self.entries
            .sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
    }

    /// Adds every secret of `other`.
    pub fn extend(&mut self, other: &Secrets) {
        for (name, value) in &other.entries {
            self.add(name.clone(), value.clone());
        }
    }

    /// Whether there are no secrets.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The (name, value) pairs.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The names of the secrets.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(name, _)| name.as_str())
    }

    /// `text` with every secret value replaced by `[secret:NAME]`.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for (name, value) in &self.entries {
            if out.contains(value.as_str()) {
                out = Cow::Owned(out.replace(value.as_str(), &placeholder(name)));
            }
        }
        out
    }

    /// Like [`Secrets::redact`] for text that was cut off at its end (captured
    /// output over its limit): additionally, a trailing beginning of a secret
    /// (the part before the cut) is replaced.
    pub fn redact_truncated(&self, text: &str) -> String {
        // The longest proper beginning of any secret that ends the text.
        let cut = self
            .entries
            .iter()
            .filter_map(|(name, value)| {
                (1..value.len())
                    .rev()
                    .filter(|&n| value.is_char_boundary(n))
                    .find(|&n| text.ends_with(&value[..n]))
                    .map(|n| (n, name))
            })
            .max_by_key(|&(n, _)| n);
        match cut {
            Some((n, name)) => {
                let mut out = self.redact(&text[..text.len() - n]).into_owned();
                out.push_str(&placeholder(name));
                out
            }
            None => self.redact(text).into_owned(),
        }
    }

    /// Bytes as lossy UTF-8 text with the secrets redacted.
    pub fn redact_bytes(&self, bytes: &[u8]) -> String {
        self.redact(&String::from_utf8_lossy(bytes)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        let mut s = Secrets::new();
        s.add("TOKEN", "s3cr3t");
        s.add("LONG", "s3cr3t-and-more");
        s.add("EMPTY", "");
        s
    }

    #[test]
    fn replaces_every_occurrence() {
        let s = secrets();
        assert_eq!(
            s.redact("a s3cr3t b s3cr3ts3cr3t"),
            "a [secret:TOKEN] b [secret:TOKEN][secret:TOKEN]"
        );
        assert!(matches!(s.redact("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn longest_value_wins() {
        assert_eq!(
            secrets().redact("x=s3cr3t-and-more y=s3cr3t"),
            "x=[secret:LONG] y=[secret:TOKEN]"
        );
    }

    #[test]
    fn empty_values_are_ignored_and_debug_hides_values() {
        let s = secrets();
        assert_eq!(s.names().collect::<Vec<_>>(), ["LONG", "TOKEN"]);
        let debug = format!("{s:?}");
        assert!(!debug.contains("s3cr3t"), "{debug}");
        assert!(debug.contains("[secret:TOKEN]"), "{debug}");
    }

    #[test]
    fn truncated_tails_are_redacted() {
        let mut s = secrets();
        s.add("ZED", "zzz-secret");
        assert_eq!(s.redact_truncated("key: zzz-se"), "key: [secret:ZED]");
        // A beginning shared by two secrets is redacted (as either).
        assert!(!s.redact_truncated("token: s3c").contains("s3c"));
        assert_eq!(
            s.redact_truncated("token: s3cr3t-an"),
            "token: [secret:LONG]"
        );
        assert!(!s.redact_truncated("token: s3cr3t").contains("s3c"));
        assert_eq!(s.redact_truncated("nothing"), "nothing");
    }

    #[test]
    fn bytes_are_lossy_utf8() {
        let s = secrets();
        assert_eq!(s.redact_bytes(b"\xffs3cr3t"), "\u{fffd}[secret:TOKEN]");
    }
}
