//! Publishing over HTTP, and reading events with their delivery state at each endpoint.

use super::ApiState;
use super::error::{ApiError, ApiResult};
use super::extract::{Caller, JsonBody, QueryParams, parse_json};
use super::views::{DeliveryView, List};
use crate::PublishError;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use laabam_shared::clock::now_ms;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::{AccountId, DeliveryId, EventId};
use laabam_shared::publish_link::LinkError;
use laabam_shared::store::{Cursor, Idempotency};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;

/// How long a publish answers a repeated `Idempotency-Key` or `id` with its first result.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishEvent {
    #[serde(rename = "type")]
    pub event_type: String,
    /// The payload, validated against the type's schema and delivered byte for byte.
    #[schema(value_type = Object)]
    pub data: Box<RawValue>,
    /// Choose the event id (the idempotency key receivers see); generated when left out.
    pub id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Published {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub timestamp: String,
}

#[utoipa::path(post, path = "/v1/events", tag = "events", request_body = PublishEvent,
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeats within 24 h return the first result")),
    responses((status = 202, body = Published, description = "The broker confirmed the event"),
        (status = 422, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody)),
    security(("api_key" = [])))]
pub async fn publish(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PublishEvent>,
) -> ApiResult<Response> {
    let chose_id = body.id.is_some();
    let id = body
        .id
        .map(EventId::parse)
        .transpose()
        .map_err(|e| ApiError::invalid("id", e))?;
    let envelope =
        Envelope::new(&body.event_type, account.clone(), body.data, id, now_ms()).map_err(|e| ApiError::Invalid {
            message: e.to_string(),
            field: e.field(),
        })?;
    // The header wins; a caller-chosen id is an idempotency key of its own.
    let idempotency_key = match headers.get("idempotency-key") {
        Some(v) => Some(format!(
            "key:{}",
            v.to_str().map_err(|_| ApiError::BadRequest {
                message: "Idempotency-Key must be visible ASCII".into(),
                field: Some("Idempotency-Key".into()),
            })?
        )),
        None if chose_id => Some(format!("id:{}", envelope.id)),
        None => None,
    };
    if let Some(key) = &idempotency_key {
        match state.store.idempotency_begin(&account, key, IDEMPOTENCY_TTL).await? {
            Idempotency::New => {}
            Idempotency::InProgress => {
                return Err(ApiError::Conflict(
                    "a request with this idempotency key is in progress".into(),
                ));
            }
            Idempotency::Done(stored) => {
                let first: Published = parse_json(stored.as_bytes())?;
                let mut response = (StatusCode::ACCEPTED, Json(first)).into_response();
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                return Ok(response);
            }
        }
    }
    if let Err(e) = state.publisher.publish(&envelope).await {
        if let Some(key) = &idempotency_key {
            state.store.idempotency_abort(&account, key).await?;
        }
        return Err(ApiError::Unavailable(match e {
            // Refused unsent: publishing it again cannot make a copy.
            PublishError::Blocked(why @ LinkError::Blocked) => format!("{why}: publish it again later"),
            other => format!("the event was not confirmed by the broker ({other}); publish it again"),
        }));
    }
    let published = Published {
        id: envelope.id.to_string(),
        event_type: envelope.event_type.clone(),
        timestamp: envelope.timestamp.clone(),
    };
    if let Some(key) = &idempotency_key {
        let stored = serde_json::to_string(&published).expect("serializes");
        state
            .store
            .idempotency_finish(&account, key, &stored, IDEMPOTENCY_TTL)
            .await?;
    }
    Ok((StatusCode::ACCEPTED, Json(published)).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// 1 to 250, default 50.
    #[param(minimum = 1, maximum = 250)]
    pub limit: Option<usize>,
}

pub fn page_limit(limit: Option<usize>) -> ApiResult<usize> {
    match limit.unwrap_or(50) {
        n @ 1..=250 => Ok(n),
        _ => Err(ApiError::BadRequest {
            message: "limit must be between 1 and 250".into(),
            field: Some("limit".into()),
        }),
    }
}

pub fn cursor(c: Option<&str>) -> ApiResult<Option<Cursor>> {
    c.map(|c| {
        Cursor::decode(c).ok_or(ApiError::BadRequest {
            message: "cursor is not one this API returned".into(),
            field: Some("cursor".into()),
        })
    })
    .transpose()
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(ListQuery),
    responses((status = 200, body = List<Object>)), security(("api_key" = [])))]
pub async fn list(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<Json<List<Box<RawValue>>>> {
    let limit = page_limit(q.limit)?;
    let cursor = cursor(q.cursor.as_deref())?;
    let page = state.store.list_events(&account, cursor.as_ref(), limit).await?;
    Ok(Json(List::from_page(page, |body| {
        RawValue::from_string(String::from_utf8_lossy(&body).into_owned())
            .unwrap_or_else(|_| RawValue::from_string("null".into()).unwrap())
    })))
}

/// An event and where it stands at each endpoint.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventView {
    #[schema(value_type = Object)]
    pub event: Box<RawValue>,
    pub deliveries: Vec<DeliveryView>,
}

pub async fn event_view(state: &ApiState, account: &AccountId, id: &str) -> ApiResult<EventView> {
    let id = EventId::parse(id).map_err(|_| ApiError::NotFound("event"))?;
    let body = state
        .store
        .event_body(account, &id)
        .await?
        .ok_or(ApiError::NotFound("event"))?;
    // Only the ids: a delivery's id is derived from its pair, so no endpoint is read or unsealed.
    let pairs: Vec<DeliveryId> = state
        .store
        .endpoint_ids(account)
        .await?
        .iter()
        .map(|endpoint| DeliveryId::for_pair(&id, endpoint))
        .collect();
    let deliveries = state
        .store
        .deliveries(&pairs)
        .await?
        .into_iter()
        .flatten()
        .map(Into::into)
        .collect();
    let event = RawValue::from_string(String::from_utf8_lossy(&body).into_owned())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(EventView { event, deliveries })
}

#[utoipa::path(get, path = "/v1/events/{event_id}", tag = "events", params(("event_id" = String, Path)),
    responses((status = 200, body = EventView), (status = 404, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn get(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<EventView>> {
    Ok(Json(event_view(&state, &account, &id).await?))
}
