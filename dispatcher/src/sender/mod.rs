//! Outbound HTTP: keep-alive connections from one bounded pool (http and https over rustls), a
//! whole-request timeout, no redirects, and response bodies read only up to a cap.

mod pool;

pub use pool::PoolLimits;

use crate::guard::{GuardedResolver, check_url};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use laabam_shared::delivery::Outcome;
use laabam_shared::targets::TargetPolicy;
use pool::{Pool, SendError};
use std::error::Error as StdError;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How much of a response body is kept with the attempt.
pub const EXCERPT_BYTES: usize = 4096;
/// How much of a response body is read at all; past it the connection is dropped.
pub const READ_CAP_BYTES: usize = 64 * 1024;

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error("cannot read CA file {path}: {cause}")]
    CaFile { path: String, cause: String },
}

/// The result of one request, whatever happened.
#[derive(Debug, Clone)]
pub struct SendResult {
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub duration: Duration,
    pub error: Option<String>,
    pub excerpt: Option<String>,
    /// The endpoint's `Retry-After` on 429 or 503, in seconds form.
    pub retry_after: Option<Duration>,
}

/// A point in a request's life at which it is judged again: once it has run for `after`, still
/// unanswered, `go_on` lets it run on to the timeout (`Ok`) or cuts it short (`Err`, the
/// reason). It shares the request's timer: a request answered before it costs nothing more.
pub struct Checkpoint<F> {
    pub after: Duration,
    pub go_on: F,
}

impl<F> std::fmt::Debug for Checkpoint<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

/// The shared HTTP client of a dispatcher.
#[derive(Debug, Clone)]
pub struct Sender {
    pool: Arc<Pool<HttpsConnector<HttpConnector<GuardedResolver>>>>,
    timeout: Duration,
    policy: Arc<TargetPolicy>,
}

fn tls_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, SenderError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let err = |cause: String| SenderError::CaFile {
            path: path.display().to_string(),
            cause,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no certificate in file".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Sender {
    /// `policy` decides which addresses endpoints may reach, checked on every connect. The
    /// pool's bound per host should be the process's requests in flight: a smaller one closes
    /// connections whenever a busy endpoint's requests briefly all finish (waiting on Redis or
    /// the broker) and opens them again moments later.
    pub fn new(
        timeout: Duration,
        extra_ca: Option<&Path>,
        policy: TargetPolicy,
        pool: PoolLimits,
    ) -> Result<Self, SenderError> {
        let policy = Arc::new(policy);
        let mut http = HttpConnector::new_with_resolver(GuardedResolver { policy: policy.clone() });
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(extra_ca)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Sender {
            pool: Pool::new(https, pool),
            timeout,
            policy,
        })
    }

    /// POSTs `body` to `url` with our headers plus `extra`, judged again at `checkpoint` if
    /// there is one. Never fails: every problem is an outcome.
    pub async fn post<E: std::fmt::Display>(
        &self,
        url: &str,
        extra: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
        body: Bytes,
        checkpoint: Option<Checkpoint<impl FnOnce() -> Result<(), E>>>,
    ) -> SendResult {
        let started = Instant::now();
        let fail = |outcome: Outcome, error: String| SendResult {
            outcome,
            status: None,
            duration: started.elapsed(),
            error: Some(error),
            excerpt: None,
            retry_after: None,
        };
        if let Err(refused) = check_url(url, &self.policy) {
            return fail(Outcome::ConnectError, refused);
        }
        let uri = match url.parse::<http::Uri>() {
            Ok(uri) => uri,
            Err(e) => return fail(Outcome::ConnectError, format!("invalid request: {e}")),
        };
        // Built in place: `http::request::Builder` moves the whole request head per header.
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("Laabam-Webhooks/", env!("CARGO_PKG_VERSION"))),
        );
        for (name, value) in extra {
            headers.append(name, value);
        }
        let exchange = async {
            let (response, lease) = self.pool.send(request).await.map_err(|e| classify(&e))?;
            let status = response.status().as_u16();
            let retry_after = match status {
                429 | 503 => response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| asked_delay(v, SystemTime::now())),
                _ => None,
            };
            let excerpt = read_capped(response.into_body()).await;
            // Read to its end: the connection can serve the next request.
            if excerpt.1.is_none() {
                self.pool.check_in(lease);
            }
            Ok::<_, (Outcome, String)>((status, retry_after, excerpt))
        };
        let mut exchange = std::pin::pin!(exchange);
        let answer = match checkpoint {
            Some(Checkpoint { after, go_on }) if after < self.timeout => {
                match tokio::time::timeout(after, &mut exchange).await {
                    Ok(answer) => Ok(answer),
                    Err(_) => match go_on() {
                        Ok(()) => tokio::time::timeout(self.timeout - after, exchange).await,
                        Err(why) => return fail(Outcome::Timeout, why.to_string()),
                    },
                }
            }
            _ => tokio::time::timeout(self.timeout, exchange).await,
        };
        match answer {
            Err(_) => fail(
                Outcome::Timeout,
                format!("no complete response within {:?}", self.timeout),
            ),
            Ok(Err((outcome, error))) => fail(outcome, error),
            Ok(Ok((status, retry_after, (excerpt, body_error)))) => SendResult {
                outcome: Outcome::from_status(status),
                status: Some(status),
                duration: started.elapsed(),
                error: body_error,
                excerpt: (!excerpt.is_empty()).then(|| String::from_utf8_lossy(&excerpt).into_owned()),
                retry_after,
            },
        }
    }
}

/// The delay a `Retry-After` value asks for, in either of its forms (RFC 9110 §10.2.3):
/// delay-seconds, or an HTTP-date measured from `now`, one already past asking for none. Anything
/// else is ignored, so the backoff applies.
fn asked_delay(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Reads at most [`READ_CAP_BYTES`], keeping the first [`EXCERPT_BYTES`]. A body error after
/// the status arrived does not change the outcome (the endpoint did answer); it is noted.
async fn read_capped(mut body: hyper::body::Incoming) -> (Vec<u8>, Option<String>) {
    let mut kept = Vec::new();
    let mut read = 0usize;
    while read < READ_CAP_BYTES {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return (kept, Some(format!("response body: {e}"))),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    read += data.len();
                    let room = EXCERPT_BYTES.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
        }
    }
    let note = (read >= READ_CAP_BYTES).then(|| {
        format!(
            "response body exceeds {} KiB; the rest was not read",
            READ_CAP_BYTES / 1024
        )
    });
    (kept, note)
}

/// Maps a client error to an outcome, looking through the cause chain for TLS failures.
fn classify(err: &SendError) -> (Outcome, String) {
    let message = chain(err);
    if err.source().is_some_and(is_tls) {
        (Outcome::TlsError, message)
    } else if matches!(err, SendError::Connect(_)) {
        (Outcome::ConnectError, message)
    } else {
        (Outcome::InvalidResponse, message)
    }
}

/// Whether a rustls error sits anywhere in the chain, also inside the `io::Error`s that
/// connectors wrap their causes in.
fn is_tls(err: &(dyn StdError + 'static)) -> bool {
    if err.is::<rustls::Error>() {
        return true;
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
        && is_tls(inner)
    {
        return true;
    }
    err.source().is_some_and(is_tls)
}

fn chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::asked_delay;
    use std::time::{Duration, SystemTime};

    #[test]
    fn retry_after_is_read_as_seconds_or_as_a_date() {
        let now = httpdate::parse_http_date("Sun, 06 Dec 2026 16:00:00 GMT").unwrap();
        let asked = |value| asked_delay(value, now);
        assert_eq!(asked("120"), Some(Duration::from_secs(120)));
        assert_eq!(asked(" 0 "), Some(Duration::ZERO));
        assert_eq!(asked("Sun, 06 Dec 2026 16:01:30 GMT"), Some(Duration::from_secs(90)));
        // Obsolete forms a receiver must still accept (RFC 9110 §5.6.7).
        assert_eq!(asked("Sunday, 06-Dec-26 16:01:30 GMT"), Some(Duration::from_secs(90)));
        assert_eq!(asked("Sun Dec  6 16:01:30 2026"), Some(Duration::from_secs(90)));
        assert_eq!(
            asked("Sun, 06 Dec 2026 15:59:00 GMT"),
            Some(Duration::ZERO),
            "a date past"
        );
        for ignored in ["", "soon", "-5", "1.5", "Sun, 06 Dec 2026 25:00:00 GMT"] {
            assert_eq!(asked(ignored), None, "{ignored:?}");
        }
        assert_eq!(asked_delay("60", SystemTime::UNIX_EPOCH), Some(Duration::from_secs(60)));
    }
}
