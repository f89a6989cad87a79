//! One cancellation token per process, cancelled by SIGTERM or Ctrl-C and passed down to every
//! loop, so that each stops taking work and finishes or hands back what it holds.

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
