//! An endpoint's `max_concurrency` kept by every dispatcher together. Each dispatcher bounds
//! its own requests to an endpoint; with several running, an endpoint that takes one request at
//! a time would otherwise get one from each. A request to such an endpoint also holds a place
//! in Redis for as long as it runs, under a lease as long as an attempt's, so a dispatcher that
//! dies holding one frees it when the lease ends.

use super::script_call::ScriptCall;
use super::{Store, StoreError};
use crate::ids::EndpointId;
use redis::{AsyncCommands, Script};
use std::sync::LazyLock;
use std::time::Duration;

static HOLD: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/hold_request_slot.lua")));

impl Store {
    /// Holds one of `endpoint`'s `limit` places for `holder` for up to `lease`; `false` when
    /// every place is held.
    pub async fn hold_request_slot(
        &self,
        endpoint: &EndpointId,
        limit: u32,
        holder: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut call = ScriptCall::new(&HOLD, 1);
        call.key(self.keys.endpoint_requests(endpoint))
            .arg(limit)
            .arg(holder)
            .arg(lease.as_millis().max(1) as u64);
        let held: u8 = call.invoke(&mut self.conn()).await?;
        Ok(held == 1)
    }

    /// Gives `holder`'s place at `endpoint` back.
    pub async fn release_request_slot(&self, endpoint: &EndpointId, holder: &str) -> Result<(), StoreError> {
        self.conn()
            .zrem::<_, _, ()>(self.keys.endpoint_requests(endpoint), holder)
            .await?;
        Ok(())
    }
}
