//! Which dispatchers are running. Each says so every second and hears how many others have
//! lately, so the per-endpoint rate limits, which each process enforces on its own, can be
//! split among them: an endpoint limited to 10 deliveries a second gets 10 from the whole
//! deployment, not 10 from each dispatcher.

use super::{Store, StoreError};
use crate::clock::now_ms;
use crate::shutdown;
use redis::AsyncCommands;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a running dispatcher says so.
pub const SEEN_EVERY: Duration = Duration::from_secs(1);

/// A dispatcher not seen for this long has stopped (killed, or cut off from Redis): several
/// periods, so one that is running is never dropped for a slow round trip.
const GONE_AFTER_MS: i64 = 5_000;

impl Store {
    /// Records dispatcher `id` as running at `now_ms`, forgets those not seen since
    /// [`GONE_AFTER_MS`] before, and says how many are running, itself included.
    pub async fn dispatcher_seen(&self, id: &str, now_ms: i64) -> Result<usize, StoreError> {
        let key = self.keys.dispatchers();
        let (running,): (usize,) = redis::pipe()
            .atomic()
            .zadd(&key, id, now_ms)
            .ignore()
            .zrembyscore(&key, "-inf", now_ms - GONE_AFTER_MS)
            .ignore()
            // Gone with the last dispatcher, even one killed.
            .pexpire(&key, 2 * GONE_AFTER_MS)
            .ignore()
            .zcard(&key)
            .query_async(&mut self.conn())
            .await?;
        Ok(running)
    }

    /// Records dispatcher `id` as stopped, so the others take up its share at once.
    pub async fn dispatcher_stopped(&self, id: &str) -> Result<(), StoreError> {
        self.conn().zrem::<_, _, ()>(self.keys.dispatchers(), id).await?;
        Ok(())
    }

    /// Says dispatcher `id` is running every [`SEEN_EVERY`] until `shutdown`, then that it has
    /// stopped; `heard` gets how many are running each time. While Redis cannot be reached the
    /// last count stands.
    pub fn keep_saying_dispatcher_runs(
        &self,
        id: String,
        shutdown: CancellationToken,
        heard: impl Fn(usize) + Send + Sync + 'static,
    ) {
        let store = self.clone();
        tokio::spawn(async move {
            let (store, id, heard) = (&store, &id, &heard);
            shutdown::every(SEEN_EVERY, &shutdown, || async move {
                match store.dispatcher_seen(id, now_ms()).await {
                    Ok(running) => heard(running),
                    Err(e) => tracing::warn!(error = %e, "could not say this dispatcher runs; trying again"),
                }
            })
            .await;
            if let Err(e) = store.dispatcher_stopped(id).await {
                tracing::warn!(error = %e, "could not say this dispatcher stopped; the others will notice");
            }
        });
    }
}
