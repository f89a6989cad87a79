//! Webhook receivers: real hyper servers on 127.0.0.1 that record each request and answer as
//! the test's script says, over plain HTTP or TLS with a test CA.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Requests being answered now, the most ever answered at once, connections accepted,
/// connections open now, and whether the listening socket is still open.
#[derive(Debug, Default)]
struct Concurrency {
    now: AtomicUsize,
    peak: AtomicUsize,
    connections: AtomicUsize,
    open: AtomicUsize,
    listening: AtomicBool,
}

/// A request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub path: String,
    /// When the request arrived.
    pub at: std::time::Instant,
    /// The same, as unix milliseconds (to compare with the envelope's timestamp).
    pub at_ms: i64,
}

impl Captured {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }

    /// Verifies the signature in `header` as a Standard Webhooks receiver would, now.
    pub fn verify(
        &self,
        secret: &laabam_shared::signing::Secret,
        header: &str,
    ) -> Result<(), laabam_shared::signing::SignatureError> {
        laabam_shared::signing::verify(
            secret,
            self.header("webhook-id"),
            self.header("webhook-timestamp"),
            self.header(header),
            &self.body,
            laabam_shared::clock::now_ms() / 1000,
            laabam_shared::signing::DEFAULT_TOLERANCE,
        )
    }

    /// Whether `webhook-signature` verifies with `secret`.
    pub fn verifies(&self, secret: &laabam_shared::signing::Secret) -> bool {
        self.verify(secret, "webhook-signature").is_ok()
    }
}

/// What to answer.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    /// Answer with this status after a delay (longer than the dispatcher's timeout = a timeout).
    After(Duration, u16),
    /// Answer with this status and `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// Answer with this status and `Retry-After` as the HTTP-date this many seconds from now.
    RetryAfterDate(u16, u64),
}

/// Decides the answer from the request and how many times this `webhook-id` came before.
pub type Script = dyn Fn(&Captured, usize) -> Reply + Send + Sync;

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    pub url: String,
    requests: Arc<Mutex<Vec<Captured>>>,
    concurrency: Arc<Concurrency>,
    stop: CancellationToken,
    /// For TLS receivers: the CA file the dispatcher must trust.
    pub ca_file: Option<PathBuf>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
        // A TLS receiver's CA was written for the test's processes, which read it at start.
        if let Some(ca) = &self.ca_file {
            let _ = std::fs::remove_file(ca);
        }
    }
}

/// A TLS server config for `127.0.0.1`/`localhost`, and the PEM of the CA that signed it.
fn test_tls(names: &[&str]) -> (rustls::ServerConfig, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf_params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("leaf params");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf cert");
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("key der");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .expect("server config");
    (config, ca.pem())
}

impl Receiver {
    /// Answers 200 to everything.
    pub async fn ok() -> Self {
        Self::start(|_, _| Reply::Status(200)).await
    }

    /// Answers `first` to each event's first attempt and 200 to its retries, so every delivery
    /// passes through the retry scheduler once.
    pub async fn failing_first_attempts(first: Reply) -> Self {
        Self::start(move |_, nth| if nth == 0 { first } else { Reply::Status(200) }).await
    }

    /// Answers 500 to the first attempt of the event `event_id` and 200 to everything else, so
    /// that one delivery has a retry pending.
    pub async fn failing_first_attempt_of(event_id: &str) -> Self {
        let failing = event_id.to_owned();
        Self::start(move |req, nth| {
            if nth == 0 && req.header("webhook-id") == failing {
                Reply::Status(500)
            } else {
                Reply::Status(200)
            }
        })
        .await
    }

    pub async fn start(script: impl Fn(&Captured, usize) -> Reply + Send + Sync + 'static) -> Self {
        Self::serve(Arc::new(script), None, 0).await
    }

    /// A receiver on a given port, e.g. one coming back where an earlier one stopped.
    pub async fn start_on(port: u16, script: impl Fn(&Captured, usize) -> Reply + Send + Sync + 'static) -> Self {
        Self::serve(Arc::new(script), None, port).await
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.url
            .split(':')
            .nth(2)
            .and_then(|p| p.split('/').next())
            .and_then(|p| p.parse().ok())
            .expect("a port in the URL")
    }

    /// A TLS receiver whose certificate names `names`, signed by a fresh CA.
    pub async fn start_tls(names: &[&str], script: impl Fn(&Captured, usize) -> Reply + Send + Sync + 'static) -> Self {
        let (config, ca_pem) = test_tls(names);
        let mut rx = Self::serve(Arc::new(script), Some(Arc::new(config)), 0).await;
        let path = std::env::temp_dir().join(format!("laabam-test-ca-{}.pem", ulid::Ulid::new()));
        std::fs::write(&path, ca_pem).expect("write CA");
        rx.url = rx.url.replacen("http://", "https://", 1);
        rx.ca_file = Some(path);
        rx
    }

    async fn serve(script: Arc<Script>, tls: Option<Arc<rustls::ServerConfig>>, port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let requests: Arc<Mutex<Vec<Captured>>> = Arc::default();
        let concurrency: Arc<Concurrency> = Arc::default();
        let conc = concurrency.clone();
        let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let stop = CancellationToken::new();
        let (reqs, stop2) = (requests.clone(), stop.clone());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        concurrency.listening.store(true, Ordering::SeqCst);
        tokio::spawn(async move {
            loop {
                // Stopping comes first: a connection waiting to be accepted is not served.
                let (stream, _) = tokio::select! {
                    biased;
                    _ = stop2.cancelled() => {
                        drop(listener);
                        conc.listening.store(false, Ordering::SeqCst);
                        return;
                    }
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                conc.connections.fetch_add(1, Ordering::Relaxed);
                conc.open.fetch_add(1, Ordering::Relaxed);
                let (script, reqs, seen, stop3, acceptor, conc) = (
                    script.clone(),
                    reqs.clone(),
                    seen.clone(),
                    stop2.clone(),
                    acceptor.clone(),
                    conc.clone(),
                );
                let open = conc.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<Incoming>| {
                        let (script, reqs, seen, conc) = (script.clone(), reqs.clone(), seen.clone(), conc.clone());
                        async move {
                            let now = conc.now.fetch_add(1, Ordering::SeqCst) + 1;
                            conc.peak.fetch_max(now, Ordering::SeqCst);
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let captured = Captured {
                                at: std::time::Instant::now(),
                                at_ms: laabam_shared::clock::now_ms(),
                                headers: parts.headers,
                                body,
                                path: parts.uri.path().to_owned(),
                            };
                            let nth = {
                                let mut seen = seen.lock().unwrap();
                                let n = seen.entry(captured.header("webhook-id").to_owned()).or_insert(0);
                                *n += 1;
                                *n - 1
                            };
                            let reply = script(&captured, nth);
                            reqs.lock().unwrap().push(captured);
                            let (status, retry_after) = match reply {
                                Reply::Status(s) => (s, None),
                                Reply::After(delay, s) => {
                                    tokio::time::sleep(delay).await;
                                    (s, None)
                                }
                                Reply::RetryAfter(s, secs) => (s, Some(secs.to_string())),
                                Reply::RetryAfterDate(s, secs) => {
                                    let at = std::time::SystemTime::now() + Duration::from_secs(secs);
                                    (s, Some(httpdate::fmt_http_date(at)))
                                }
                            };
                            conc.now.fetch_sub(1, Ordering::SeqCst);
                            let mut resp = Response::new(Full::new(Bytes::from(format!("answered {status}"))));
                            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                            if let Some(value) = retry_after {
                                let value = http::HeaderValue::from_str(&value).expect("a header value");
                                resp.headers_mut().insert(http::header::RETRY_AFTER, value);
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let builder = http1::Builder::new();
                    let serve = async {
                        match acceptor {
                            Some(acceptor) => {
                                if let Ok(tls) = acceptor.accept(stream).await {
                                    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                                }
                            }
                            None => {
                                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    };
                    tokio::select! {
                        biased;
                        _ = stop3.cancelled() => {}
                        _ = serve => {}
                    }
                    open.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Receiver {
            url: format!("http://127.0.0.1:{}/hook", addr.port()),
            requests,
            concurrency,
            stop,
            ca_file: None,
        }
    }

    /// Stops, and returns once the listening socket and every connection are closed, with the
    /// requests per `webhook-id` it saw: from then on a request to its port can only be
    /// refused, so none can arrive here unseen. Dropping a receiver only starts that.
    pub async fn shut_down(self) -> HashMap<String, usize> {
        self.stop.cancel();
        crate::wait::wait_until("the receiver closed", Duration::from_secs(10), || async {
            !self.concurrency.listening.load(Ordering::SeqCst) && self.open_connections() == 0
        })
        .await;
        self.per_event()
    }

    pub fn requests(&self) -> Vec<Captured> {
        self.requests.lock().unwrap().clone()
    }

    /// The most requests this receiver was ever answering at once.
    pub fn peak_concurrency(&self) -> usize {
        self.concurrency.peak.load(Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Connections accepted so far: with keep-alive, far fewer than requests.
    pub fn connections(&self) -> usize {
        self.concurrency.connections.load(Ordering::Relaxed)
    }

    /// Connections open now: those a client keeps for reuse, and those being answered.
    pub fn open_connections(&self) -> usize {
        self.concurrency.open.load(Ordering::Relaxed)
    }

    /// Requests per `webhook-id`.
    pub fn per_event(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for r in self.requests.lock().unwrap().iter() {
            *out.entry(r.header("webhook-id").to_owned()).or_insert(0) += 1;
        }
        out
    }
}
