//! Guest file names as text, without losing a byte.
//!
//! Linux file names are bytes, not UTF-8; the protocol's paths are strings.
//! Every path the guest reports is [`encode`]d and every path the host sends
//! is [`decode`]d by the guest, so a name like `a\xff` (byte 0xff) travels as
//! the text `a\xff`, shows in snapshots as such, and `vm.read_file("a\\xff")`
//! reads it back. The encoding:
//!
//! * valid UTF-8 is kept as it is, except a backslash, which is doubled (`\\`);
//! * each byte that is not part of valid UTF-8 becomes `\xHH` (lowercase hex).
//!
//! [`decode`] reverses it exactly; a backslash that starts neither `\\` nor
//! `\xHH` is kept as a literal backslash, so paths typed by hand without
//! escapes still work. For every byte string `b`, `decode(&encode(b)) == b`.

/// The text form of a file name's bytes (see the module docs).
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The bytes of a file name in text form (see the module docs).
pub fn decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
                continue;
            }
            if bytes.get(i + 1) == Some(&b'x') {
                if let Some(b) = bytes.get(i + 2..i + 4).and_then(hex_byte) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| (c as char).to_digit(16);
    Some((digit(two[0])? * 16 + digit(two[1])?) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_names_are_unchanged() {
        for name in ["hello.txt", "dir/ünïcödé 名前.md", "", "a b/c"] {
            assert_eq!(encode(name.as_bytes()), name);
            assert_eq!(decode(name), name.as_bytes());
        }
    }

    #[test]
    fn invalid_bytes_and_backslashes_are_escaped() {
        assert_eq!(encode(b"a\xff"), "a\\xff");
        assert_eq!(encode(b"a\xfe"), "a\\xfe");
        assert_eq!(encode(b"back\\slash"), "back\\\\slash");
        assert_eq!(encode(b"\xc3"), "\\xc3", "a truncated UTF-8 sequence");
        assert_eq!(encode("é\u{0}".as_bytes()), "é\u{0}");
    }

    #[test]
    fn hand_typed_backslashes_stay_literal() {
        assert_eq!(decode("a\\b"), b"a\\b");
        assert_eq!(decode("a\\x"), b"a\\x");
        assert_eq!(decode("a\\xZZ"), b"a\\xZZ");
        assert_eq!(decode("a\\"), b"a\\");
    }

    proptest::proptest! {
        #[test]
        fn decode_reverses_encode(bytes: Vec<u8>) {
            proptest::prop_assert_eq!(decode(&encode(&bytes)), bytes);
        }

        #[test]
        fn distinct_names_stay_distinct(a: Vec<u8>, b: Vec<u8>) {
            proptest::prop_assume!(a != b);
            proptest::prop_assert_ne!(encode(&a), encode(&b));
        }
    }
}
