//! Deliveries: list with filters and cursor pagination, read one with every attempt, redeliver.

use super::ApiState;
use super::error::{ApiError, ApiResult};
use super::events::{cursor, page_limit};
use super::extract::{Caller, QueryParams};
use super::views::{DeliveryView, List};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use laabam_shared::clock::{parse_rfc3339_ms, redis_now_ms};
use laabam_shared::delivery::{DeliveryState, DeliveryStatus};
use laabam_shared::ids::{AccountId, DeliveryId};
use laabam_shared::store::{DeliveryFilter, Redelivery};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQuery {
    pub endpoint_id: Option<String>,
    pub event_type: Option<String>,
    /// `pending`, `retrying`, `succeeded` or `failed`.
    pub status: Option<String>,
    /// RFC 3339: created at or after.
    pub since: Option<String>,
    /// RFC 3339: created at or before.
    pub until: Option<String>,
    pub cursor: Option<String>,
    /// 1 to 250, default 50.
    #[param(minimum = 1, maximum = 250)]
    pub limit: Option<usize>,
}

fn bad(field: &str, message: &str) -> ApiError {
    ApiError::BadRequest {
        message: message.to_owned(),
        field: Some(field.to_owned()),
    }
}

fn time(field: &str, v: Option<&str>) -> ApiResult<Option<i64>> {
    v.map(|s| parse_rfc3339_ms(s).ok_or_else(|| bad(field, "must be an RFC 3339 date-time")))
        .transpose()
}

#[utoipa::path(get, path = "/v1/deliveries", tag = "deliveries", params(DeliveryQuery),
    responses((status = 200, body = List<DeliveryView>), (status = 400, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn list(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    QueryParams(q): QueryParams<DeliveryQuery>,
) -> ApiResult<Json<List<DeliveryView>>> {
    let limit = page_limit(q.limit)?;
    let cursor = cursor(q.cursor.as_deref())?;
    let endpoint = match q.endpoint_id.as_deref() {
        Some(id) => Some(super::endpoints::owned(&state, &account, id).await?.id),
        None => None,
    };
    let filter = DeliveryFilter {
        endpoint,
        event_type: q.event_type,
        status: q
            .status
            .as_deref()
            .map(|s| {
                DeliveryStatus::parse(s).ok_or_else(|| bad("status", "must be pending, retrying, succeeded or failed"))
            })
            .transpose()?,
        since_ms: time("since", q.since.as_deref())?,
        until_ms: time("until", q.until.as_deref())?,
    };
    let page = state
        .store
        .list_deliveries(&account, &filter, cursor.as_ref(), limit)
        .await?;
    Ok(Json(List::from_page(page, DeliveryView::from)))
}

/// The caller's delivery, or 404 exactly as if it did not exist.
async fn owned(state: &ApiState, account: &AccountId, id: &str) -> ApiResult<DeliveryState> {
    let id = DeliveryId::parse(id).map_err(|_| ApiError::NotFound("delivery"))?;
    match state.store.delivery(&id).await? {
        Some(d) if d.account_id == *account => Ok(d),
        _ => Err(ApiError::NotFound("delivery")),
    }
}

#[utoipa::path(get, path = "/v1/deliveries/{delivery_id}", tag = "deliveries", params(("delivery_id" = String, Path)),
    responses((status = 200, body = DeliveryView), (status = 404, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn get(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeliveryView>> {
    let d = owned(&state, &account, &id).await?;
    let attempts = state.store.attempts(&d.id).await?;
    let mut view = DeliveryView::from(d);
    view.attempt_log = Some(attempts.into_iter().map(Into::into).collect());
    Ok(Json(view))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Redelivered {
    pub delivery_id: String,
    /// `queued`: attempted as soon as a retry scheduler sees it.
    pub status: &'static str,
}

#[utoipa::path(post, path = "/v1/deliveries/{delivery_id}/redeliver", tag = "deliveries", params(("delivery_id" = String, Path)),
    responses((status = 202, body = Redelivered), (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody, description = "An attempt is in flight, or the event's payload outlived retention")), security(("api_key" = [])))]
pub async fn redeliver(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Redelivered>)> {
    let d = owned(&state, &account, &id).await?;
    match state.store.redeliver(&d, redis_now_ms()).await? {
        Redelivery::Queued => Ok((
            StatusCode::ACCEPTED,
            Json(Redelivered {
                delivery_id: d.id.to_string(),
                status: "queued",
            }),
        )),
        Redelivery::InFlight => Err(ApiError::Conflict(
            "an attempt of this delivery is in flight; try again when it finishes".into(),
        )),
        Redelivery::EventExpired => Err(ApiError::Conflict(
            "this delivery's event payload has outlived retention and can no longer be sent".into(),
        )),
        Redelivery::NotFound => Err(ApiError::NotFound("delivery")),
    }
}
