//! The value types settings are written in, shared by every subsystem's configuration:
//! durations, URLs that may hold a password, failure modes, and the error of a setting that does
//! not validate.
//!
//! A leaf: it imports nothing from the crate, so a subsystem can own its settings (and
//! `config` can gather them) without either importing the other. `config` re-exports all of it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A duration written as `"250ms"`, `"30s"`, `"5m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration like \"30s\" ({e})"))
        })
    }
}

/// A URL that may hold a password: `Debug` and `Display` show it without.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(pub String);

impl SecretUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// A URL as it may be shown: `scheme://user:secret@host/…?password=secret` →
/// `scheme://user:***@host/…?password=***` (any query parameter whose name holds `pass`,
/// `secret` or `token`, and libpq's TLS parameters but `sslmode`: where the keys and
/// certificates are is nobody's business in a log).
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = redact_user_info(base);
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if is_secret_param(name) => format!("{name}=***"),
                _ => param.to_string(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`.
fn redact_user_info(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// Query parameters whose value is a credential (`password`, libpq's `sslpassword`, a token…)
/// or says where one is (`sslkey`, `sslcert`, `sslrootcert`, and sqlx's `ssl-key` spellings).
fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase().replace(['-', '_'], "");
    ["pass", "secret", "token"].iter().any(|s| name.contains(s))
        || (name.starts_with("ssl") && name != "sslmode")
}

/// An error and its causes on one line, each said once: `a: b: c`. A cause whose text is on the
/// line already is left out: error types that print their source in their own message (sqlx's,
/// the store's) would otherwise say it two or three times.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// What a check does when a backend cannot answer (DESIGN rule 7).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Allow the request, log a warning, count it in a metric.
    Open,
    /// Refuse the request with 503 and a body that says why.
    Closed,
}

/// A setting that does not validate: its path in the file (`redis.timeout`,
/// `authz.key_headers[0]`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSetting {
    pub field: String,
    pub message: String,
}

impl InvalidSetting {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that prints its source in its own message, as sqlx's and the store's do.
    #[derive(Debug, thiserror::Error)]
    #[error("database unavailable: {0}")]
    struct Saying(#[source] std::io::Error);

    #[test]
    fn each_cause_is_said_once() {
        let e = anyhow::Error::new(Saying(std::io::Error::other("invalid peer certificate")))
            .context("cannot open database postgres://db/x");
        assert_eq!(
            format!("{e:#}"),
            "cannot open database postgres://db/x: database unavailable: invalid peer \
             certificate: invalid peer certificate",
            "anyhow alone says it twice"
        );
        assert_eq!(
            error_chain(e.as_ref()),
            "cannot open database postgres://db/x: database unavailable: invalid peer certificate"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(e.as_ref()), "outer: inner");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:hunter2@db:5432/x"),
            "postgres://u:***@db:5432/x"
        );
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
        assert_eq!(redact_url("no url"), "no url");
        assert_eq!(
            redact_url("postgres://db/x?user=u&password=hunter2&sslmode=require"),
            "postgres://db/x?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://u:pw@db/x?sslpassword=k3y&application_name=t"),
            "postgres://u:***@db/x?sslpassword=***&application_name=t"
        );
        assert_eq!(
            redact_url("redis://h:6379/0?token=abc"),
            "redis://h:6379/0?token=***"
        );
        assert_eq!(
            redact_url(
                "postgres://u:pw@db/x?sslmode=verify-full&sslrootcert=/ca.crt&sslcert=/c.crt&\
                 sslkey=/k.key&ssl-key=/k2.key&sslpassword=pp"
            ),
            "postgres://u:***@db/x?sslmode=verify-full&sslrootcert=***&sslcert=***&\
             sslkey=***&ssl-key=***&sslpassword=***"
        );
        let s = SecretUrl("redis://:pw@h:6379".into());
        assert!(!format!("{s:?}").contains("pw"));
        assert!(!s.to_string().contains("pw"));
        assert_eq!(s.expose(), "redis://:pw@h:6379");
    }
}
