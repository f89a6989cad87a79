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
    while !condition().await {
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
