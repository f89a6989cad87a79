//! Endpoints: registration, the product page's list, secrets, statistics, test sends and
//! recovery of failed deliveries.

use super::ApiState;
use super::error::{ApiError, ApiResult};
use super::events::{ListQuery, cursor, page_limit};
use super::extract::{Caller, JsonBody, QueryParams};
use super::views::{EndpointView, List};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use laabam_shared::catalog;
use laabam_shared::clock::{format_rfc3339_ms, now_ms, parse_rfc3339_ms};
use laabam_shared::delivery::DeliveryStatus;
use laabam_shared::endpoint::{Endpoint, EndpointError, EndpointPatch, NewEndpoint};
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::{AccountId, DeliveryId, EndpointId};
use laabam_shared::store::{Cursor, EndpointStats, Redelivery};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpoint {
    pub url: String,
    #[serde(default)]
    pub description: String,
    /// Event types to receive; leave out (or `null`) for all types.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// Deliveries per second, for all dispatchers together.
    pub rate_limit: Option<u32>,
    /// Requests in flight at once, for the deployment (1 gives serial delivery).
    pub max_concurrency: Option<u32>,
    /// Extra headers sent with every delivery.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Present fields change; `null` clears `events` (all types), `rate_limit` and `max_concurrency`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateEndpoint {
    pub url: Option<String>,
    pub description: Option<String>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>)]
    pub events: Option<Option<Vec<String>>>,
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>)]
    pub rate_limit: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>)]
    pub max_concurrency: Option<Option<u32>>,
    pub headers: Option<BTreeMap<String, String>>,
}

/// Tells a field given as `null` (Some(None)) from a field left out (None).
pub(super) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn invalid(e: EndpointError) -> ApiError {
    ApiError::invalid(e.field(), e)
}

/// The caller's endpoint, or 404 exactly as if it did not exist.
pub async fn owned(state: &ApiState, account: &AccountId, id: &str) -> ApiResult<Endpoint> {
    let id = EndpointId::parse(id).map_err(|_| ApiError::NotFound("endpoint"))?;
    match state.store.get_endpoint(&id).await? {
        Some(ep) if ep.account_id == *account => Ok(ep),
        _ => Err(ApiError::NotFound("endpoint")),
    }
}

async fn view(state: &ApiState, ep: Endpoint) -> ApiResult<EndpointView> {
    let (health, day) = tokio::try_join!(
        state.store.endpoint_health(&ep.id),
        state.store.endpoint_day(&ep.id, now_ms())
    )?;
    Ok(EndpointView::new(ep, health.last_delivery, day.success_rate))
}

#[utoipa::path(post, path = "/v1/endpoints", tag = "endpoints", request_body = CreateEndpoint,
    responses((status = 201, body = EndpointView, description = "Created; `secret` is included this once"),
        (status = 409, body = super::error::ErrorBody, description = "The account has as many endpoints as it may have (`limit_reached`)"),
        (status = 422, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn create(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    JsonBody(body): JsonBody<CreateEndpoint>,
) -> ApiResult<(StatusCode, Json<EndpointView>)> {
    let new = NewEndpoint {
        url: body.url,
        events: body.events,
        description: body.description,
        max_concurrency: body.max_concurrency,
        rate_limit: body.rate_limit,
        headers: body.headers,
    };
    let ep = Endpoint::create(account, new, now_ms()).map_err(invalid)?;
    state.guard_target(&ep).await?;
    state.store.create_endpoint(&ep, Some(state.max_endpoints)).await?;
    let secret = ep.secret.expose();
    let mut shown = view(&state, ep).await?;
    shown.secret = Some(secret);
    Ok((StatusCode::CREATED, Json(shown)))
}

#[utoipa::path(get, path = "/v1/endpoints", tag = "endpoints", params(ListQuery),
    responses((status = 200, body = List<EndpointView>), (status = 400, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn list(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<Json<List<EndpointView>>> {
    let limit = page_limit(q.limit)?;
    let cursor = cursor(q.cursor.as_deref())?;
    let page = state.store.endpoints_page(&account, cursor.as_ref(), limit).await?;
    // Each view's reads go out together on the one multiplexed connection: one round trip's
    // wait for the whole page, not one per endpoint.
    let views = page.items.into_iter().map(|ep| view(&state, ep));
    Ok(Json(List {
        data: futures_util::future::try_join_all(views).await?,
        next_cursor: page.next.as_ref().map(Cursor::encode),
    }))
}

#[utoipa::path(get, path = "/v1/endpoints/{endpoint_id}", tag = "endpoints", params(("endpoint_id" = String, Path)),
    responses((status = 200, body = EndpointView), (status = 404, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn get(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<EndpointView>> {
    let ep = owned(&state, &account, &id).await?;
    Ok(Json(view(&state, ep).await?))
}

#[utoipa::path(patch, path = "/v1/endpoints/{endpoint_id}", tag = "endpoints", params(("endpoint_id" = String, Path)), request_body = UpdateEndpoint,
    responses((status = 200, body = EndpointView), (status = 404, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)),
    security(("api_key" = [])))]
pub async fn update(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateEndpoint>,
) -> ApiResult<Json<EndpointView>> {
    let mut ep = owned(&state, &account, &id).await?;
    let disabling = body.enabled == Some(false) && ep.enabled;
    ep.apply(EndpointPatch {
        url: body.url,
        events: body.events,
        description: body.description,
        enabled: body.enabled,
        max_concurrency: body.max_concurrency,
        rate_limit: body.rate_limit,
        headers: body.headers,
    })
    .map_err(invalid)?;
    if disabling {
        ep.disable("disabled by its owner", now_ms());
    }
    state.guard_target(&ep).await?;
    state.store.save_endpoint(&ep).await?;
    Ok(Json(view(&state, ep).await?))
}

#[utoipa::path(delete, path = "/v1/endpoints/{endpoint_id}", tag = "endpoints", params(("endpoint_id" = String, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn delete(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let ep = owned(&state, &account, &id).await?;
    state.store.delete_endpoint(&ep.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The signing secrets of an endpoint.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SecretView {
    pub secret: String,
    /// Secrets replaced by a rotation that still sign until `expires_at`.
    pub previous: Vec<RetiredSecretView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RetiredSecretView {
    pub secret: String,
    pub expires_at: String,
}

fn secret_view(ep: &Endpoint) -> SecretView {
    let now = now_ms();
    SecretView {
        secret: ep.secret.expose(),
        previous: ep
            .previous_secrets
            .iter()
            .filter(|r| r.expires_ms > now)
            .map(|r| RetiredSecretView {
                secret: r.secret.expose(),
                expires_at: format_rfc3339_ms(r.expires_ms),
            })
            .collect(),
    }
}

#[utoipa::path(get, path = "/v1/endpoints/{endpoint_id}/secret", tag = "endpoints", params(("endpoint_id" = String, Path)),
    responses((status = 200, body = SecretView), (status = 404, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn secret(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<SecretView>> {
    let ep = owned(&state, &account, &id).await?;
    Ok(Json(secret_view(&ep)))
}

#[utoipa::path(post, path = "/v1/endpoints/{endpoint_id}/secret/rotate", tag = "endpoints", params(("endpoint_id" = String, Path)),
    responses((status = 200, body = SecretView, description = "The old secret keeps signing for the grace period (default 24 h)"),
        (status = 404, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn rotate(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<SecretView>> {
    let mut ep = owned(&state, &account, &id).await?;
    ep.rotate_secret(now_ms(), state.secret_grace);
    state.store.save_endpoint(&ep).await?;
    Ok(Json(secret_view(&ep)))
}

#[utoipa::path(get, path = "/v1/endpoints/{endpoint_id}/stats", tag = "endpoints", params(("endpoint_id" = String, Path)),
    responses((status = 200, body = EndpointStats), (status = 404, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn stats(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<EndpointStats>> {
    let ep = owned(&state, &account, &id).await?;
    Ok(Json(state.store.endpoint_stats(&ep.id, now_ms()).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestSend {
    /// The event type to send, with its catalog example as payload.
    #[serde(rename = "type")]
    pub event_type: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TestSent {
    pub event_id: String,
    pub delivery_id: String,
}

#[utoipa::path(post, path = "/v1/endpoints/{endpoint_id}/test", tag = "endpoints", params(("endpoint_id" = String, Path)), request_body = TestSend,
    responses((status = 202, body = TestSent, description = "Published through the real pipeline to this endpoint only"),
        (status = 404, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn test(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TestSend>,
) -> ApiResult<(StatusCode, Json<TestSent>)> {
    let ep = owned(&state, &account, &id).await?;
    if !ep.enabled {
        return Err(ApiError::Conflict(
            "the endpoint is disabled; enable it to send a test event".into(),
        ));
    }
    let spec = catalog::lookup(&body.event_type)
        .ok_or_else(|| ApiError::invalid("type", format!("unknown event type {:?}", body.event_type)))?;
    let data = RawValue::from_string(spec.example.to_owned()).expect("catalog examples are JSON");
    let envelope =
        Envelope::new(spec.name, account, data, None, now_ms()).map_err(|e| ApiError::Internal(e.to_string()))?;
    state
        .publisher
        .publish_to(&envelope, Some(&ep.id))
        .await
        .map_err(|e| ApiError::Unavailable(format!("the test event was not confirmed by the broker ({e})")))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(TestSent {
            delivery_id: DeliveryId::for_pair(&envelope.id, &ep.id).to_string(),
            event_id: envelope.id.to_string(),
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Recover {
    /// RFC 3339: re-send every failed delivery created since then.
    pub since: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Recovered {
    pub redelivered: usize,
}

#[utoipa::path(post, path = "/v1/endpoints/{endpoint_id}/recover", tag = "endpoints", params(("endpoint_id" = String, Path)), request_body = Recover,
    responses((status = 202, body = Recovered), (status = 404, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)),
    security(("api_key" = [])))]
pub async fn recover(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Recover>,
) -> ApiResult<(StatusCode, Json<Recovered>)> {
    let ep = owned(&state, &account, &id).await?;
    let since =
        parse_rfc3339_ms(&body.since).ok_or_else(|| ApiError::invalid("since", "must be an RFC 3339 date-time"))?;
    let now = now_ms();
    let mut redelivered = 0;
    for id in state.store.endpoint_deliveries_since(&ep.id, since).await? {
        if let Some(d) = state.store.delivery(&id).await?
            && d.status == DeliveryStatus::Failed
            && state.store.redeliver(&d, now).await? == Redelivery::Queued
        {
            redelivered += 1;
        }
    }
    Ok((StatusCode::ACCEPTED, Json(Recovered { redelivered })))
}
