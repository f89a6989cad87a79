//! The event catalog, with each type's payload schema and example.

use axum::Json;
use laabam_shared::catalog::CATALOG;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventTypeView {
    pub name: &'static str,
    pub description: &'static str,
    /// JSON Schema of `data`.
    pub schema: Value,
    pub example: Value,
}

#[utoipa::path(get, path = "/v1/event-types", tag = "events", responses((status = 200, body = [EventTypeView])))]
pub async fn list() -> Json<Vec<EventTypeView>> {
    Json(
        CATALOG
            .iter()
            .map(|spec| EventTypeView {
                name: spec.name,
                description: spec.description,
                schema: spec.json_schema(),
                example: serde_json::from_str(spec.example).expect("catalog examples are JSON"),
            })
            .collect(),
    )
}
