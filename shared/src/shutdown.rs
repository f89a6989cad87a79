//! One cancellation token per process, cancelled by SIGTERM or Ctrl-C and passed down to every
//! loop, so that each stops taking work and finishes or hands back what it holds.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT. The handlers are installed before this
/// returns, not in the task that waits for them: a signal that came before that task first ran
/// would otherwise take the default action and kill the process mid-start.
pub fn on_signals() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let trigger = token.clone();
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = interrupt.recv() => tracing::info!("interrupt received, shutting down"),
        }
        trigger.cancel();
    });
    token
}

/// Sleeps for `period`, or less if `shutdown` comes first.
pub async fn pause(period: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(period) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Runs `round` at once and then `period` after each until `shutdown`: a process's upkeep
/// (announcing itself, watching a dependency), whose wait never holds up a shutdown.
pub async fn every<F: Future<Output = ()>>(
    period: Duration,
    shutdown: &CancellationToken,
    mut round: impl FnMut() -> F,
) {
    while !shutdown.is_cancelled() {
        round().await;
        pause(period, shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn every_runs_at_once_and_stops_within_its_pause_at_shutdown() {
        let token = CancellationToken::new();
        let rounds = AtomicUsize::new(0);
        let rounds = &rounds;
        let stop = &token.clone();
        let looping = every(Duration::from_secs(3600), &token, || async move {
            rounds.fetch_add(1, Ordering::Relaxed);
            stop.cancel();
        });
        tokio::time::timeout(Duration::from_secs(10), looping)
            .await
            .expect("the hour's pause is cut short");
        assert_eq!(
            rounds.load(Ordering::Relaxed),
            1,
            "one round, at once, and none after the shutdown"
        );
    }

    /// On one thread the task that waits for the signal cannot have run when `kill` returns: the
    /// SIGTERM is caught only if `on_signals` installed the handler itself. Without it, the
    /// default action would end this test process.
    #[tokio::test(flavor = "current_thread")]
    async fn a_sigterm_that_comes_before_the_waiting_task_runs_still_cancels() {
        let token = on_signals();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(10), token.cancelled())
            .await
            .expect("the token is cancelled");
    }
}
