//! API keys: their format, their hash, and the cache that keeps verified keys close.
//!
//! A key is `tg_` followed by 40 base62 characters (about 238 random bits). Only its SHA-256 hash
//! and a short visible prefix (`tg_` plus 8 characters) are ever stored (DESIGN rule 8); the key
//! itself is printed once, by `tollgate keys create`.

mod bounded;
pub mod cache;

use chrono::{DateTime, Utc};
use rand::RngExt;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use std::num::NonZeroU64;

/// What every tollgate key starts with, so a leaked key is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "tg_";
/// Random characters after [`KEY_PREFIX`].
pub const KEY_RANDOM_LEN: usize = 40;
/// Length of a whole key.
pub const KEY_LEN: usize = KEY_PREFIX.len() + KEY_RANDOM_LEN;
/// Length of the visible prefix kept for humans (`tg_` + 8 characters).
pub const VISIBLE_PREFIX_LEN: usize = KEY_PREFIX.len() + 8;

/// SHA-256 of a key: what the database stores and the cache is keyed by.
pub type KeyHash = [u8; 32];

/// A freshly generated key: shown once, then only its hash and prefix remain.
#[derive(Clone, PartialEq, Eq)]
pub struct NewKey {
    pub plaintext: String,
    pub hash: KeyHash,
    pub prefix: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Generates a new random key from the thread's cryptographically secure generator.
pub fn generate() -> NewKey {
    let random: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(KEY_RANDOM_LEN)
        .map(char::from)
        .collect();
    let plaintext = format!("{KEY_PREFIX}{random}");
    NewKey {
        hash: hash(&plaintext),
        prefix: plaintext[..VISIBLE_PREFIX_LEN].to_string(),
        plaintext,
    }
}

/// Hashes a key for storage and lookup.
pub fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Lower-case hex of a hash, as stored in the `key_hash` column.
pub fn hash_hex(hash: &KeyHash) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The hash a [`hash_hex`] string stands for; `None` for anything else.
pub(crate) fn parse_hash_hex(hex: &str) -> Option<KeyHash> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Whether `candidate` has the shape of a tollgate key. Anything else is refused before it is
/// hashed or looked up, so garbage and oversized values cost nothing.
pub fn is_well_formed(candidate: &str) -> bool {
    candidate.len() == KEY_LEN
        && candidate.starts_with(KEY_PREFIX)
        && candidate.as_bytes()[KEY_PREFIX.len()..]
            .iter()
            .all(u8::is_ascii_alphanumeric)
}

/// Whether a key may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(KeyStatus::Active),
            "revoked" => Some(KeyStatus::Revoked),
            _ => None,
        }
    }
}

/// A key's limits. `None` means unlimited; a `None` per-minute limit falls back to the configured
/// default (`limits.default_per_minute`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub per_minute: Option<u64>,
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
    /// Give back the quota of requests the upstream answered with a 5xx (known from Envoy's
    /// access log).
    pub refund_5xx: bool,
}

/// [`Limits`] as a cached key holds them: 32 bytes where `Limits` takes 56, since every cached
/// key pays for the inline size. A stored limit is at least 1 (the tables' CHECKs, and the admin
/// API refuses 0), so `None` can be the niche of a `NonZeroU64`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    per_minute: Option<NonZeroU64>,
    daily: Option<NonZeroU64>,
    monthly: Option<NonZeroU64>,
    refund_5xx: bool,
}

impl From<Limits> for KeyLimits {
    /// A limit of 0, which no store holds, is kept as 1: the nearest limit, never unlimited.
    fn from(l: Limits) -> Self {
        debug_assert!(
            [l.per_minute, l.daily, l.monthly]
                .iter()
                .all(|v| *v != Some(0)),
            "limits are at least 1: {l:?}"
        );
        let nz = |v: Option<u64>| v.map(|v| NonZeroU64::new(v).unwrap_or(NonZeroU64::MIN));
        Self {
            per_minute: nz(l.per_minute),
            daily: nz(l.daily),
            monthly: nz(l.monthly),
            refund_5xx: l.refund_5xx,
        }
    }
}

impl KeyLimits {
    pub fn get(self) -> Limits {
        Limits {
            per_minute: self.per_minute.map(NonZeroU64::get),
            daily: self.daily.map(NonZeroU64::get),
            monthly: self.monthly.map(NonZeroU64::get),
            refund_5xx: self.refund_5xx,
        }
    }
}

/// The identity a key belongs to, with the limits its keys share (`None` = unlimited). A key
/// with one must fit its own limits and these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityLimits {
    pub id: i64,
    pub per_minute: Option<u64>,
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

/// The secret a key had before its last rotation: it keeps working until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldSecret {
    /// Its visible prefix, for people (and the request log) to tell it from the new one.
    pub prefix: String,
    pub expires_at: DateTime<Utc>,
}

/// A stored key, as the request path needs it. Never holds the plaintext.
///
/// The cache holds one per key in use (100,000 in the memory benchmark), behind an `Arc`, so its
/// size decides the allocation's size class: boxed strings and slices, and [`KeyLimits`], keep
/// it at 144 bytes, 160 with the `Arc`'s counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: i64,
    pub name: Box<str>,
    pub prefix: Box<str>,
    pub status: KeyStatus,
    pub expires_at: Option<DateTime<Utc>>,
    /// Read them with [`ApiKey::limits`].
    pub limits: KeyLimits,
    /// The secret retired by the last rotation, while it may still be working (boxed, as the
    /// identity: most keys have neither, and every cached key pays for the inline size).
    pub old_secret: Option<Box<OldSecret>>,
    /// This key was found by its old secret's hash (so the grace decides whether it works).
    pub by_old_secret: bool,
    /// The permissions the key has, sorted; empty: it may call every route.
    pub permissions: Box<[String]>,
    /// Fields the key carries to Envoy's dynamic metadata and, if configured, upstream headers.
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The identity whose limits the key shares, if it belongs to one.
    pub identity: Option<Box<IdentityLimits>>,
}

impl ApiKey {
    pub fn limits(&self) -> Limits {
        self.limits.get()
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether the secret this key was found by still works at `now`: the current one always,
    /// the old one until its grace ends.
    pub fn secret_works(&self, now: DateTime<Utc>) -> bool {
        !self.by_old_secret || self.old_secret.as_ref().is_some_and(|o| o.expires_at > now)
    }

    /// Whether a route that needs `permission` may be called with this key.
    pub fn may(&self, permission: &str) -> bool {
        self.permissions.is_empty() || self.permissions.iter().any(|p| p == permission)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate();
        let b = generate();
        assert!(is_well_formed(&a.plaintext), "{}", a.plaintext);
        assert_ne!(a.plaintext, b.plaintext);
        assert_eq!(a.prefix, &a.plaintext[..11]);
        assert_eq!(a.hash, hash(&a.plaintext));
        assert!(
            !format!("{a:?}").contains(&a.plaintext),
            "Debug must not print the key"
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        let good = generate().plaintext;
        assert!(is_well_formed(&good));
        assert!(!is_well_formed(""));
        assert!(!is_well_formed(&good[..KEY_LEN - 1]));
        assert!(!is_well_formed(&format!("{good}x")));
        assert!(!is_well_formed(&good.replacen("tg_", "xx_", 1)));
        assert!(!is_well_formed(&format!("tg_{}", "é".repeat(20))));
        assert!(!is_well_formed(&format!("tg_{}-", &good[3..KEY_LEN - 1])));
        assert!(!is_well_formed(&"a".repeat(1 << 20)));
    }

    #[test]
    fn hash_hex_round_trips() {
        let h = hash("tg_x");
        assert_eq!(parse_hash_hex(&hash_hex(&h)), Some(h));
        assert_eq!(parse_hash_hex("zz"), None);
        assert_eq!(parse_hash_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_hex(&hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_cached_key_fits_the_160_byte_size_class_with_its_arc() {
        assert_eq!(size_of::<ApiKey>(), 144);
        let limits = Limits {
            per_minute: Some(1),
            daily: None,
            monthly: Some(u64::MAX),
            refund_5xx: true,
        };
        assert_eq!(KeyLimits::from(limits).get(), limits);
    }

    #[test]
    fn expiry_is_inclusive_of_the_instant() {
        let at: DateTime<Utc> = "2026-05-01T00:00:00Z".parse().unwrap();
        let key = ApiKey {
            id: 1,
            name: "k".into(),
            prefix: "tg_abcdefgh".into(),
            status: KeyStatus::Active,
            expires_at: Some(at),
            limits: KeyLimits::default(),
            old_secret: None,
            by_old_secret: false,
            permissions: Box::default(),
            metadata: Default::default(),
            identity: None,
        };
        assert!(!key.is_expired(at - chrono::Duration::seconds(1)));
        assert!(key.is_expired(at));
    }

    #[test]
    fn an_old_secret_works_until_its_grace_ends_and_permissions_restrict() {
        let at: DateTime<Utc> = "2026-05-01T00:00:00Z".parse().unwrap();
        let mut key = ApiKey {
            id: 1,
            name: "k".into(),
            prefix: "tg_abcdefgh".into(),
            status: KeyStatus::Active,
            expires_at: None,
            limits: KeyLimits::default(),
            old_secret: Some(Box::new(OldSecret {
                prefix: "tg_zzzzzzzz".into(),
                expires_at: at,
            })),
            by_old_secret: false,
            permissions: Box::default(),
            metadata: Default::default(),
            identity: None,
        };
        assert!(key.secret_works(at + chrono::Duration::days(9)));
        key.by_old_secret = true;
        assert!(key.secret_works(at - chrono::Duration::seconds(1)));
        assert!(!key.secret_works(at));
        key.old_secret = None;
        assert!(!key.secret_works(at - chrono::Duration::days(1)));
        assert!(key.may("reports.read"));
        key.permissions = Box::new(["billing.write".into()]);
        assert!(key.may("billing.write"));
        assert!(!key.may("reports.read"));
    }
}
