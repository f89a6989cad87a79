//! The producer side of Laabam Webhooks.
//!
//! # Layout
//! - [`publisher`]: the [`Publisher`] billing services embed to publish events with publisher
//!   confirms.
//! - [`api`]: the HTTP API (`laabam-producer serve`).
//! - [`metrics`]: Prometheus metrics.
//! - `main.rs`: the `laabam-producer` command line for operators (serve, publish, accounts,
//!   keys, endpoints, topology).

pub mod api;
pub mod metrics;
pub mod publisher;

pub use publisher::{PublishError, Publisher};
