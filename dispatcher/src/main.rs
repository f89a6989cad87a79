//! `laabam-dispatcher`: see the library for what it does.

use laabam_dispatcher::DispatcherConfig;
use laabam_shared::config::parse_settings;
use laabam_shared::{shutdown, telemetry};

/// Attempts allocate and free many small buffers across worker threads; mimalloc's per-thread
/// free lists cost less CPU per delivery than glibc malloc there (see the README's Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Before the runtime allocates: mimalloc advises its arenas as huge-page memory, so with
    // transparent huge pages on ("madvise" or "always") each 2 MiB region it touched was
    // resident whole. Off, `fanout` peaked at 52–54 MiB instead of 70–80 (README, Performance).
    #[cfg(target_os = "linux")]
    let huge_pages = rustix::thread::disable_transparent_huge_pages(true);
    let config: DispatcherConfig = parse_settings();
    telemetry::init(config.common.log_format);
    laabam_shared::open_files::raise_limit();
    #[cfg(target_os = "linux")]
    if let Err(e) = huge_pages {
        tracing::warn!(error = %e, "transparent huge pages stay on: memory use may be higher");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the Tokio runtime starts");
    if let Err(e) = runtime.block_on(async { laabam_dispatcher::run(config, shutdown::on_signals()).await }) {
        eprintln!("laabam-dispatcher: {e}");
        std::process::exit(1);
    }
}
