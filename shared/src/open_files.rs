//! The process's open-file limit, raised from its soft value to its hard one at start.
//!
//! Every connection is a file descriptor: the dispatcher's keep-alive connections to endpoints
//! (up to `LAABAM_HTTP_IDLE_CONNECTIONS` kept idle), the API's clients, Redis and RabbitMQ. Services
//! often start with a soft limit of 1,024 (systemd's default) under a hard one hundreds of
//! times larger, and a Rust process does not raise it by itself. With 128, a dispatcher
//! delivering to 300 endpoints made 555 of 1,500 deliveries in 77 s: the connections kept idle
//! for the endpoints it had reached took every descriptor, so the attempts to the others failed
//! with "Too many open files", and again at each retry.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The limit to aim for when the hard limit is "unlimited", which Linux refuses for open files
/// past `fs.nr_open` (1,048,576 by default).
const UNLIMITED_AIM: u64 = 1 << 20;

/// Raises the soft open-file limit to the hard one. A failure is logged, and the process runs on
/// with the limit it had.
pub fn raise_limit() {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let aim = maximum.unwrap_or(UNLIMITED_AIM);
    let Some(soft) = current.filter(|&soft| soft < aim) else {
        return;
    };
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(aim),
            maximum,
        },
    ) {
        Ok(()) => tracing::info!(from = soft, to = aim, "open-file limit raised to its hard limit"),
        Err(e) => {
            tracing::warn!(limit = soft, error = %e, "cannot raise the open-file limit; connections past it will fail")
        }
    }
}

/// The soft open-file limit in force; `None` when unlimited.
pub fn current_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}
