//! The end-to-end test harness: real RabbitMQ and Redis, real HTTP(S) receivers on loopback.
//!
//! # Layout
//! - [`env`]: a test's own namespace — a RabbitMQ vhost and a Redis key prefix, removed on drop —
//!   and the components (in-process or as real binaries) running in it.
//! - [`api`]: a JSON client for the HTTP API.
//! - [`deliveries`]: deliveries begun and recorded straight through the store.
//! - [`own_rabbit`], [`own_redis`]: a broker or a Redis of a test's own, to crash and restart.
//! - [`ports`]: ports for processes told where to listen before they start.
//! - [`receiver`]: HTTP and HTTPS receivers that record every request and answer as told.
//! - [`report`]: the fault table (fault, confirmed, delivered, lost, duplicates).
//! - [`wait`]: waiting on conditions instead of sleeping.
//! - [`workspace`]: the repository's root, and the Node.js packages some tests run.

pub mod api;
pub mod deliveries;
pub mod env;
pub mod own_rabbit;
pub mod own_redis;
pub mod ports;
pub mod receiver;
pub mod report;
pub mod wait;
pub mod workspace;

pub use api::ApiClient;
pub use env::TestEnv;
pub use receiver::{Captured, Receiver, Reply};
pub use wait::{wait_finished, wait_until};
