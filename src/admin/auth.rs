//! Who may call the admin API, decided once per request, before anything else is read: a bearer
//! token whose SHA-256 is configured (`admin.token_sha256`), compared in constant time.
//!
//! [`Credentials`] is what a request presents: the bearer token and, once the admin port speaks
//! TLS, the SANs of a verified client certificate. [`AdminAuth::authenticate`] is the one place
//! that decides; a client-certificate check is one more arm there, fed by the listener that
//! verified the certificate.

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::config::AdminConfig;
use crate::keys::{KeyHash, hash_hex};

/// The longest bearer token looked at; longer ones are refused without being hashed.
const MAX_TOKEN_BYTES: usize = 1024;

/// Who made an admin call, as logs name them: never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A bearer token, by the first 12 hex digits of its configured SHA-256 (which is in the
    /// configuration already, so the fingerprint tells nothing about the token).
    Token { fingerprint: String },
    /// No credentials are configured (loopback only): anyone who reaches the port.
    Anonymous,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Token { fingerprint } => write!(f, "token:{fingerprint}"),
            Caller::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// What a request presents.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The value of `authorization`, if any.
    pub authorization: Option<&'a [u8]>,
}

/// Why a request was refused; for logs only (the caller learns nothing but 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials.
    Missing,
    /// Credentials that are not a configured token.
    Wrong,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Wrong => "wrong",
        }
    }
}

/// The configured credentials.
#[derive(Clone)]
pub struct AdminAuth {
    tokens: Vec<KeyHash>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl AdminAuth {
    pub fn new(config: &AdminConfig) -> Self {
        AdminAuth {
            tokens: config.token_hashes(),
        }
    }

    /// Whether calls need no credentials (none configured; config validation allows that on
    /// loopback only).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Who presents `credentials`, or why they are refused.
    pub fn authenticate(&self, credentials: &Credentials<'_>) -> Result<Caller, AuthFailure> {
        if self.is_open() {
            return Ok(Caller::Anonymous);
        }
        let Some(header) = credentials.authorization else {
            return Err(AuthFailure::Missing);
        };
        let token = bearer_token(header).ok_or(AuthFailure::Wrong)?;
        let presented: KeyHash = Sha256::digest(token).into();
        // Every configured hash is compared, each in constant time, and the match is picked
        // without a branch: how long this takes says nothing about the token or which one it is.
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, configured) in self.tokens.iter().enumerate() {
            let eq = presented.ct_eq(configured);
            index = u32::conditional_select(&index, &(i as u32), eq);
            found |= eq;
        }
        if bool::from(found) {
            Ok(Caller::Token {
                fingerprint: hash_hex(&self.tokens[index as usize])[..12].to_string(),
            })
        } else {
            Err(AuthFailure::Wrong)
        }
    }
}

/// The token of `Bearer <token>` (the scheme in any case), if the header is that and the token
/// is of a sane length.
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty() && token.len() <= MAX_TOKEN_BYTES).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(tokens: &[&str]) -> AdminAuth {
        AdminAuth::new(&AdminConfig {
            token_sha256: tokens
                .iter()
                .map(|t| hash_hex(&Sha256::digest(t.as_bytes()).into()))
                .collect(),
        })
    }

    fn with(header: &str) -> Credentials<'_> {
        Credentials {
            authorization: Some(header.as_bytes()),
        }
    }

    #[test]
    fn configured_tokens_and_only_they_pass() {
        let a = auth(&["old-token", "new-token"]);
        let old = a.authenticate(&with("Bearer old-token")).unwrap();
        let new = a.authenticate(&with("bearer   new-token ")).unwrap();
        assert_ne!(old, new);
        let fp = hash_hex(&Sha256::digest(b"new-token").into())[..12].to_string();
        assert_eq!(new, Caller::Token { fingerprint: fp });
        assert!(!new.to_string().contains("new-token"));
        assert_eq!(
            a.authenticate(&Credentials::default()),
            Err(AuthFailure::Missing)
        );
        for bad in [
            "Bearer wrong",
            "Bearer ",
            "Basic b2xkLXRva2Vu",
            "old-token",
            "Bearer old-token-and-more",
            "",
        ] {
            assert_eq!(a.authenticate(&with(bad)), Err(AuthFailure::Wrong), "{bad}");
        }
        let long = format!("Bearer {}", "x".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(a.authenticate(&with(&long)), Err(AuthFailure::Wrong));
    }

    #[test]
    fn without_tokens_everyone_is_anonymous() {
        let a = auth(&[]);
        assert!(a.is_open());
        assert_eq!(
            a.authenticate(&Credentials::default()),
            Ok(Caller::Anonymous)
        );
    }
}
