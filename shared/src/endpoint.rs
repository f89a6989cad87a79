//! Endpoint records: where an account wants its events, which ones, and the key to sign them.

use crate::catalog;
use crate::clock;
use crate::ids::{AccountId, EndpointId};
use crate::signing::Secret;
use serde::{Deserialize, Serialize};

/// An absolute `http` or `https` URL; anything else is refused at registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EndpointUrl(String);

/// Why an endpoint could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("url: {0}")]
    InvalidUrl(String),
    #[error("events: unknown event type {0:?}")]
    UnknownEventType(String),
    #[error("max_concurrency: must be at least 1")]
    ZeroConcurrency,
}

const MAX_URL_LEN: usize = 2048;

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

/// An endpoint as stored in Redis and shown to its owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: EndpointId,
    pub account_id: AccountId,
    pub url: EndpointUrl,
    /// Subscribed event types; `None` subscribes to every type, present and future.
    pub events: Option<Vec<String>>,
    pub secret: Secret,
    pub enabled: bool,
    /// Why delivery stopped, when it was stopped by the platform (e.g. `410 Gone`).
    #[serde(default)]
    pub disabled_reason: Option<String>,
    #[serde(default)]
    pub description: String,
    pub created_at: String,
    /// Requests in flight to this endpoint at once, per dispatcher; `None` takes the
    /// dispatcher's default. Further deliveries are deferred, not queued in memory.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
}

/// What an account asks for when it registers an endpoint.
#[derive(Debug, Clone, Default)]
pub struct NewEndpoint {
    pub url: String,
    pub events: Option<Vec<String>>,
    pub description: String,
    pub max_concurrency: Option<u32>,
}

impl Endpoint {
    /// Validates a registration and mints the id and secret.
    pub fn create(account_id: AccountId, new: NewEndpoint, now_ms: i64) -> Result<Self, EndpointError> {
        let url = EndpointUrl::parse(&new.url)?;
        if let Some(events) = &new.events
            && let Some(unknown) = events.iter().find(|t| catalog::lookup(t).is_none())
        {
            return Err(EndpointError::UnknownEventType(unknown.clone()));
        }
        if new.max_concurrency == Some(0) {
            return Err(EndpointError::ZeroConcurrency);
        }
        Ok(Endpoint {
            id: EndpointId::generate(),
            account_id,
            url,
            events: new.events,
            secret: Secret::generate(),
            enabled: true,
            disabled_reason: None,
            description: new.description,
            created_at: clock::format_rfc3339_ms(now_ms),
            max_concurrency: new.max_concurrency,
        })
    }

    pub fn subscribes_to(&self, event_type: &str) -> bool {
        match &self.events {
            None => true,
            Some(types) => types.iter().any(|t| t == event_type),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn registration_checks_event_types() {
        let acct = AccountId::parse("acct_1").unwrap();
        let new = NewEndpoint {
            url: "https://example.com/".into(),
            events: Some(vec!["invoice.paid".into(), "invoice.exploded".into()]),
            ..Default::default()
        };
        assert_eq!(
            Endpoint::create(acct.clone(), new, 0).unwrap_err(),
            EndpointError::UnknownEventType("invoice.exploded".into())
        );
        let ep = Endpoint::create(
            acct,
            NewEndpoint {
                url: "https://example.com/".into(),
                events: Some(vec!["invoice.paid".into()]),
                ..Default::default()
            },
            0,
        )
        .unwrap();
        assert!(ep.subscribes_to("invoice.paid"));
        assert!(!ep.subscribes_to("invoice.created"));
    }

    #[test]
    fn records_round_trip_through_json() {
        let ep = Endpoint::create(
            AccountId::parse("acct_1").unwrap(),
            NewEndpoint {
                url: "https://example.com/".into(),
                ..Default::default()
            },
            0,
        )
        .unwrap();
        let json = serde_json::to_string(&ep).unwrap();
        let back: Endpoint = serde_json::from_str(&json).unwrap();
        assert_eq!(back.secret, ep.secret);
        assert!(back.subscribes_to("anything.at.all"));
    }
}
