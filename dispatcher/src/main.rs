//! `laabam-dispatcher`: see the library for what it does.

use clap::Parser;
use laabam_dispatcher::DispatcherConfig;
use laabam_shared::{shutdown, telemetry};

/// Attempts allocate and free many small buffers across worker threads; mimalloc's per-thread
/// free lists cost less CPU per delivery than glibc malloc there (see the README's Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let config = DispatcherConfig::parse();
    telemetry::init(config.common.log_format);
    if let Err(e) = laabam_dispatcher::run(config, shutdown::on_signals()).await {
        eprintln!("laabam-dispatcher: {e}");
        std::process::exit(1);
    }
}
