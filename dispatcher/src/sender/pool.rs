//! Connections kept open for reuse, bounded per host and in all.
//!
//! hyper-util's pool bounds only each host and keeps every idle connection for its timeout, so
//! a dispatcher delivering to many endpoints held one connection per endpoint host: 3,000
//! endpoints took about 50 MiB and 3,000 file descriptors for 90 s, and a pod limited to
//! 256 MiB would be killed past about 12,000. Here, past [`PoolLimits::total`] in all, the connection
//! idle longest is closed.

use bytes::Bytes;
use http::Uri;
use http::uri::Authority;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tower_service::Service;

type Body = Full<Bytes>;
type Conn = http1::SendRequest<Body>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How many connections are kept idle, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Idle connections to one host: the process's requests in flight bound how many it can
    /// use at once, so every connection a busy endpoint opened is kept.
    pub per_host: usize,
    /// Idle connections in all; past it the one idle longest is closed.
    pub total: usize,
    pub idle_timeout: Duration,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect error")]
    Connect(#[source] BoxError),
    #[error("request failed")]
    Request(#[source] hyper::Error),
}

/// Where a connection goes: a connection serves only requests with the same scheme and
/// authority.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Host {
    https: bool,
    authority: Authority,
}

/// A connection lent to one request; [`Pool::check_in`] returns it once the response was read
/// to its end, and dropping it instead closes the connection.
#[derive(Debug)]
pub struct Lease {
    host: Host,
    conn: Conn,
}

#[derive(Debug, Default)]
struct Idle {
    /// Each host's idle connections, in the order they were returned (the newest, warmest,
    /// is lent first).
    hosts: HashMap<Host, VecDeque<(u64, Conn)>>,
    /// Every idle connection by its return number, oldest first, with its return time.
    order: BTreeMap<u64, (Host, Instant)>,
    returned: u64,
}

impl Idle {
    fn take(&mut self, host: &Host) -> Option<Conn> {
        let queue = self.hosts.get_mut(host)?;
        let (number, conn) = queue.pop_back()?;
        if queue.is_empty() {
            self.hosts.remove(host);
        }
        self.order.remove(&number);
        Some(conn)
    }

    /// Closes the connection idle longest.
    fn close_oldest(&mut self) {
        let Some((number, (host, _))) = self.order.pop_first() else {
            return;
        };
        if let Some(queue) = self.hosts.get_mut(&host) {
            debug_assert_eq!(queue.front().map(|(n, _)| *n), Some(number));
            queue.pop_front();
            if queue.is_empty() {
                self.hosts.remove(&host);
            }
        }
    }

    fn close_expired(&mut self, now: Instant, timeout: Duration) {
        while self
            .order
            .first_key_value()
            .is_some_and(|(_, (_, since))| now.duration_since(*since) >= timeout)
        {
            self.close_oldest();
        }
    }

    fn put(&mut self, host: Host, conn: Conn, limits: &PoolLimits, now: Instant) {
        let queue = self.hosts.entry(host.clone()).or_default();
        if queue.len() >= limits.per_host {
            // This host's own oldest goes: `close_oldest` may pick another host's.
            if let Some((number, _)) = queue.pop_front() {
                self.order.remove(&number);
            }
        }
        self.returned += 1;
        queue.push_back((self.returned, conn));
        self.order.insert(self.returned, (host, now));
        while self.order.len() > limits.total {
            self.close_oldest();
        }
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

/// Opens connections with `C` (TCP, then TLS for https) and lends them to requests.
#[derive(Debug)]
pub struct Pool<C> {
    connector: C,
    limits: PoolLimits,
    idle: Mutex<Idle>,
}

impl<C> Pool<C>
where
    C: Service<Uri, Response = MaybeHttpsStream<TokioIo<TcpStream>>, Error = BoxError> + Clone + Send + Sync + 'static,
    C::Future: Send,
{
    /// A pool whose expired connections a task closes every tenth of the idle timeout while the
    /// pool lives, so a connection idles at most that much past it.
    pub fn new(connector: C, limits: PoolLimits) -> Arc<Self> {
        let pool = Arc::new(Pool {
            connector,
            limits,
            idle: Mutex::new(Idle::default()),
        });
        tokio::spawn(close_expired_while_alive(
            Arc::downgrade(&pool),
            limits.idle_timeout / 10,
        ));
        pool
    }

    /// Sends `request` (absolute URI) over an idle connection to its host, or a new one. An
    /// idle connection that closed, or closes as the request goes, gives the request back
    /// unsent, and it goes on the next.
    pub async fn send(&self, mut request: http::Request<Body>) -> Result<(http::Response<Incoming>, Lease), SendError> {
        let host = host_of(request.uri()).map_err(SendError::Connect)?;
        to_origin_form(&mut request, &host);
        loop {
            let (mut conn, reused) = match self.lend(&host) {
                Some(conn) => (conn, true),
                None => (self.connect(&host).await?, false),
            };
            // Returned the moment its response ended: its connection may still be finishing
            // that exchange, or closing (`Connection: close`).
            if reused && conn.ready().await.is_err() {
                continue;
            }
            match conn.try_send_request(request).await {
                Ok(response) => return Ok((response, Lease { host, conn })),
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Request(failed.into_error())),
                },
            }
        }
    }

    /// Keeps `lease`'s connection, its response read to the end, for the next request to its
    /// host. Kept at once, not once the connection is ready again: a request starting meanwhile
    /// would otherwise open a connection of its own (twice as many were opened under load).
    pub fn check_in(&self, lease: Lease) {
        let mut idle = self.idle.lock().unwrap();
        idle.put(lease.host, lease.conn, &self.limits, Instant::now());
        crate::metrics::METRICS.idle_connections.set(idle.len() as i64);
    }

    fn lend(&self, host: &Host) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap();
        let lent = std::iter::from_fn(|| idle.take(host)).find(|conn| !conn.is_closed());
        crate::metrics::METRICS.idle_connections.set(idle.len() as i64);
        lent
    }

    async fn connect(&self, host: &Host) -> Result<Conn, SendError> {
        // The connector needs only the scheme and the authority.
        let uri = Uri::builder()
            .scheme(if host.https { "https" } else { "http" })
            .authority(host.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| SendError::Connect(e.into()))?;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = connector.call(uri).await.map_err(SendError::Connect)?;
        let (conn, connection) = http1::handshake(io).await.map_err(|e| SendError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "endpoint connection ended");
            }
        });
        Ok(conn)
    }
}

async fn close_expired_while_alive<C>(pool: Weak<Pool<C>>, every: Duration) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap();
        idle.close_expired(Instant::now(), pool.limits.idle_timeout);
        crate::metrics::METRICS.idle_connections.set(idle.len() as i64);
    }
}

fn host_of(uri: &Uri) -> Result<Host, BoxError> {
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("the URL's scheme is not http or https".into()),
    };
    let authority = uri.authority().ok_or("the URL has no host")?.clone();
    Ok(Host { https, authority })
}

/// A connection to the host is asked only for the path, with the host in `Host` (without a
/// default port), as HTTP/1.1 origin servers expect. Endpoint URLs carry no user info (refused
/// at registration), so the authority is the host and port.
fn to_origin_form(request: &mut http::Request<Body>, host: &Host) {
    let default_port = if host.https { 443 } else { 80 };
    let value = match host.authority.port_u16() {
        Some(port) if port != default_port => host.authority.as_str(),
        _ => host.authority.host(),
    };
    if !request.headers().contains_key(http::header::HOST)
        && let Ok(value) = http::HeaderValue::from_str(value)
    {
        request.headers_mut().insert(http::header::HOST, value);
    }
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real connection's request handle, over an in-memory stream nobody answers.
    async fn conn() -> Conn {
        let (client, server) = tokio::io::duplex(64);
        let (conn, connection) = http1::handshake(TokioIo::new(client)).await.unwrap();
        tokio::spawn(async move {
            let _server = server;
            let _ = connection.await;
        });
        conn
    }

    fn host(name: &str) -> Host {
        Host {
            https: false,
            authority: name.parse().unwrap(),
        }
    }

    const LIMITS: PoolLimits = PoolLimits {
        per_host: 2,
        total: 3,
        idle_timeout: Duration::from_secs(90),
    };

    #[tokio::test]
    async fn past_the_total_the_connection_idle_longest_is_closed_whatever_its_host() {
        let mut idle = Idle::default();
        let now = Instant::now();
        for name in ["a:1", "b:1", "c:1", "d:1"] {
            idle.put(host(name), conn().await, &LIMITS, now);
        }
        assert_eq!(idle.len(), 3);
        assert!(idle.take(&host("a:1")).is_none(), "the oldest went");
        for name in ["b:1", "c:1", "d:1"] {
            assert!(idle.take(&host(name)).is_some(), "{name} kept");
        }
        assert_eq!(idle.len(), 0);
        assert!(idle.hosts.is_empty());
    }

    #[tokio::test]
    async fn each_host_keeps_its_newest_and_lends_the_newest_first() {
        let mut idle = Idle::default();
        let now = Instant::now();
        let returned = |idle: &Idle| -> Vec<u64> { idle.hosts[&host("a:1")].iter().map(|(n, _)| *n).collect() };
        for _ in 0..3 {
            idle.put(host("a:1"), conn().await, &LIMITS, now);
        }
        assert_eq!(returned(&idle), [2, 3], "two per host, the newest");
        assert!(idle.take(&host("a:1")).is_some());
        assert_eq!(returned(&idle), [2], "the newest lent first");
        // The order stays whole: the other host's connection is next to go past the total.
        idle.put(host("b:1"), conn().await, &LIMITS, now);
        idle.put(host("b:1"), conn().await, &LIMITS, now);
        idle.put(host("c:1"), conn().await, &LIMITS, now);
        assert_eq!(idle.len(), 3);
        assert!(idle.take(&host("a:1")).is_none(), "a's last, the oldest, went");
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed() {
        let mut idle = Idle::default();
        let start = Instant::now();
        idle.put(host("a:1"), conn().await, &LIMITS, start);
        idle.put(host("b:1"), conn().await, &LIMITS, start + Duration::from_secs(60));
        idle.close_expired(start + Duration::from_secs(90), LIMITS.idle_timeout);
        assert!(idle.take(&host("a:1")).is_none());
        assert_eq!(idle.len(), 1);
        idle.close_expired(start + Duration::from_secs(150), LIMITS.idle_timeout);
        assert_eq!(idle.len(), 0);
        assert!(idle.hosts.is_empty());
    }

    #[test]
    fn requests_go_in_origin_form_with_the_host_and_only_a_port_that_is_not_the_default() {
        for (url, host_header, path) in [
            ("http://example.com/hook?x=1", "example.com", "/hook?x=1"),
            ("http://example.com:80/", "example.com", "/"),
            ("https://example.com:443/a", "example.com", "/a"),
            ("https://example.com:8443/a", "example.com:8443", "/a"),
            ("http://[::1]:9000/h", "[::1]:9000", "/h"),
            ("http://example.com", "example.com", "/"),
        ] {
            let mut request = http::Request::new(Body::new(Bytes::new()));
            *request.uri_mut() = url.parse().unwrap();
            let host = host_of(request.uri()).unwrap();
            to_origin_form(&mut request, &host);
            assert_eq!(request.headers()[http::header::HOST], host_header, "{url}");
            assert_eq!(request.uri().to_string(), path, "{url}");
        }
        assert!(host_of(&"ftp://example.com/".parse().unwrap()).is_err());
    }
}
