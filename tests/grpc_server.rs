//! The gRPC port's connection settings (`grpc.*`): a peer that stops answering PINGs is dropped,
//! old connections are closed so clients reconnect, one connection's streams are bounded, and so
//! is a message's size.

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use harness::check::{check_request, key_header};
use harness::server::Tollgate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::config::Dur;

/// Opens an HTTP/2 connection by hand (the client preface and an empty SETTINGS frame), then
/// only reads: it never answers a PING. Returns how long until the server closed it, or `None`
/// if it was still open after `wait`.
async fn silent_connection(addr: std::net::SocketAddr, wait: Duration) -> Option<Duration> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(wait, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    closed.ok().map(|()| started.elapsed())
}

fn no_keepalive_no_age(c: &mut tollgate::config::Config) {
    c.grpc.keepalive_interval = None;
    c.grpc.max_connection_age = None;
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let tg = Tollgate::start_with(|c| {
        no_keepalive_no_age(c);
        c.grpc.keepalive_interval = Some(Dur(Duration::from_secs(1)));
        c.grpc.keepalive_timeout = Dur(Duration::from_secs(1));
    })
    .await;
    let closed = silent_connection(tg.grpc, Duration::from_secs(8)).await;
    assert!(
        closed.is_some_and(|t| t < Duration::from_secs(6)),
        "closed after {closed:?}"
    );
    tg.stop().await;
}

#[tokio::test]
async fn without_keepalive_or_age_a_silent_connection_stays_open() {
    let tg = Tollgate::start_with(no_keepalive_no_age).await;
    let closed = silent_connection(tg.grpc, Duration::from_secs(4)).await;
    assert_eq!(closed, None);
    tg.stop().await;
}

#[tokio::test]
async fn connections_older_than_the_max_age_are_closed() {
    let tg = Tollgate::start_with(|c| {
        no_keepalive_no_age(c);
        c.grpc.max_connection_age = Some(Dur(Duration::from_secs(1)));
        c.shutdown_timeout = Dur(Duration::from_secs(1));
    })
    .await;
    let closed = silent_connection(tg.grpc, Duration::from_secs(8)).await;
    assert!(
        closed.is_some_and(|t| t < Duration::from_secs(6)),
        "closed after {closed:?}"
    );
    // A client reconnects and is answered as before.
    let mut c = tg.client().await;
    c.check(key_header("tg_none")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.check(key_header("tg_none")).await.unwrap();
    tg.stop().await;
}

/// With two streams per connection and two access-log streams open on one connection, a Check
/// on it waits until one of them ends.
#[tokio::test]
async fn one_connection_has_at_most_max_concurrent_streams() {
    let tg = Tollgate::start_with(|c| c.grpc.max_concurrent_streams = 2).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", tg.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut check =
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            channel.clone(),
        );
    check.check(key_header("tg_none")).await.unwrap();
    let open_stream = || {
        let mut logs = AccessLogServiceClient::new(channel.clone());
        tokio::spawn(async move {
            logs.stream_access_logs(futures_util::stream::pending::<StreamAccessLogsMessage>())
                .await
        })
    };
    let (first, second) = (open_stream(), open_stream());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = tokio::time::timeout(
        Duration::from_millis(700),
        check.check(key_header("tg_none")),
    )
    .await;
    assert!(third.is_err(), "a third stream was let through: {third:?}");
    first.abort();
    let after = tokio::time::timeout(Duration::from_secs(5), check.check(key_header("tg_none")))
        .await
        .expect("the stream freed by the first one's end");
    after.unwrap();
    second.abort();
    tg.stop().await;
}

#[tokio::test]
async fn a_message_larger_than_the_limit_is_refused_and_the_port_keeps_answering() {
    let tg = Tollgate::start_with(|c| c.grpc.max_message_bytes = 16 * 1024).await;
    let mut c = tg.client().await;
    let big = "x".repeat(32 * 1024);
    let refused = c
        .check(check_request(&[
            ("x-api-key", "tg_none"),
            ("x-padding", &big),
        ]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    let resp = c.check(key_header("tg_none")).await.unwrap().into_inner();
    assert!(resp.status.is_some());
    tg.stop().await;
}

/// The open connections per serving thread that `/metrics` shows, by thread.
async fn connections_per_thread(tg: &Tollgate) -> Vec<u64> {
    tg.metrics_text()
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("tollgate_grpc_connections{thread=\""))
        .map(|l| l.split_once("\"} ").unwrap().1.parse().unwrap())
        .collect()
}

/// Waits up to 5 s for `/metrics` to show `want` open connections per serving thread.
async fn wait_for_connections(tg: &Tollgate, want: &[u64]) {
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = connections_per_thread(tg).await;
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("connections per serving thread: {seen:?}, expected {want:?}");
}

async fn checked_connection(tg: &Tollgate) -> tonic::transport::Channel {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", tg.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            channel.clone(),
        );
    client.check(key_header("tg_none")).await.unwrap();
    channel
}

/// New connections go to the serving thread with the fewest open, so Envoy's (one per worker)
/// spread evenly, also after some close; every thread answers.
#[tokio::test]
async fn connections_spread_evenly_over_the_serving_threads() {
    let tg = Tollgate::start_with(|c| c.grpc.serving_threads = Some(3)).await;
    wait_for_connections(&tg, &[0, 0, 0]).await;
    let mut open = Vec::new();
    for _ in 0..6 {
        open.push(checked_connection(&tg).await);
    }
    wait_for_connections(&tg, &[2, 2, 2]).await;
    // The first and fourth went to thread 0, the second and fifth to thread 1.
    drop(open.remove(0));
    drop(open.remove(0));
    drop(open.remove(1));
    drop(open.remove(1));
    wait_for_connections(&tg, &[0, 0, 2]).await;
    // The next two go to the idle threads, not the busy one.
    open.push(checked_connection(&tg).await);
    open.push(checked_connection(&tg).await);
    wait_for_connections(&tg, &[1, 1, 2]).await;
    let (key, _) = tg
        .create_key("lanes", harness::server::limits(None, None, None))
        .await;
    for channel in &open {
        let mut c =
            envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
                channel.clone(),
            );
        let answer = c.check(key_header(&key)).await.unwrap().into_inner();
        assert_eq!(answer.status.unwrap().code, 0);
    }
    drop(open);
    tg.stop().await;
}

/// `grpc.serving_threads: 0` serves on the main runtime, with the same answers and one gauge.
#[tokio::test]
async fn with_no_serving_threads_the_main_runtime_serves() {
    let tg = Tollgate::start_with(|c| c.grpc.serving_threads = Some(0)).await;
    let (key, _) = tg
        .create_key("main", harness::server::limits(Some(2), None, None))
        .await;
    let first = checked_connection(&tg).await;
    let second = checked_connection(&tg).await;
    wait_for_connections(&tg, &[2]).await;
    let mut c =
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            first,
        );
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            c.check(key_header(&key))
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap()
                .code,
        );
    }
    // Two a minute: the third is refused (RESOURCE_EXHAUSTED).
    assert_eq!(got, [0, 0, 8]);
    drop(second);
    tg.stop().await;
}

/// A stop whose Checks outlast `shutdown_timeout` is forced: `run` ends and the port is released.
/// (On the main runtime the stuck call's connection closes when the process exits, which this
/// test's process does not.)
#[tokio::test]
async fn a_stop_whose_checks_outlast_the_shutdown_timeout_is_forced() {
    stop_is_forced(Some(0)).await;
}

/// The same on two serving threads: the forced stop reaches them, their runtimes end, and the
/// caller still waiting hears that its connection is gone rather than waiting on.
#[tokio::test]
async fn on_serving_threads_a_stop_whose_checks_outlast_the_shutdown_timeout_is_forced() {
    stop_is_forced(Some(2)).await;
}

async fn stop_is_forced(serving_threads: Option<usize>) {
    let tg = Tollgate::start_with(|c| {
        c.grpc.serving_threads = serving_threads;
        c.shutdown_timeout = Dur(Duration::from_secs(1));
        // The Check below would wait this long for the database.
        c.database.timeout = Dur(Duration::from_secs(60));
    })
    .await;
    let (key, _) = tg
        .create_key("stuck", harness::server::limits(None, Some(100), None))
        .await;
    let mut c = tg.client().await;
    let answer = c.check(key_header(&key)).await.unwrap().into_inner();
    assert_eq!(answer.status.unwrap().code, 0);
    let blocker = tg.db.lock_quota_writes().await;
    let stuck = tokio::spawn(async move { c.check(key_header(&key)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stuck.is_finished(), "the check should be waiting");
    let addr = tg.grpc;
    let started = Instant::now();
    let _db = tg.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stopped after {:?}",
        started.elapsed()
    );
    std::net::TcpListener::bind(addr).expect("the gRPC port is released");
    if serving_threads != Some(0) {
        let answer = tokio::time::timeout(Duration::from_secs(5), stuck)
            .await
            .expect("the waiting caller is let go")
            .unwrap();
        assert!(answer.is_err(), "{answer:?}");
    }
    blocker.release().await;
}
