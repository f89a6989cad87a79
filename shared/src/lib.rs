//! Contracts every Laabam Webhooks process agrees on. No process logic lives here.
//!
//! # Layout
//! - [`envelope`], [`catalog`]: the event as published and delivered, and the types it may have.
//! - [`signing`]: Standard Webhooks signatures and verification.
//! - [`ids`], [`endpoint`], [`delivery`]: the records, as newtypes that parse at the edge.
//! - [`retry`]: when to try again and when to give up.
//! - [`store`]: everything in Redis (endpoints, events, deliveries, the retry set).
//! - [`topology`]: every exchange and queue in RabbitMQ.
//! - [`config`], [`startup`], [`shutdown`], [`telemetry`], [`ops`], [`clock`]: what each
//!   process needs to start, run, be watched and stop; [`http_server`]: its HTTP ports;
//!   [`open_files`]: room for its connections; [`idle_map`]: state per caller or endpoint,
//!   kept bounded.

pub mod catalog;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod endpoint;
pub mod envelope;
pub mod http_server;
pub mod idle_map;
pub mod ids;
pub mod open_files;
pub mod ops;
pub mod publish_link;
pub mod retry;
pub mod sealing;
pub mod shutdown;
pub mod signing;
pub mod startup;
pub mod store;
pub mod targets;
pub mod telemetry;
pub mod topology;
