//! Counter keys: how a descriptor names the window counter its hits go to, in this process and
//! in Redis alike (so replicas agree).
//!
//! A key is a kind (`rule:`, `override:`) followed by parts: the domain, then each entry's key
//! and value. A part of up to [`MAX_RAW_PART`] bytes is written as `<length>:<part>`; a longer
//! one, or one holding `{` or `}` (which would cut a Redis hash tag short), as `#` and a
//! 128-bit digest of it (SHA-256, 32 hex digits). Parts written as they are start with a digit
//! and a digest has a fixed length, so no two different descriptors give one key. A key that
//! is still longer than [`MAX_COUNTER_KEY`] (a descriptor of many entries) becomes `~` and the
//! digest of all of it.
//!
//! So a counter costs the same whether a client sent a 60 KiB value or a short one, and no long
//! value (it may be a credential) is ever written into a Redis key name.

use std::fmt::Write;

use sha2::{Digest, Sha256};

/// The longest domain, key or value (in bytes) that a counter key holds as it is.
pub const MAX_RAW_PART: usize = 64;

/// The longest counter key (in bytes) kept as built.
pub const MAX_COUNTER_KEY: usize = 256;

/// Appends one part: `<length>:<part>` when it is short and has no brace, else `#<digest>`.
pub fn push_part(out: &mut String, part: &str) {
    if part.len() <= MAX_RAW_PART && !part.contains(['{', '}']) {
        let _ = write!(out, "{}:{part}", part.len());
    } else {
        out.push('#');
        push_digest(out, part.as_bytes());
    }
}

/// The key as it is when it is at most [`MAX_COUNTER_KEY`] bytes, else `~<digest>`.
pub fn bounded(key: String) -> String {
    if key.len() <= MAX_COUNTER_KEY {
        return key;
    }
    let mut out = String::with_capacity(33);
    out.push('~');
    push_digest(&mut out, key.as_bytes());
    out
}

/// The parts of a domain and its entries, each as [`push_part`] writes it.
pub fn push_entries(out: &mut String, domain: &str, entries: &[(&str, &str)]) {
    push_part(out, domain);
    for (k, v) in entries {
        push_part(out, k);
        push_part(out, v);
    }
}

/// The first 128 bits of the SHA-256 of `bytes`, as 32 lower-case hex digits.
fn push_digest(out: &mut String, bytes: &[u8]) {
    for b in &Sha256::digest(bytes)[..16] {
        let _ = write!(out, "{b:02x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(domain: &str, entries: &[(&str, &str)]) -> String {
        let mut out = String::from("rule:");
        push_entries(&mut out, domain, entries);
        bounded(out)
    }

    #[test]
    fn short_parts_are_kept_as_they_are() {
        assert_eq!(
            key("api", &[("path", "/v1/search")]),
            "rule:3:api4:path10:/v1/search"
        );
        let at_limit = "x".repeat(MAX_RAW_PART);
        assert_eq!(
            key("api", &[("k", &at_limit)]),
            format!("rule:3:api1:k64:{at_limit}")
        );
    }

    #[test]
    fn a_long_value_costs_what_a_short_one_does() {
        let huge = "v".repeat(60 * 1024);
        let long = "w".repeat(MAX_RAW_PART + 1);
        let a = key("api", &[("path", &huge)]);
        let b = key("api", &[("path", &long)]);
        assert_eq!(a.len(), b.len());
        assert_eq!(a.len(), "rule:3:api4:path#".len() + 32);
        assert!(a.starts_with("rule:3:api4:path#"), "{a}");
        assert!(!a.contains("vvvv") && !b.contains("wwww"), "{a} {b}");
        assert_ne!(a, b);
        // A short value is no longer than a digested one: the key stays small either way.
        assert!(key("api", &[("path", "/")]).len() < a.len());
        // The same value always gives the same key (replicas agree).
        assert_eq!(a, key("api", &[("path", &huge)]));
    }

    #[test]
    fn braces_never_reach_a_key() {
        let k = key("api", &[("path", "/a}{b")]);
        assert!(!k.contains(['{', '}']), "{k}");
        assert_ne!(k, key("api", &[("path", "/a{}b")]));
    }

    #[test]
    fn parts_cannot_be_confused() {
        // Separators inside values, and a value that looks like a digest.
        assert_ne!(
            key("d", &[("a", "1:b"), ("c", "d")]),
            key("d", &[("a", "1"), ("b", "c:d")])
        );
        let long = "z".repeat(100);
        let mut digest = String::new();
        push_part(&mut digest, &long);
        assert!(digest.starts_with('#') && digest.len() == 33);
        assert_ne!(key("d", &[("a", &long)]), key("d", &[("a", &digest)]));
    }

    #[test]
    fn many_entries_give_a_key_of_bounded_size() {
        let entries: Vec<(String, String)> = (0..1000)
            .map(|i| (format!("k{i}"), format!("v{i}")))
            .collect();
        let entries: Vec<(&str, &str)> = entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let k = key("d", &entries);
        assert_eq!(k.len(), 33);
        assert!(k.starts_with('~'), "{k}");
        assert_ne!(k, key("d", &entries[..999]));
        // Below the bound, nothing changes.
        assert!(key("d", &entries[..3]).starts_with("rule:1:d"));
    }
}
