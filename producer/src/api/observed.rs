//! What the API answers, for Prometheus: requests by method, route and status, and how long
//! each took. Routes are labelled by their template (`/v1/endpoints/{id}`), and paths no route
//! matches by `unmatched`, so a client cannot add series by making up paths or methods.

use crate::metrics::METRICS;
use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use std::time::Instant;

/// The label of a path no route matched.
const UNMATCHED: &str = "unmatched";

/// Outside every other layer, so the limits' refusals are counted too.
pub async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    // A matched path is shared, not copied: cloning it costs no allocation.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let response = next.run(req).await;
    let route = route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    METRICS
        .api_requests
        .with_label_values(&[method, route, response.status().as_str()])
        .inc();
    METRICS
        .api_request_seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    response
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
