//! Endpoint records: where an account wants its events, which ones, how fast, and the keys
//! that sign them.

use crate::catalog;
use crate::clock;
use crate::ids::{AccountId, EndpointId};
use crate::signing::Secret;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// An absolute `http` or `https` URL; anything else is refused at registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EndpointUrl(String);

/// Why an endpoint could not be registered or changed; `field()` names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("url: {0}")]
    InvalidUrl(String),
    #[error("events: unknown event type {0:?}")]
    UnknownEventType(String),
    #[error("events: must list at least one type (leave it out for all types)")]
    NoEventTypes,
    #[error("max_concurrency: must be at least 1")]
    ZeroConcurrency,
    #[error("rate_limit: must be at least 1 delivery per second")]
    ZeroRateLimit,
    #[error("headers: {0}")]
    InvalidHeader(String),
    #[error("description: longer than 1024 characters")]
    DescriptionTooLong,
}

impl EndpointError {
    pub fn field(&self) -> &'static str {
        match self {
            EndpointError::InvalidUrl(_) => "url",
            EndpointError::UnknownEventType(_) | EndpointError::NoEventTypes => "events",
            EndpointError::ZeroConcurrency => "max_concurrency",
            EndpointError::ZeroRateLimit => "rate_limit",
            EndpointError::InvalidHeader(_) => "headers",
            EndpointError::DescriptionTooLong => "description",
        }
    }
}

const MAX_URL_LEN: usize = 2048;
const MAX_HEADERS: usize = 20;

impl EndpointUrl {
    pub fn parse(s: &str) -> Result<Self, EndpointError> {
        let bad = |why: &str| EndpointError::InvalidUrl(format!("{why} ({s:?})"));
        if s.len() > MAX_URL_LEN {
            return Err(bad("longer than 2048 characters"));
        }
        let uri: http::Uri = s.parse().map_err(|_| bad("not a valid URL"))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(bad("must be an absolute http:// or https:// URL")),
        }
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("must not carry credentials"));
        }
        if authority.host().is_empty() {
            return Err(bad("has no host"));
        }
        Ok(EndpointUrl(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EndpointUrl {
    type Error = EndpointError;
    fn try_from(s: String) -> Result<Self, EndpointError> {
        EndpointUrl::parse(&s)
    }
}

impl From<EndpointUrl> for String {
    fn from(u: EndpointUrl) -> String {
        u.0
    }
}

/// A secret replaced by a rotation, still signing until `expires_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetiredSecret {
    pub secret: Secret,
    pub expires_ms: i64,
}

/// An endpoint as stored in Redis and shown to its owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: EndpointId,
    pub account_id: AccountId,
    pub url: EndpointUrl,
    /// Subscribed event types; `None` subscribes to every type, present and future.
    pub events: Option<Vec<String>>,
    pub secret: Secret,
    /// Secrets replaced by rotation that still sign during their grace period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_secrets: Vec<RetiredSecret>,
    pub enabled: bool,
    /// Why delivery stopped, when it was stopped by the platform (e.g. `410 Gone`).
    #[serde(default)]
    pub disabled_reason: Option<String>,
    #[serde(default)]
    pub disabled_at: Option<String>,
    #[serde(default)]
    pub description: String,
    pub created_at: String,
    /// Requests in flight to this endpoint at once, for all dispatchers together; `None` takes
    /// the dispatcher's default, which is per dispatcher. Further deliveries are deferred, not
    /// queued in memory.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    /// Deliveries per second, for all dispatchers together (each keeps to its share); `None`
    /// is unlimited.
    #[serde(default)]
    pub rate_limit: Option<u32>,
    /// Extra headers sent with every delivery (never our own signature headers).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// What an account asks for when it registers an endpoint.
#[derive(Debug, Clone, Default)]
pub struct NewEndpoint {
    pub url: String,
    pub events: Option<Vec<String>>,
    pub description: String,
    pub max_concurrency: Option<u32>,
    pub rate_limit: Option<u32>,
    pub headers: BTreeMap<String, String>,
}

/// A partial update; `None` leaves a field as it is. `events: Some(None)` subscribes to all.
#[derive(Debug, Clone, Default)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub events: Option<Option<Vec<String>>>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
    pub max_concurrency: Option<Option<u32>>,
    pub rate_limit: Option<Option<u32>>,
    pub headers: Option<BTreeMap<String, String>>,
}

fn check_events(events: &Option<Vec<String>>) -> Result<(), EndpointError> {
    if let Some(events) = events {
        if events.is_empty() {
            return Err(EndpointError::NoEventTypes);
        }
        if let Some(unknown) = events.iter().find(|t| catalog::lookup(t).is_none()) {
            return Err(EndpointError::UnknownEventType(unknown.clone()));
        }
    }
    Ok(())
}

/// Headers the platform sets itself, which an endpoint's custom headers may not replace.
fn reserved_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.starts_with("webhook-")
        || name.starts_with("x-laabam-")
        || [
            "content-type",
            "content-length",
            "user-agent",
            "host",
            "connection",
            "transfer-encoding",
        ]
        .contains(&name.as_str())
}

fn check_headers(headers: &BTreeMap<String, String>) -> Result<(), EndpointError> {
    if headers.len() > MAX_HEADERS {
        return Err(EndpointError::InvalidHeader(format!("at most {MAX_HEADERS} headers")));
    }
    for (name, value) in headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(EndpointError::InvalidHeader(format!(
                "{name:?} is not a valid header name"
            )));
        }
        if reserved_header(name) {
            return Err(EndpointError::InvalidHeader(format!("{name:?} is set by the platform")));
        }
        if http::HeaderValue::from_str(value).is_err() || value.len() > 1024 {
            return Err(EndpointError::InvalidHeader(format!(
                "the value of {name:?} is not a valid header value"
            )));
        }
    }
    Ok(())
}

fn check_limits(max_concurrency: Option<u32>, rate_limit: Option<u32>) -> Result<(), EndpointError> {
    if max_concurrency == Some(0) {
        return Err(EndpointError::ZeroConcurrency);
    }
    if rate_limit == Some(0) {
        return Err(EndpointError::ZeroRateLimit);
    }
    Ok(())
}

fn check_description(d: &str) -> Result<(), EndpointError> {
    if d.chars().count() > 1024 {
        return Err(EndpointError::DescriptionTooLong);
    }
    Ok(())
}

impl Endpoint {
    /// Validates a registration and mints the id and secret.
    pub fn create(account_id: AccountId, new: NewEndpoint, now_ms: i64) -> Result<Self, EndpointError> {
        let url = EndpointUrl::parse(&new.url)?;
        check_events(&new.events)?;
        check_limits(new.max_concurrency, new.rate_limit)?;
        check_headers(&new.headers)?;
        check_description(&new.description)?;
        Ok(Endpoint {
            id: EndpointId::generate(),
            account_id,
            url,
            events: new.events,
            secret: Secret::generate(),
            previous_secrets: Vec::new(),
            enabled: true,
            disabled_reason: None,
            disabled_at: None,
            description: new.description,
            created_at: clock::format_rfc3339_ms(now_ms),
            max_concurrency: new.max_concurrency,
            rate_limit: new.rate_limit,
            headers: new.headers,
        })
    }

    /// Applies an update, validating every changed field first; re-enabling clears the reason.
    pub fn apply(&mut self, patch: EndpointPatch) -> Result<(), EndpointError> {
        let url = patch.url.as_deref().map(EndpointUrl::parse).transpose()?;
        if let Some(events) = &patch.events {
            check_events(events)?;
        }
        check_limits(patch.max_concurrency.flatten(), patch.rate_limit.flatten())?;
        if let Some(headers) = &patch.headers {
            check_headers(headers)?;
        }
        if let Some(d) = &patch.description {
            check_description(d)?;
        }
        if let Some(url) = url {
            self.url = url;
        }
        if let Some(events) = patch.events {
            self.events = events;
        }
        if let Some(d) = patch.description {
            self.description = d;
        }
        if let Some(m) = patch.max_concurrency {
            self.max_concurrency = m;
        }
        if let Some(r) = patch.rate_limit {
            self.rate_limit = r;
        }
        if let Some(h) = patch.headers {
            self.headers = h;
        }
        if let Some(enabled) = patch.enabled {
            self.enabled = enabled;
            if enabled {
                self.disabled_reason = None;
                self.disabled_at = None;
            }
        }
        Ok(())
    }

    pub fn subscribes_to(&self, event_type: &str) -> bool {
        match &self.events {
            None => true,
            Some(types) => types.iter().any(|t| t == event_type),
        }
    }

    /// Every secret that signs a delivery at `now_ms`: the current one first, then those still
    /// within their rotation grace period.
    pub fn signing_secrets(&self, now_ms: i64) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.secret).chain(
            self.previous_secrets
                .iter()
                .filter(move |r| r.expires_ms > now_ms)
                .map(|r| &r.secret),
        )
    }

    /// Replaces the secret; the old one keeps signing for `grace`, so receivers can switch over.
    pub fn rotate_secret(&mut self, now_ms: i64, grace: Duration) {
        self.previous_secrets.retain(|r| r.expires_ms > now_ms);
        let old = std::mem::replace(&mut self.secret, Secret::generate());
        self.previous_secrets.push(RetiredSecret {
            secret: old,
            expires_ms: now_ms + grace.as_millis() as i64,
        });
    }

    /// Stops delivery, recording why and when.
    pub fn disable(&mut self, reason: &str, now_ms: i64) {
        self.enabled = false;
        self.disabled_reason = Some(reason.to_owned());
        self.disabled_at = Some(clock::format_rfc3339_ms(now_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(url: &str) -> NewEndpoint {
        NewEndpoint {
            url: url.into(),
            ..Default::default()
        }
    }

    fn acct() -> AccountId {
        AccountId::parse("acct_1").unwrap()
    }

    #[test]
    fn only_absolute_http_urls_are_accepted() {
        for ok in ["http://127.0.0.1:8080/hook", "https://example.com/webhooks?x=1"] {
            assert!(EndpointUrl::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/relative",
            "ftp://example.com/",
            "example.com/hook",
            "https://user:pw@example.com/",
            "javascript:alert(1)",
            "http:///nohost",
        ] {
            assert!(EndpointUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn registration_checks_every_field() {
        let with = |f: fn(&mut NewEndpoint)| {
            let mut n = new("https://example.com/");
            f(&mut n);
            Endpoint::create(acct(), n, 0).unwrap_err().field()
        };
        assert_eq!(with(|n| n.events = Some(vec!["invoice.exploded".into()])), "events");
        assert_eq!(with(|n| n.events = Some(vec![])), "events");
        assert_eq!(with(|n| n.max_concurrency = Some(0)), "max_concurrency");
        assert_eq!(with(|n| n.rate_limit = Some(0)), "rate_limit");
        assert_eq!(
            with(|n| {
                n.headers.insert("webhook-signature".into(), "x".into());
            }),
            "headers"
        );
        assert_eq!(
            with(|n| {
                n.headers.insert("bad name".into(), "x".into());
            }),
            "headers"
        );
        assert_eq!(with(|n| n.description = "x".repeat(1025)), "description");
    }

    #[test]
    fn subscriptions_filter_types() {
        let mut n = new("https://example.com/");
        n.events = Some(vec!["invoice.paid".into()]);
        let ep = Endpoint::create(acct(), n, 0).unwrap();
        assert!(ep.subscribes_to("invoice.paid"));
        assert!(!ep.subscribes_to("invoice.created"));
    }

    #[test]
    fn patches_validate_before_changing_anything() {
        let mut ep = Endpoint::create(acct(), new("https://example.com/"), 0).unwrap();
        let bad = EndpointPatch {
            description: Some("changed".into()),
            url: Some("ftp://nope".into()),
            ..Default::default()
        };
        assert!(ep.apply(bad).is_err());
        assert_eq!(ep.description, "");
        ep.disable("endpoint answered 410 Gone", 0);
        ep.apply(EndpointPatch {
            enabled: Some(true),
            events: Some(Some(vec!["payment.failed".into()])),
            ..Default::default()
        })
        .unwrap();
        assert!(ep.enabled && ep.disabled_reason.is_none());
        assert!(!ep.subscribes_to("invoice.paid"));
    }

    #[test]
    fn rotated_secrets_sign_until_their_grace_ends() {
        let mut ep = Endpoint::create(acct(), new("https://example.com/"), 0).unwrap();
        let old = ep.secret.clone();
        ep.rotate_secret(1_000, Duration::from_secs(60));
        assert_ne!(ep.secret, old);
        let signing: Vec<_> = ep.signing_secrets(2_000).cloned().collect();
        assert_eq!(signing, vec![ep.secret.clone(), old]);
        assert_eq!(ep.signing_secrets(61_001).count(), 1);
    }

    #[test]
    fn records_round_trip_through_json() {
        let ep = Endpoint::create(acct(), new("https://example.com/"), 0).unwrap();
        let json = serde_json::to_string(&ep).unwrap();
        let back: Endpoint = serde_json::from_str(&json).unwrap();
        assert_eq!(back.secret, ep.secret);
        assert!(back.subscribes_to("anything.at.all"));
    }
}
