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
        super::accounts::create, super::accounts::create_key, super::accounts::list_keys, super::accounts::revoke_key,
        super::accounts::own_keys, super::accounts::revoke_own_key,
    ),
    modifiers(&Security),
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

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
