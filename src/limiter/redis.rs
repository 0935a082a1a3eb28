//! Counters kept in Redis (one node or a Redis Cluster): exact across any number of replicas.
//!
//! Each hit is one Lua script run on the server (one per algorithm, in the `.lua` files beside
//! this one): check, count and expiry happen as one atomic step (DESIGN rule 3). Scripts run by
//! `EVALSHA`; a Redis that has lost them (restarted, failed over) answers `NOSCRIPT` and the
//! `redis` crate loads the script and runs it again.
//!
//! **Time comes from tollgate, not Redis.** `now` (ms) is an argument of every script, so tests
//! can drive the clock and every replica's window boundaries are its own clock's. Replicas
//! sharing a Redis therefore need synchronised clocks (NTP); a replica whose clock is behind
//! counts in the latest window another replica has written.
//!
//! Lua numbers are doubles, so the scripts are exact while `limit × window in ms` stays below
//! 2^53: a per-minute limit below 150 billion.
//!
//! Keys are `<key_prefix>{<counter key>}:<algorithm>:<window s>[:<window start>]`. The counter
//! key sits in a hash tag, so every key of one counter is in one Redis Cluster slot.
//!
//! Connections are multiplexed: a `ConnectionManager` (which reconnects by itself) for a
//! single node, an async cluster connection (which follows the cluster's slots and reconnects
//! to nodes) for a cluster. Each gRPC serving thread (`grpc::serving`) has one of its own, up to
//! [`MAX_LANE_CONNECTIONS`], and everything else shares one more: a connection's driver task
//! runs where it was first used, so a call, its write and its reply all stay on the serving
//! thread that made it, with no wake-up of another thread. (A cluster connection is shared:
//! it holds one connection per node already.) None connects at start: tollgate
//! starts while Redis is down and follows `redis.failure_mode` until it is back. Every call is
//! bounded by `redis.timeout`.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::Script;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

use super::{
    Algorithm, LimiterError, Rate, WindowLimiter, WindowState, bucket_report, fixed_report,
    hit_both_in_steps, sliding_report, window_start_ms,
};

const FIXED_WINDOW: &str = include_str!("fixed_window.lua");
const SLIDING_WINDOW: &str = include_str!("sliding_window.lua");
const TOKEN_BUCKET: &str = include_str!("token_bucket.lua");

/// Keys live this much longer than their state matters, for replicas whose clocks are a little
/// behind (and for tests, whose clocks jump while Redis's runs).
const EXPIRY_GRACE_MS: i64 = 5000;

/// Serving threads with a Redis connection of their own, at most; more share them in turn.
pub const MAX_LANE_CONNECTIONS: usize = 16;

/// URL schemes of `redis.url`.
pub const SCHEMES: &[&str] = &["redis", "rediss", "redis+cluster", "rediss+cluster"];

/// Where the counters live, from `redis.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `redis://host:port[/db]` or `rediss://…`.
    Node(String),
    /// `redis+cluster://host:port,host:port,…`: the seed nodes, each as a `redis://` URL.
    Cluster(Vec<String>),
}

/// Reads `redis.url`. `redis+cluster://[user:password@]host:port,host:port,…` lists seed nodes of
/// a Redis Cluster (the credentials apply to all); `redis://` and `rediss://` name one node.
/// Checks the URLs without connecting.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        "is not a URL: use redis://HOST:PORT or redis+cluster://HOST:PORT,…".to_string()
    })?;
    let check = |u: &str| {
        redis::Client::open(u)
            .map(|_| ())
            .map_err(|e| format!("node {}: {e}", crate::setting::redact_url(u)))
    };
    match scheme {
        "redis" | "rediss" => {
            redis::Client::open(url).map_err(|e| e.to_string())?;
            Ok(Target::Node(url.to_string()))
        }
        "redis+cluster" | "rediss+cluster" => {
            let node_scheme = scheme.trim_end_matches("+cluster");
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), rest),
            };
            let hosts = hosts.split('/').next().unwrap_or_default();
            let nodes: Vec<String> = hosts
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| format!("{node_scheme}://{auth}{h}"))
                .collect();
            if nodes.is_empty() {
                return Err(
                    "names no cluster node: use redis+cluster://HOST:PORT,HOST:PORT".into(),
                );
            }
            for n in &nodes {
                check(n)?;
            }
            Ok(Target::Cluster(nodes))
        }
        other => Err(format!(
            "scheme {other}:// is not supported: use one of {}",
            SCHEMES
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[derive(Clone)]
enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Counters in Redis.
pub struct RedisLimiter {
    /// `[0]`: off the serving threads; `[1 + lane % (len - 1)]`: a serving thread's.
    conns: Box<[Conn]>,
    prefix: String,
    timeout: Duration,
    fixed: Script,
    sliding: Script,
    bucket: Script,
    /// Each algorithm's script run on two counters in one step (see [`pair_script`]).
    fixed_pair: Script,
    sliding_pair: Script,
    bucket_pair: Script,
}

/// The end of a pair script: `ARGV[1]` is how many arguments each counter's step takes, then
/// the first's and the second's. The first is hit; if it fitted, the second; if that did not,
/// the first's hit is refunded, all in one script, so no other command sees it in between.
/// Returns `{first's reply}` or `{first's reply, second's reply}`.
const PAIR_TAIL: &str = "
local n = tonumber(ARGV[1])
local a1, a2 = {}, {}
for i = 1, n do a1[i] = ARGV[1 + i]; a2[i] = ARGV[1 + n + i] end
local r1 = step({KEYS[1]}, a1)
if tonumber(r1[1]) == 0 then return {r1} end
local r2 = step({KEYS[2]}, a2)
if tonumber(r2[1]) == 0 then
  a1[1] = 'refund'
  step({KEYS[1]}, a1)
end
return {r1, r2}
";

/// An algorithm's script as a function `step(KEYS, ARGV)`, run on two counters by
/// [`PAIR_TAIL`] (a key's own per-minute window and its identity's).
fn pair_script(step: &str) -> String {
    format!("local function step(KEYS, ARGV)\n{step}\nend\n{PAIR_TAIL}")
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// Sets up one connection without connecting (Redis may be down at start); must run inside
    /// a Tokio runtime. `timeout` bounds every call, connecting included.
    pub fn new(url: &str, key_prefix: &str, timeout: Duration) -> Result<Self, LimiterError> {
        Self::for_lanes(url, key_prefix, timeout, 0)
    }

    /// Like [`RedisLimiter::new`], with a connection of its own for each of `lanes` gRPC serving
    /// threads (at most [`MAX_LANE_CONNECTIONS`]) besides the shared one.
    pub fn for_lanes(
        url: &str,
        key_prefix: &str,
        timeout: Duration,
        lanes: usize,
    ) -> Result<Self, LimiterError> {
        let fail = LimiterError::Config;
        // rediss://: TLS by rustls with the ring provider, trusting the system's roots (or
        // the file named by SSL_CERT_FILE). Err only means a provider is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let target = parse_url(url).map_err(fail)?;
        // A cluster connection is one per node already, with its own task: only a single
        // node's connections are per lane.
        let lanes = match target {
            Target::Node(_) => lanes.min(MAX_LANE_CONNECTIONS),
            Target::Cluster(_) => 0,
        };
        let conns = (0..=lanes)
            .map(|_| Self::connection(&target, timeout))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            conns,
            prefix: key_prefix.to_string(),
            timeout,
            fixed: Script::new(FIXED_WINDOW),
            sliding: Script::new(SLIDING_WINDOW),
            bucket: Script::new(TOKEN_BUCKET),
            fixed_pair: Script::new(&pair_script(FIXED_WINDOW)),
            sliding_pair: Script::new(&pair_script(SLIDING_WINDOW)),
            bucket_pair: Script::new(&pair_script(TOKEN_BUCKET)),
        })
    }

    /// One connection to `target`, not connected yet.
    fn connection(target: &Target, timeout: Duration) -> Result<Conn, LimiterError> {
        let fail = LimiterError::Config;
        Ok(match target.clone() {
            Target::Node(url) => {
                let client = redis::Client::open(url).map_err(|e| fail(e.to_string()))?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_max_delay(Duration::from_secs(1));
                Conn::Node(
                    ConnectionManager::new_lazy_with_config(client, config)
                        .map_err(|e| fail(e.to_string()))?,
                )
            }
            Target::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .build()
                    .map_err(|e| fail(e.to_string()))?;
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout);
                Conn::Cluster(client.get_pending_async_connection_with_config(config))
            }
        })
    }

    /// The connection of the serving thread this runs on, or the shared one.
    fn conn(&self) -> Conn {
        let i = match crate::grpc::serving::current_lane() {
            Some(lane) if self.conns.len() > 1 => 1 + lane % (self.conns.len() - 1),
            _ => 0,
        };
        self.conns[i].clone()
    }

    /// The Redis key of `counter`'s state for `rate` at `now_ms`.
    fn redis_key(&self, counter: &str, rate: Rate, now_ms: i64) -> String {
        let w = rate.window_secs;
        match rate.algorithm {
            Algorithm::FixedWindow => format!(
                "{}{{{counter}}}:fw:{w}:{}",
                self.prefix,
                window_start_ms(now_ms, w)
            ),
            Algorithm::SlidingWindow => format!("{}{{{counter}}}:sw:{w}", self.prefix),
            Algorithm::TokenBucket => format!("{}{{{counter}}}:tb:{w}", self.prefix),
        }
    }

    /// Runs the rate's script once, within the timeout.
    async fn run(
        &self,
        op: &str,
        counter: &str,
        rate: Rate,
        cost: u64,
        now_ms: i64,
    ) -> Result<Vec<i64>, LimiterError> {
        let mut call = match rate.algorithm {
            Algorithm::FixedWindow => self.fixed.prepare_invoke(),
            Algorithm::SlidingWindow => self.sliding.prepare_invoke(),
            Algorithm::TokenBucket => self.bucket.prepare_invoke(),
        };
        call.key(self.redis_key(counter, rate, now_ms))
            .arg(op)
            .arg(rate.limit)
            .arg(cost);
        match rate.algorithm {
            Algorithm::FixedWindow => {
                let end = window_start_ms(now_ms, rate.window_secs) + rate.window_ms();
                call.arg(end - now_ms + EXPIRY_GRACE_MS)
            }
            _ => call.arg(rate.window_ms()).arg(now_ms).arg(EXPIRY_GRACE_MS),
        };
        let conn = self.conn();
        let answer = async move {
            match conn {
                Conn::Node(mut c) => call.invoke_async::<Vec<i64>>(&mut c).await,
                Conn::Cluster(mut c) => call.invoke_async::<Vec<i64>>(&mut c).await,
            }
        };
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// The arguments of `rate`'s script after the operation, in order.
    fn args(rate: Rate, cost: u64, now_ms: i64) -> Vec<i64> {
        let (limit, cost) = (rate.limit as i64, cost.min(i64::MAX as u64) as i64);
        match rate.algorithm {
            Algorithm::FixedWindow => {
                let end = window_start_ms(now_ms, rate.window_secs) + rate.window_ms();
                vec![limit, cost, end - now_ms + EXPIRY_GRACE_MS]
            }
            _ => vec![limit, cost, rate.window_ms(), now_ms, EXPIRY_GRACE_MS],
        }
    }

    /// Runs the pair script of the rates' algorithm on both counters, within the timeout.
    async fn run_pair(
        &self,
        first: (&str, Rate),
        second: (&str, Rate),
        cost: u64,
        now_ms: i64,
    ) -> Result<Vec<Vec<i64>>, LimiterError> {
        let mut call = match first.1.algorithm {
            Algorithm::FixedWindow => self.fixed_pair.prepare_invoke(),
            Algorithm::SlidingWindow => self.sliding_pair.prepare_invoke(),
            Algorithm::TokenBucket => self.bucket_pair.prepare_invoke(),
        };
        call.key(self.redis_key(first.0, first.1, now_ms))
            .key(self.redis_key(second.0, second.1, now_ms));
        let (a1, a2) = (
            Self::args(first.1, cost, now_ms),
            Self::args(second.1, cost, now_ms),
        );
        call.arg(a1.len() + 1).arg("hit");
        for a in &a1 {
            call.arg(*a);
        }
        call.arg("hit");
        for a in &a2 {
            call.arg(*a);
        }
        let conn = self.conn();
        let answer = async move {
            match conn {
                Conn::Node(mut c) => call.invoke_async::<Vec<Vec<i64>>>(&mut c).await,
                Conn::Cluster(mut c) => call.invoke_async::<Vec<Vec<i64>>>(&mut c).await,
            }
        };
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> LimiterError {
        LimiterError::Unavailable(format!("no answer from Redis within {:?}", self.timeout))
    }
}

/// A Redis error as a [`LimiterError`]: transient when Redis could not be reached or asked to
/// be asked again (loading, cluster down or failing over, a slot moved), not when it answered
/// with an error (a failed script, a refused command, bad credentials) or with a reply that is
/// not what the script returns.
fn classify(e: &redis::RedisError) -> LimiterError {
    use redis::{ErrorKind, ServerErrorKind};
    let transient = e.is_io_error()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                )
        );
    if transient {
        LimiterError::Unavailable(e.to_string())
    } else {
        LimiterError::Backend(e.to_string())
    }
}

/// What a script's reply `v` for one hit says.
fn report(v: &[i64], rate: Rate, cost: u64, now_ms: i64) -> Result<WindowState, LimiterError> {
    let allowed = field(v, 0)? == 1;
    Ok(match rate.algorithm {
        Algorithm::FixedWindow => fixed_report(allowed, field(v, 1)?, rate, now_ms),
        Algorithm::SlidingWindow => {
            let elapsed = field(v, 3)? as i64;
            sliding_report(allowed, field(v, 1)?, field(v, 2)?, elapsed, rate, cost)
        }
        Algorithm::TokenBucket => bucket_report(allowed, field(v, 1)?, rate, cost),
    })
}

fn field(v: &[i64], i: usize) -> Result<u64, LimiterError> {
    v.get(i)
        .map(|n| (*n).max(0) as u64)
        .ok_or_else(|| LimiterError::Backend(format!("unexpected script reply {v:?}")))
}

#[async_trait]
impl WindowLimiter for RedisLimiter {
    async fn ping(&self) -> Result<(), LimiterError> {
        let conn = self.conn();
        let answer = async move {
            let cmd = redis::cmd("PING");
            match conn {
                Conn::Node(mut c) => cmd.query_async::<String>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<String>(&mut c).await,
            }
        };
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    async fn hit(
        &self,
        key: &str,
        rate: Rate,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<WindowState, LimiterError> {
        let now_ms = now.timestamp_millis();
        let v = self.run("hit", key, rate, cost, now_ms).await?;
        report(&v, rate, cost, now_ms)
    }

    /// One script on a single node (both counters' keys in one step). A Redis Cluster keeps
    /// the two counters in different slots, which one script cannot touch: there, the
    /// trait's hit, hit, take back.
    async fn hit_both(
        &self,
        first: (&str, Rate),
        second: (&str, Rate),
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<(WindowState, Option<WindowState>), LimiterError> {
        if matches!(self.conns[0], Conn::Cluster(_)) || first.1.algorithm != second.1.algorithm {
            return hit_both_in_steps(self, first, second, cost, now).await;
        }
        let now_ms = now.timestamp_millis();
        let v = self.run_pair(first, second, cost, now_ms).await?;
        let bad = || LimiterError::Backend(format!("unexpected pair script reply {v:?}"));
        let a = report(v.first().ok_or_else(bad)?, first.1, cost, now_ms)?;
        let b = match v.get(1) {
            Some(r) => Some(report(r, second.1, cost, now_ms)?),
            None if !a.allowed => None,
            None => return Err(bad()),
        };
        Ok((a, b))
    }

    async fn refund(
        &self,
        key: &str,
        rate: Rate,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<(), LimiterError> {
        self.run("refund", key, rate, cost, now.timestamp_millis())
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("redis://127.0.0.1:6379").unwrap(),
            Target::Node("redis://127.0.0.1:6379".into())
        );
        assert_eq!(
            parse_url("redis+cluster://a:7000, b:7001,c:7002").unwrap(),
            Target::Cluster(vec![
                "redis://a:7000".into(),
                "redis://b:7001".into(),
                "redis://c:7002".into()
            ])
        );
        assert_eq!(
            parse_url("redis+cluster://u:pw@a:7000,b:7001").unwrap(),
            Target::Cluster(vec![
                "redis://u:pw@a:7000".into(),
                "redis://u:pw@b:7001".into()
            ])
        );
        assert!(
            parse_url("http://x")
                .unwrap_err()
                .contains("redis+cluster://")
        );
        assert!(parse_url("127.0.0.1:6379").is_err());
        assert!(parse_url("redis+cluster://").is_err());
    }

    #[test]
    fn errors_say_whether_they_are_transient() {
        use redis::{ErrorKind, RedisError, ServerErrorKind};
        use std::io;
        let io = |kind: io::ErrorKind| RedisError::from(io::Error::from(kind));
        for e in [
            io(io::ErrorKind::TimedOut),
            io(io::ErrorKind::ConnectionRefused),
            io(io::ErrorKind::ConnectionReset),
            io(io::ErrorKind::BrokenPipe),
            RedisError::from((ErrorKind::Server(ServerErrorKind::BusyLoading), "loading")),
            RedisError::from((ErrorKind::Server(ServerErrorKind::ClusterDown), "down")),
            RedisError::from((ErrorKind::Server(ServerErrorKind::TryAgain), "again")),
            RedisError::from((ErrorKind::ClusterConnectionNotFound, "no node")),
        ] {
            assert!(classify(&e).is_transient(), "{e:?} should be transient");
        }
        for e in [
            redis::make_extension_error(
                "ERR".into(),
                Some("Error running script (call to f_0123): attempt to compare nil".into()),
            ),
            RedisError::from((
                ErrorKind::Server(ServerErrorKind::ResponseError),
                "ERR user_script:1: Script attempted to access nonexistent global variable",
            )),
            RedisError::from((ErrorKind::Server(ServerErrorKind::NoPerm), "no perm")),
            RedisError::from((ErrorKind::UnexpectedReturnType, "not an array")),
            RedisError::from((ErrorKind::Parse, "bad reply")),
            RedisError::from((ErrorKind::AuthenticationFailed, "WRONGPASS")),
        ] {
            let got = classify(&e);
            assert!(!got.is_transient(), "{e:?} should not be transient");
            assert!(matches!(got, LimiterError::Backend(_)), "{got:?}");
        }
        // A reply of the wrong shape is the script's fault, not Redis's absence.
        assert!(!field(&[1], 1).unwrap_err().is_transient());
        assert_eq!(field(&[1, -3], 1).unwrap(), 0);
        // A URL that names no Redis is a setting to fix.
        let bad = RedisLimiter::new("http://cache:6379", "t:", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(bad, LimiterError::Config(_)), "{bad:?}");
        assert!(!bad.is_transient());
        assert!(
            LimiterError::Unavailable("no answer from Redis within 100ms".into()).is_transient()
        );
    }
}
