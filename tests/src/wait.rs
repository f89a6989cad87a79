//! Tests wait on conditions, never on fixed sleeps.

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// Polls `condition` every 20 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    // Each check is bounded by what is left of the limit too: a check that never returns (a
    // connect to a broker that never answers) must fail the test, not hang it.
    while !tokio::time::timeout_at(deadline, condition())
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what} (a check never returned)"))
    {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a delivery is finished (succeeded or failed) and returns its state.
pub async fn wait_finished(
    store: &laabam_shared::store::Store,
    id: &laabam_shared::ids::DeliveryId,
) -> laabam_shared::delivery::DeliveryState {
    use laabam_shared::delivery::DeliveryStatus;
    let finished = |d: &laabam_shared::delivery::DeliveryState| {
        matches!(d.status, DeliveryStatus::Succeeded | DeliveryStatus::Failed)
    };
    wait_until(&format!("delivery {id} finished"), Duration::from_secs(30), || async {
        store.delivery(id).await.unwrap().is_some_and(|d| finished(&d))
    })
    .await;
    store.delivery(id).await.unwrap().expect("finished deliveries exist")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[should_panic(expected = "a check never returned")]
    async fn a_check_that_never_returns_fails_the_wait_instead_of_hanging_it() {
        wait_until("nothing", Duration::from_millis(50), std::future::pending::<bool>).await;
    }
}
