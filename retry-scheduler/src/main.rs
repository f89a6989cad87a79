//! `laabam-retry-scheduler`: see the library for what it does.

use laabam_retry_scheduler::SchedulerConfig;
use laabam_shared::config::parse_settings;
use laabam_shared::{shutdown, telemetry};

#[tokio::main]
async fn main() {
    let config: SchedulerConfig = parse_settings();
    telemetry::init(config.common.log_format);
    laabam_shared::open_files::raise_limit();
    if let Err(e) = laabam_retry_scheduler::run(config, shutdown::on_signals()).await {
        eprintln!("laabam-retry-scheduler: {e}");
        std::process::exit(1);
    }
}
