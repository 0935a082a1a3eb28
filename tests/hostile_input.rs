//! Hostile input, property-tested against a real tollgate over gRPC: arbitrary bytes posted as
//! the message of Check and of ShouldRateLimit (garbage, truncated or mutated real messages,
//! huge varints, deep nesting), and arbitrary well-typed requests (any strings in headers, costs,
//! near-miss keys, descriptors, overrides, hits). Each answer must be well formed: a message that
//! does not decode gets tonic's decode error, one that does gets an answer that says something
//! (a Check is decoded as the fields tollgate reads: `grpc::check_request`);
//! no task of the server panics, and after every case a real key is still allowed.
//!
//! Three servers, one per counting algorithm, share the cases; before a case its server's clock
//! may jump (within a window, past a minute, a day, a month). The number of cases per property
//! is 256, or `PROPTEST_CASES`. Nothing is written to disk about failures: a failing case is
//! printed, shrunk.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::TimeDelta;
use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderMap, HeaderValue, Metadata, Pipe, SocketAddress, address,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor,
    rate_limit_descriptor::{Entry, RateLimitOverride},
};
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse,
    attribute_context::{HttpRequest, Peer, Request as AttrRequest},
    authorization_client::AuthorizationClient,
    check_response::HttpResponse,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse,
    rate_limit_response::{Code as RlsCode, rate_limit::Unit as PbUnit},
    rate_limit_service_client::RateLimitServiceClient,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, UInt64Value, Value, value::Kind};
use harness::check::{allowed, key_header};
// What tollgate decodes a Check as: the fields it reads, text as bytes (so a message the full
// `CheckRequest` refuses, for a field a Check never reads, still gets an answer).
use harness::server::{Tollgate, limits, t0};
use proptest::collection::{hash_map, vec};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tollgate::check_request::CheckRequest as LeanCheckRequest;
use tollgate::limiter::Algorithm;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// The largest message tollgate takes by default (`grpc.max_message_bytes`); larger ones get
/// OUT_OF_RANGE.
const MAX_MESSAGE: usize = 4 << 20;

/// The prefix of tonic's answer to a message that does not decode (gRPC INTERNAL).
const DECODE_ERROR: &str = "failed to decode Protobuf message";

/// Rules with every kind of limit, algorithm and unit, and the largest counts a file can hold.
const RULES: &str = "domain: api
descriptors:
  - key: path
    value: /v1/search
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: path
    rate_limit: {unit: second, requests_per_unit: 100}
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 0}
  - key: internal
    rate_limit: {unlimited: true}
  - key: soft
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: sliding
    rate_limit: {algorithm: sliding_window, unit: hour, requests_per_unit: 18446744073709551615}
  - key: bucket
    rate_limit: {algorithm: token_bucket, unit: year, requests_per_unit: 18446744073709551615}
  - key: fixed
    rate_limit: {algorithm: fixed_window, unit: week, requests_per_unit: 2}
  - key: plan
    value: basic
    descriptors:
      - key: user
        rate_limit: {name: basic_user, unit: day, requests_per_unit: 2}
  - key: promo
    descriptors:
      - key: user
        rate_limit: {replaces: [{name: basic_user}], unit: month, requests_per_unit: 5}
";

/// Keys of descriptor entries the rules know, and values they match.
const RULE_KEYS: &[&str] = &[
    "path",
    "remote_address",
    "internal",
    "soft",
    "sliding",
    "bucket",
    "fixed",
    "plan",
    "user",
    "promo",
    "api_key_id",
];
const RULE_VALUES: &[&str] = &["/v1/search", "/v1/other", "basic", "10.0.0.66", "bob"];

// --- the servers ---------------------------------------------------------------------------

/// One tollgate and what the cases use of it.
struct Server {
    tg: Tollgate,
    channel: Channel,
    /// A key without limits: always allowed, so it shows the server still answers.
    live_key: String,
}

/// Three tollgates, one per algorithm, with the same keys and rules.
struct Fixture {
    servers: Vec<Server>,
    /// Every server's keys (on one server, those of the others are unknown), and their ids
    /// (the same on each server).
    keys: Vec<String>,
    key_ids: Vec<i64>,
    _rules: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Fixture {
        let rules = tempfile::tempdir().unwrap();
        let path = rules.path().join("rules.yaml");
        std::fs::write(&path, RULES).unwrap();
        let mut servers = Vec::new();
        let mut keys = Vec::new();
        let mut key_ids = Vec::new();
        for algorithm in [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::TokenBucket,
        ] {
            let p = path.clone();
            let tg = Tollgate::start_with(move |c| {
                c.ratelimit.rules = Some(p);
                c.ratelimit.algorithm = algorithm;
                c.limits.algorithm = algorithm;
                // Few counters, so random descriptors also drive evictions.
                c.limits.max_counters = 64;
            })
            .await;
            let (live_key, live_id) = tg.create_key("live", limits(None, None, None)).await;
            let (tight, tight_id) = tg
                .create_key("tight", limits(Some(5), Some(10), Some(20)))
                .await;
            let (expired, expired_id) = tg
                .create_key_expiring(
                    "expired",
                    limits(Some(1), None, None),
                    Some(t0() - TimeDelta::hours(1)),
                )
                .await;
            keys.extend([live_key.clone(), tight, expired]);
            key_ids = vec![live_id, tight_id, expired_id];
            let channel = Channel::from_shared(format!("http://{}", tg.grpc))
                .unwrap()
                .connect()
                .await
                .expect("connects");
            servers.push(Server {
                tg,
                channel,
                live_key,
            });
        }
        Fixture {
            servers,
            keys,
            key_ids,
            _rules: rules,
        }
    }

    /// Runs one case against `server`, its clock moved on by `pause` first: `body` must pass,
    /// no thread of `runtime` may panic meanwhile, and afterwards the server must still allow a
    /// real key.
    async fn case(
        &self,
        server: usize,
        pause: TimeDelta,
        runtime: &str,
        body: impl Future<Output = Result<(), TestCaseError>>,
    ) -> Result<(), TestCaseError> {
        // What an earlier case left (it failed already).
        let _ = no_panics_in(runtime);
        self.servers[server].tg.clock.advance(pause);
        let passed = body.await;
        no_panics_in(runtime)?;
        passed?;
        let s = &self.servers[server];
        let mut client = AuthorizationClient::new(s.channel.clone());
        let check = client.check(key_header(&s.live_key));
        let resp = tokio::time::timeout(Duration::from_secs(20), check)
            .await
            .map_err(|_| TestCaseError::fail("the server no longer answers"))?
            .map_err(|e| TestCaseError::fail(format!("a real key's Check failed: {e}")))?
            .into_inner();
        if !allowed(&resp) {
            return Err(TestCaseError::fail(format!(
                "a real key was refused: {resp:?}"
            )));
        }
        no_panics_in(runtime)
    }

    /// Every server's `/metrics` still renders, counting the checks.
    async fn metrics_render(&self) {
        for s in &self.servers {
            let text = s.tg.metrics_text().await;
            assert!(text.contains("tollgate_decisions_total"), "{text}");
        }
    }

    async fn stop(self) {
        for s in self.servers {
            s.tg.stop().await;
        }
    }
}

/// Which server a case goes to, and how far its clock moves first: not at all, within a
/// window, past a minute, a day or a month.
fn target(servers: usize) -> impl Strategy<Value = (usize, TimeDelta)> {
    let pause = prop_oneof![
        4 => Just(TimeDelta::zero()),
        2 => (0i64..2_000).prop_map(TimeDelta::milliseconds),
        1 => (1i64..120).prop_map(TimeDelta::seconds),
        1 => Just(TimeDelta::days(1)),
        1 => Just(TimeDelta::days(40)),
    ];
    (0..servers, pause)
}

// --- panics --------------------------------------------------------------------------------

/// Threads (by name) that panicked, with the message.
static PANICS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// A runtime whose worker threads carry `name`, where a panic is recorded (besides printed),
/// so a case can tell that a server task died even though tonic answers the next call.
fn runtime(name: &str) -> tokio::runtime::Runtime {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or("").to_string();
            PANICS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((thread, info.to_string()));
            previous(info);
        }));
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

/// Fails if a thread of `runtime` panicked since the last call (and forgets those panics, so
/// that proptest can shrink the case that caused them).
fn no_panics_in(runtime: &str) -> Result<(), TestCaseError> {
    let mut panics = PANICS.lock().unwrap_or_else(|e| e.into_inner());
    let before = panics.len();
    let mut first = None;
    panics.retain(|(thread, message)| {
        let ours = thread == runtime;
        if ours && first.is_none() {
            first = Some(message.clone());
        }
        !ours
    });
    match first {
        Some(message) => Err(TestCaseError::fail(format!(
            "the server panicked ({} times): {message}",
            before - panics.len()
        ))),
        None => Ok(()),
    }
}

/// Runs `property` over `strategy`, 256 cases (or `PROPTEST_CASES`), failures only printed.
fn run<S: Strategy>(strategy: S, property: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    if let Err(e) = runner.run(&strategy, property) {
        panic!("{e}");
    }
}

// --- raw gRPC messages ---------------------------------------------------------------------

/// A codec that sends the message bytes as they are and hands back the answer's bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Posts `body` as the gRPC message of `method`.
async fn call_raw(
    channel: &Channel,
    method: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("not ready: {e}")))?;
    let call = grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(method),
        RawCodec,
    );
    match tokio::time::timeout(Duration::from_secs(20), call).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer in 20 s")),
    }
}

/// What a server must answer to `body` as a message of type `M`: if it decodes, an answer (that
/// `well_formed` then checks); if not, tonic's decode error, nothing else.
fn expect_raw<M: Message + Default, R: Message + Default>(
    body: &[u8],
    answer: Result<Vec<u8>, tonic::Status>,
    well_formed: impl Fn(&M, &R) -> Result<(), String>,
) -> Result<(), TestCaseError> {
    match (M::decode(body), answer) {
        (Ok(request), Ok(bytes)) => {
            let response = R::decode(bytes.as_slice())
                .map_err(|e| TestCaseError::fail(format!("answer does not decode: {e}")))?;
            well_formed(&request, &response).map_err(TestCaseError::fail)
        }
        (_, Err(status))
            if status.code() == tonic::Code::OutOfRange && body.len() > MAX_MESSAGE =>
        {
            Ok(())
        }
        (Err(_), Err(status))
            if status.code() == tonic::Code::Internal
                && status.message().starts_with(DECODE_ERROR) =>
        {
            Ok(())
        }
        (Ok(_), Err(status)) => Err(TestCaseError::fail(format!(
            "a message that decodes got an error: {status:?}"
        ))),
        (Err(e), Ok(_)) => Err(TestCaseError::fail(format!(
            "a message that does not decode ({e}) got an answer"
        ))),
        (Err(_), Err(status)) => Err(TestCaseError::fail(format!(
            "a message that does not decode got {status:?}, not the decode error"
        ))),
    }
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Fields whose tags or payloads are extreme: varints of 10 bytes and more, lengths near
/// `u64::MAX`, wire types that do not exist, field numbers 0 and the largest.
fn extreme_fields() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        Just(0u64),
        1u64..20,
        Just((1 << 29) - 1),
        Just(u64::MAX >> 3)
    ];
    let payload = prop_oneof![
        Just(vec![0xff; 10]),
        Just(vec![0xff; 11]),
        Just({
            let mut v = Vec::new();
            varint(u64::MAX, &mut v);
            v
        }),
        Just({
            let mut v = Vec::new();
            varint(i64::MAX as u64, &mut v);
            v.extend_from_slice(b"short");
            v
        }),
        vec(any::<u8>(), 0..24),
    ];
    vec((field, 0u64..8, payload), 1..8).prop_map(|fields| {
        let mut out = Vec::new();
        for (number, wire_type, payload) in fields {
            varint(number << 3 | wire_type, &mut out);
            out.extend_from_slice(&payload);
        }
        out
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(Index),
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Repeat(Index, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (
            any::<Index>(),
            prop_oneof![vec(any::<u8>(), 1..12), extreme_fields()]
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Repeat(a, b)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        let n = bytes.len();
        match m {
            Mutation::Truncate(i) => bytes.truncate(i.index(n)),
            Mutation::Flip(i, b) => bytes[i.index(n)] ^= b,
            Mutation::Insert(i, b) => {
                let at = i.index(n);
                bytes.splice(at..at, b.iter().copied());
            }
            Mutation::Repeat(a, b) => {
                let (a, b) = (a.index(n), b.index(n));
                let part = bytes[a.min(b)..=a.max(b)].to_vec();
                bytes.extend_from_slice(&part);
            }
        }
    }
    bytes
}

/// Bytes as a hostile client sends them: random, extreme fields, or a real message (from
/// `valid`) truncated, flipped, spliced or repeated.
fn hostile_bytes(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => vec(any::<u8>(), 0..512),
        1 => extreme_fields(),
        2 => (valid, vec(mutation(), 0..4)).prop_map(|(bytes, ms)| mutate(bytes, &ms)),
    ]
}

// --- strings ---------------------------------------------------------------------------------

/// Any string: empty, any Unicode (control characters included), or very long.
fn any_text() -> BoxedStrategy<String> {
    prop_oneof![
        6 => any::<String>(),
        2 => Just(String::new()),
        2 => "[\\x00-\\x1f\\x7f\"\\\\{}|:\\n\\r ]{1,12}",
        1 => (any::<char>(), 256usize..20_000).prop_map(|(c, n)| c.to_string().repeat(n)),
    ]
    .boxed()
}

/// One of `known`, or any string.
fn known_or_any(known: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        2 => proptest::sample::select(known).prop_map(str::to_string),
        1 => any_text(),
    ]
    .boxed()
}

/// What a key header may carry: the fixture's keys (some with space around, or a character
/// changed), `tg_` and 40 characters that are not a key, and anything else.
fn credential(keys: Vec<String>) -> BoxedStrategy<String> {
    let real = proptest::sample::select(keys);
    prop_oneof![
        real.clone(),
        real.clone().prop_map(|k| format!("  {k}\t")),
        (real, any::<Index>(), any::<char>()).prop_map(|(k, i, c)| {
            let mut chars: Vec<char> = k.chars().collect();
            let at = i.index(chars.len());
            chars[at] = c;
            chars.into_iter().collect()
        }),
        "tg_[A-Za-z0-9]{40}",
        "tg_[A-Za-z0-9]{39,41}",
        "tg_.{40}",
        any_text(),
    ]
    .boxed()
}

/// A `cost` context extension: numbers at and past every edge, and not numbers.
fn cost() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(
            &[
                "0",
                "1",
                "-1",
                "+3",
                " 5 ",
                "1000000",
                "1000001",
                "1e9",
                "0x10",
                "18446744073709551615",
                "18446744073709551616",
                "99999999999999999999999999999999999999",
                "",
            ][..]
        )
        .prop_map(str::to_string),
        any::<u64>().prop_map(|n| n.to_string()),
        any_text(),
    ]
}

/// A `google.protobuf.Value` nested `depth` deep (lists and structs in turn).
fn nested_value(depth: usize) -> Value {
    let mut v = Value {
        kind: Some(Kind::StringValue("leaf".into())),
    };
    for i in 0..depth {
        v = Value {
            kind: Some(if i % 2 == 0 {
                Kind::ListValue(ListValue { values: vec![v] })
            } else {
                Kind::StructValue(Struct {
                    fields: HashMap::from([("n".to_string(), v)]),
                })
            }),
        };
    }
    v
}

// --- CheckRequest --------------------------------------------------------------------------

/// A CheckRequest with anything in it; its metadata nested at most `max_depth` deep.
fn check_request(keys: Vec<String>, max_depth: usize) -> impl Strategy<Value = CheckRequest> {
    let header_name = prop_oneof![
        3 => proptest::sample::select(
            &["x-api-key", "authorization", "x-request-id", "X-Api-Key", "AUTHORIZATION"][..]
        )
        .prop_map(str::to_string),
        1 => any_text(),
    ];
    let header_value = prop_oneof![
        2 => credential(keys.clone()),
        1 => credential(keys.clone()).prop_map(|k| format!("Bearer {k}")),
        1 => credential(keys).prop_map(|k| format!("bEaReR   {k}")),
        1 => any_text(),
    ];
    let headers = vec((header_name, header_value), 0..6);
    let raw_headers = vec(
        (
            any_text(),
            any_text(),
            prop_oneof![Just(Vec::new()), vec(any::<u8>(), 0..64)],
        ),
        0..4,
    );
    let http = (
        headers.clone(),
        prop::option::of(raw_headers),
        (any_text(), any_text(), any_text(), any_text()),
        (any::<i64>(), any_text(), vec(any::<u8>(), 0..64)),
    )
        .prop_map(
            |(headers, raw, (id, method, path, host), (size, body, raw_body))| HttpRequest {
                id,
                method,
                headers: headers.into_iter().collect(),
                header_map: raw.map(|raw| HeaderMap {
                    headers: raw
                        .into_iter()
                        .map(|(key, value, raw_value)| HeaderValue {
                            key,
                            value,
                            raw_value,
                        })
                        .collect(),
                }),
                path,
                host,
                size,
                body,
                raw_body,
                ..Default::default()
            },
        );
    // The same headers again in `header_map` only (raw_value set), as `encode_raw_headers` sends.
    let raw_only = headers.prop_map(|headers| HttpRequest {
        header_map: Some(HeaderMap {
            headers: headers
                .into_iter()
                .map(|(key, value)| HeaderValue {
                    key,
                    value: String::new(),
                    raw_value: value.into_bytes(),
                })
                .collect(),
        }),
        ..Default::default()
    });
    let source = prop_oneof![
        Just(None),
        any_text().prop_map(|a| Some(address::Address::SocketAddress(SocketAddress {
            address: a,
            ..Default::default()
        }))),
        any_text().prop_map(|path| Some(address::Address::Pipe(Pipe {
            path,
            ..Default::default()
        }))),
    ]
    .prop_map(|address| Peer {
        address: Some(Address { address }),
        ..Default::default()
    });
    let extensions = (
        prop::option::of(cost()),
        hash_map(any_text(), any_text(), 0..3),
    )
        .prop_map(|(cost, mut others)| {
            if let Some(cost) = cost {
                others.insert("cost".to_string(), cost);
            }
            others
        });
    (
        prop::option::of(prop_oneof![http, raw_only]),
        any::<bool>(),
        prop::option::of(source),
        extensions,
        prop::option::of(0..=max_depth),
        any::<bool>(),
    )
        .prop_map(
            |(http, has_request, source, context_extensions, depth, has_attributes)| CheckRequest {
                attributes: has_attributes.then(|| AttributeContext {
                    source,
                    request: has_request.then(|| AttrRequest {
                        http,
                        ..Default::default()
                    }),
                    context_extensions,
                    metadata_context: depth.map(|d| Metadata {
                        filter_metadata: HashMap::from([(
                            "deep".to_string(),
                            Struct {
                                fields: HashMap::from([("v".to_string(), nested_value(d))]),
                            },
                        )]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
        )
}

/// gRPC codes of a Check answer, with the HTTP status each goes with.
const CHECK_CODES: &[(i32, i32)] = &[(16, 401), (7, 403), (8, 429), (13, 500), (14, 503)];

fn check_answer_is_well_formed<M>(_: &M, resp: &CheckResponse) -> Result<(), String> {
    let status = resp.status.as_ref().ok_or("no status")?;
    match (&resp.http_response, status.code) {
        (Some(HttpResponse::OkResponse(ok)), 0) => {
            if ok.headers.is_empty() {
                return Err(format!("allowed without the key id header: {resp:?}"));
            }
        }
        (Some(HttpResponse::DeniedResponse(denied)), code) => {
            let http = denied.status.as_ref().ok_or("denied without HTTP status")?;
            if !CHECK_CODES.contains(&(code, http.code)) {
                return Err(format!("denied with gRPC {code} and HTTP {}", http.code));
            }
            let body: serde_json::Value = serde_json::from_str(&denied.body)
                .map_err(|e| format!("denial body is not JSON ({e}): {:?}", denied.body))?;
            if body["status"] != http.code || !body["error"].is_string() {
                return Err(format!("denial body {body} for HTTP {}", http.code));
            }
        }
        _ => return Err(format!("neither allowed nor denied: {resp:?}")),
    }
    Ok(())
}

// --- RateLimitRequest ----------------------------------------------------------------------

fn rate_limit_request(key_ids: Vec<i64>) -> impl Strategy<Value = RateLimitRequest> {
    let ids: Vec<String> = key_ids.iter().map(i64::to_string).collect();
    let key_id = prop_oneof![
        proptest::sample::select(ids),
        proptest::sample::select(
            &[
                "-1",
                "0",
                "+1",
                " 1",
                "1e3",
                "abc",
                "",
                "9223372036854775807",
                "9223372036854775808",
                "-9223372036854775808",
                "-9223372036854775809",
                "99999999999999999999999999999",
            ][..]
        )
        .prop_map(str::to_string),
        any::<i64>().prop_map(|n| n.to_string()),
    ];
    let entry = (known_or_any(RULE_KEYS), known_or_any(RULE_VALUES))
        .prop_map(|(key, value)| Entry { key, value });
    let entries = prop_oneof![
        3 => vec(entry, 0..6),
        1 => key_id.prop_map(|value| vec![Entry {
            key: "api_key_id".into(),
            value,
        }]),
    ];
    let limit = (
        prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()],
        prop_oneof![0i32..=7, any::<i32>()],
    )
        .prop_map(|(requests_per_unit, unit)| RateLimitOverride {
            requests_per_unit,
            unit,
        });
    let hits = prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()];
    let descriptor = (
        entries,
        prop::option::weighted(0.3, limit),
        prop::option::of(hits),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(entries, limit, hits_addend, is_negative_hits)| RateLimitDescriptor {
                entries,
                limit,
                hits_addend: hits_addend.map(|value| UInt64Value { value }),
                is_negative_hits,
            },
        );
    (
        prop_oneof![3 => Just("api".to_string()), 1 => any_text()],
        vec(descriptor, 0..8),
        prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()],
    )
        .prop_map(|(domain, descriptors, hits_addend)| RateLimitRequest {
            domain,
            descriptors,
            hits_addend,
        })
}

fn rate_limit_answer_is_well_formed(
    req: &RateLimitRequest,
    resp: &RateLimitResponse,
) -> Result<(), String> {
    let code = |c: i32| match RlsCode::try_from(c) {
        Ok(c @ (RlsCode::Ok | RlsCode::OverLimit)) => Ok(c),
        _ => Err(format!("code {c} in {resp:?}")),
    };
    let overall = code(resp.overall_code)?;
    if resp.statuses.len() != req.descriptors.len() {
        return Err(format!(
            "{} statuses for {} descriptors",
            resp.statuses.len(),
            req.descriptors.len()
        ));
    }
    let mut any_over = false;
    for s in &resp.statuses {
        any_over |= code(s.code)? == RlsCode::OverLimit;
        if let Some(limit) = &s.current_limit
            && !matches!(PbUnit::try_from(limit.unit), Ok(u) if u != PbUnit::Unknown)
        {
            return Err(format!("limit with unit {}: {resp:?}", limit.unit));
        }
        if let Some(d) = &s.duration_until_reset
            && (d.seconds < 0 || d.nanos != 0)
        {
            return Err(format!("reset after {d:?}"));
        }
    }
    if any_over != (overall == RlsCode::OverLimit) {
        return Err(format!(
            "overall code disagrees with the statuses: {resp:?}"
        ));
    }
    for h in &resp.response_headers_to_add {
        if h.key != "retry-after" || h.value.parse::<u64>().is_err() || !any_over {
            return Err(format!("header {h:?} in {resp:?}"));
        }
    }
    Ok(())
}

/// A ShouldRateLimit answer: well formed, or UNAVAILABLE (a backend failed, failure mode closed).
fn expect_rate_limit(
    req: &RateLimitRequest,
    answer: Result<RateLimitResponse, tonic::Status>,
) -> Result<(), TestCaseError> {
    match answer {
        Ok(resp) => rate_limit_answer_is_well_formed(req, &resp).map_err(TestCaseError::fail),
        Err(s) if s.code() == tonic::Code::Unavailable => Ok(()),
        Err(s) => Err(TestCaseError::fail(format!(
            "ShouldRateLimit failed: {s:?}"
        ))),
    }
}

// --- the properties ------------------------------------------------------------------------

#[test]
fn any_bytes_as_a_check_get_the_decode_error_or_a_well_formed_answer() {
    const RUNTIME: &str = "hostile-check-bytes";
    let rt = runtime(RUNTIME);
    let fx = rt.block_on(Fixture::start());
    let valid = check_request(fx.keys.clone(), 300).prop_map(|r| r.encode_to_vec());
    let strategy = (target(fx.servers.len()), hostile_bytes(valid));
    run(strategy, |((server, pause), body)| {
        rt.block_on(fx.case(server, pause, RUNTIME, async {
            let answer = call_raw(&fx.servers[server].channel, CHECK, body.clone()).await;
            expect_raw::<LeanCheckRequest, _>(&body, answer, check_answer_is_well_formed)
        }))
    });
    rt.block_on(async {
        fx.metrics_render().await;
        fx.stop().await;
    });
}

#[test]
fn any_bytes_as_a_should_rate_limit_get_the_decode_error_or_a_well_formed_answer() {
    const RUNTIME: &str = "hostile-rls-bytes";
    let rt = runtime(RUNTIME);
    let fx = rt.block_on(Fixture::start());
    let valid = rate_limit_request(fx.key_ids.clone()).prop_map(|r| r.encode_to_vec());
    let strategy = (target(fx.servers.len()), hostile_bytes(valid));
    run(strategy, |((server, pause), body)| {
        rt.block_on(fx.case(server, pause, RUNTIME, async {
            let answer =
                call_raw(&fx.servers[server].channel, SHOULD_RATE_LIMIT, body.clone()).await;
            match (RateLimitRequest::decode(body.as_slice()), answer) {
                // A message that decodes may also get UNAVAILABLE (a backend failed).
                (Ok(request), Err(s)) if s.code() == tonic::Code::Unavailable => {
                    expect_rate_limit(&request, Err(s))
                }
                (_, answer) => expect_raw(&body, answer, rate_limit_answer_is_well_formed),
            }
        }))
    });
    rt.block_on(async {
        fx.metrics_render().await;
        fx.stop().await;
    });
}

#[test]
fn any_check_request_gets_a_well_formed_allow_or_deny() {
    const RUNTIME: &str = "hostile-check";
    let rt = runtime(RUNTIME);
    let fx = rt.block_on(Fixture::start());
    let strategy = (target(fx.servers.len()), check_request(fx.keys.clone(), 20));
    run(strategy, |((server, pause), request)| {
        rt.block_on(fx.case(server, pause, RUNTIME, async {
            let mut client = AuthorizationClient::new(fx.servers[server].channel.clone());
            let resp = client
                .check(request.clone())
                .await
                .map_err(|s| TestCaseError::fail(format!("Check failed: {s:?}")))?
                .into_inner();
            check_answer_is_well_formed(&request, &resp).map_err(TestCaseError::fail)
        }))
    });
    rt.block_on(async {
        fx.metrics_render().await;
        fx.stop().await;
    });
}

#[test]
fn any_rate_limit_request_gets_a_well_formed_answer() {
    const RUNTIME: &str = "hostile-rls";
    let rt = runtime(RUNTIME);
    let fx = rt.block_on(Fixture::start());
    let strategy = (
        target(fx.servers.len()),
        rate_limit_request(fx.key_ids.clone()),
    );
    run(strategy, |((server, pause), request)| {
        rt.block_on(fx.case(server, pause, RUNTIME, async {
            let mut client = RateLimitServiceClient::new(fx.servers[server].channel.clone());
            let answer = client
                .should_rate_limit(request.clone())
                .await
                .map(tonic::Response::into_inner);
            expect_rate_limit(&request, answer)
        }))
    });
    rt.block_on(async {
        fx.metrics_render().await;
        fx.stop().await;
    });
}
