//! A small JSON client for the HTTP API, as a test (or a curl user) sees it.

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Talks to one API base URL with one credential (or none).
#[derive(Debug, Clone)]
pub struct ApiClient {
    pub base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A response: status, headers, and the body as JSON (`Null` when empty or not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub json: Value,
}

impl ApiClient {
    pub fn new(base: &str) -> Self {
        ApiClient {
            base: base.trim_end_matches('/').to_owned(),
            token: None,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The credential this client sends, for handing to another client (a browser).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn with_token(&self, token: &str) -> Self {
        ApiClient {
            token: Some(token.to_owned()),
            ..self.clone()
        }
    }

    /// Creates an account as the operator (`admin_token`) and returns its id and a client
    /// holding a fresh key of it.
    pub async fn new_account(&self, admin_token: &str, name: &str) -> (String, ApiClient) {
        let admin = self.with_token(admin_token);
        let created = admin.post("/v1/accounts", serde_json::json!({ "name": name })).await;
        assert_eq!(created.status, 201, "{:?}", created.json);
        let id = created.json["id"].as_str().expect("an account id").to_owned();
        let key = admin
            .post(&format!("/v1/accounts/{id}/keys"), serde_json::json!({}))
            .await;
        assert_eq!(key.status, 201, "{:?}", key.json);
        (id, self.with_token(key.json["key"].as_str().expect("a key")))
    }

    /// Sends raw bytes, for tests of malformed input.
    pub async fn send(&self, method: Method, path: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> Answer {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.base));
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .expect("API reachable");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Answer {
            status,
            headers,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
        self.send(method, path, body, &[]).await
    }

    /// Like [`Self::post`], but `None` when the API cannot be reached at all.
    pub async fn try_post(&self, path: &str, body: Value) -> Option<Answer> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = Full::new(Bytes::from(serde_json::to_vec(&body).unwrap()));
        let resp = self.client.request(req.body(body).unwrap()).await.ok()?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        Some(Answer {
            status,
            headers,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        })
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Answer {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.call(Method::DELETE, path, None).await
    }
}

/// The body of a `GET` as text: `/metrics` and other answers that are not JSON.
pub async fn plain_text(url: &str) -> String {
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<Bytes>>();
    let resp = client.get(url.parse().expect("a valid URL")).await.expect("an answer");
    let body = resp.into_body().collect().await.expect("a body");
    String::from_utf8(body.to_bytes().to_vec()).expect("UTF-8 text")
}

/// The value of an unlabelled metric the process serving operations on `addr` exports.
pub async fn metric(addr: &str, name: &str) -> f64 {
    let metrics = plain_text(&format!("http://{addr}/metrics")).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}
