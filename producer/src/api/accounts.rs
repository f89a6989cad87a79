//! Accounts and API keys: operators create accounts and issue keys; an account can list and
//! revoke its own keys.

use super::ApiState;
use super::error::{ApiError, ApiResult};
use super::extract::{Caller, JsonBody, Operator};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use laabam_shared::clock::now_ms;
use laabam_shared::ids::AccountId;
use laabam_shared::store::{Account, ApiKeyInfo};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    pub name: String,
    /// Endpoints the account may have, in place of the API's default
    /// (`LAABAM_MAX_ENDPOINTS_PER_ACCOUNT`).
    pub max_endpoints: Option<u32>,
}

/// `max_endpoints: null` puts the account back on the API's default.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAccount {
    #[serde(default, deserialize_with = "super::endpoints::present")]
    #[schema(value_type = Option<u32>)]
    pub max_endpoints: Option<Option<u32>>,
}

fn check_max_endpoints(most: Option<u32>) -> ApiResult<()> {
    match most {
        Some(0) => Err(ApiError::invalid("max_endpoints", "must be at least 1")),
        _ => Ok(()),
    }
}

/// A new key: `key` is shown this once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NewApiKey {
    pub key: String,
    pub prefix: String,
    pub created_at: String,
}

/// The account, or 404.
async fn account(state: &ApiState, id: &str) -> ApiResult<Account> {
    let id = AccountId::parse(id).map_err(|_| ApiError::NotFound("account"))?;
    state.store.get_account(&id).await?.ok_or(ApiError::NotFound("account"))
}

async fn existing(state: &ApiState, id: &str) -> ApiResult<AccountId> {
    Ok(account(state, id).await?.id)
}

#[utoipa::path(post, path = "/v1/accounts", tag = "accounts", request_body = CreateAccount,
    responses((status = 201, body = Account), (status = 401, body = super::error::ErrorBody)), security(("operator" = [])))]
pub async fn create(
    _: Operator,
    State(state): State<Arc<ApiState>>,
    JsonBody(body): JsonBody<CreateAccount>,
) -> ApiResult<(StatusCode, Json<Account>)> {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid("name", "must be 1 to 200 characters"));
    }
    check_max_endpoints(body.max_endpoints)?;
    let account = state.store.create_account(name, body.max_endpoints, now_ms()).await?;
    Ok((StatusCode::CREATED, Json(account)))
}

#[utoipa::path(get, path = "/v1/accounts/{account_id}", tag = "accounts", params(("account_id" = String, Path)),
    responses((status = 200, body = Account), (status = 404, body = super::error::ErrorBody)), security(("operator" = [])))]
pub async fn get(_: Operator, State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult<Json<Account>> {
    Ok(Json(account(&state, &id).await?))
}

#[utoipa::path(patch, path = "/v1/accounts/{account_id}", tag = "accounts", params(("account_id" = String, Path)), request_body = UpdateAccount,
    responses((status = 200, body = Account), (status = 404, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)),
    security(("operator" = [])))]
pub async fn update(
    _: Operator,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateAccount>,
) -> ApiResult<Json<Account>> {
    let mut found = account(&state, &id).await?;
    if let Some(most) = body.max_endpoints {
        check_max_endpoints(most)?;
        state.store.set_max_endpoints(&found.id, most).await?;
        found.max_endpoints = most;
    }
    Ok(Json(found))
}

#[utoipa::path(post, path = "/v1/accounts/{account_id}/keys", tag = "accounts", params(("account_id" = String, Path)),
    responses((status = 201, body = NewApiKey), (status = 404, body = super::error::ErrorBody)), security(("operator" = [])))]
pub async fn create_key(
    _: Operator,
    State(state): State<Arc<ApiState>>,
    Path(account): Path<String>,
) -> ApiResult<(StatusCode, Json<NewApiKey>)> {
    let account = existing(&state, &account).await?;
    let (key, info) = state.store.create_api_key(&account, now_ms()).await?;
    Ok((
        StatusCode::CREATED,
        Json(NewApiKey {
            key,
            prefix: info.prefix,
            created_at: info.created_at,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/accounts/{account_id}/keys", tag = "accounts", params(("account_id" = String, Path)),
    responses((status = 200, body = [ApiKeyInfo])), security(("operator" = [])))]
pub async fn list_keys(
    _: Operator,
    State(state): State<Arc<ApiState>>,
    Path(account): Path<String>,
) -> ApiResult<Json<Vec<ApiKeyInfo>>> {
    let account = existing(&state, &account).await?;
    Ok(Json(state.store.list_api_keys(&account).await?))
}

#[utoipa::path(delete, path = "/v1/accounts/{account_id}/keys/{prefix}", tag = "accounts",
    params(("account_id" = String, Path), ("prefix" = String, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)), security(("operator" = [])))]
pub async fn revoke_key(
    _: Operator,
    State(state): State<Arc<ApiState>>,
    Path((account, prefix)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let account = existing(&state, &account).await?;
    revoke(&state, &account, &prefix).await
}

async fn revoke(state: &ApiState, account: &AccountId, prefix: &str) -> ApiResult<StatusCode> {
    if state.store.revoke_api_key(account, prefix).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("API key"))
    }
}

#[utoipa::path(get, path = "/v1/api-keys", tag = "accounts", responses((status = 200, body = [ApiKeyInfo])), security(("api_key" = [])))]
pub async fn own_keys(Caller(account): Caller, State(state): State<Arc<ApiState>>) -> ApiResult<Json<Vec<ApiKeyInfo>>> {
    Ok(Json(state.store.list_api_keys(&account).await?))
}

#[utoipa::path(delete, path = "/v1/api-keys/{prefix}", tag = "accounts", params(("prefix" = String, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)), security(("api_key" = [])))]
pub async fn revoke_own_key(
    Caller(account): Caller,
    State(state): State<Arc<ApiState>>,
    Path(prefix): Path<String>,
) -> ApiResult<StatusCode> {
    revoke(&state, &account, &prefix).await
}
