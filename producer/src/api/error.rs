//! One error shape for every route: `{"error": {"code", "message", "field"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use laabam_shared::store::StoreError;
use serde::Serialize;

/// An API failure; its variant decides the status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{message}")]
    BadRequest { message: String, field: Option<String> },
    #[error("{message}")]
    Invalid { message: String, field: Option<String> },
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Conflict(String),
    /// The account has as many of something as it may have.
    #[error("{0}")]
    LimitReached(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("too many requests; slow down (see Retry-After)")]
    RateLimited,
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: &'static str,
    pub message: String,
    /// The offending field's path, when one field is to blame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        ApiError::Invalid {
            message: message.to_string(),
            field: Some(field.into()),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<String>) {
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::BadRequest { field, .. } => (StatusCode::BAD_REQUEST, "bad_request", field.clone()),
            ApiError::Invalid { field, .. } => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", field.clone()),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", None),
            ApiError::LimitReached(_) => (StatusCode::CONFLICT, "limit_reached", None),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None),
            ApiError::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limited", None),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
        }
    }
}

/// Redis's refusals that pass by themselves or by an operator's hand, not by a change to the
/// request: out of memory under `noeviction`, loading its data after a restart, a replica not
/// yet promoted, a script running long. Answered 503 like a Redis that is down, not 500.
const REDIS_BUSY_FOR_NOW: [&str; 6] = ["OOM", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "BUSY"];

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Redis(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                ApiError::Unavailable("Redis is unavailable; try again".into())
            }
            StoreError::Redis(e) => match busy_for_now(&e) {
                Some(code) => {
                    tracing::warn!(error = %e, "Redis refused a request for now");
                    ApiError::Unavailable(format!("Redis cannot take this request for now ({code}); try again"))
                }
                None => ApiError::Internal(StoreError::Redis(e).to_string()),
            },
            e @ StoreError::TooManyEndpoints { .. } => ApiError::LimitReached(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// The code of a refusal of [`REDIS_BUSY_FOR_NOW`], also inside an aborted transaction (a
/// `MULTI` refused as a whole answers `EXECABORT`, with each command's own error).
fn busy_for_now(e: &redis::RedisError) -> Option<String> {
    let errors = e.clone().into_server_errors()?;
    errors
        .iter()
        .map(|(_, error)| error.code())
        .find(|code| REDIS_BUSY_FOR_NOW.contains(code))
        .map(str::to_owned)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = self.parts();
        if let ApiError::Internal(detail) = &self {
            // The cause is logged once here; clients get no internals.
            tracing::error!(error = %detail, "internal error");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
                field,
            },
        };
        (status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
