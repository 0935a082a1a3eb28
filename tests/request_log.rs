//! The request log cannot be wedged by one row: values are cleaned before they are queued, and a
//! row the database rejects is dropped and counted while the rows around it are written. A row
//! records its key's identity, and `tollgate usage --identity` counts by it.

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::data::accesslog::v3::{
    HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage,
    access_log_service_client::AccessLogServiceClient,
    stream_access_logs_message::{HttpAccessLogEntries, LogEntries},
};
use envoy_types::pb::google::protobuf::UInt32Value;
use harness::check::{allowed, check_request, denied, key_header};
use harness::cli::cli_create_key;
use harness::db::{Db, TestDb};
use harness::every_database;
use harness::server::{Tollgate, limits, t0};
use tollgate::store::{LogApi, LogRow};

/// A Check with this request id (and no key: it is denied, and logged all the same).
async fn check_with_id(tg: &Tollgate, request_id: &str, path: &str) {
    let mut request = check_request(&[("x-request-id", request_id)]);
    let http = request
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("an HTTP request");
    http.path = path.into();
    let mut c = tg.client().await;
    let d = denied(&c.check(request).await.unwrap().into_inner());
    assert_eq!(d.body["error"], "missing_key");
}

/// A NUL in `x-request-id` (PostgreSQL text cannot hold one) is cleaned before the row is queued,
/// so the row and every row behind it are written while tollgate runs. An access log entry with
/// only that request id completes nothing: the request id is the client's, and names no row.
async fn a_nul_in_a_request_id_is_cleaned_and_holds_up_no_row(db: Db) {
    let tg = Tollgate::on(db).await;
    check_with_id(&tg, "bad\0id\x1b[2J", "/v1/things").await;
    for i in 0..100 {
        check_with_id(&tg, &format!("rid-{i}"), "/v1/things").await;
    }
    tg.wait_for_count(
        "SELECT count(*) FROM api_requests_log WHERE request_id LIKE 'rid-%'",
        100,
    )
    .await;
    assert_eq!(
        tg.scalar(
            "SELECT count(*) FROM api_requests_log \
             WHERE request_id = 'bad\u{FFFD}id\u{FFFD}[2J'"
        )
        .await,
        1,
        "the request id is kept with its control characters replaced"
    );
    send_outcome(&tg, "bad\0id\x1b[2J", 204).await;
    let metrics = tg.metrics.clone();
    let started = Instant::now();
    while metrics.access_log_unmatched.get() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "entry not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        tg.scalar("SELECT count(*) FROM api_requests_log WHERE response_status IS NOT NULL")
            .await,
        0
    );
    let db = tg.stop().await;
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log").await,
        101
    );
    assert_eq!(metrics.reqlog_written.get(), 101);
    assert_eq!(metrics.reqlog_rejected.get(), 0);
    assert_eq!(metrics.reqlog_failed.get(), 0);
}

/// Streams one access log entry to tollgate, as Envoy's gRPC access logger does: the request
/// `request_id` was answered `status`.
async fn send_outcome(tg: &Tollgate, request_id: &str, status: u32) {
    let entry = HttpAccessLogEntry {
        request: Some(HttpRequestProperties {
            request_id: request_id.into(),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: status }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let message = StreamAccessLogsMessage {
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![entry],
        })),
        ..Default::default()
    };
    let mut c = AccessLogServiceClient::connect(format!("http://{}", tg.grpc))
        .await
        .expect("connects");
    c.stream_access_logs(futures_util::stream::iter([message]))
        .await
        .unwrap();
}

/// Makes the database itself refuse any row whose path is `/poison`, as a constraint would.
async fn reject_poison_paths(db: &TestDb, kind: Db) {
    match kind {
        Db::Postgres => {
            db.execute(
                "ALTER TABLE api_requests_log ADD CONSTRAINT no_poison \
                 CHECK (path IS DISTINCT FROM '/poison')",
            )
            .await
        }
        Db::Sqlite => {
            db.execute(
                "CREATE TRIGGER no_poison BEFORE INSERT ON api_requests_log \
                 WHEN NEW.path = '/poison' BEGIN SELECT RAISE(ABORT, 'no poison'); END",
            )
            .await
        }
    }
}

/// A row the database rejects (here a constraint, whatever the cleaning does) is found by
/// splitting its batch, dropped and counted; every other row of the batch is written.
async fn a_row_the_database_rejects_is_dropped_and_counted_and_the_rest_are_written(db: Db) {
    let tg = Tollgate::on_with(db, |c| {
        // All 101 rows in one batch, written when it is full.
        c.request_log.batch_size = 101;
        c.request_log.flush_interval = tollgate::config::Dur(Duration::from_secs(3600));
    })
    .await;
    reject_poison_paths(&tg.db, db).await;
    for i in 0..50 {
        check_with_id(&tg, &format!("rid-{i}"), "/v1/things").await;
    }
    check_with_id(&tg, "poison", "/poison").await;
    for i in 50..100 {
        check_with_id(&tg, &format!("rid-{i}"), "/v1/things").await;
    }
    tg.wait_for_count(
        "SELECT count(*) FROM api_requests_log WHERE request_id LIKE 'rid-%'",
        100,
    )
    .await;
    let metrics = tg.metrics.clone();
    let text = tg.metrics_text().await;
    let db = tg.stop().await;
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log").await,
        100
    );
    assert_eq!(metrics.reqlog_written.get(), 100);
    assert_eq!(metrics.reqlog_failed.get(), 0);
    assert!(metrics.reqlog_write_errors.get() > 1, "found by splitting");
    assert!(
        text.contains("\ntollgate_request_log_rejected_total 1\n"),
        "{text}"
    );
}

/// `tollgate ARGS --json` on the instance's database, as JSON.
fn cli_json(tg: &Tollgate, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = tg.cli(&all);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A Check row records the identity its key belonged to (allowed or denied), and none for a key
/// without one or a request without a key; `tollgate usage --identity` counts only the rows of
/// that identity, with `--key` too only that key's, and still shows an identity deleted since.
async fn a_row_records_its_keys_identity_and_usage_counts_by_it(db: Db) {
    let tg = Tollgate::on(db).await;
    let acme = cli_json(&tg, &["identities", "create", "--name", "acme"])["id"]
        .as_i64()
        .unwrap();
    let other = cli_json(&tg, &["identities", "create", "--name", "other"])["id"]
        .as_i64()
        .unwrap();
    let (a, a_id) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &[
            "--name",
            "a",
            "--identity",
            &acme.to_string(),
            "--daily",
            "2",
        ],
    );
    let (b, b_id) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &["--name", "b", "--identity", &other.to_string()],
    );
    let (loose, loose_id) = tg.create_key("loose", limits(None, None, None)).await;
    let mut c = tg.client().await;
    // a: 2 allowed and 1 over its daily quota; b: 2 allowed; loose: 1; no key: 1.
    let mut admitted = Vec::new();
    for key in [&a, &a, &a, &b, &b, &loose] {
        admitted.push(allowed(
            &c.check(key_header(key)).await.unwrap().into_inner(),
        ));
    }
    assert_eq!(admitted, [true, true, false, true, true, true]);
    c.check(check_request(&[])).await.unwrap();
    tg.wait_for_count("SELECT count(*) FROM api_requests_log", 7)
        .await;
    assert_eq!(
        tg.scalar(&format!(
            "SELECT count(*) FROM api_requests_log WHERE identity_id = {acme} \
             AND api_key_id = {a_id}"
        ))
        .await,
        3,
        "the refused row too"
    );
    assert_eq!(
        tg.scalar(&format!(
            "SELECT count(*) FROM api_requests_log WHERE identity_id = {other} \
             AND api_key_id = {b_id}"
        ))
        .await,
        2
    );
    assert_eq!(
        tg.scalar(&format!(
            "SELECT count(*) FROM api_requests_log WHERE identity_id IS NULL \
             AND (api_key_id = {loose_id} OR api_key_id IS NULL)"
        ))
        .await,
        2
    );

    let day = ["--since", "2026-03-10", "--until", "2026-03-10"];
    let usage = |extra: &[&str]| {
        let mut args = vec!["usage"];
        args.extend_from_slice(&day);
        args.extend_from_slice(extra);
        cli_json(&tg, &args)
    };
    let acme_arg = acme.to_string();
    let v = usage(&["--identity", &acme_arg]);
    assert_eq!(v["identity"], acme);
    assert_eq!(v["identity_name"], "acme");
    assert_eq!(
        v["days"],
        serde_json::json!([{"day": "2026-03-10", "allowed": 2, "denied": 1}])
    );
    assert_eq!(
        v["top_keys"],
        serde_json::json!([{"id": a_id, "name": "a", "allowed": 2, "denied": 1}])
    );
    // Both filters apply: a's rows are acme's; loose's are not.
    let a_arg = a_id.to_string();
    let v = usage(&["--identity", &acme_arg, "--key", &a_arg]);
    assert_eq!(v["days"][0]["allowed"], 2);
    let loose_arg = loose_id.to_string();
    let v = usage(&["--identity", &acme_arg, "--key", &loose_arg]);
    assert_eq!(v["days"], serde_json::json!([]));
    // All: every row of the day.
    let v = usage(&[]);
    assert_eq!(
        v["days"],
        serde_json::json!([{"day": "2026-03-10", "allowed": 5, "denied": 2}])
    );
    assert!(v["identity"].is_null());

    // An identity deleted since keeps its rows; the text says it is gone.
    let out = tg.cli(&["identities", "delete", &other.to_string()]);
    assert!(out.status.success(), "{out:?}");
    let other_arg = other.to_string();
    let v = usage(&["--identity", &other_arg]);
    assert!(v["identity_name"].is_null(), "{v}");
    assert_eq!(
        v["days"],
        serde_json::json!([{"day": "2026-03-10", "allowed": 2, "denied": 0}])
    );
    let text = |extra: &[&str]| {
        let mut args = vec!["usage"];
        args.extend_from_slice(&day);
        args.extend_from_slice(extra);
        let out = tg.cli(&args);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let gone = text(&["--identity", &other_arg]);
    assert!(
        gone.lines()
            .next()
            .unwrap()
            .ends_with(&format!(", identity {other} (no longer exists):")),
        "{gone}"
    );
    assert!(gone.contains("Top keys:") && gone.contains(" b "), "{gone}");
    let named = text(&["--identity", &acme_arg]);
    assert!(
        named
            .lines()
            .next()
            .unwrap()
            .ends_with(&format!(", identity {acme} (acme):")),
        "{named}"
    );
    tg.stop().await;
}

every_database!(
    a_nul_in_a_request_id_is_cleaned_and_holds_up_no_row,
    a_row_the_database_rejects_is_dropped_and_counted_and_the_rest_are_written,
    a_row_records_its_keys_identity_and_usage_counts_by_it,
);

/// Why values are cleaned before they are queued: PostgreSQL refuses a NUL in text, and says
/// retrying will not help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_a_nul_in_text_for_good() {
    let db = TestDb::create(Db::Postgres).await;
    let stores = db.open_stores().await;
    let row = |id: &str| LogRow {
        ts: t0(),
        api: LogApi::Authz,
        request_id: Some(id.into()),
        decision_id: None,
        key_id: None,
        method: Some("GET".into()),
        path: Some("/".into()),
        host: None,
        client_addr: None,
        allowed: false,
        reason: "missing_key",
        status: 401,
        cost: 0,
        key_prefix: None,
        identity_id: None,
    };
    let e = stores
        .log
        .write_batch(&[row("good"), row("bad\0id")])
        .await
        .expect_err("PostgreSQL refuses a NUL");
    assert!(!e.is_transient(), "{e}");
    stores.log.write_batch(&[row("good")]).await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM api_requests_log").await, 1);
    stores.close().await;
}
