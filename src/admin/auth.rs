//! Who may call the admin API, decided once per request, before anything else is read: a client
//! certificate carrying a listed subject alternative name (`admin.client_sans`), or a bearer
//! token whose SHA-256 is configured (`admin.token_sha256`), compared in constant time.
//!
//! [`Credentials`] is what a request presents: the bearer token and the SANs of the client
//! certificate its connection's TLS handshake verified (against `grpc_tls.client_ca_file`; the
//! handshake lets a client without one through, so a token still works over TLS).
//! [`AdminAuth::authenticate`] is the one place that decides.

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
    /// A client certificate from the client CA, by the SAN of it that `admin.client_sans` lists
    /// (a name, not a secret).
    ClientCert { san: String },
    /// No credentials are configured (loopback only): anyone who reaches the port.
    Anonymous,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Token { fingerprint } => write!(f, "token:{fingerprint}"),
            Caller::ClientCert { san } => write!(f, "client_cert:{san}"),
            Caller::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// What a request presents.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The value of `authorization`, if any.
    pub authorization: Option<&'a [u8]>,
    /// The URI and DNS SANs of the client certificate the connection's handshake verified
    /// (chained to the client CA, in date, for client authentication); empty without one.
    pub client_sans: &'a [String],
}

/// Why a request was refused; for logs only (the caller learns nothing but 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials.
    Missing,
    /// Credentials that are not a configured token.
    Wrong,
    /// Only a client certificate (from the client CA), none of whose SANs is listed.
    UnlistedClientCert,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Wrong => "wrong",
            AuthFailure::UnlistedClientCert => "unlisted_client_cert",
        }
    }
}

/// The configured credentials.
#[derive(Clone)]
pub struct AdminAuth {
    tokens: Vec<KeyHash>,
    client_sans: Vec<String>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("tokens", &self.tokens.len())
            .field("client_sans", &self.client_sans)
            .finish()
    }
}

impl AdminAuth {
    pub fn new(config: &AdminConfig) -> Self {
        AdminAuth {
            tokens: config.token_hashes(),
            client_sans: config.client_sans.clone(),
        }
    }

    /// Whether calls need no credentials (none configured; config validation allows that on
    /// loopback only).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty() && self.client_sans.is_empty()
    }

    /// Whether a client certificate can be a credential (the admin port then asks for one).
    pub fn takes_client_certs(&self) -> bool {
        !self.client_sans.is_empty()
    }

    /// Who presents `credentials`, or why they are refused. Either credential is enough: a
    /// client certificate with a listed SAN, else a configured token.
    pub fn authenticate(&self, credentials: &Credentials<'_>) -> Result<Caller, AuthFailure> {
        if self.is_open() {
            return Ok(Caller::Anonymous);
        }
        if let Some(san) = crate::tls::first_allowed(&self.client_sans, credentials.client_sans) {
            return Ok(Caller::ClientCert {
                san: san.to_string(),
            });
        }
        let Some(header) = credentials.authorization else {
            return Err(if credentials.client_sans.is_empty() {
                AuthFailure::Missing
            } else {
                AuthFailure::UnlistedClientCert
            });
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
        auth_with(tokens, &[])
    }

    fn auth_with(tokens: &[&str], sans: &[&str]) -> AdminAuth {
        AdminAuth::new(&AdminConfig {
            token_sha256: tokens
                .iter()
                .map(|t| hash_hex(&Sha256::digest(t.as_bytes()).into()))
                .collect(),
            client_sans: sans.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn with(header: &str) -> Credentials<'_> {
        Credentials {
            authorization: Some(header.as_bytes()),
            ..Credentials::default()
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

    #[test]
    fn a_listed_client_certificate_passes_by_its_san() {
        const PORTAL: &str = "spiffe://cluster.local/ns/portal/sa/portal";
        let a = auth_with(&["the-token"], &[PORTAL, "Console.Ops.svc"]);
        assert!(!a.is_open());
        let cert = |sans: &[&str]| sans.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let portal = cert(&["other.example", PORTAL]);
        let presented = Credentials {
            client_sans: &portal,
            ..Credentials::default()
        };
        assert_eq!(
            a.authenticate(&presented),
            Ok(Caller::ClientCert { san: PORTAL.into() })
        );
        assert_eq!(
            a.authenticate(&presented).unwrap().to_string(),
            format!("client_cert:{PORTAL}")
        );
        let console = cert(&["console.ops.svc"]);
        assert!(matches!(
            a.authenticate(&Credentials {
                client_sans: &console,
                ..Credentials::default()
            }),
            Ok(Caller::ClientCert { .. })
        ));
        // A certificate from the CA with another name is no credential; a token still is.
        let stranger = cert(&["spiffe://cluster.local/ns/portal/sa/portal2", "ops.svc"]);
        let unlisted = Credentials {
            client_sans: &stranger,
            ..Credentials::default()
        };
        assert_eq!(
            a.authenticate(&unlisted),
            Err(AuthFailure::UnlistedClientCert)
        );
        assert_eq!(
            a.authenticate(&Credentials {
                authorization: Some(b"Bearer wrong"),
                ..unlisted
            }),
            Err(AuthFailure::Wrong)
        );
        assert!(matches!(
            a.authenticate(&Credentials {
                authorization: Some(b"Bearer the-token"),
                ..unlisted
            }),
            Ok(Caller::Token { .. })
        ));
        assert_eq!(
            a.authenticate(&Credentials::default()),
            Err(AuthFailure::Missing)
        );
        // SANs only, no token: nothing else gets in.
        let sans_only = auth_with(&[], &[PORTAL]);
        assert!(!sans_only.is_open());
        assert_eq!(
            sans_only.authenticate(&with("Bearer anything")),
            Err(AuthFailure::Wrong)
        );
        assert_eq!(
            sans_only.authenticate(&presented),
            Ok(Caller::ClientCert { san: PORTAL.into() })
        );
    }
}
