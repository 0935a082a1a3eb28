//! End to end: HTTP clients → real Envoy → tollgate → demo upstream. What is asserted is what an
//! API client sees. Every case runs twice: with Envoy reaching tollgate in plaintext
//! (envoy/ext_authz.yaml, as a sidecar on loopback), and over mTLS (envoy/ext_authz_mtls.yaml:
//! Envoy presents a client certificate with a SPIFFE ID and checks tollgate's; tollgate admits
//! only that ID), as the tests `plaintext::CASE` and `mtls::CASE`; and a third time through the
//! configuration Istio generates (envoy/ext_authz_istio.yaml: the ext_authz filter of the
//! envoyExtAuthzGrpc provider in examples/istio, behind the RBAC shadow filter of its CUSTOM
//! policy), as `istio::CASE`.

use std::net::SocketAddr;

use chrono::Duration as Span;
use harness::envoy::Envoy;
use harness::net::{free_port, http_client};
use harness::server::{Tollgate, limits, t0};
use harness::tls::{ENVOY_SPIFFE_ID, TestCa};
use tollgate::config::{Config, GrpcTlsConfig};
use tollgate::keys::Limits;

/// How Envoy reaches tollgate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Plaintext,
    Mtls,
    /// Plaintext from Envoy's side (an Istio sidecar's mTLS is below it), with the filters Istio
    /// generates.
    Istio,
}

/// The certificates of an mTLS run, in a directory that lives as long as the test.
struct Pki {
    dir: tempfile::TempDir,
    tollgate: GrpcTlsConfig,
}

impl Pki {
    /// A CA; tollgate's pair from it; Envoy's client pair (its SPIFFE ID), laid out as
    /// envoy/ext_authz_mtls.yaml expects.
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("tollgate test CA");
        let (cert, key) = ca.server(1).write(dir.path(), "tollgate");
        let ca_file = ca.write(dir.path(), "ca.crt");
        ca.client("envoy", &[ENVOY_SPIFFE_ID])
            .write(dir.path(), "tls");
        Pki {
            tollgate: GrpcTlsConfig {
                cert_file: Some(cert),
                key_file: Some(key),
                client_ca_file: Some(ca_file),
                allowed_client_sans: vec![ENVOY_SPIFFE_ID.into()],
            },
            dir,
        }
    }
}

/// A tollgate configured by `tweak`, and Envoy in front of it reaching it over `hop`. The last
/// value holds the certificates of an mTLS run: keep it until the end of the test.
async fn start(hop: Hop, tweak: impl FnOnce(&mut Config)) -> (Tollgate, Envoy, Option<Pki>) {
    let pki = (hop == Hop::Mtls).then(Pki::new);
    let tls = pki.as_ref().map(|p| p.tollgate.clone());
    let tg = Tollgate::start_with(|c| {
        if let Some(tls) = tls {
            c.grpc_tls = tls;
        }
        tweak(c)
    })
    .await;
    let envoy = envoy(hop, tg.grpc, pki.as_ref()).await;
    (tg, envoy, pki)
}

/// Envoy in front of a tollgate at `grpc`, over `hop` (with `pki`'s client files for mTLS).
async fn envoy(hop: Hop, grpc: SocketAddr, pki: Option<&Pki>) -> Envoy {
    match (hop, pki) {
        (Hop::Plaintext, _) => Envoy::start("ext_authz.yaml", grpc).await,
        (Hop::Istio, _) => Envoy::start("ext_authz_istio.yaml", grpc).await,
        (Hop::Mtls, Some(pki)) => {
            let dir = format!("{}/", pki.dir.path().display());
            Envoy::start_with(
                "ext_authz_mtls.yaml",
                grpc,
                &[("/etc/envoy/tollgate-client/", &dir)],
            )
            .await
        }
        (Hop::Mtls, None) => panic!("mTLS needs certificates"),
    }
}

/// Runs each `async fn CASE(hop: Hop)` over every hop, as `plaintext::CASE`, `mtls::CASE` and
/// `istio::CASE`.
macro_rules! over_both_hops {
    ($($case:ident),* $(,)?) => {
        mod plaintext {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Hop::Plaintext).await
                }
            )*
        }
        mod mtls {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Hop::Mtls).await
                }
            )*
        }
        mod istio {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Hop::Istio).await
                }
            )*
        }
    };
}

over_both_hops!(
    allowed_request_reaches_upstream_with_key_id_and_rate_limit_headers,
    bearer_key_passes_and_authorization_reaches_upstream_unless_hidden,
    missing_and_unknown_keys_are_401_problems,
    revoked_and_expired_keys_are_403_problems,
    per_minute_limit_is_429_with_retry_after,
    daily_quota_is_429_until_midnight_then_the_new_day_is_allowed,
    monthly_quota_is_429_until_the_first,
    two_hundred_concurrent_requests_on_a_daily_limit_of_50_let_exactly_50_through,
    a_route_with_a_cost_spends_that_much,
    tollgate_unreachable_is_503_not_an_open_door,
    envoys_access_log_completes_each_row_with_the_answer,
    a_key_that_asks_gets_its_quota_back_when_the_upstream_fails,
    a_header_that_is_not_utf8_is_ignored_not_an_error,
    only_the_failed_request_is_refunded_when_two_share_a_request_id,
);

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

/// GET /v1/things through Envoy with these headers.
async fn get(envoy: &Envoy, headers: &[(&str, &str)]) -> Reply {
    get_at(envoy, "/v1/things", headers).await
}

/// GET `path` through Envoy with this key.
async fn get_path(envoy: &Envoy, path: &str, key: &str) -> Reply {
    get_at(envoy, path, &[("x-api-key", key)]).await
}

async fn get_at(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = http_client().get(envoy.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("envoy answers");
    Reply {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap(),
    }
}

async fn allowed_request_reaches_upstream_with_key_id_and_rate_limit_headers(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |c| c.authz.hide_credentials = true).await;
    let (key, id) = tg
        .create_key("shop", limits(Some(100), Some(5), None))
        .await;
    let r = get(
        &envoy,
        &[
            ("x-api-key", &key),
            ("x-tollgate-key-id", "999"),
            ("x-request-id", "e2e-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "hello from upstream\n");
    // The upstream saw tollgate's key id (not the client's forgery) and no key (Envoy leaves
    // out an echo header whose value is empty).
    assert_eq!(
        r.header("x-echo-tollgate-key-id"),
        Some(id.to_string().as_str())
    );
    assert_eq!(r.header("x-echo-api-key"), None);
    // The client sees the limit closest to exhaustion: 4 of 5 left today.
    assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("4"));
    assert_eq!(r.header("ratelimit"), Some(r#""daily";r=4;t=43180"#));
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""per_minute";q=100;w=60, "daily";q=5;w=86400"#)
    );
    // Envoy's access log has the key from tollgate's dynamic metadata.
    let log = envoy.access_log_lines(1).await;
    assert!(
        log.iter().any(|l| l.contains("request_id=e2e-1")
            && l.contains(&format!("key_id={id} "))
            && l.contains("key_name=shop")
            && l.contains(" 200 ")),
        "{log:?}"
    );
    tg.stop().await;
}

async fn bearer_key_passes_and_authorization_reaches_upstream_unless_hidden(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let (key, _) = tg.create_key("b", Limits::default()).await;
    let bearer = format!("Bearer {key}");
    let r = get(&envoy, &[("authorization", &bearer)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-echo-authorization"), Some(bearer.as_str()));
    let r = get(&envoy, &[("x-api-key", &key)]).await;
    assert_eq!(r.header("x-echo-api-key"), Some(key.as_str()));
    tg.stop().await;
}

async fn missing_and_unknown_keys_are_401_problems(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let r = get(&envoy, &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer realm="tollgate""#)
    );
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let body = r.json();
    assert_eq!(body["error"], "missing_key");
    assert_eq!(body["status"], 401);
    assert_eq!(body["type"], "urn:tollgate:error:missing_key");

    let unknown = tollgate::keys::generate().plaintext;
    let r = get(&envoy, &[("x-api-key", &unknown)]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "invalid_key");
    assert!(
        r.header("x-echo-tollgate-key-id").is_none(),
        "never reached upstream"
    );
    tg.stop().await;
}

/// A header value of bytes that are not UTF-8 (HTTP allows them) does not change the decision,
/// whichever way Envoy sends the headers (the raw header map, or the headers map as Istio's
/// filter does): tollgate reads only the fields a Check uses (`grpc::check_request`).
async fn a_header_that_is_not_utf8_is_ignored_not_an_error(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let (key, _) = tg.create_key("latin", Limits::default()).await;
    let odd = reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap();
    let send = |key: &str| {
        http_client()
            .get(envoy.url("/v1/things"))
            .header("x-api-key", key)
            .header("x-latin", odd.clone())
            .send()
    };
    let r = send(&key).await.expect("envoy answers");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello from upstream\n");
    let r = send("tg_unknownunknownunknownunknownunknown0000")
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    tg.stop().await;
}

async fn revoked_and_expired_keys_are_403_problems(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let (revoked, id) = tg.create_key("r", Limits::default()).await;
    let (expiring, _) = tg
        .create_key_expiring("e", Limits::default(), Some(t0() + Span::hours(1)))
        .await;
    tg.stores.keys.revoke(id, t0()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let r = get(&envoy, &[("x-api-key", &revoked)]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "key_revoked");
    assert_eq!(get(&envoy, &[("x-api-key", &expiring)]).await.status, 200);
    tg.clock.advance(Span::hours(1));
    let r = get(&envoy, &[("x-api-key", &expiring)]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "key_expired");
    tg.stop().await;
}

async fn per_minute_limit_is_429_with_retry_after(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let (key, id) = tg.create_key("pm", limits(Some(2), Some(10), None)).await;
    for _ in 0..2 {
        assert_eq!(get(&envoy, &[("x-api-key", &key)]).await.status, 200);
    }
    let r = get(&envoy, &[("x-api-key", &key)]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("40"));
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("x-ratelimit-reset"), Some("40"));
    let body = r.json();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["retry_after"], 40);
    assert_eq!(body["limit"]["name"], "per_minute");
    // The refused request did not touch the daily quota.
    let usage = tg.stores.quotas.usage(id, t0()).await.unwrap();
    assert_eq!(usage.daily, 2);
    tg.clock.advance(Span::seconds(40));
    assert_eq!(get(&envoy, &[("x-api-key", &key)]).await.status, 200);
    tg.stop().await;
}

async fn daily_quota_is_429_until_midnight_then_the_new_day_is_allowed(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let (key, _) = tg.create_key("d", limits(None, Some(3), None)).await;
    for _ in 0..3 {
        assert_eq!(get(&envoy, &[("x-api-key", &key)]).await.status, 200);
    }
    let r = get(&envoy, &[("x-api-key", &key)]).await;
    assert_eq!(r.status, 429);
    // 12:00:20 → midnight is 11 h 59 min 40 s away.
    assert_eq!(r.header("retry-after"), Some("43180"));
    let body = r.json();
    assert_eq!(body["error"], "daily_quota_exceeded");
    assert_eq!(body["limit"]["name"], "daily");
    assert_eq!(body["limit"]["limit"], 3);
    // The key hit yesterday's limit; today it starts from zero.
    tg.clock.set("2026-03-11T00:00:00Z".parse().unwrap());
    let r = get(&envoy, &[("x-api-key", &key)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("2"));
    tg.stop().await;
}

async fn monthly_quota_is_429_until_the_first(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let (key, _) = tg.create_key("m", limits(None, None, Some(1))).await;
    assert_eq!(get(&envoy, &[("x-api-key", &key)]).await.status, 200);
    let r = get(&envoy, &[("x-api-key", &key)]).await;
    assert_eq!(r.status, 429);
    // 2026-03-10 12:00:20 → 2026-04-01 00:00:00.
    let expected = (21 * 86_400 + 11 * 3600 + 59 * 60 + 40).to_string();
    assert_eq!(r.header("retry-after"), Some(expected.as_str()));
    assert_eq!(r.json()["error"], "monthly_quota_exceeded");
    tg.clock.set("2026-04-01T00:00:00Z".parse().unwrap());
    assert_eq!(get(&envoy, &[("x-api-key", &key)]).await.status, 200);
    tg.stop().await;
}

async fn two_hundred_concurrent_requests_on_a_daily_limit_of_50_let_exactly_50_through(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let (key, id) = tg.create_key("burst", limits(None, Some(50), None)).await;
    let client = http_client();
    let url = envoy.url("/v1/things");
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            tokio::spawn(async move {
                let r = client
                    .get(url)
                    .header("x-api-key", key)
                    .send()
                    .await
                    .unwrap();
                r.status().as_u16()
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(statuses.get(&200), Some(&50), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&150), "{statuses:?}");
    let db = tg.stop().await;
    let usage = format!("SELECT daily_requests FROM api_usage WHERE api_key_id = {id}");
    assert_eq!(db.scalar(&usage).await, 50);
    let logged = format!(
        "SELECT COUNT(*) FROM api_requests_log WHERE api_key_id = {id} AND decision = 'allow'"
    );
    assert_eq!(db.scalar(&logged).await, 50);
}

async fn a_route_with_a_cost_spends_that_much(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let (key, id) = tg.create_key("costly", limits(None, Some(25), None)).await;
    let client = http_client();
    let report = |key: &str| {
        client
            .get(envoy.url("/v1/reports/monthly"))
            .header("x-api-key", key.to_string())
            .send()
    };
    let r = report(&key).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining"], "15");
    assert_eq!(report(&key).await.unwrap().status(), 200);
    // 10 more do not fit in the 5 left; a plain request still does.
    let r = report(&key).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "daily_quota_exceeded"
    );
    let r = get(&envoy, &[("x-api-key", &key)]).await;
    assert_eq!(
        (r.status, r.header("x-ratelimit-remaining")),
        (200, Some("4"))
    );
    assert_eq!(tg.stores.quotas.usage(id, t0()).await.unwrap().daily, 21);
    tg.stop().await;
}

async fn tollgate_unreachable_is_503_not_an_open_door(hop: Hop) {
    // A port nothing listens on.
    let nowhere: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let pki = (hop == Hop::Mtls).then(Pki::new);
    let envoy = envoy(hop, nowhere, pki.as_ref()).await;
    let r = get(&envoy, &[("x-api-key", "tg_whatever")]).await;
    assert_eq!(r.status, 503);
    assert!(r.header("x-echo-tollgate-key-id").is_none());
}

async fn envoys_access_log_completes_each_row_with_the_answer(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let (key, id) = tg.create_key("logged", Limits::default()).await;
    let client = http_client();
    let send = |path: &str, key: Option<&str>, rid: &str| {
        let mut r = client
            .get(envoy.url(path))
            .header("x-request-id", rid.to_string());
        if let Some(k) = key {
            r = r.header("x-api-key", k.to_string());
        }
        r.send()
    };
    assert_eq!(
        send("/v1/things", Some(&key), "rid-ok")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        send("/v1/broken", Some(&key), "rid-5xx")
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        send("/v1/things", None, "rid-401").await.unwrap().status(),
        401
    );
    // Envoy flushes its access log every 0.25 s; tollgate completes rows as entries arrive.
    let row = |rid: &str, col: &str| {
        format!("SELECT COALESCE(MAX({col}), -1) FROM api_requests_log WHERE request_id = '{rid}'")
    };
    let started = std::time::Instant::now();
    for (rid, status) in [("rid-ok", 200), ("rid-5xx", 503), ("rid-401", 401)] {
        loop {
            let got = tg.scalar(&row(rid, "response_status")).await;
            if got == status {
                break;
            }
            if started.elapsed() > std::time::Duration::from_secs(15) {
                let db = sqlx::SqlitePool::connect(&tg.db_url).await.unwrap();
                let rows: Vec<(Option<String>, Option<i64>)> =
                    sqlx::query_as("SELECT request_id, response_status FROM api_requests_log")
                        .fetch_all(&db)
                        .await
                        .unwrap();
                panic!("{rid}: response_status {got}, want {status}; rows {rows:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    assert!(tg.scalar(&row("rid-ok", "bytes_sent")).await > "hello from upstream\n".len() as i64);
    assert!(tg.scalar(&row("rid-ok", "bytes_received")).await > 0);
    assert!(tg.scalar(&row("rid-ok", "duration_ms")).await >= 0);
    let key_of = "SELECT api_key_id FROM api_requests_log WHERE request_id = 'rid-5xx'";
    assert_eq!(tg.scalar(key_of).await, id);
    let metrics = tg.metrics_text().await;
    assert!(
        metrics.contains("tollgate_access_log_entries_total{result=\"completed\"} 3\n"),
        "{metrics}"
    );
    tg.stop().await;
}

async fn a_key_that_asks_gets_its_quota_back_when_the_upstream_fails(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let refunding = Limits {
        daily: Some(2),
        refund_5xx: true,
        ..Limits::default()
    };
    let (key, id) = tg.create_key("refunds", refunding).await;
    for _ in 0..2 {
        let r = get_path(&envoy, "/v1/broken", &key).await;
        assert_eq!(
            r.status, 503,
            "the upstream failed; tollgate let it through"
        );
    }
    // Envoy's access log tells tollgate; the two requests' quota comes back.
    let started = std::time::Instant::now();
    while tg.stores.quotas.usage(id, t0()).await.unwrap().daily != 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "quota not given back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for _ in 0..2 {
        assert_eq!(get_path(&envoy, "/v1/things", &key).await.status, 200);
    }
    assert_eq!(get_path(&envoy, "/v1/things", &key).await.status, 429);
    tg.stop().await;
}

/// Two requests under one client-chosen `x-request-id`, a 200 and an upstream 503, for a key with
/// `refund_5xx`: Envoy's access log brings back each Check's own minted id, so exactly the 503's
/// row is refunded and the 200's row is completed with its 200.
async fn only_the_failed_request_is_refunded_when_two_share_a_request_id(hop: Hop) {
    let (tg, envoy, _pki) = start(hop, |_| {}).await;
    let refunding = Limits {
        daily: Some(10),
        refund_5xx: true,
        ..Limits::default()
    };
    let (key, id) = tg.create_key("refunds", refunding).await;
    let shared = [("x-api-key", key.as_str()), ("x-request-id", "same")];
    assert_eq!(get_at(&envoy, "/v1/things", &shared).await.status, 200);
    assert_eq!(get_at(&envoy, "/v1/broken", &shared).await.status, 503);
    let completed = "SELECT count(*) FROM api_requests_log WHERE response_status IS NOT NULL";
    let started = std::time::Instant::now();
    while tg.scalar(completed).await != 2 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "rows not completed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let refunded = "SELECT count(*) FROM api_requests_log \
         WHERE refunded AND response_status = 503 AND path = '/v1/broken'";
    assert_eq!(tg.scalar(refunded).await, 1);
    let kept = "SELECT count(*) FROM api_requests_log \
         WHERE NOT refunded AND response_status = 200 AND path = '/v1/things'";
    assert_eq!(tg.scalar(kept).await, 1);
    assert_eq!(tg.stores.quotas.usage(id, t0()).await.unwrap().daily, 1);
    tg.stop().await;
}

/// envoy/ext_authz_mtls.yaml is envoy/ext_authz.yaml with TLS on the tollgate cluster, and
/// nothing else: what the plaintext runs show holds for it too.
#[test]
fn the_mtls_config_is_the_plaintext_one_with_tls_to_tollgate() {
    let read = |file: &str| -> serde_yaml::Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("envoy")
            .join(file);
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let plaintext = read("ext_authz.yaml");
    let mut mtls = read("ext_authz_mtls.yaml");
    let clusters = mtls["static_resources"]["clusters"]
        .as_sequence_mut()
        .unwrap();
    let tollgate = clusters
        .iter_mut()
        .find(|c| c["name"] == "tollgate")
        .unwrap();
    let socket = tollgate
        .as_mapping_mut()
        .unwrap()
        .remove("transport_socket")
        .expect("the tollgate cluster has a transport_socket");
    let tls = &socket["typed_config"];
    assert_eq!(
        tls["@type"],
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    );
    let common = &tls["common_tls_context"];
    assert!(common["tls_certificates"][0]["certificate_chain"]["filename"].is_string());
    assert!(common["validation_context"]["trusted_ca"]["filename"].is_string());
    assert_eq!(mtls, plaintext);
}

/// Keys of one identity share its daily limit through real Envoy: what one key spends, the other
/// cannot, and the refusal names the identity's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_one_identity_share_its_daily_limit_through_envoy() {
    let tg = Tollgate::start().await;
    let envoy = Envoy::start("ext_authz.yaml", tg.grpc).await;
    let out = tg.cli(&[
        "identities",
        "create",
        "--name",
        "acme",
        "--daily",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let identity: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let identity_id = identity["id"].to_string();
    let create = |name: &str| {
        harness::cli::cli_create_key(
            tg.dir.path(),
            &tg.db_url,
            &["--name", name, "--identity", &identity_id],
        )
        .0
    };
    let (a, b) = (create("a"), create("b"));
    for key in [&a, &b, &a] {
        let r = get_path(&envoy, "/v1/things", key).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for key in [&a, &b] {
        let r = get_path(&envoy, "/v1/things", key).await;
        assert_eq!(r.status, 429, "{}", r.body);
        let body = r.json();
        assert_eq!(body["error"], "daily_quota_exceeded");
        assert_eq!(body["limit_scope"], "identity");
        assert!(r.header("retry-after").is_some());
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_needing_a_permission_and_key_metadata_sent_upstream() {
    let tg = Tollgate::start_with(|c| c.authz.metadata_headers = vec!["plan".into()]).await;
    let envoy = Envoy::start("ext_authz.yaml", tg.grpc).await;
    let create = |args: &[&str]| harness::cli::cli_create_key(tg.dir.path(), &tg.db_url, args);
    let (reader, _) = create(&[
        "--name",
        "reader",
        "--permissions",
        "reports.read",
        "--metadata",
        r#"{"plan":"gold"}"#,
    ]);
    let (billing, _) = create(&["--name", "billing", "--permissions", "billing.read"]);
    let (anything, _) = create(&["--name", "anything"]);
    // /v1/billing needs billing.read (envoy/ext_authz.yaml).
    let r = get_path(&envoy, "/v1/billing/invoices", &reader).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let body = r.json();
    assert_eq!(body["error"], "permission_denied");
    assert_eq!(body["permission"], "billing.read");
    assert_eq!(
        get_path(&envoy, "/v1/billing/invoices", &billing)
            .await
            .status,
        200
    );
    assert_eq!(
        get_path(&envoy, "/v1/billing/invoices", &anything)
            .await
            .status,
        200
    );
    // Other routes need nothing; the upstream gets the key's plan, never the client's.
    let r = get(
        &envoy,
        &[("x-api-key", &reader), ("x-tollgate-plan", "platinum")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-echo-tollgate-plan"), Some("gold"));
    let r = get(
        &envoy,
        &[("x-api-key", &billing), ("x-tollgate-plan", "platinum")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-echo-tollgate-plan"),
        None,
        "a key without a plan sends none"
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_keys_old_secret_works_through_envoy_until_its_grace_ends() {
    let tg = Tollgate::start().await;
    // The CLI reckons the grace by the wall clock.
    tg.clock.set(chrono::Utc::now());
    let envoy = Envoy::start("ext_authz.yaml", tg.grpc).await;
    let (old, id) = harness::cli::cli_create_key(tg.dir.path(), &tg.db_url, &["--name", "rot"]);
    assert_eq!(get_path(&envoy, "/v1/things", &old).await.status, 200);
    let rotate = |grace: &str| {
        let out = tg.cli(&[
            "keys",
            "rotate",
            &id.to_string(),
            "--grace",
            grace,
            "--json",
        ]);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["key"].as_str().unwrap().to_string()
    };
    let new = rotate("1h");
    let r = get_path(&envoy, "/v1/things", &new).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("x-echo-tollgate-key-id"),
        Some(id.to_string().as_str())
    );
    assert_eq!(get_path(&envoy, "/v1/things", &old).await.status, 200);
    // A second rotation without grace: the secret it replaces stops within a second, and the
    // first one with it.
    let newest = rotate("0s");
    // tollgate's clock is the test's: let it catch up with the wall clock the CLI used.
    tg.clock.set(chrono::Utc::now());
    // Both within a second: `new` may be refused at once by the clock (its grace is over)
    // while the change has yet to reach the cached `old`.
    let started = std::time::Instant::now();
    for secret in [&new, &old] {
        while get_path(&envoy, "/v1/things", secret).await.status != 401 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(1),
                "0s grace"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let r = get_path(&envoy, "/v1/things", &old).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (401, "invalid_key".into())
    );
    assert_eq!(get_path(&envoy, "/v1/things", &newest).await.status, 200);
    tg.stop().await;
}

/// The CUSTOM policy of examples/istio leaves the health endpoints out: Istio's RBAC shadow
/// filter does not mark them, so ext_authz lets them through unchecked, keyless, while every
/// other path still needs a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_health_paths_the_policy_leaves_out_are_not_checked() {
    let (tg, envoy, _pki) = start(Hop::Istio, |_| {}).await;
    for path in ["/healthz", "/readyz"] {
        let r = get_at(&envoy, path, &[]).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "hello from upstream\n"),
            "{path}"
        );
    }
    assert_eq!(get_at(&envoy, "/healthz/x", &[]).await.status, 401);
    assert_eq!(get(&envoy, &[]).await.status, 401);
    tg.stop().await;
}

fn yaml_file(path: &str) -> serde_yaml::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).unwrap()
}

/// What Istio's pilot writes for an `envoyExtAuthzGrpc` provider (generateGRPCConfig in
/// pilot/pkg/security/authz/builder/extauthz.go): V3, the provider's status and fail-open
/// choice, its timeout (600s when it has none), the outbound cluster of its service, and ext_authz
/// enabled only where the CUSTOM policy's shadow rule matched. Nothing else: no header list
/// (every header goes, in the headers map), no raw headers, no peer certificate.
fn istio_ext_authz_filter(name: &str, provider: &serde_yaml::Value) -> serde_yaml::Value {
    let service = provider["service"].as_str().expect("provider.service");
    let port = provider["port"].as_u64().expect("provider.port");
    assert!(
        provider.get("includeRequestBodyInCheck").is_none(),
        "update the generator below"
    );
    let mut config = yaml(&format!(
        r#"
"@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
failure_mode_allow: {fail_open}
grpc_service:
  envoy_grpc:
    cluster_name: "outbound|{port}||{service}"
    authority: {service}
  timeout: {timeout}
filter_enabled_metadata:
  filter: envoy.filters.http.rbac
  path:
  - key: istio_ext_authz_shadow_effective_policy_id
  value:
    string_match: {{ prefix: istio-ext-authz-{name} }}
transport_api_version: V3
"#,
        fail_open = provider["failOpen"].as_bool().unwrap_or(false),
        timeout = provider["timeout"].as_str().unwrap_or("600s"),
    ));
    if let Some(status) = provider["statusOnError"].as_str() {
        // Envoy's StatusCode names, for the codes worth choosing.
        let code = match status {
            "403" => "Forbidden",
            "500" => "InternalServerError",
            "502" => "BadGateway",
            "503" => "ServiceUnavailable",
            "504" => "GatewayTimeout",
            other => panic!("statusOnError {other}: add its StatusCode name"),
        };
        config["status_on_error"] = yaml(&format!("{{ code: {code} }}"));
    }
    yaml(&format!(
        "name: envoy.filters.http.ext_authz\ntyped_config: {}",
        serde_json::to_string(&config).unwrap()
    ))
}

/// What Istio's pilot writes for a CUSTOM AuthorizationPolicy whose one rule is "every path but
/// these" (builder.go, model/permission.go): an RBAC filter with only shadow rules, the rule named
/// after the provider, namespace, policy and rule index.
fn istio_rbac_filter(policy: &serde_yaml::Value) -> serde_yaml::Value {
    let spec = &policy["spec"];
    assert_eq!(spec["action"], "CUSTOM");
    let rules = spec["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1, "update the generator below");
    let to = rules[0]["to"].as_sequence().unwrap();
    assert!(rules[0].get("from").is_none() && rules[0].get("when").is_none() && to.len() == 1);
    let operation = to[0]["operation"].as_mapping().unwrap();
    assert_eq!(
        operation.len(),
        1,
        "only notPaths: update the generator below"
    );
    let paths: Vec<String> = to[0]["operation"]["notPaths"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            let p = p.as_str().unwrap();
            assert!(!p.contains('*') && !p.contains('{'), "exact paths only");
            format!("- url_path: {{ path: {{ exact: {p} }} }}")
        })
        .collect();
    let name = format!(
        "istio-ext-authz-{}-ns[{}]-policy[{}]-rule[0]",
        spec["provider"]["name"].as_str().unwrap(),
        policy["metadata"]["namespace"].as_str().unwrap(),
        policy["metadata"]["name"].as_str().unwrap()
    );
    let indent = " ".repeat(18);
    yaml(&format!(
        r#"
name: envoy.filters.http.rbac
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
  shadow_rules:
    action: DENY
    policies:
      "{name}":
        permissions:
        - and_rules:
            rules:
            - not_rule:
                or_rules:
                  rules:
{indent}{paths}
        principals:
        - and_ids:
            ids:
            - any: true
  shadow_rules_stat_prefix: istio_ext_authz_
"#,
        paths = paths.join(&format!("\n{indent}")),
    ))
}

/// envoy/ext_authz_istio.yaml is what Istio makes of examples/istio's provider, CUSTOM policy
/// and access-log provider, in envoy/ext_authz.yaml; the rest of it is envoy/ext_authz.yaml.
#[test]
fn the_istio_config_is_what_istio_generates_from_examples_istio() {
    let mesh = yaml_file("examples/istio/mesh-config.yaml");
    let policy = yaml_file("examples/istio/authorization-policy.yaml");
    let providers = mesh["spec"]["meshConfig"]["extensionProviders"]
        .as_sequence()
        .unwrap();
    let provider_named = |name: &str| {
        providers
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no extension provider {name}"))
    };
    let name = policy["spec"]["provider"]["name"].as_str().unwrap();
    let authz = &provider_named(name)["envoyExtAuthzGrpc"];
    let mut istio = yaml_file("envoy/ext_authz_istio.yaml");
    let hcm = &mut istio["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let filters = hcm["http_filters"].as_sequence_mut().unwrap();
    assert_eq!(filters.len(), 3, "rbac, ext_authz, router");
    assert_eq!(filters[0], istio_rbac_filter(&policy));
    assert_eq!(filters[1], istio_ext_authz_filter(name, authz));
    // The access log to tollgate, from the envoyHttpAls provider the Telemetry names.
    let telemetry = yaml_file("examples/istio/telemetry.yaml");
    let als = &provider_named(
        telemetry["spec"]["accessLogging"][0]["providers"][0]["name"]
            .as_str()
            .unwrap(),
    )["envoyHttpAls"];
    let cluster = format!(
        "outbound|{}||{}",
        als["port"].as_u64().unwrap(),
        als["service"].as_str().unwrap()
    );
    let logs = hcm["access_log"].as_sequence().unwrap();
    let expected_als = yaml(&format!(
        r#"
name: envoy.access_loggers.http_grpc
typed_config:
  "@type": type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig
  common_config:
    log_name: {log_name}
    grpc_service:
      envoy_grpc:
        cluster_name: "{cluster}"
        authority: {service}
    transport_api_version: V3
"#,
        log_name = als["logName"].as_str().unwrap(),
        service = als["service"].as_str().unwrap(),
    ));
    assert_eq!(logs[1], expected_als);
    // The rest is envoy/ext_authz.yaml, the tollgate cluster renamed as Istio names it.
    let plaintext = yaml_file("envoy/ext_authz.yaml");
    let plain_hcm = &plaintext["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
        [0]["typed_config"];
    let hcm = &mut istio["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["access_log"][1] = plain_hcm["access_log"][1].clone();
    hcm["http_filters"] = plain_hcm["http_filters"].clone();
    let authz_cluster = format!(
        "outbound|{}||{}",
        authz["port"].as_u64().unwrap(),
        authz["service"].as_str().unwrap()
    );
    assert_eq!(authz_cluster, cluster, "one tollgate cluster for both");
    let renamed = serde_yaml::to_string(&istio)
        .unwrap()
        .replace(&format!("'{cluster}'"), "tollgate")
        .replace(&cluster, "tollgate");
    assert_eq!(yaml(&renamed), plaintext);
}
