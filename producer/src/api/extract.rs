//! Request extractors: JSON bodies with precise errors, and the two kinds of credentials.

use super::ApiState;
use super::error::ApiError;
use super::limits::Authenticated;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use laabam_shared::ids::AccountId;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// A JSON body: malformed JSON is a 400 naming the position; a well-formed body of the wrong
/// shape (wrong type, unknown or missing field) is a 422 naming the field's path.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// Parses bytes as `T`, classifying errors as [`JsonBody`] does.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        classify(e.into_inner(), (path != ".").then_some(path))
    })?;
    de.end().map_err(|e| classify(e, None))?;
    Ok(value)
}

fn classify(inner: serde_json::Error, path: Option<String>) -> ApiError {
    {
        match inner.classify() {
            serde_json::error::Category::Data => ApiError::Invalid {
                message: inner.to_string(),
                field: path,
            },
            _ => ApiError::BadRequest {
                message: format!("malformed JSON: {inner}"),
                field: None,
            },
        }
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e: BytesRejection| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(super::MAX_BODY_BYTES)
            } else {
                ApiError::BadRequest {
                    message: e.body_text(),
                    field: None,
                }
            }
        })?;
        if bytes.is_empty() {
            return Err(ApiError::BadRequest {
                message: "a JSON body is required".into(),
                field: None,
            });
        }
        parse_json(&bytes).map(JsonBody)
    }
}

/// Query parameters; a bad one is a 400 naming it.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|e: QueryRejection| ApiError::BadRequest {
                message: e.body_text(),
                field: None,
            })
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    bearer_of(&parts.headers)
}

/// The token of an `Authorization: Bearer …` header.
pub(super) fn bearer_of(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The account an API key belongs to. Every account route takes this; nothing else scopes.
#[derive(Debug, Clone)]
pub struct Caller(pub AccountId);

/// The account of the request's API key, as looked up while its rate was counted (see
/// `limits::count_for_deployment`); `None` inside when the key is not valid.
#[derive(Debug, Clone)]
pub(super) struct KeyLookedUp(pub(super) Option<AccountId>);

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<ApiState>) -> Result<Self, ApiError> {
        let key = bearer(parts).ok_or(ApiError::Unauthorized(
            "an account API key is required (Authorization: Bearer lbk_…)",
        ))?;
        let looked_up = match parts.extensions.get::<KeyLookedUp>() {
            Some(KeyLookedUp(found)) => found.clone(),
            None => state.store.authenticate(key).await?,
        };
        match looked_up {
            Some(account) => {
                Authenticated::mark(parts);
                Ok(Caller(account))
            }
            None => Err(ApiError::Unauthorized("invalid API key")),
        }
    }
}

/// An operator presenting `LAABAM_ADMIN_TOKEN`.
#[derive(Debug)]
pub struct Operator;

impl FromRequestParts<Arc<ApiState>> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<ApiState>) -> Result<Self, ApiError> {
        let Some(expected) = &state.admin_token_hash else {
            return Err(ApiError::Unauthorized(
                "operator routes are off: LAABAM_ADMIN_TOKEN is not set",
            ));
        };
        let given = bearer(parts).ok_or(ApiError::Unauthorized("the operator token is required"))?;
        // Comparing digests: timing can reveal at most a prefix of a hash, never of the token.
        if Sha256::digest(given.as_bytes()).as_slice() == expected.as_slice() {
            Authenticated::mark(parts);
            Ok(Operator)
        } else {
            Err(ApiError::Unauthorized("invalid operator token"))
        }
    }
}
