//! Per-endpoint concurrency limits. A delivery finding its endpoint at the limit is deferred
//! to the retry set instead of waiting here, so one slow endpoint never holds broker messages
//! or slots that healthy endpoints need.

use laabam_shared::endpoint::Endpoint;
use laabam_shared::ids::EndpointId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct EndpointLimits {
    default_limit: u32,
    slots: Mutex<HashMap<EndpointId, (u32, Arc<Semaphore>)>>,
}

/// Idle entries are dropped when the map grows past this, so it stays bounded.
const PRUNE_ABOVE: usize = 10_000;

impl EndpointLimits {
    pub fn new(default_limit: u32) -> Self {
        EndpointLimits {
            default_limit: default_limit.max(1),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one request to `endpoint`, or `None` when it is at its limit.
    pub fn try_acquire(&self, endpoint: &Endpoint) -> Option<OwnedSemaphorePermit> {
        let limit = endpoint.max_concurrency.unwrap_or(self.default_limit).max(1);
        let semaphore = {
            let mut slots = self.slots.lock().expect("limits lock");
            if slots.len() > PRUNE_ABOVE {
                slots.retain(|_, (max, sem)| sem.available_permits() < *max as usize);
            }
            let entry = slots
                .entry(endpoint.id.clone())
                .or_insert_with(|| (limit, Arc::new(Semaphore::new(limit as usize))));
            if entry.0 != limit {
                // The owner changed the limit: start a fresh semaphore; old permits drain away.
                *entry = (limit, Arc::new(Semaphore::new(limit as usize)));
            }
            entry.1.clone()
        };
        semaphore.try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use laabam_shared::endpoint::NewEndpoint;
    use laabam_shared::ids::AccountId;

    fn endpoint(max: Option<u32>) -> Endpoint {
        Endpoint::create(
            AccountId::parse("acct_1").unwrap(),
            NewEndpoint {
                url: "http://127.0.0.1/".into(),
                max_concurrency: max,
                ..Default::default()
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn at_most_the_limit_is_handed_out_and_slots_come_back() {
        let limits = EndpointLimits::new(2);
        let ep = endpoint(None);
        let a = limits.try_acquire(&ep).unwrap();
        let _b = limits.try_acquire(&ep).unwrap();
        assert!(limits.try_acquire(&ep).is_none());
        drop(a);
        assert!(limits.try_acquire(&ep).is_some());
    }

    #[test]
    fn an_endpoint_limit_overrides_the_default() {
        let limits = EndpointLimits::new(8);
        let serial = endpoint(Some(1));
        let _only = limits.try_acquire(&serial).unwrap();
        assert!(limits.try_acquire(&serial).is_none());
        assert!(limits.try_acquire(&endpoint(None)).is_some());
    }
}
