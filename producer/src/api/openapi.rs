//! The OpenAPI 3 document, generated from the handlers' annotations so it cannot drift.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Laabam Webhooks API", description = "Manage endpoints, publish events and inspect every delivery. Errors always have the shape {\"error\": {\"code\", \"message\", \"field\"}}."),
    paths(
        super::event_types::list,
        super::events::publish, super::events::list, super::events::get,
        super::endpoints::create, super::endpoints::list, super::endpoints::get, super::endpoints::update, super::endpoints::delete,
        super::endpoints::secret, super::endpoints::rotate, super::endpoints::stats, super::endpoints::test, super::endpoints::recover,
        super::deliveries::list, super::deliveries::get, super::deliveries::redeliver,
        super::accounts::create, super::accounts::get, super::accounts::update, super::accounts::create_key, super::accounts::list_keys, super::accounts::revoke_key,
        super::accounts::own_keys, super::accounts::revoke_own_key,
    ),
    modifiers(&Security, &CommonErrors),
    tags(
        (name = "events", description = "The catalog, publishing, and events with their delivery state"),
        (name = "endpoints", description = "Where an account's events go"),
        (name = "deliveries", description = "Every delivery and attempt"),
        (name = "accounts", description = "Accounts and API keys"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description.to_owned()))
                    .build(),
            )
        };
        components.add_security_scheme("api_key", bearer("An account API key (lbk_…)"));
        components.add_security_scheme("operator", bearer("The operator token (LAABAM_ADMIN_TOKEN)"));
    }
}

/// Declares on every operation the errors any request may meet, so the document lists every
/// status the API can answer (checked by schemathesis).
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        let common = [
            ("400", "Malformed JSON or query parameters"),
            ("401", "Missing or invalid credentials"),
            ("404", "Not found (or another account's)"),
            ("405", "Method not allowed on this route"),
            ("409", "Conflicts with the resource's state (in progress, disabled)"),
            ("413", "Body larger than 256 KiB"),
            ("422", "Well-formed but invalid input; `field` names it"),
            ("429", "Too many requests; see Retry-After"),
            (
                "503",
                "A dependency is unavailable, or too many requests in flight; retry",
            ),
        ];
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.delete,
                &mut item.put,
            ]
            .into_iter()
            .flatten()
            {
                for (status, description) in common {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error(description).into());
                }
            }
        }
    }
}

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
