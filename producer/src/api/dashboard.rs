//! The account owner's dashboard: a static single-page app compiled into the binary (no CDN, no
//! build step) that signs in with an account API key and talks only to the public `/v1` API,
//! so it can never see more than the key's own API calls could.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// Where the dashboard lives; `/` redirects here.
pub const BASE: &str = "/dashboard/";

/// Every file of the app, by name. The receiver examples are served as text: the catalog page
/// shows them, and the browser test runs them against real deliveries.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../dashboard/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/api.js"),
    ),
    (
        "charts.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/charts.js"),
    ),
    (
        "dom.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/dom.js"),
    ),
    (
        "format.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/format.js"),
    ),
    (
        "i18n.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/i18n.js"),
    ),
    (
        "page-catalog.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/page-catalog.js"),
    ),
    (
        "page-delivery.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/page-delivery.js"),
    ),
    (
        "page-endpoint.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/page-endpoint.js"),
    ),
    (
        "page-form.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/page-form.js"),
    ),
    (
        "page-signin.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/page-signin.js"),
    ),
    (
        "page-webhooks.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/page-webhooks.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../dashboard/style.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("../../dashboard/favicon.svg"),
    ),
    (
        "example-receiver.js",
        "text/plain; charset=utf-8",
        include_str!("../../dashboard/example-receiver.js"),
    ),
    (
        "example-receiver.py",
        "text/plain; charset=utf-8",
        include_str!("../../dashboard/example-receiver.py"),
    ),
];

/// Scripts, styles and requests only from the producer itself; no framing (clickjacking), no
/// inline script (an injected string can never run).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

fn asset(name: &str) -> Response {
    let Some((_, content_type, body)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return super::error::ApiError::NotFound("file").into_response();
    };
    let mut response = (StatusCode::OK, *body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The app is small and changes with the binary: always revalidate rather than serve a stale
    // script against a newer API.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// The dashboard's routes, merged into the API's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to(BASE) }))
        .route("/dashboard", get(|| async { Redirect::to(BASE) }))
        .route("/dashboard/", get(|| async { asset("index.html") }))
        .route(
            "/dashboard/{file}",
            get(|Path(file): Path<String>| async move { asset(&file) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_used_by_another_and_every_module_is_served() {
        for (name, _, _) in &ASSETS[1..] {
            let quoted = [format!("\"{name}\""), format!("'./{name}'"), format!("'{name}'")];
            assert!(
                ASSETS
                    .iter()
                    .any(|(other, _, body)| other != name && quoted.iter().any(|q| body.contains(q.as_str()))),
                "no page loads {name}"
            );
        }
        for (_, _, body) in ASSETS {
            for import in body.split("from './").skip(1) {
                let file = &import[..import.find('\'').unwrap()];
                assert!(
                    ASSETS.iter().any(|(n, _, _)| *n == file),
                    "{file} is imported but not served"
                );
            }
        }
        assert_eq!(asset("index.html").status(), StatusCode::OK);
        assert_eq!(asset("../Cargo.toml").status(), StatusCode::NOT_FOUND);
    }
}
