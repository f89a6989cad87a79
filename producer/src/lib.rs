//! The producer side of Laabam Webhooks.
//!
//! # Layout
//! - [`publisher`]: the [`Publisher`] billing services embed to publish events with publisher
//!   confirms.
//! - `main.rs`: the `laabam-producer` command line for operators (publish, endpoints, topology).

pub mod publisher;

pub use publisher::{PublishError, Publisher};
