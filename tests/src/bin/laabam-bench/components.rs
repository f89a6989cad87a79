//! Our processes as the benchmark runs them: release binaries with production defaults.

use laabam_tests::TestEnv;
use laabam_tests::ports::free_port;

/// The components' log level: `error` unless `LAABAM_BENCH_LOG` says otherwise.
pub(crate) fn log_level() -> String {
    std::env::var("LAABAM_BENCH_LOG").unwrap_or_else(|_| "error".into())
}

/// The dispatcher and scheduler as separate release processes, with production defaults
/// (timeouts, leases, in-flight cap) except quick retries and a per-endpoint limit fit for one
/// high-volume endpoint. Returns their pids and metrics ports.
pub(crate) fn spawn_components(env: &mut TestEnv, queues: u16) -> ([(&'static str, u32); 2], u16, u16) {
    let queues = queues.to_string();
    let (dispatcher_port, scheduler_port) = (free_port(), free_port());
    let mut flags = env.connection_flags();
    flags.extend(
        [
            "--retry-first-delay",
            "100ms",
            "--retry-max-delay",
            "1s",
            "--endpoint-concurrency",
            "128",
            "--allow-private-targets",
            "true",
            "--dispatch-queues",
            &queues,
        ]
        .map(String::from),
    );
    flags.extend(["--metrics-addr".into(), format!("127.0.0.1:{dispatcher_port}")]);
    let dispatcher = env.spawn_binary_with("laabam-dispatcher", &flags, &[("RUST_LOG", &log_level())], None);
    let mut sflags = env.connection_flags();
    sflags.extend(["--dispatch-queues".into(), queues, "--poll".into(), "20ms".into()]);
    sflags.extend(["--metrics-addr".into(), format!("127.0.0.1:{scheduler_port}")]);
    let scheduler = env.spawn_binary_with("laabam-retry-scheduler", &sflags, &[("RUST_LOG", &log_level())], None);
    (
        [("dispatcher", dispatcher), ("scheduler", scheduler)],
        dispatcher_port,
        scheduler_port,
    )
}
