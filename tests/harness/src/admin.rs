//! The admin API as a portal calls it: [`Rest`] (JSON over HTTP or HTTPS, with or without a
//! bearer token and a client certificate) and [`grpc`] (tonic's client), the test token and its
//! configured hash ([`TOKEN`], [`sha256_hex`]), and [`with_admin`], the configuration that serves
//! it with that token.

use std::net::SocketAddr;

use tollgate::admin::pb::admin_service_client::AdminServiceClient;
use tollgate::config::Config;
use tonic::transport::Channel;

use crate::net::http_client;
use crate::tls::{Pair, https_request};

/// The token the tests' admin API takes.
pub const TOKEN: &str = "test-admin-token-5b1f0c8e2d7a4e96";

/// SHA-256 of `s` in hex, as `admin.token_sha256` holds it.
pub fn sha256_hex(s: &str) -> String {
    tollgate::keys::hash_hex(&tollgate::keys::hash(s))
}

/// Serves the admin API on an ephemeral loopback port, taking `tokens`.
pub fn with_admin(config: &mut Config, tokens: &[&str]) {
    config.admin_addr = Some("127.0.0.1:0".parse().unwrap());
    config.admin.token_sha256 = tokens.iter().map(|t| sha256_hex(t)).collect();
}

/// What a REST call answered: status, content type, JSON body (`Null` when empty or not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
    pub text: String,
}

/// The REST side of an admin port.
#[derive(Clone)]
pub struct Rest {
    pub base: String,
    pub token: Option<String>,
    addr: SocketAddr,
    /// Over TLS: the CA trusted, and the client certificate presented.
    tls: Option<(String, Option<Pair>)>,
}

impl std::fmt::Debug for Rest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rest")
            .field("base", &self.base)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Rest {
    pub fn new(addr: SocketAddr, token: Option<&str>) -> Rest {
        Rest {
            base: format!("http://{addr}"),
            token: token.map(str::to_string),
            addr,
            tls: None,
        }
    }

    /// Over TLS, trusting `ca`, presenting `identity` (a client certificate) if any.
    pub fn tls(addr: SocketAddr, token: Option<&str>, ca: &str, identity: Option<&Pair>) -> Rest {
        Rest {
            base: format!("https://{addr}"),
            tls: Some((ca.to_string(), identity.cloned())),
            ..Rest::new(addr, token)
        }
    }

    /// `method path` with a JSON body (`None`: no body).
    pub async fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> Answer {
        let body = body.map(|b| b.to_string().into_bytes());
        self.send(method, path, Some("application/json"), body)
            .await
    }

    /// `method path` with these bytes as body, of this content type.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Answer {
        self.try_send(method, path, content_type, body)
            .await
            .expect("the admin port answers")
    }

    /// Like [`Rest::send`]; the error is why there was no answer (a refused handshake).
    pub async fn try_send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, String> {
        if let Some((ca, identity)) = &self.tls {
            let mut headers = Vec::new();
            if let Some(token) = &self.token {
                headers.push(("authorization", format!("Bearer {token}")));
            }
            if let (Some(ct), Some(_)) = (content_type, &body) {
                headers.push(("content-type", ct.to_string()));
            }
            let a = https_request(
                self.addr,
                ca,
                identity.as_ref(),
                method,
                path,
                &headers,
                body.as_deref(),
            )
            .await?;
            let text = String::from_utf8_lossy(&a.body).into_owned();
            return Ok(Answer {
                status: a.status,
                content_type: a
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                body: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                headers: a.headers,
                text,
            });
        }
        let mut req =
            http_client().request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if let Some(body) = body {
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            req = req.body(body);
        }
        let resp = req.send().await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Ok(Answer {
            status,
            content_type,
            headers,
            body,
            text,
        })
    }
}

/// tonic's client of an admin port.
pub async fn grpc(addr: SocketAddr) -> AdminServiceClient<Channel> {
    AdminServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connects")
}

/// `message` as a request with `Authorization: Bearer token` (none for `None`).
pub fn authed<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(token) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    r
}
