//! The network around a test's servers: [`free_port`], the [`http_client`] every HTTP request
//! goes through, [`metrics_text`] and [`http_text`].

use std::time::Duration;

/// A port nothing listens on now (the OS picked it for a listener that is closed again).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP client that ignores proxy settings and gives up after 30 s.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The `/metrics` text of the HTTP port at `base` (`http://host:port`).
pub async fn metrics_text(base: &str) -> String {
    http_text(base, "/metrics").await
}

/// The body of `GET base/path` (`http://host:port`, `/readyz`), whatever its status.
pub async fn http_text(base: &str, path: &str) -> String {
    http_client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
