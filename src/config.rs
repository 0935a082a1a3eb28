//! Configuration: one YAML file, every setting overridable by an environment variable.
//!
//! A setting at path `a.b_c` is overridden by `TOLLGATE_A_B_C`. The list of settings, and so of
//! variables, comes from the defaults themselves, so a new setting gets its variable for free.
//! An unknown key in the file is an error; an unknown `TOLLGATE_…` variable only a warning, since
//! Kubernetes injects `TOLLGATE_PORT`, `TOLLGATE_SERVICE_HOST`, … for a Service named tollgate.
//! Everything is checked at start; an error names the file (or variable) and the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::limiter::Algorithm;
pub use crate::limiter::RedisConfig;
pub use crate::setting::{Dur, FailureMode, InvalidSetting, SecretUrl, error_chain, redact_url};
pub use crate::tls::GrpcTlsConfig;

/// Environment variable prefix.
pub const ENV_PREFIX: &str = "TOLLGATE_";
/// Environment variable naming the config file, when `--config` is not given.
pub const ENV_CONFIG_FILE: &str = "TOLLGATE_CONFIG";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where ext_authz Check and gRPC health are served.
    pub grpc_addr: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub http_addr: SocketAddr,
    /// Where the admin API (gRPC and REST/JSON) is served; `null`: nowhere. Never the port Envoy
    /// calls.
    pub admin_addr: Option<SocketAddr>,
    /// Who may call the admin API.
    pub admin: AdminConfig,
    /// How the gRPC port treats its connections.
    pub grpc: GrpcConfig,
    /// TLS (and mTLS) on the gRPC port; unset, it is plaintext.
    pub grpc_tls: GrpcTlsConfig,
    /// Keys, usage quotas and the request log.
    pub database: DatabaseConfig,
    /// Per-minute windows; without a URL they are counted in this process.
    pub redis: RedisConfig,
    pub authz: AuthzConfig,
    pub ratelimit: RateLimitConfig,
    pub limits: LimitsConfig,
    pub quota: QuotaConfig,
    pub cache: CacheConfig,
    pub request_log: RequestLogConfig,
    pub log: LogConfig,
    /// After SIGTERM, how long tollgate keeps answering while its health checks already say
    /// NOT_SERVING, so load balancers and Envoy's health checks move away first.
    pub shutdown_delay: Dur,
    /// How long shutdown waits for in-flight checks and the log flush.
    pub shutdown_timeout: Dur,
    /// Things worth telling the operator that did not stop the load (unknown variables).
    #[serde(skip)]
    pub warnings: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:8081".parse().expect("literal"),
            http_addr: "127.0.0.1:9090".parse().expect("literal"),
            admin_addr: None,
            admin: AdminConfig::default(),
            grpc: GrpcConfig::default(),
            grpc_tls: GrpcTlsConfig::default(),
            database: DatabaseConfig::default(),
            redis: RedisConfig::default(),
            authz: AuthzConfig::default(),
            ratelimit: RateLimitConfig::default(),
            limits: LimitsConfig::default(),
            quota: QuotaConfig::default(),
            cache: CacheConfig::default(),
            request_log: RequestLogConfig::default(),
            log: LogConfig::default(),
            shutdown_delay: Dur(Duration::ZERO),
            shutdown_timeout: Dur(Duration::from_secs(10)),
            warnings: Vec::new(),
        }
    }
}

/// The admin API's credentials.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// SHA-256 (hex) of each bearer token that may call the admin API; several, so a token can
    /// be replaced without a moment when neither works. The tokens themselves are never
    /// configured. Empty: on a loopback `admin_addr`, anyone who can reach it may call; elsewhere
    /// a configuration error.
    pub token_sha256: Vec<String>,
    /// Subject alternative names (URI, such as a SPIFFE ID, or DNS) of client certificates that
    /// may call the admin API. The certificate must chain to `grpc_tls.client_ca_file`; the admin
    /// port then speaks TLS with the gRPC port's certificate. A caller needs a listed certificate
    /// or a configured token, either one. Separate from `grpc_tls.allowed_client_sans`: being
    /// allowed to call Check does not make a client an administrator.
    pub client_sans: Vec<String>,
}

impl AdminConfig {
    /// The configured token hashes, as bytes (call after [`AdminConfig::validate`]).
    pub fn token_hashes(&self) -> Vec<[u8; 32]> {
        self.token_sha256
            .iter()
            .filter_map(|h| crate::keys::parse_hash_hex(&h.to_ascii_lowercase()))
            .collect()
    }

    /// Checks the settings; `tls` is the gRPC port's, whose certificate and client CA the admin
    /// port uses.
    pub fn validate(
        &self,
        admin_addr: Option<SocketAddr>,
        tls: &GrpcTlsConfig,
    ) -> Result<(), InvalidSetting> {
        for (i, h) in self.token_sha256.iter().enumerate() {
            if crate::keys::parse_hash_hex(&h.to_ascii_lowercase()).is_none() {
                return Err(InvalidSetting::new(
                    format!("admin.token_sha256[{i}]"),
                    "not a SHA-256 in hex (64 hex digits): configure the token's hash, e.g. \
                     from `printf %s \"$TOKEN\" | sha256sum`, never the token",
                ));
            }
        }
        for (i, san) in self.client_sans.iter().enumerate() {
            if let Err(why) = crate::tls::check_san(san) {
                return Err(InvalidSetting::new(
                    format!("admin.client_sans[{i}]"),
                    format!("{san:?} {why}"),
                ));
            }
        }
        if !self.client_sans.is_empty() && tls.client_ca_file.is_none() {
            return Err(InvalidSetting::new(
                "admin.client_sans",
                "needs grpc_tls.cert_file, grpc_tls.key_file and grpc_tls.client_ca_file: the \
                 admin port checks client certificates in a TLS handshake, with the gRPC port's \
                 certificate and client CA",
            ));
        }
        if let Some(addr) = admin_addr
            && !addr.ip().is_loopback()
            && self.is_open()
        {
            return Err(InvalidSetting::new(
                "admin.token_sha256",
                format!(
                    "empty while admin_addr {addr} is not on loopback and admin.client_sans is \
                     empty too: anyone who reaches it could manage every key; configure at least \
                     one token's SHA-256 (TOLLGATE_ADMIN_TOKEN_SHA256) or client certificate SAN \
                     (TOLLGATE_ADMIN_CLIENT_SANS)"
                ),
            ));
        }
        Ok(())
    }

    /// Whether the admin API at `admin_addr` takes calls without credentials (loopback, no
    /// token and no client certificate SAN configured).
    pub fn is_open(&self) -> bool {
        self.token_sha256.is_empty() && self.client_sans.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (created when missing) or `postgres://USER:PASSWORD@HOST:PORT/DB`.
    pub url: SecretUrl,
    /// Quotas when the database cannot be reached. Keys already verified keep working from the
    /// cache either way.
    pub failure_mode: FailureMode,
    /// PostgreSQL connections per replica.
    pub max_connections: u32,
    /// Longest a check waits on the database: for a connection, and for a statement.
    pub timeout: Dur,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl("sqlite://tollgate.db".into()),
            failure_mode: FailureMode::Closed,
            max_connections: 16,
            timeout: Dur(Duration::from_secs(2)),
        }
    }
}

impl DatabaseConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let url = self.url.expose();
        if !["sqlite:", "postgres://", "postgresql://"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            return Err(InvalidSetting::new(
                "database.url",
                format!(
                    "{} is not supported: use sqlite://PATH or postgres://USER@HOST/DB",
                    redact_url(url)
                ),
            ));
        }
        if self.max_connections == 0 {
            return Err(InvalidSetting::new(
                "database.max_connections",
                "must be at least 1",
            ));
        }
        if self.timeout.0.is_zero() {
            return Err(InvalidSetting::new(
                "database.timeout",
                "must be longer than 0",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthzConfig {
    /// Request headers that may carry the key, tried in order (lower case).
    pub key_headers: Vec<String>,
    /// Also accept `Authorization: Bearer <key>`.
    pub bearer: bool,
    /// Remove the header that carried the key before the request goes upstream.
    pub hide_credentials: bool,
    /// Header set on allowed requests, for the upstream, with the key's id.
    pub key_id_header: String,
    /// Enforce keys' per-minute limits in Check. Switch off when Envoy's ratelimit filter
    /// enforces them instead.
    pub rate_limit: bool,
    /// Key metadata fields sent upstream on allowed requests, each as an `x-tollgate-<field>`
    /// header (replacing whatever the client sent under that name; removed when the key has no
    /// such field).
    pub metadata_headers: Vec<String>,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        Self {
            key_headers: vec!["x-api-key".into()],
            bearer: true,
            hide_credentials: false,
            key_id_header: "x-tollgate-key-id".into(),
            rate_limit: true,
            metadata_headers: Vec::new(),
        }
    }
}

impl AuthzConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.key_headers.is_empty() && !self.bearer {
            return Err(InvalidSetting::new(
                "authz.key_headers",
                "empty while authz.bearer is false: no header could carry a key",
            ));
        }
        for (i, h) in self.key_headers.iter().enumerate() {
            if !is_header_name(h) {
                return Err(InvalidSetting::new(
                    format!("authz.key_headers[{i}]"),
                    format!("{h:?} is not a lower-case HTTP header name"),
                ));
            }
        }
        for (i, field) in self.metadata_headers.iter().enumerate() {
            if !crate::admin::service::is_metadata_name(field) {
                return Err(InvalidSetting::new(
                    format!("authz.metadata_headers[{i}]"),
                    format!(
                        "{field:?} is not a key metadata field name (1 to 32 of a-z, 0-9, '_', \
                         '-', starting with a letter)"
                    ),
                ));
            }
        }
        if !is_header_name(&self.key_id_header) {
            return Err(InvalidSetting::new(
                "authz.key_id_header",
                format!(
                    "{:?} is not a lower-case HTTP header name",
                    self.key_id_header
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Per-minute limit of keys that have none of their own; unset = unlimited.
    pub default_per_minute: Option<u64>,
    /// How per-minute limits are counted: `fixed_window`, `sliding_window` or `token_bucket`.
    pub algorithm: Algorithm,
    /// Without Redis: the most window counters (of keys and of rate limit descriptors) kept in
    /// this process. Past it the least recently used counter is dropped, and starts from zero
    /// if it comes back; so set it above the number of counters in use at once.
    pub max_counters: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            default_per_minute: None,
            algorithm: Algorithm::default(),
            max_counters: crate::limiter::memory::DEFAULT_MAX_COUNTERS,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.default_per_minute == Some(0) {
            return Err(InvalidSetting::new(
                "limits.default_per_minute",
                "must be at least 1 (leave unset for unlimited)",
            ));
        }
        if self.max_counters == 0 {
            return Err(InvalidSetting::new(
                "limits.max_counters",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// A rules file, or a directory of them, in envoyproxy/ratelimit's format. Unset: only
    /// descriptors that name an API key are limited.
    pub rules: Option<PathBuf>,
    /// Count everything but answer OK to every request (global shadow mode).
    pub shadow_mode: bool,
    /// How rules without an `algorithm` of their own count hits.
    pub algorithm: crate::limiter::Algorithm,
    /// How often the rules are checked for changes (SIGHUP reloads at once).
    pub watch_interval: Dur,
    /// Let several rules files define one domain, their top-level descriptors merged
    /// (envoyproxy/ratelimit's `MERGE_DOMAIN_CONFIG`). Off: a domain defined twice is an error.
    pub merge_domains: bool,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            rules: None,
            shadow_mode: false,
            algorithm: crate::limiter::Algorithm::FixedWindow,
            watch_interval: Dur(Duration::from_secs(1)),
            merge_domains: false,
        }
    }
}

impl RateLimitConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.watch_interval.0.is_zero() {
            return Err(InvalidSetting::new(
                "ratelimit.watch_interval",
                "must be longer than 0",
            ));
        }
        Ok(())
    }
}

/// How daily and monthly quotas are spent.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QuotaMode {
    /// One conditional UPDATE per request: counters are exact at every moment.
    Exact,
    /// Blocks reserved with the same UPDATE and spent in memory; unused units go back every
    /// `flush_interval`. Never admits more than the limit.
    Batched,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    pub mode: QuotaMode,
    /// Batched: the largest block a replica reserves for one key.
    pub max_block: u64,
    /// Batched: how often unused units are given back (at most 1s).
    pub flush_interval: Dur,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            mode: QuotaMode::Exact,
            max_block: 100,
            flush_interval: Dur(Duration::from_millis(500)),
        }
    }
}

impl QuotaConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.max_block == 0 {
            return Err(InvalidSetting::new("quota.max_block", "must be at least 1"));
        }
        if self.flush_interval.0.is_zero() || self.flush_interval.0 > Duration::from_secs(1) {
            return Err(InvalidSetting::new(
                "quota.flush_interval",
                "must be longer than 0 and at most 1s, so counters show real use within a second",
            ));
        }
        Ok(())
    }
}

/// The gRPC server's connection settings, as Envoy's own upstreams have them: keepalive so a
/// dead Envoy connection is noticed, bounds on streams and message size, and an age after which
/// a connection is closed gracefully, so the Envoys of a shared service spread over new replicas.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// An HTTP/2 PING on a connection this long idle; `null` sends none.
    pub keepalive_interval: Option<Dur>,
    /// A connection whose PING is not answered this long is closed.
    pub keepalive_timeout: Dur,
    /// Streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// The largest request message; larger ones are refused with OUT_OF_RANGE.
    pub max_message_bytes: usize,
    /// Connections older than this are closed gracefully (GOAWAY; calls in flight get
    /// `shutdown_timeout` to finish) and the client reconnects; `null` keeps them.
    pub max_connection_age: Option<Dur>,
    /// Threads that serve the port's connections, each a whole connection on one core
    /// (`grpc::serving`); `0`: none, the main runtime serves them; `null`: one per core the
    /// process may use.
    pub serving_threads: Option<usize>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            keepalive_interval: Some(Dur(Duration::from_secs(30))),
            keepalive_timeout: Dur(Duration::from_secs(10)),
            max_concurrent_streams: 1024,
            max_message_bytes: 4 << 20,
            max_connection_age: None,
            serving_threads: Some(0),
        }
    }
}

impl GrpcConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.keepalive_interval.is_some_and(|d| d.0.is_zero()) {
            return Err(InvalidSetting::new(
                "grpc.keepalive_interval",
                "must be longer than 0 (null sends no PINGs)",
            ));
        }
        if self.keepalive_timeout.0.is_zero() {
            return Err(InvalidSetting::new(
                "grpc.keepalive_timeout",
                "must be longer than 0",
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err(InvalidSetting::new(
                "grpc.max_concurrent_streams",
                "must be at least 1",
            ));
        }
        if !(1024..=64 << 20).contains(&self.max_message_bytes) {
            return Err(InvalidSetting::new(
                "grpc.max_message_bytes",
                "must be between 1024 and 67108864 (64 MiB)",
            ));
        }
        if self.max_connection_age.is_some_and(|d| d.0.is_zero()) {
            return Err(InvalidSetting::new(
                "grpc.max_connection_age",
                "must be longer than 0 (null keeps connections)",
            ));
        }
        if self
            .serving_threads
            .is_some_and(|n| n > crate::grpc::serving::MAX_LANES)
        {
            return Err(InvalidSetting::new(
                "grpc.serving_threads",
                "must be at most 256 (0: none, the main runtime serves; null: one per core)",
            ));
        }
        Ok(())
    }

    /// The serving threads to start: as set, or one per core this process may use (its CPU
    /// quota counted, where the platform tells it).
    pub fn serving_threads(&self) -> usize {
        self.serving_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get().min(crate::grpc::serving::MAX_LANES))
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a verified key is used without asking the database again.
    pub key_ttl: Dur,
    /// How long an unknown key is remembered as unknown.
    pub negative_ttl: Dur,
    /// How often the database is asked which keys changed (revoked, limits set, created).
    pub poll_interval: Dur,
    /// Most verified keys kept in memory (and as many again looked up by id); past that, the
    /// least recently used go.
    pub max_keys: usize,
    /// Most unknown keys remembered as unknown (and as many again by id), apart from
    /// `max_keys`: a flood of random keys pushes out only other unknown keys.
    pub max_unknown: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            key_ttl: Dur(Duration::from_secs(60)),
            negative_ttl: Dur(Duration::from_secs(5)),
            poll_interval: Dur(Duration::from_millis(250)),
            max_keys: 100_000,
            max_unknown: 100_000,
        }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.poll_interval.0.is_zero() {
            return Err(InvalidSetting::new(
                "cache.poll_interval",
                "must be longer than 0",
            ));
        }
        if self.poll_interval.0 > Duration::from_secs(1) {
            return Err(InvalidSetting::new(
                "cache.poll_interval",
                "must be at most 1s, or key changes would take longer than 1s to apply",
            ));
        }
        for (field, value) in [
            ("cache.max_keys", self.max_keys),
            ("cache.max_unknown", self.max_unknown),
        ] {
            if value == 0 {
                return Err(InvalidSetting::new(field, "must be at least 1"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RequestLogConfig {
    pub enabled: bool,
    /// Rows waiting to be written; past this, rows are dropped and counted.
    pub queue_capacity: usize,
    /// Rows per write.
    pub batch_size: usize,
    /// Longest a row waits before a write.
    pub flush_interval: Dur,
    /// How long rows are kept (PostgreSQL: whole months are dropped once they are all older);
    /// `null` keeps everything.
    pub retention: Option<Dur>,
}

impl Default for RequestLogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            queue_capacity: 65_536,
            batch_size: 1_000,
            flush_interval: Dur(Duration::from_millis(500)),
            retention: Some(Dur(Duration::from_secs(90 * 86_400))),
        }
    }
}

impl RequestLogConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.flush_interval.0.is_zero() {
            return Err(InvalidSetting::new(
                "request_log.flush_interval",
                "must be longer than 0",
            ));
        }
        // The queue holds rows in memory: a bound that memory can hold (a row is a few hundred
        // bytes), and batches no larger than one statement should carry.
        if !(1..=1_000_000).contains(&self.queue_capacity) {
            return Err(InvalidSetting::new(
                "request_log.queue_capacity",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=65_536).contains(&self.batch_size) {
            return Err(InvalidSetting::new(
                "request_log.batch_size",
                "must be between 1 and 65536",
            ));
        }
        if let Some(retention) = self.retention
            && !(Duration::from_secs(3600)..=Duration::from_secs(100 * 366 * 86_400))
                .contains(&retention.0)
        {
            return Err(InvalidSetting::new(
                "request_log.retention",
                "must be between 1h and 100years (null keeps every row)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `tollgate=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            return Err(InvalidSetting::new(
                "log.level",
                format!("{:?}: {e}", self.level),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration problem: where, which field, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration in {source_name}: {field}: {message}")]
pub struct ConfigError {
    pub source_name: String,
    pub field: String,
    pub message: String,
}

impl Config {
    /// Reads the file (if any), applies `TOLLGATE_*` overrides from `env`, and validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let source_name = file
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "defaults".into());
        let mut tree = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    source_name: source_name.clone(),
                    field: "(file)".into(),
                    message: format!("cannot read: {e}"),
                })?;
                let value: Value = serde_yaml::from_str(&text).map_err(|e| ConfigError {
                    source_name: source_name.clone(),
                    field: e
                        .location()
                        .map(|l| format!("line {} column {}", l.line(), l.column()))
                        .unwrap_or_else(|| "(file)".into()),
                    message: e.to_string(),
                })?;
                if value.is_null() {
                    Value::Mapping(Default::default())
                } else {
                    value
                }
            }
            None => Value::Mapping(Default::default()),
        };
        let file_config = Self::from_tree(tree.clone(), &source_name)?;
        let unknown = apply_env(&mut tree, env, &file_config);
        let mut config =
            Self::from_tree(tree, &format!("{source_name} with TOLLGATE_* overrides"))?;
        config.validate(&source_name)?;
        config.warnings = unknown
            .into_iter()
            .map(|name| format!("environment variable {name} is not a tollgate setting; ignored"))
            .collect();
        Ok(config)
    }

    /// Reads the file named by `--config` or `TOLLGATE_CONFIG`, with the process environment.
    pub fn from_process(file: Option<PathBuf>) -> Result<Config, ConfigError> {
        let file = file.or_else(|| std::env::var_os(ENV_CONFIG_FILE).map(PathBuf::from));
        Self::load(file.as_deref(), std::env::vars())
    }

    fn from_tree(tree: Value, source_name: &str) -> Result<Config, ConfigError> {
        serde_path_to_error::deserialize(tree).map_err(|e| ConfigError {
            source_name: source_name.to_string(),
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }

    /// Checks every subsystem's settings, each with its own `validate`; the first problem found
    /// is the error, named after the file (or variable) it came from.
    fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let each = || -> Result<(), InvalidSetting> {
            self.admin.validate(self.admin_addr, &self.grpc_tls)?;
            self.grpc.validate()?;
            self.grpc_tls.validate()?;
            self.database.validate()?;
            self.redis.validate()?;
            self.authz.validate()?;
            self.limits.validate()?;
            self.ratelimit.validate()?;
            self.cache.validate()?;
            self.request_log.validate()?;
            self.quota.validate()?;
            self.log.validate()
        };
        each().map_err(|e| ConfigError {
            source_name: source_name.to_string(),
            field: e.field,
            message: e.message,
        })
    }
}

fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b))
}

/// Every setting's path, from the defaults' own shape: `[("grpc_addr"), ("authz", "bearer"), …]`.
fn setting_paths(tree: &Value, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, Value)>) {
    match tree {
        Value::Mapping(map) => {
            for (k, v) in map {
                let Some(k) = k.as_str() else { continue };
                prefix.push(k.to_string());
                setting_paths(v, prefix, out);
                prefix.pop();
            }
        }
        leaf => out.push((prefix.clone(), leaf.clone())),
    }
}

/// Applies the overrides; returns the names of `TOLLGATE_*` variables that match no setting.
fn apply_env(
    tree: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
    current: &Config,
) -> Vec<String> {
    let mut unknown = Vec::new();
    let shape = serde_yaml::to_value(current).expect("config serialises");
    let mut paths = Vec::new();
    setting_paths(&shape, &mut Vec::new(), &mut paths);
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != ENV_CONFIG_FILE)
        .collect();
    env.sort();
    for (name, raw) in env {
        let Some((path, shape_leaf)) = paths
            .iter()
            .find(|(p, _)| format!("{ENV_PREFIX}{}", p.join("_").to_uppercase()) == name)
        else {
            unknown.push(name);
            continue;
        };
        let value = match shape_leaf {
            Value::Sequence(_) => Value::Sequence(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_string()))
                    .collect(),
            ),
            Value::String(_) => Value::String(raw.clone()),
            _ if raw.trim().is_empty() => Value::Null,
            _ => serde_yaml::from_str(&raw).unwrap_or(Value::String(raw.clone())),
        };
        set_path(tree, path, value);
    }
    unknown
}

fn set_path(tree: &mut Value, path: &[String], value: Value) {
    let mut node = tree;
    for (i, part) in path.iter().enumerate() {
        if !node.is_mapping() {
            *node = Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().expect("mapping");
        let key = Value::String(part.clone());
        if i == path.len() - 1 {
            map.insert(key, value);
            return;
        }
        node = map.entry(key).or_insert(Value::Mapping(Default::default()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_yaml(yaml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(yaml.as_bytes()).unwrap();
        Config::load(
            Some(f.path()),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::load(None, []).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:9090");
        assert_eq!(c.database.url.expose(), "sqlite://tollgate.db");
    }

    #[test]
    fn file_values_and_env_overrides() {
        let c = load_yaml(
            "grpc_addr: 127.0.0.1:7000\nauthz:\n  hide_credentials: true\ncache:\n  key_ttl: 2m\n",
            &[
                ("TOLLGATE_HTTP_ADDR", "0.0.0.0:9999"),
                ("TOLLGATE_AUTHZ_KEY_HEADERS", "x-key, x-api-key"),
                ("TOLLGATE_LIMITS_DEFAULT_PER_MINUTE", "120"),
                ("TOLLGATE_AUTHZ_RATE_LIMIT", "false"),
                ("TOLLGATE_DATABASE_URL", "sqlite:///tmp/t.db"),
                ("TOLLGATE_DATABASE_FAILURE_MODE", "open"),
                ("TOLLGATE_CONFIG", "ignored.yaml"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:7000");
        assert_eq!(c.http_addr.to_string(), "0.0.0.0:9999");
        assert!(c.authz.hide_credentials);
        assert!(!c.authz.rate_limit);
        assert_eq!(c.authz.key_headers, vec!["x-key", "x-api-key"]);
        assert_eq!(c.limits.default_per_minute, Some(120));
        assert_eq!(c.cache.key_ttl.0, Duration::from_secs(120));
        assert_eq!(c.database.url.expose(), "sqlite:///tmp/t.db");
        assert_eq!(c.database.failure_mode, FailureMode::Open);
    }

    #[test]
    fn merge_domains_from_file_or_env() {
        assert!(!Config::default().ratelimit.merge_domains);
        let c = load_yaml("ratelimit:\n  merge_domains: true\n", &[]).unwrap();
        assert!(c.ratelimit.merge_domains);
        let c = load_yaml("", &[("TOLLGATE_RATELIMIT_MERGE_DOMAINS", "true")]).unwrap();
        assert!(c.ratelimit.merge_domains);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let e = load_yaml("", &[("TOLLGATE_RATELIMIT_MERGE_DOMAINS", "sometimes")]).unwrap_err();
        assert!(e.to_string().contains("merge_domains"), "{e}");
    }

    #[test]
    fn redis_settings() {
        let c = load_yaml(
            "redis:\n  url: redis+cluster://10.0.0.1:7000,10.0.0.2:7000\n  timeout: 250ms\n",
            &[
                ("TOLLGATE_REDIS_URL", "redis://:pw@cache:6379/2"),
                ("TOLLGATE_REDIS_KEY_PREFIX", "tg:"),
                ("TOLLGATE_LIMITS_ALGORITHM", "sliding_window"),
                ("TOLLGATE_LIMITS_MAX_COUNTERS", "5000"),
            ],
        )
        .unwrap();
        assert_eq!(c.limits.max_counters, 5000);
        assert_eq!(Config::default().limits.max_counters, 100_000);
        assert_eq!(
            c.redis.url.as_ref().map(SecretUrl::expose),
            Some("redis://:pw@cache:6379/2")
        );
        assert_eq!(c.redis.timeout.0, Duration::from_millis(250));
        assert_eq!(c.redis.key_prefix, "tg:");
        assert_eq!(c.limits.algorithm, Algorithm::SlidingWindow);
        let c = load_yaml("redis:\n  url: redis+cluster://a:7000,b:7001\n", &[]).unwrap();
        assert!(c.redis.url.is_some());
        assert_eq!(
            Config::default().redis.timeout.0,
            Duration::from_millis(100)
        );
        assert_eq!(Config::default().limits.algorithm, Algorithm::FixedWindow);
    }

    #[test]
    fn unknown_field_is_named() {
        let e = load_yaml("authz:\n  hide_credential: true\n", &[]).unwrap_err();
        assert_eq!(e.field, "authz.hide_credential");
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(
            e.to_string().contains(".yaml") || e.to_string().contains("tmp"),
            "{e}"
        );
    }

    #[test]
    fn request_log_bounds_are_named() {
        for (yaml, field) in [
            ("request_log:\n  retention: 0s\n", "request_log.retention"),
            (
                "request_log:\n  retention: 1000000years\n",
                "request_log.retention",
            ),
            (
                "request_log:\n  queue_capacity: 100000000000\n",
                "request_log.queue_capacity",
            ),
            (
                "request_log:\n  batch_size: 10000000000\n",
                "request_log.batch_size",
            ),
        ] {
            let e = load_yaml(yaml, &[]).unwrap_err();
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
        let c = load_yaml("request_log:\n  retention: null\n", &[]).unwrap();
        assert_eq!(c.request_log.retention, None);
    }

    #[test]
    fn bad_values_are_named() {
        let e = load_yaml("grpc_addr: nowhere\n", &[]).unwrap_err();
        assert_eq!(e.field, "grpc_addr");
        let e = load_yaml("cache:\n  key_ttl: soon\n", &[]).unwrap_err();
        assert_eq!(e.field, "cache.key_ttl");
        assert!(e.message.contains("soon"), "{e}");
        let e = load_yaml("authz:\n  key_headers: [X-Api-Key]\n", &[]).unwrap_err();
        assert_eq!(e.field, "authz.key_headers[0]");
        let e = load_yaml("limits:\n  default_per_minute: 0\n", &[]).unwrap_err();
        assert_eq!(e.field, "limits.default_per_minute");
        let e = load_yaml("log:\n  format: xml\n", &[]).unwrap_err();
        assert_eq!(e.field, "log.format");
        let e = load_yaml("database:\n  url: mysql://x\n", &[]).unwrap_err();
        assert_eq!(e.field, "database.url");
        let e = load_yaml("redis:\n  failure_mode: sometimes\n", &[]).unwrap_err();
        assert_eq!(e.field, "redis.failure_mode");
        let e = load_yaml("redis:\n  url: http://cache:6379\n", &[]).unwrap_err();
        assert_eq!(e.field, "redis.url");
        assert!(e.message.contains("redis+cluster://"), "{e}");
        let e = load_yaml("redis:\n  timeout: 0s\n", &[]).unwrap_err();
        assert_eq!(e.field, "redis.timeout");
        let e = load_yaml("redis:\n  key_prefix: \"t{1}:\"\n", &[]).unwrap_err();
        assert_eq!(e.field, "redis.key_prefix");
        let e = load_yaml("limits:\n  algorithm: leaky\n", &[]).unwrap_err();
        assert_eq!(e.field, "limits.algorithm");
        let e = load_yaml("limits:\n  max_counters: 0\n", &[]).unwrap_err();
        assert_eq!(e.field, "limits.max_counters");
        assert_eq!(e.message, "must be at least 1");
        let e = load_yaml("", &[("TOLLGATE_LIMITS_MAX_COUNTERS", "0")]).unwrap_err();
        assert_eq!(e.field, "limits.max_counters");
    }

    #[test]
    fn each_subsystem_validates_itself() {
        let field = |r: Result<(), InvalidSetting>| r.unwrap_err().field;
        assert_eq!(
            field(
                DatabaseConfig {
                    max_connections: 0,
                    ..Default::default()
                }
                .validate()
            ),
            "database.max_connections"
        );
        assert_eq!(
            field(
                CacheConfig {
                    poll_interval: Dur(Duration::from_secs(2)),
                    ..Default::default()
                }
                .validate()
            ),
            "cache.poll_interval"
        );
        for (yaml, field) in [
            ("cache:\n  max_keys: 0\n", "cache.max_keys"),
            ("cache:\n  max_unknown: 0\n", "cache.max_unknown"),
        ] {
            let e = load_yaml(yaml, &[]).unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.message.as_str()),
                (field, "must be at least 1")
            );
        }
        assert_eq!(
            field(
                RequestLogConfig {
                    batch_size: 0,
                    ..Default::default()
                }
                .validate()
            ),
            "request_log.batch_size"
        );
        assert_eq!(
            field(
                AuthzConfig {
                    key_headers: Vec::new(),
                    bearer: false,
                    ..Default::default()
                }
                .validate()
            ),
            "authz.key_headers"
        );
        assert_eq!(
            field(
                QuotaConfig {
                    flush_interval: Dur(Duration::from_secs(2)),
                    ..Default::default()
                }
                .validate()
            ),
            "quota.flush_interval"
        );
        let e = load_yaml("quota:\n  max_block: 0\n", &[]).unwrap_err();
        assert_eq!(e.field, "quota.max_block");
        assert_eq!(e.message, "must be at least 1");
        Config::default().redis.validate().unwrap();
        Config::default().log.validate().unwrap();
    }

    /// The README's configuration reference names every setting, with its `TOLLGATE_*` name.
    #[test]
    fn the_readme_names_every_setting_and_its_variable() {
        let readme = include_str!("../README.md");
        let shape = serde_yaml::to_value(Config::default()).unwrap();
        let mut paths = Vec::new();
        setting_paths(&shape, &mut Vec::new(), &mut paths);
        let missing: Vec<String> = paths
            .iter()
            .filter_map(|(p, _)| {
                let dotted = p.join(".");
                let env = format!("{ENV_PREFIX}{}", p.join("_").to_uppercase());
                (!readme.contains(&format!("`{dotted}`")) || !readme.contains(&env))
                    .then(|| format!("{dotted} ({env})"))
            })
            .collect();
        assert!(missing.is_empty(), "not in README.md: {missing:?}");
    }

    #[test]
    fn unknown_env_is_a_warning_and_bad_env_an_error() {
        let c = load_yaml(
            "",
            &[
                ("TOLLGATE_GRPC_ADRR", "1"),
                ("TOLLGATE_PORT", "tcp://10.0.0.1:8081"),
            ],
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 2);
        assert!(
            c.warnings[0].contains("TOLLGATE_GRPC_ADRR"),
            "{:?}",
            c.warnings
        );
        let e = load_yaml("", &[("TOLLGATE_REQUEST_LOG_BATCH_SIZE", "many")]).unwrap_err();
        assert_eq!(e.field, "request_log.batch_size");
        assert!(e.source_name.contains("TOLLGATE_"), "{e}");
    }

    #[test]
    fn admin_settings() {
        let c = Config::load(None, []).unwrap();
        assert_eq!(c.admin_addr, None);
        let token = "0".repeat(64);
        let other = "AB".repeat(32);
        let c = load_yaml(
            "",
            &[
                ("TOLLGATE_ADMIN_ADDR", "0.0.0.0:9443"),
                ("TOLLGATE_ADMIN_TOKEN_SHA256", &format!("{token}, {other}")),
            ],
        )
        .unwrap();
        assert_eq!(c.admin_addr, Some("0.0.0.0:9443".parse().unwrap()));
        assert_eq!(c.admin.token_sha256, vec![token.clone(), other.clone()]);
        assert_eq!(c.admin.token_hashes(), vec![[0; 32], [0xab; 32]]);
        // Loopback without tokens is allowed (the embedded start), anywhere else it is not.
        let c = load_yaml("admin_addr: 127.0.0.1:9443\n", &[]).unwrap();
        assert!(c.admin.is_open());
        load_yaml("admin_addr: \"[::1]:9443\"\n", &[]).unwrap();
        let e = load_yaml("admin_addr: 0.0.0.0:9443\n", &[]).unwrap_err();
        assert_eq!(e.field, "admin.token_sha256");
        assert!(e.message.contains("0.0.0.0:9443"), "{e}");
        let e = load_yaml("", &[("TOLLGATE_ADMIN_ADDR", "10.1.2.3:9443")]).unwrap_err();
        assert_eq!(e.field, "admin.token_sha256");
        let e = load_yaml("admin:\n  token_sha256: [s3cr3t-token]\n", &[]).unwrap_err();
        assert_eq!(e.field, "admin.token_sha256[0]");
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
        let e = load_yaml("admin_addr: somewhere\n", &[]).unwrap_err();
        assert_eq!(e.field, "admin_addr");
    }

    #[test]
    fn admin_client_sans_count_as_credentials_and_need_the_client_ca() {
        let tls = "grpc_tls:\n  cert_file: c.pem\n  key_file: k.pem\n  client_ca_file: ca.pem\n";
        let portal = "spiffe://cluster.local/ns/portal/sa/portal";
        // Off loopback, a SAN list alone is authentication enough.
        let c = load_yaml(
            tls,
            &[
                ("TOLLGATE_ADMIN_ADDR", "0.0.0.0:9443"),
                (
                    "TOLLGATE_ADMIN_CLIENT_SANS",
                    &format!("{portal}, console.ops.svc"),
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.admin.client_sans, vec![portal, "console.ops.svc"]);
        assert!(!c.admin.is_open());
        // Without a client CA there is no certificate to judge.
        for yaml in [
            "admin:\n  client_sans: [a.b]\n",
            "grpc_tls:\n  cert_file: c.pem\n  key_file: k.pem\nadmin:\n  client_sans: [a.b]\n",
        ] {
            let e = load_yaml(yaml, &[]).unwrap_err();
            assert_eq!(e.field, "admin.client_sans", "{yaml}");
            assert!(e.message.contains("grpc_tls.client_ca_file"), "{e}");
        }
        let e = load_yaml(
            tls,
            &[("TOLLGATE_ADMIN_CLIENT_SANS", "ok.example,*.example")],
        )
        .unwrap_err();
        assert_eq!(e.field, "admin.client_sans[1]");
        // Neither tokens nor SANs off loopback: the message names both ways out.
        let e = load_yaml(&format!("{tls}admin_addr: 0.0.0.0:9443\n"), &[]).unwrap_err();
        assert_eq!(e.field, "admin.token_sha256");
        assert!(e.message.contains("TOLLGATE_ADMIN_CLIENT_SANS"), "{e}");
    }

    #[test]
    fn malformed_yaml_names_the_line() {
        let e = load_yaml("grpc_addr: [\n", &[]).unwrap_err();
        assert!(e.field.starts_with("line "), "{e}");
    }

    #[test]
    fn the_example_file_documents_every_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tollgate.yaml");
        let c = Config::load(Some(&path), []).unwrap();
        assert_eq!(c, Config::default());
        // And it names every setting there is.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut paths = Vec::new();
        setting_paths(
            &serde_yaml::to_value(Config::default()).unwrap(),
            &mut Vec::new(),
            &mut paths,
        );
        for (p, _) in paths {
            let leaf = p.last().unwrap();
            assert!(
                text.contains(&format!("{leaf}:")),
                "examples/tollgate.yaml lacks {p:?}"
            );
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:hunter2@db:5432/x"),
            "postgres://u:***@db:5432/x"
        );
        assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
        let s = SecretUrl("redis://:pw@h:6379".into());
        assert!(!format!("{s:?}").contains("pw"));
    }
}
