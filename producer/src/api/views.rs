//! What the API shows of stored records: times as RFC 3339, ids as strings, no secrets.

use laabam_shared::clock::format_rfc3339_ms;
use laabam_shared::delivery::{AttemptRecord, DeliveryState};
use laabam_shared::endpoint::Endpoint;
use laabam_shared::store::{Cursor, LastDelivery, Page};
use serde::Serialize;
use std::collections::BTreeMap;

/// A page of a listing; pass `next_cursor` back as `cursor` for the next one.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct List<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> List<T> {
    pub fn from_page<S>(page: Page<S>, f: impl FnMut(S) -> T) -> Self {
        List {
            data: page.items.into_iter().map(f).collect(),
            next_cursor: page.next.as_ref().map(Cursor::encode),
        }
    }
}

/// An endpoint as the product page shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EndpointView {
    pub id: String,
    pub url: String,
    pub description: String,
    /// Subscribed event types; `null` for all.
    pub events: Option<Vec<String>>,
    /// `active` or `disabled`.
    pub status: &'static str,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub disabled_at: Option<String>,
    pub rate_limit: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub headers: BTreeMap<String, String>,
    pub created_at: String,
    pub last_delivery: Option<LastDeliveryView>,
    /// Successful attempts over all attempts in the last 24 hours; `null` with none.
    pub success_rate_24h: Option<f64>,
    /// The signing secret: only in the answer to creating the endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LastDeliveryView {
    pub at: String,
    pub outcome: String,
    pub status_code: Option<u16>,
    pub delivery_id: String,
}

impl From<LastDelivery> for LastDeliveryView {
    fn from(l: LastDelivery) -> Self {
        LastDeliveryView {
            at: format_rfc3339_ms(l.at_ms),
            outcome: l.outcome,
            status_code: l.status_code,
            delivery_id: l.delivery_id,
        }
    }
}

impl EndpointView {
    pub fn new(ep: Endpoint, last_delivery: Option<LastDelivery>, success_rate_24h: Option<f64>) -> Self {
        EndpointView {
            id: ep.id.to_string(),
            url: ep.url.as_str().to_owned(),
            description: ep.description,
            events: ep.events,
            status: if ep.enabled { "active" } else { "disabled" },
            enabled: ep.enabled,
            disabled_reason: ep.disabled_reason,
            disabled_at: ep.disabled_at,
            rate_limit: ep.rate_limit,
            max_concurrency: ep.max_concurrency,
            headers: ep.headers,
            created_at: ep.created_at,
            last_delivery: last_delivery.map(Into::into),
            success_rate_24h,
            secret: None,
        }
    }
}

/// A delivery: one event to one endpoint.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    pub id: String,
    pub event_id: String,
    pub endpoint_id: String,
    pub event_type: String,
    /// `pending`, `retrying`, `succeeded` or `failed`.
    pub status: &'static str,
    pub attempts: u32,
    pub created_at: String,
    pub first_attempt_at: Option<String>,
    pub next_attempt_at: Option<String>,
    /// Why it failed for good.
    pub reason: Option<String>,
    /// Every attempt, oldest first (only when one delivery is read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt_log: Option<Vec<AttemptView>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    pub attempt: u32,
    pub at: String,
    pub outcome: &'static str,
    pub status_code: Option<u16>,
    pub duration_ms: u64,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
}

impl From<AttemptRecord> for AttemptView {
    fn from(a: AttemptRecord) -> Self {
        AttemptView {
            attempt: a.attempt,
            at: format_rfc3339_ms(a.at_ms),
            outcome: a.outcome.as_str(),
            status_code: a.status_code,
            duration_ms: a.duration_ms,
            error: a.error,
            response_excerpt: a.response_excerpt,
        }
    }
}

impl From<DeliveryState> for DeliveryView {
    fn from(d: DeliveryState) -> Self {
        DeliveryView {
            id: d.id.to_string(),
            event_id: d.event_id.to_string(),
            endpoint_id: d.endpoint_id.to_string(),
            event_type: d.event_type,
            status: d.status.as_str(),
            attempts: d.attempts,
            created_at: format_rfc3339_ms(d.created_ms),
            first_attempt_at: d.first_attempt_ms.map(format_rfc3339_ms),
            next_attempt_at: d.next_attempt_ms.map(format_rfc3339_ms),
            reason: d.reason,
            attempt_log: None,
        }
    }
}
