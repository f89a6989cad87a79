//! Protection for the API itself: a request rate per credential (or per client address when
//! there is none), a cap on requests in flight, and a time limit per request. Header sizes are
//! bounded by hyper (100 headers, about 400 KiB of head); bodies by `MAX_BODY_BYTES`.

use super::error::ApiError;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// The limits in force, shared by every request.
#[derive(Debug)]
pub struct Limits {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<[u8; 16], (f64, Instant)>>,
    in_flight: Arc<Semaphore>,
    timeout: Duration,
}

/// Buckets of idle callers are dropped past this many, so the map stays bounded.
const PRUNE_ABOVE: usize = 10_000;

impl Limits {
    pub fn new(rate_per_sec: u32, max_in_flight: usize, timeout: Duration) -> Self {
        Limits {
            rate: rate_per_sec.max(1) as f64,
            burst: (rate_per_sec.max(1) * 2) as f64,
            buckets: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            timeout,
        }
    }

    /// Takes a token for `caller`; `Err(seconds)` until the next token when there is none.
    fn take(&self, caller: [u8; 16]) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("limits lock");
        if buckets.len() > PRUNE_ABOVE {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(caller).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

/// Who is calling: the credential if any (hashed, never kept), else the client address.
fn caller(req: &Request) -> [u8; 16] {
    let mut hasher = Sha256::new();
    match req.headers().get(axum::http::header::AUTHORIZATION) {
        Some(auth) => hasher.update(auth.as_bytes()),
        None => {
            let ip = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_string());
            hasher.update(ip.unwrap_or_default().as_bytes());
        }
    }
    hasher.finalize()[..16].try_into().expect("16 bytes")
}

pub async fn enforce(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    if let Err(wait) = limits.take(caller(&req)) {
        let mut response = ApiError::RateLimited.into_response();
        response.headers_mut().insert("retry-after", HeaderValue::from(wait));
        return response;
    }
    let Ok(_slot) = limits.in_flight.clone().try_acquire_owned() else {
        let mut response = ApiError::Unavailable("too many requests in flight; try again".into()).into_response();
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        return response;
    };
    match tokio::time::timeout(limits.timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable(format!("the request took longer than {:?}", limits.timeout)).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_its_burst_then_waits_and_others_are_unaffected() {
        let limits = Limits::new(5, 10, Duration::from_secs(1));
        let admitted = (0..20).filter(|_| limits.take([1; 16]).is_ok()).count();
        assert_eq!(admitted, 10, "a burst of twice the rate");
        assert_eq!(limits.take([1; 16]), Err(1));
        assert!(limits.take([2; 16]).is_ok());
    }
}
