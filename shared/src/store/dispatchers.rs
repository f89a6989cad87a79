//! Which dispatchers are running. Each says so every second and hears how many others have
//! lately, so the per-endpoint rate limits, which each process enforces on its own, can be
//! split among them (an endpoint limited to 10 deliveries a second gets 10 from the whole
//! deployment, not 10 from each dispatcher), and so each knows when endpoints' own
//! `max_concurrency` must be held in Redis (see `request_slots`).

use super::script_call::ScriptCall;
use super::{Store, StoreError};
use crate::shutdown;
use redis::{AsyncCommands, Script};
use std::sync::LazyLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

static SEEN: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/dispatcher_seen.lua")));

/// How often a running dispatcher says so.
pub const SEEN_EVERY: Duration = Duration::from_secs(1);

/// A dispatcher not seen for this long has stopped (killed, or cut off from Redis): several
/// periods, so one that is running is never dropped for a slow round trip.
const GONE_AFTER_MS: i64 = 5_000;

impl Store {
    /// Records dispatcher `id` as running now, forgets those not seen for [`GONE_AFTER_MS`],
    /// and says how many are running, itself included.
    pub async fn dispatcher_seen(&self, id: &str) -> Result<usize, StoreError> {
        let mut call = ScriptCall::new(&SEEN, 1);
        call.key(self.keys.dispatchers()).arg(id).arg(GONE_AFTER_MS);
        Ok(call.invoke(&mut self.conn()).await?)
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
                match store.dispatcher_seen(id).await {
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
