//! ext_authz Checks as Envoy sends them, and what a client sees of the answers: builders
//! ([`check_request`], [`key_header`]), readers ([`ok`], [`denied`], [`headers_of`],
//! [`allowed`]), and concurrent loads over several clients ([`burst`], [`one_round_each`]).

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    attribute_context::{HttpRequest, Request as AttrRequest},
    authorization_client::AuthorizationClient,
    check_response,
};
use tonic::transport::Channel;

/// A CheckRequest for an HTTP request with these headers.
pub fn check_request(headers: &[(&str, &str)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: "req-1".into(),
                    method: "GET".into(),
                    path: "/v1/things".into(),
                    host: "api.example".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

pub fn key_header(key: &str) -> CheckRequest {
    check_request(&[("x-api-key", key)])
}

/// What the client sees of a denial: status, headers, JSON body.
pub struct Denied {
    pub grpc_code: i32,
    pub status: i32,
    pub headers: HashMap<String, String>,
    pub body: serde_json::Value,
}

pub fn headers_of(list: &[HeaderValueOption]) -> HashMap<String, String> {
    list.iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect()
}

pub fn denied(resp: &CheckResponse) -> Denied {
    match &resp.http_response {
        Some(check_response::HttpResponse::DeniedResponse(DeniedHttpResponse {
            status,
            headers,
            body,
        })) => Denied {
            grpc_code: resp.status.as_ref().map(|s| s.code).unwrap_or(0),
            status: status.as_ref().map(|s| s.code).unwrap_or(0),
            headers: headers_of(headers),
            body: serde_json::from_str(body).expect("JSON body"),
        },
        other => panic!("expected a denial, got {other:?}"),
    }
}

pub fn ok(resp: &CheckResponse) -> &OkHttpResponse {
    assert_eq!(resp.status.as_ref().map(|s| s.code), Some(0), "{resp:?}");
    match &resp.http_response {
        Some(check_response::HttpResponse::OkResponse(ok)) => ok,
        other => panic!("expected OK, got {other:?}"),
    }
}

/// Whether a Check answer allowed the request.
pub fn allowed(resp: &CheckResponse) -> bool {
    resp.status.as_ref().map(|s| s.code) == Some(0)
}

/// `n` concurrent Checks with `key`, spread round-robin over `clients`; returns, per request,
/// the index of the client that sent it and the answer.
pub async fn burst(
    clients: &[AuthorizationClient<Channel>],
    key: &str,
    n: usize,
) -> Vec<(usize, CheckResponse)> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let r = i % clients.len();
            let mut c = clients[r].clone();
            let key = key.to_string();
            tokio::spawn(async move { (r, c.check(key_header(&key)).await.unwrap().into_inner()) })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

/// Two requests through each client in turn, before a burst: each is admitted (the limit is
/// far from reached), so every replica provably takes part. Returns the admissions per client.
pub async fn one_round_each(clients: &[AuthorizationClient<Channel>], key: &str) -> Vec<usize> {
    let mut admitted = vec![0; clients.len()];
    for _ in 0..2 {
        for (i, c) in clients.iter().enumerate() {
            let resp = c.clone().check(key_header(key)).await.unwrap().into_inner();
            assert!(allowed(&resp), "{resp:?}");
            admitted[i] += 1;
        }
    }
    admitted
}
