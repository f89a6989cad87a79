//! Protection for the API itself: a request rate per credential (or per client address when
//! there is none), a cap on requests in flight, and a time limit per request. Header sizes are
//! bounded by hyper (100 headers, about 400 KiB of head); bodies by `MAX_BODY_BYTES`.
//!
//! No caller (a credential, or an address without one) holds more than a quarter of the
//! requests in flight: a request holds its room while its body arrives, so one client sending
//! bodies slowly could otherwise hold all of it, and the API would answer everyone else `503`.
//!
//! A credential has its own rate only once it has been accepted. Until then its requests also
//! spend the client address's budget of failed authentications: otherwise a made-up key per
//! request would bring a fresh budget each time, and one client could send as many guesses (a
//! Redis lookup each) as the in-flight cap lets through. Accepted credentials never wait on
//! that budget, so other callers behind the same address (a NAT gateway) go on while one of
//! them sends wrong keys.
//!
//! The rate holds for the whole deployment: a request this process admits also spends the
//! caller's bucket in Redis, which every producer shares, so replicas behind one address do not
//! each grant it. The process's own bucket is checked first, so a caller far over its rate is
//! refused without a Redis call. Should Redis not answer within [`SHARED_RATE_WAIT`], the
//! process's own bucket decides alone. The probes (`/healthz`, `/readyz`) are counted by the
//! process only. The failure budget stays per process: it protects the process's own lookups.

use super::error::ApiError;
use super::extract::{KeyLookedUp, bearer_of};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use laabam_shared::idle_map::IdleMap;
use laabam_shared::store::{Spent, Store};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// The longest a request waits for the deployment's count of its caller's rate.
const SHARED_RATE_WAIT: Duration = Duration::from_millis(250);

/// The limits in force, shared by every request.
#[derive(Debug)]
pub struct Limits {
    rate: f64,
    burst: f64,
    /// Per credential, or per client address for requests without one.
    callers: Mutex<IdleMap<[u8; 16], Bucket>>,
    /// Failed authentications per client address.
    failures: Mutex<IdleMap<[u8; 16], Bucket>>,
    in_flight: Arc<Semaphore>,
    /// Requests in flight per caller, and the most one caller may have.
    per_caller: Arc<Mutex<HashMap<[u8; 16], usize>>>,
    per_caller_max: usize,
    timeout: Duration,
}

/// A caller's share of the room in flight, given back when the request ends.
struct Share {
    per_caller: Arc<Mutex<HashMap<[u8; 16], usize>>>,
    caller: [u8; 16],
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut per_caller = self.per_caller.lock().expect("limits lock");
        if let Some(n) = per_caller.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                per_caller.remove(&self.caller);
            }
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// A request with this credential has been authenticated.
    accepted: bool,
}

impl Limits {
    pub fn new(rate_per_sec: u32, max_in_flight: usize, timeout: Duration) -> Self {
        Limits {
            rate: rate_per_sec.max(1) as f64,
            burst: (rate_per_sec.max(1) * 2) as f64,
            callers: Mutex::default(),
            failures: Mutex::default(),
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            per_caller: Arc::default(),
            per_caller_max: (max_in_flight / 4).max(1),
            timeout,
        }
    }

    /// A share of the room in flight for `caller`, unless it holds its most already.
    fn share(&self, caller: &Caller) -> Option<Share> {
        let mut per_caller = self.per_caller.lock().expect("limits lock");
        let n = per_caller.entry(caller.bucket).or_insert(0);
        if *n >= self.per_caller_max {
            return None;
        }
        *n += 1;
        Some(Share {
            per_caller: self.per_caller.clone(),
            caller: caller.bucket,
        })
    }

    /// `caller`'s bucket in `buckets`, refilled to now.
    fn refilled<'a>(&self, buckets: &'a mut IdleMap<[u8; 16], Bucket>, caller: [u8; 16]) -> &'a mut Bucket {
        let now = Instant::now();
        let (rate, burst) = (self.rate, self.burst);
        buckets.prune(|b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate >= burst);
        let bucket = buckets.entry(caller).or_insert(Bucket {
            tokens: self.burst,
            at: now,
            accepted: false,
        });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.rate).min(self.burst);
        bucket.at = now;
        bucket
    }

    /// Seconds until `bucket` has a token, when it has none.
    fn wait(&self, bucket: &Bucket) -> Result<(), u64> {
        if bucket.tokens >= 1.0 {
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }

    /// Takes a token for `caller`; `Err(seconds)` until the next token when there is none. An
    /// unaccepted credential also needs its address's failure budget not to be spent. Says
    /// whether the credential was already accepted.
    fn take(&self, caller: &Caller) -> Result<bool, u64> {
        let mut callers = self.callers.lock().expect("limits lock");
        let bucket = self.refilled(&mut callers, caller.bucket);
        if let Some(address) = caller.address.filter(|_| !bucket.accepted) {
            let mut failures = self.failures.lock().expect("limits lock");
            self.wait(self.refilled(&mut failures, address))?;
        }
        self.wait(bucket)?;
        bucket.tokens -= 1.0;
        Ok(bucket.accepted)
    }

    /// Marks `caller`'s credential accepted once it authenticated a request; charges its address
    /// a failure when it was refused. A request to a public route does neither, and an accepted
    /// credential that authenticates again changes nothing, so most requests skip the locks.
    fn settle(&self, caller: &Caller, was_accepted: bool, authenticated: bool, refused: bool) {
        let Some(address) = caller.address else { return };
        if !((authenticated && !was_accepted) || refused) {
            return;
        }
        let mut callers = self.callers.lock().expect("limits lock");
        self.refilled(&mut callers, caller.bucket).accepted = authenticated;
        if refused {
            let mut failures = self.failures.lock().expect("limits lock");
            let bucket = self.refilled(&mut failures, address);
            bucket.tokens = (bucket.tokens - 1.0).max(0.0);
        }
    }
}

/// Set by the extractors that authenticate ([`super::extract::Caller`], `Operator`) when the
/// credential is valid, for [`enforce`] to read after the handler.
#[derive(Debug, Clone, Default)]
pub struct Authenticated(Arc<AtomicBool>);

impl Authenticated {
    /// Records that this request's credential was accepted.
    pub fn mark(parts: &Parts) {
        if let Some(flag) = parts.extensions.get::<Authenticated>() {
            flag.0.store(true, Ordering::Relaxed);
        }
    }
}

/// Who is calling: the bucket of the credential (hashed, never kept) or, without one, of the
/// client address; and with a credential, the address its failures are charged to.
struct Caller {
    bucket: [u8; 16],
    address: Option<[u8; 16]>,
}

/// The caller's bucket, as [`enforce`] found it, for [`count_for_deployment`] inside it.
#[derive(Debug, Clone, Copy)]
struct CallerBucket([u8; 16]);

fn digest(parts: &[&[u8]]) -> [u8; 16] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize()[..16].try_into().expect("16 bytes")
}

fn caller(req: &Request) -> Caller {
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    match req.headers().get(axum::http::header::AUTHORIZATION) {
        Some(auth) => Caller {
            bucket: digest(&[b"credential:", auth.as_bytes()]),
            address: Some(digest(&[b"address:", ip.as_bytes()])),
        },
        None => Caller {
            bucket: digest(&[b"address:", ip.as_bytes()]),
            address: None,
        },
    }
}

/// `error`, telling the caller to try again in `seconds`.
fn try_again_in(error: ApiError, seconds: u64) -> Response {
    let mut response = error.into_response();
    response.headers_mut().insert("retry-after", HeaderValue::from(seconds));
    response
}

/// The process's own limits; every route is behind them.
pub async fn enforce(State(limits): State<Arc<Limits>>, mut req: Request, next: Next) -> Response {
    let caller = caller(&req);
    let was_accepted = match limits.take(&caller) {
        Ok(accepted) => accepted,
        Err(wait) => return try_again_in(ApiError::RateLimited, wait),
    };
    let Some(_share) = limits.share(&caller) else {
        return try_again_in(ApiError::RateLimited, 1);
    };
    let Ok(_slot) = limits.in_flight.clone().try_acquire_owned() else {
        return try_again_in(
            ApiError::Unavailable("too many requests in flight; try again".into()),
            1,
        );
    };
    let authenticated = Authenticated::default();
    req.extensions_mut().insert(authenticated.clone());
    req.extensions_mut().insert(CallerBucket(caller.bucket));
    match tokio::time::timeout(limits.timeout, next.run(req)).await {
        Ok(response) => {
            let refused = response.status() == StatusCode::UNAUTHORIZED;
            limits.settle(&caller, was_accepted, authenticated.0.load(Ordering::Relaxed), refused);
            response
        }
        Err(_) => ApiError::Unavailable(format!("the request took longer than {:?}", limits.timeout)).into_response(),
    }
}

/// The caller's rate for the whole deployment, inside [`enforce`]: a request spends a request
/// of the caller's bucket in Redis, or is told when the next one is allowed. The same round
/// trip looks up the API key the request carries, for [`super::extract::Caller`], so counting
/// costs an authenticated request no extra wait. The probes are not behind it, so they answer
/// from the process alone whatever Redis does.
pub async fn count_for_deployment(
    State((limits, store)): State<(Arc<Limits>, Store)>,
    mut req: Request,
    next: Next,
) -> Response {
    let CallerBucket(bucket) = *req
        .extensions()
        .get::<CallerBucket>()
        .expect("the router puts count_for_deployment inside enforce, which names the caller");
    let bucket = hex::encode(bucket);
    // What can be an API key is the store's to say (`Store::authenticate`'s rule): any other
    // token is looked up as no account, as `authenticate` would answer.
    let key = bearer_of(req.headers());
    let spent = store.spend_api_request(&bucket, limits.rate, limits.burst, key);
    match tokio::time::timeout(SHARED_RATE_WAIT, spent).await {
        Ok(Ok(Spent { wait: Some(wait), .. })) => {
            return try_again_in(ApiError::RateLimited, wait.as_secs_f64().ceil().max(1.0) as u64);
        }
        Ok(Ok(Spent { wait: None, account })) => {
            if key.is_some() {
                req.extensions_mut().insert(KeyLookedUp(account));
            }
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "the deployment's API rate could not be counted; this process's stands")
        }
        Err(_) => tracing::debug!("the deployment's API rate was not counted in time; this process's stands"),
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_credential(credential: u8) -> Caller {
        Caller {
            bucket: [credential; 16],
            address: Some([0; 16]),
        }
    }

    #[test]
    fn a_caller_gets_its_burst_then_waits_and_others_are_unaffected() {
        let limits = Limits::new(5, 10, Duration::from_secs(1));
        let one = Caller {
            bucket: [1; 16],
            address: None,
        };
        let admitted = (0..20).filter(|_| limits.take(&one).is_ok()).count();
        assert_eq!(admitted, 10, "a burst of twice the rate");
        assert_eq!(limits.take(&one), Err(1));
        assert!(limits.take(&with_credential(2)).is_ok());
    }

    #[test]
    fn callers_whose_buckets_refilled_are_dropped_once_the_map_grows() {
        let limits = Limits::new(1_000, 10, Duration::from_secs(1));
        let caller = |n: usize| Caller {
            bucket: digest(&[&n.to_le_bytes()]),
            address: None,
        };
        for n in 0..=laabam_shared::idle_map::PRUNE_ABOVE {
            assert!(limits.take(&caller(n)).is_ok());
        }
        // At 1,000 a second, a few milliseconds refill the one token each took.
        std::thread::sleep(Duration::from_millis(5));
        assert!(limits.take(&caller(usize::MAX)).is_ok());
        let kept = limits.callers.lock().unwrap().len();
        assert_eq!(kept, 1, "only the caller just admitted is short of a full bucket");
    }

    #[test]
    fn a_caller_holds_at_most_a_quarter_of_the_room_in_flight() {
        let limits = Limits::new(5, 8, Duration::from_secs(1));
        let shares: Vec<_> = (0..3).map(|_| limits.share(&with_credential(1))).collect();
        assert_eq!(shares.iter().filter(|s| s.is_some()).count(), 2);
        assert!(
            limits.share(&with_credential(2)).is_some(),
            "another caller has its own"
        );
        drop(shares);
        assert!(
            limits.share(&with_credential(1)).is_some(),
            "given back when a request ends"
        );
    }

    #[test]
    fn refused_credentials_spend_their_address_budget_and_accepted_ones_do_not_wait_on_it() {
        let limits = Limits::new(5, 10, Duration::from_secs(1));
        limits.settle(&with_credential(1), false, true, false);
        // A new made-up credential per request: a fresh bucket each, one address budget.
        let guesses = (10..40u8)
            .take_while(|&guess| {
                let admitted = limits.take(&with_credential(guess)).is_ok();
                limits.settle(&with_credential(guess), false, false, true);
                admitted
            })
            .count();
        assert_eq!(guesses, 10, "refusals are limited per address like requests");
        assert_eq!(
            limits.take(&with_credential(99)),
            Err(1),
            "another unknown credential waits"
        );
        assert!(limits.take(&with_credential(1)).is_ok(), "an accepted one goes on");
        // A public route's answer proves nothing about a credential.
        limits.settle(&with_credential(99), false, false, false);
        assert!(limits.take(&with_credential(99)).is_err());
    }
}
