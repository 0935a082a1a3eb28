//! The `tollgate` command line: argument types and the admin commands behind `tollgate keys`.
//!
//! The binary parses [`Cli`] and calls into here or into [`crate::app`]; the output formats
//! (text for people, `--json` for scripts) live here too.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::admin::service::{KeyAdmin, KeyListing, NewKeySpec};
use crate::config::Config;
use crate::keys::{ApiKey, Limits};
use crate::store::{
    Identity, IdentityLimitsPatch, KeyUpdate, LimitsPatch, Stores, Usage, UsageQuery,
};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "API keys, rate limits and usage quotas for Envoy (ext_authz)"
)]
pub struct Cli {
    /// Configuration file (YAML). Also TOLLGATE_CONFIG. Every setting can be overridden by a
    /// TOLLGATE_<SETTING> environment variable.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve ext_authz Check and gRPC health on grpc_addr, /healthz /readyz /metrics on http_addr.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Validate the configuration and print it (passwords redacted).
    CheckConfig,
    /// Create, list, inspect, revoke API keys and change their limits.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Create, list, inspect and delete identities: customers whose keys share limits.
    Identities {
        #[command(subcommand)]
        command: IdentitiesCommand,
    },
    /// Requests by day (allowed and denied) and the busiest keys, from the request log.
    Usage(UsageArgs),
}

#[derive(Debug, Subcommand)]
pub enum IdentitiesCommand {
    /// Create an identity; keys created with --identity ID share its limits (each request must
    /// fit the key's own limits and the identity's).
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        limits: IdentityLimitArgs,
        #[arg(long)]
        json: bool,
    },
    /// List all identities.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one identity's limits and its shared usage.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Change some of an identity's limits; "unlimited" removes one.
    SetLimits {
        id: i64,
        #[command(flatten)]
        limits: IdentityLimitArgs,
    },
    /// Delete an identity: its keys stay, with their own limits only.
    Delete { id: i64 },
}

/// An identity's limit flags. A value is a positive count, or `unlimited`.
#[derive(Debug, Args, Clone, Copy)]
pub struct IdentityLimitArgs {
    /// Requests per minute, shared by all the identity's keys (unset: unlimited).
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub per_minute: Option<LimitValue>,
    /// Requests per UTC day, shared (unset: unlimited).
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub daily: Option<LimitValue>,
    /// Requests per UTC month, shared (unset: unlimited).
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub monthly: Option<LimitValue>,
}

impl IdentityLimitArgs {
    fn patch(self) -> IdentityLimitsPatch {
        IdentityLimitsPatch {
            per_minute: self.per_minute.map(|v| v.0),
            daily: self.daily.map(|v| v.0),
            monthly: self.monthly.map(|v| v.0),
        }
    }
}

fn identity_json(identity: &Identity) -> serde_json::Value {
    json!({
        "id": identity.id,
        "name": identity.name,
        "per_minute": identity.per_minute,
        "daily": identity.daily,
        "monthly": identity.monthly,
        "created_at": rfc3339(identity.created_at),
    })
}

fn identity_text(identity: &Identity) -> String {
    format!(
        "Identity {id} ({name:?}): per minute {pm}, daily {d}, monthly {m} (shared by its keys).\n",
        id = identity.id,
        name = identity.name,
        pm = limit_text(identity.per_minute),
        d = limit_text(identity.daily),
        m = limit_text(identity.monthly),
    )
}

/// Runs a `tollgate identities …` command; returns what to print. Through [`KeyAdmin`], as the
/// admin API.
pub async fn run_identities(
    command: IdentitiesCommand,
    config: &Config,
    stores: &Stores,
    now: DateTime<Utc>,
) -> anyhow::Result<String> {
    let admin = KeyAdmin::new(stores, config.limits.default_per_minute);
    Ok(match command {
        IdentitiesCommand::Create { name, limits, json } => {
            let identity = admin.create_identity(&name, limits.patch(), now).await?;
            if json {
                format!("{}\n", identity_json(&identity))
            } else {
                format!("Created {}", identity_text(&identity))
            }
        }
        IdentitiesCommand::List { json } => {
            let mut all = Vec::new();
            let mut after_id = 0;
            loop {
                let page = admin
                    .list_identities(crate::admin::service::MAX_PAGE_SIZE, after_id)
                    .await?;
                all.extend(page.identities);
                match page.next_after_id {
                    Some(after) => after_id = after,
                    None => break,
                }
            }
            if json {
                let v: Vec<_> = all.iter().map(identity_json).collect();
                format!("{}\n", serde_json::Value::from(v))
            } else if all.is_empty() {
                "No identities.\n".into()
            } else {
                all.iter().map(identity_text).collect()
            }
        }
        IdentitiesCommand::Show { id, json } => {
            let identity = admin.get_identity(id).await?;
            let usage = admin.identity_usage(id, now).await?;
            if json {
                let mut v = identity_json(&identity);
                v["usage"] = json!({
                    "daily": usage.daily,
                    "monthly": usage.monthly,
                    "total": usage.total,
                });
                format!("{v}\n")
            } else {
                format!(
                    "{}Usage: today {}, this month {}, total {}.\n",
                    identity_text(&identity),
                    usage.daily,
                    usage.monthly,
                    usage.total
                )
            }
        }
        IdentitiesCommand::SetLimits { id, limits } => {
            let patch = limits.patch();
            anyhow::ensure!(
                !patch.is_empty(),
                "nothing to change: give --per-minute, --daily and/or --monthly"
            );
            let identity = admin.set_identity_limits(id, patch, now).await?;
            format!("Updated {}", identity_text(&identity))
        }
        IdentitiesCommand::Delete { id } => {
            admin.delete_identity(id, now).await?;
            format!("Deleted identity {id}; its keys keep their own limits.\n")
        }
    })
}

/// `tollgate usage`: a period of UTC days, inclusive at both ends.
#[derive(Debug, Args, Clone)]
pub struct UsageArgs {
    /// Only this key.
    #[arg(long, value_name = "ID")]
    pub key: Option<i64>,
    /// Only the keys of this identity (as each request's log row records it; with --key, only
    /// that key's requests made while it belonged to the identity).
    #[arg(long, value_name = "ID")]
    pub identity: Option<i64>,
    /// The last N days, today included (ignored when --since is given).
    #[arg(long, value_name = "N", default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=3660))]
    pub days: u32,
    /// First day (YYYY-MM-DD, UTC).
    #[arg(long, value_name = "DAY")]
    pub since: Option<chrono::NaiveDate>,
    /// Last day (YYYY-MM-DD, UTC; default today).
    #[arg(long, value_name = "DAY")]
    pub until: Option<chrono::NaiveDate>,
    /// How many keys to list.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: u32,
    #[arg(long)]
    pub json: bool,
}

/// Runs `tollgate usage`; returns what to print.
pub async fn run_usage(
    args: UsageArgs,
    stores: &Stores,
    now: DateTime<Utc>,
) -> anyhow::Result<String> {
    use chrono::Days;
    let until = args.until.unwrap_or_else(|| now.date_naive());
    let since = match args.since {
        Some(since) => since,
        None => until
            .checked_sub_days(Days::new(u64::from(args.days) - 1))
            .ok_or_else(|| anyhow::anyhow!("--days {} before {until} is too far", args.days))?,
    };
    anyhow::ensure!(since <= until, "--since {since} is after --until {until}");
    let end = until
        .checked_add_days(Days::new(1))
        .ok_or_else(|| anyhow::anyhow!("--until {until} is past the last day there is"))?;
    let start = |d: chrono::NaiveDate| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let summary = stores
        .log
        .summarize(&UsageQuery {
            from: start(since),
            to: start(end),
            key_id: args.key,
            identity_id: args.identity,
            top: args.top,
        })
        .await?;
    // An identity deleted since keeps its rows in the log: its summary is shown all the same,
    // saying it no longer exists.
    let identity = match args.identity {
        Some(id) => Some((id, stores.identities.get_identity(id).await?)),
        None => None,
    };
    if args.json {
        let v = json!({
            "since": since.to_string(),
            "until": until.to_string(),
            "key": args.key,
            "identity": args.identity,
            "identity_name": identity.as_ref().and_then(|(_, i)| i.as_ref()).map(|i| &i.name),
            "days": summary.days.iter().map(|d| json!({
                "day": d.day, "allowed": d.allowed, "denied": d.denied,
            })).collect::<Vec<_>>(),
            "top_keys": summary.top_keys.iter().map(|k| json!({
                "id": k.key_id, "name": k.name, "allowed": k.allowed, "denied": k.denied,
            })).collect::<Vec<_>>(),
        });
        return Ok(format!("{v}\n"));
    }
    let mut scope = args.key.map(|id| format!(", key {id}")).unwrap_or_default();
    match &identity {
        Some((_, Some(i))) => scope.push_str(&format!(", identity {} ({})", i.id, i.name)),
        Some((id, None)) => scope.push_str(&format!(", identity {id} (no longer exists)")),
        None => {}
    }
    let mut out = format!("Check requests from {since} to {until} (UTC){scope}:\n\n");
    if summary.days.is_empty() {
        out.push_str("No requests in this period.\n");
        return Ok(out);
    }
    out.push_str(&format!(
        "{:<12}  {:>10}  {:>10}  {:>10}\n",
        "DAY", "ALLOWED", "DENIED", "TOTAL"
    ));
    let (mut allowed, mut denied) = (0, 0);
    for d in &summary.days {
        allowed += d.allowed;
        denied += d.denied;
        out.push_str(&format!(
            "{:<12}  {:>10}  {:>10}  {:>10}\n",
            d.day,
            d.allowed,
            d.denied,
            d.allowed + d.denied
        ));
    }
    out.push_str(&format!(
        "{:<12}  {:>10}  {:>10}  {:>10}\n",
        "total",
        allowed,
        denied,
        allowed + denied
    ));
    if !summary.top_keys.is_empty() {
        out.push_str(&format!(
            "\nTop keys:\n{:>6}  {:<20}  {:>10}  {:>10}  {:>10}\n",
            "ID", "NAME", "ALLOWED", "DENIED", "TOTAL"
        ));
        for k in &summary.top_keys {
            out.push_str(&format!(
                "{:>6}  {:<20}  {:>10}  {:>10}  {:>10}\n",
                k.key_id,
                k.name.as_deref().unwrap_or("(deleted)"),
                k.allowed,
                k.denied,
                k.allowed + k.denied
            ));
        }
    }
    Ok(out)
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (the only time it is shown).
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// When the key stops working (RFC 3339, e.g. 2027-01-01T00:00:00Z).
        #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
        expires_at: Option<DateTime<Utc>>,
        /// The only permissions the key has (comma-separated, e.g. reports.read,billing.write);
        /// unset: it may call every route.
        #[arg(long, value_name = "A,B", value_parser = parse_permissions)]
        permissions: Option<Permissions>,
        /// Fields passed on to Envoy and, if configured, the upstream: a JSON object of strings,
        /// e.g. '{"plan":"gold","tenant":"acme"}'.
        #[arg(long, value_name = "JSON", value_parser = parse_metadata)]
        metadata: Option<Metadata>,
        /// The identity the key belongs to: each request must fit the key's limits and the
        /// identity's, which all its keys share.
        #[arg(long, value_name = "ID")]
        identity: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// List all keys.
    List {
        /// Only the keys of this identity.
        #[arg(long, value_name = "ID")]
        identity: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Show one key's limits and current usage.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: it is refused (403) from then on, within a second on running servers.
    Revoke { id: i64 },
    /// Change some of a key's limits; "unlimited" removes one.
    SetLimits {
        id: i64,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Give a key a new secret (printed once); the old one keeps working for the grace period.
    /// Same id, limits, usage counters and identity.
    Rotate {
        id: i64,
        /// How long the old secret keeps working (e.g. 1h, 7d; 0s: it stops at once).
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_grace)]
        grace: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// Set the only permissions a key has (comma-separated); "" lets it call every route.
    SetPermissions {
        id: i64,
        #[arg(value_name = "A,B", value_parser = parse_permissions)]
        permissions: Permissions,
    },
    /// Replace a key's metadata (a JSON object of strings; '{}' removes it all).
    SetMetadata {
        id: i64,
        #[arg(value_name = "JSON", value_parser = parse_metadata)]
        metadata: Metadata,
    },
    /// Move a key to an identity, whose limits it then shares, or out of its identity ("none").
    /// What it spent before stays counted in the identity it spent it in.
    SetIdentity {
        id: i64,
        #[arg(value_name = "IDENTITY_ID|none", value_parser = parse_identity)]
        identity: IdentityChoice,
    },
}

/// An identity named on the command line, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityChoice(pub Option<i64>);

fn parse_identity(s: &str) -> Result<IdentityChoice, String> {
    match s.trim() {
        "none" => Ok(IdentityChoice(None)),
        n => n
            .parse::<i64>()
            .ok()
            .filter(|id| *id > 0)
            .map(|id| IdentityChoice(Some(id)))
            .ok_or_else(|| format!("{s:?} is not an identity id (a positive number) or none")),
    }
}

/// Permissions given on the command line (checked by [`KeyAdmin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions(pub Vec<String>);

/// Metadata given on the command line (checked by [`KeyAdmin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata(pub BTreeMap<String, String>);

/// `"a,b"` → `[a, b]`; `""` → none (every route).
fn parse_permissions(s: &str) -> Result<Permissions, String> {
    Ok(Permissions(
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect(),
    ))
}

/// A JSON object whose values are all strings.
fn parse_metadata(s: &str) -> Result<Metadata, String> {
    if s.len() > 4 * crate::admin::service::MAX_METADATA_BYTES {
        return Err("too long".into());
    }
    serde_json::from_str::<BTreeMap<String, String>>(s)
        .map(Metadata)
        .map_err(|e| {
            format!("not a JSON object of string values such as {{\"plan\":\"gold\"}} ({e})")
        })
}

fn parse_grace(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration such as 24h, 30m or 0s ({e})"))
}

/// Limit flags. A value is a positive count, or `unlimited`.
#[derive(Debug, Args, Clone, Copy)]
pub struct LimitArgs {
    /// Requests per minute (unset: the configured default, limits.default_per_minute).
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub per_minute: Option<LimitValue>,
    /// Requests per UTC day (unset: unlimited).
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub daily: Option<LimitValue>,
    /// Requests per UTC month (unset: unlimited).
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub monthly: Option<LimitValue>,
    /// Give back the quota of requests the upstream answered with a 5xx (needs Envoy's access
    /// log sent to tollgate).
    #[arg(long, value_name = "BOOL")]
    pub refund_5xx: Option<bool>,
}

/// A limit given on the command line: a count, or `None` for unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitValue(pub Option<u64>);

impl LimitArgs {
    fn patch(self) -> LimitsPatch {
        LimitsPatch {
            per_minute: self.per_minute.map(|v| v.0),
            daily: self.daily.map(|v| v.0),
            monthly: self.monthly.map(|v| v.0),
            refund_5xx: self.refund_5xx,
        }
    }
}

/// `"100"` → `Some(100)`; `"unlimited"` / `"none"` → `None`; `"0"` and garbage are errors.
pub fn parse_limit(s: &str) -> Result<LimitValue, String> {
    parse_limit_count(s).map(LimitValue)
}

fn parse_limit_count(s: &str) -> Result<Option<u64>, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "unlimited" | "none" => Ok(None),
        n => match n.parse::<u64>() {
            Ok(0) => Err("0 is not a limit: use a count of at least 1, or \"unlimited\" (to block a key, revoke it)".into()),
            Ok(n) if n > i64::MAX as u64 => Err(format!("{n} is too large")),
            Ok(n) => Ok(Some(n)),
            Err(_) => Err(format!("{s:?} is not a count or \"unlimited\"")),
        },
    }
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time such as 2027-01-01T00:00:00Z ({e})"))
}

/// Runs a `tollgate keys …` command against the configured database; returns what to print.
/// Every command goes through [`KeyAdmin`], as the admin API does.
pub async fn run_keys(
    command: KeysCommand,
    config: &Config,
    stores: &Stores,
    now: DateTime<Utc>,
) -> anyhow::Result<String> {
    let default_pm = config.limits.default_per_minute;
    let admin = KeyAdmin::new(stores, default_pm);
    // The set-* commands: one change to one key, all of it or nothing.
    let update = |id, change: KeyUpdate| admin.update(id, change, now);
    Ok(match command {
        KeysCommand::Create {
            name,
            limits,
            expires_at,
            permissions,
            metadata,
            identity,
            json,
        } => {
            let created = admin
                .create(
                    NewKeySpec {
                        name,
                        limits: limits.patch().apply(Limits::default()),
                        expires_at,
                        permissions: permissions.map(|p| p.0).unwrap_or_default(),
                        metadata: metadata.map(|m| m.0).unwrap_or_default(),
                        identity_id: identity,
                    },
                    now,
                )
                .await?;
            let key = &created.key;
            if json {
                let mut v = key_json(key, default_pm);
                v["key"] = created.secret.clone().into();
                format!("{v}\n")
            } else {
                format!(
                    "Created API key {id} ({name:?}).\n\n    {plain}\n\n\
                     This is the only time the key is shown: store it now.\n{limits}",
                    id = key.id,
                    name = key.name,
                    plain = created.secret,
                    limits = limits_text(key, default_pm),
                )
            }
        }
        KeysCommand::List { identity, json } => {
            if let Some(id) = identity {
                // An unknown id is a mistake, not an identity without keys.
                admin.get_identity(id).await?;
            }
            let mut all = Vec::new();
            let mut listing = KeyListing {
                page_size: crate::admin::service::MAX_PAGE_SIZE,
                identity_id: identity,
                ..Default::default()
            };
            loop {
                let page = admin.list(&listing, now).await?;
                all.extend(page.keys);
                match page.next_after_id {
                    Some(after) => listing.after_id = after,
                    None => break,
                }
            }
            if json {
                let v: Vec<_> = all.iter().map(|k| key_json(k, default_pm)).collect();
                format!("{}\n", serde_json::Value::from(v))
            } else if let (Some(id), true) = (identity, all.is_empty()) {
                format!("Identity {id} has no keys.\n")
            } else {
                list_text(&all, default_pm)
            }
        }
        KeysCommand::Show { id, json } => {
            let key = admin.get(id).await?;
            let usage = admin.usage(id, 1, now).await?.counters;
            if json {
                let mut v = key_json(&key, default_pm);
                v["usage"] = json!({
                    "daily": usage.daily,
                    "monthly": usage.monthly,
                    "total": usage.total,
                });
                format!("{v}\n")
            } else {
                show_text(&key, usage, default_pm)
            }
        }
        KeysCommand::Revoke { id } => {
            admin.revoke(id, now).await?;
            format!("Revoked API key {id}.\n")
        }
        KeysCommand::SetLimits { id, limits } => {
            let patch = limits.patch();
            anyhow::ensure!(
                patch != LimitsPatch::default(),
                "nothing to change: give --per-minute, --daily, --monthly and/or --refund-5xx"
            );
            let key = update(
                id,
                KeyUpdate {
                    limits: patch,
                    ..Default::default()
                },
            )
            .await?;
            format!("Updated API key {id}.\n{}", limits_text(&key, default_pm))
        }
        KeysCommand::Rotate { id, grace, json } => {
            let rotated = admin.rotate(id, grace, now).await?;
            let expires = rfc3339(rotated.old_key_expires_at);
            if json {
                let v = json!({
                    "id": rotated.key.id,
                    "key": rotated.secret,
                    "prefix": rotated.key.prefix,
                    "old_key_expires_at": expires,
                });
                format!("{v}\n")
            } else {
                format!(
                    "Rotated API key {id} ({name:?}).\n\n    {plain}\n\n\
                     This is the only time the new key is shown: store it now.\n\
                     The old key keeps working until {expires}.\n",
                    name = rotated.key.name,
                    plain = rotated.secret,
                )
            }
        }
        KeysCommand::SetPermissions { id, permissions } => {
            let key = update(
                id,
                KeyUpdate {
                    permissions: Some(permissions.0),
                    ..Default::default()
                },
            )
            .await?;
            format!("Updated API key {id}.\n{}\n", permissions_text(&key))
        }
        KeysCommand::SetMetadata { id, metadata } => {
            let key = update(
                id,
                KeyUpdate {
                    metadata: Some(metadata.0),
                    ..Default::default()
                },
            )
            .await?;
            format!("Updated API key {id}.\nMetadata: {}\n", metadata_text(&key))
        }
        KeysCommand::SetIdentity { id, identity } => {
            let key = update(
                id,
                KeyUpdate {
                    identity_id: Some(identity.0),
                    ..Default::default()
                },
            )
            .await?;
            format!("Updated API key {id}.\nIdentity: {}.\n", identity_of(&key))
        }
    })
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn permissions_text(key: &ApiKey) -> String {
    if key.permissions.is_empty() {
        "Permissions: every route.".into()
    } else {
        format!("Permissions: {}.", key.permissions.join(", "))
    }
}

/// The key's identity as `keys show` and `keys list` print it.
fn identity_of(key: &ApiKey) -> String {
    key.identity
        .as_deref()
        .map(|i| i.id.to_string())
        .unwrap_or_else(|| "none".into())
}

fn metadata_text(key: &ApiKey) -> String {
    if key.metadata.is_empty() {
        "none".into()
    } else {
        serde_json::to_string(&key.metadata).expect("strings serialize")
    }
}

fn key_json(key: &ApiKey, default_pm: Option<u64>) -> serde_json::Value {
    json!({
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "status": key.status.as_str(),
        "expires_at": key.expires_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        "per_minute": key.limits().per_minute,
        "effective_per_minute": key.limits().per_minute.or(default_pm),
        "daily": key.limits().daily,
        "monthly": key.limits().monthly,
        "refund_5xx": key.limits().refund_5xx,
        "permissions": key.permissions,
        "metadata": key.metadata,
        "identity_id": key.identity.as_deref().map(|i| i.id),
        "old_prefix": key.old_secret.as_ref().map(|o| o.prefix.clone()),
        "old_key_expires_at": key.old_secret.as_ref().map(|o| rfc3339(o.expires_at)),
    })
}

fn limit_text(v: Option<u64>) -> String {
    v.map(|n| n.to_string())
        .unwrap_or_else(|| "unlimited".into())
}

fn per_minute_text(key: &ApiKey, default_pm: Option<u64>) -> String {
    match (key.limits().per_minute, default_pm) {
        (Some(n), _) => n.to_string(),
        (None, Some(d)) => format!("{d} (default)"),
        (None, None) => "unlimited".into(),
    }
}

fn limits_text(key: &ApiKey, default_pm: Option<u64>) -> String {
    format!(
        "Limits: per minute {}, daily {}, monthly {}.{}\n",
        per_minute_text(key, default_pm),
        limit_text(key.limits().daily),
        limit_text(key.limits().monthly),
        if key.limits().refund_5xx {
            " Quota of requests answered with 5xx is given back."
        } else {
            ""
        },
    )
}

fn show_text(key: &ApiKey, usage: Usage, default_pm: Option<u64>) -> String {
    let expires = key
        .expires_at
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| "never".into());
    format!(
        "id:          {}\nname:        {}\nprefix:      {}…\nstatus:      {}\nexpires:     {}\n\
         per minute:  {}\ndaily:       {} of {}\nmonthly:     {} of {}\ntotal:       {}\n\
         identity:    {}\npermissions: {}\nmetadata:    {}\n{}",
        key.id,
        key.name,
        key.prefix,
        key.status.as_str(),
        expires,
        per_minute_text(key, default_pm),
        usage.daily,
        limit_text(key.limits().daily),
        usage.monthly,
        limit_text(key.limits().monthly),
        usage.total,
        identity_of(key),
        if key.permissions.is_empty() {
            "every route".to_string()
        } else {
            key.permissions.join(", ")
        },
        metadata_text(key),
        match &key.old_secret {
            Some(o) => format!(
                "old secret:  {}… works until {}\n",
                o.prefix,
                rfc3339(o.expires_at)
            ),
            None => String::new(),
        },
    )
}

fn list_text(all: &[ApiKey], default_pm: Option<u64>) -> String {
    if all.is_empty() {
        return "No API keys yet: create one with `tollgate keys create --name NAME`.\n".into();
    }
    let mut out = format!(
        "{:>6}  {:<20}  {:<12}  {:<8}  {:>14}  {:>10}  {:>10}  {:>8}  {}\n",
        "ID", "NAME", "PREFIX", "STATUS", "PER MINUTE", "DAILY", "MONTHLY", "IDENTITY", "EXPIRES"
    );
    for k in all {
        out.push_str(&format!(
            "{:>6}  {:<20}  {:<12}  {:<8}  {:>14}  {:>10}  {:>10}  {:>8}  {}\n",
            k.id,
            k.name,
            k.prefix,
            k.status.as_str(),
            per_minute_text(k, default_pm),
            limit_text(k.limits().daily),
            limit_text(k.limits().monthly),
            identity_of(k),
            k.expires_at
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_else(|| "never".into()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse() {
        assert_eq!(parse_limit("100"), Ok(LimitValue(Some(100))));
        assert_eq!(parse_limit("unlimited"), Ok(LimitValue(None)));
        assert_eq!(parse_limit("NONE"), Ok(LimitValue(None)));
        assert!(parse_limit("0").unwrap_err().contains("revoke"));
        assert!(parse_limit("-3").is_err());
        assert!(parse_limit("lots").is_err());
        assert!(parse_limit("99999999999999999999").is_err());
    }

    #[test]
    fn cli_shape_is_the_contract() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "tollgate",
            "keys",
            "create",
            "--name",
            "a",
            "--per-minute",
            "5",
            "--daily",
            "unlimited",
            "--expires-at",
            "2027-01-01T00:00:00Z",
            "--json",
            "--config",
            "x.yaml",
        ])
        .unwrap();
        assert_eq!(cli.config, Some(PathBuf::from("x.yaml")));
        match cli.command {
            Command::Keys {
                command:
                    KeysCommand::Create {
                        limits,
                        json,
                        expires_at,
                        ..
                    },
            } => {
                assert!(json);
                assert_eq!(limits.per_minute, Some(LimitValue(Some(5))));
                assert_eq!(limits.daily, Some(LimitValue(None)));
                assert_eq!(limits.monthly, None);
                assert!(expires_at.is_some());
            }
            other => panic!("{other:?}"),
        }
        for args in [
            &["tollgate", "serve", "--config", "f"][..],
            &["tollgate", "migrate"],
            &["tollgate", "check-config"],
            &["tollgate", "keys", "list", "--json"],
            &["tollgate", "keys", "show", "3", "--json"],
            &["tollgate", "keys", "revoke", "3"],
            &["tollgate", "keys", "set-limits", "3", "--monthly", "9"],
            &["tollgate", "keys", "list", "--identity", "2"],
            &["tollgate", "keys", "set-identity", "3", "2"],
            &["tollgate", "keys", "set-identity", "3", "none"],
            &["tollgate", "usage"],
            &[
                "tollgate", "usage", "--key", "3", "--days", "30", "--top", "5", "--json",
            ],
            &["tollgate", "usage", "--identity", "2", "--key", "3"],
            &[
                "tollgate",
                "usage",
                "--since",
                "2026-01-01",
                "--until",
                "2026-01-31",
            ],
        ] {
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        assert!(Cli::try_parse_from(["tollgate", "keys", "create"]).is_err());
        for bad in ["0", "-1", "x", ""] {
            assert!(Cli::try_parse_from(["tollgate", "keys", "set-identity", "3", bad]).is_err());
        }
        assert!(Cli::try_parse_from(["tollgate", "usage", "--days", "0"]).is_err());
        assert!(Cli::try_parse_from(["tollgate", "usage", "--since", "yesterday"]).is_err());
        assert!(
            Cli::try_parse_from([
                "tollgate",
                "keys",
                "create",
                "--name",
                "a",
                "--expires-at",
                "tomorrow"
            ])
            .is_err()
        );
    }

    /// Days at the very ends of the calendar are refused with a message, not a panic.
    #[tokio::test]
    async fn usage_refuses_days_off_the_calendar() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::DatabaseConfig {
            url: crate::config::SecretUrl(format!("sqlite://{}/u.db", dir.path().display())),
            ..Default::default()
        };
        let stores = crate::store::open(&config, true).await.unwrap();
        let usage = |args: &[&str]| {
            let mut all = vec!["tollgate", "usage"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all).unwrap().command {
                Command::Usage(args) => args,
                other => panic!("{other:?}"),
            }
        };
        let max = chrono::NaiveDate::MAX.to_string();
        let e = run_usage(usage(&["--until", &max]), &stores, Utc::now())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("--until"), "{e}");
        let until_min = format!("--until={}", chrono::NaiveDate::MIN);
        let e = run_usage(usage(&[&until_min, "--days", "3"]), &stores, Utc::now())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("--days"), "{e}");
        stores.close().await;
    }
}
