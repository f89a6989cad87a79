//! Per-endpoint limits: requests in flight at once, and deliveries per second. A delivery
//! finding its endpoint's requests all in flight waits for one to finish when the wait is
//! expected to be short: a healthy endpoint frees a slot within milliseconds, so a burst queues
//! here instead of making a round trip through the retry set, scheduler and broker. It waits
//! only if a slot is typically held (a moving average, or, while every slot is held, at least as
//! long as none has been released) for less than the wait budget, and the number waiting times
//! that, over the limit, is less too; otherwise, as for a slow endpoint, the delivery is
//! deferred to the retry set at once, so a slow endpoint never holds the broker messages and
//! in-flight slots healthy endpoints need. An endpoint that has not answered yet gets a short
//! grace for its first answer. Over the rate limit, deliveries are deferred too.
//! Both are enforced by each dispatcher process: the rate limit as the process's share of it
//! among the dispatchers running; the concurrency limit per process, and an endpoint's own
//! `max_concurrency` also for the deployment while several run, each request holding a place
//! in Redis (see [`EndpointLimits::held_together`]).
//!
//! Requests to endpoints judged slow share a bounded *slow room* (half of
//! `LAABAM_MAX_IN_FLIGHT`): each endpoint's limit bounds its own requests, but many slow
//! endpoints together could otherwise hold the whole in-flight room, each request until its
//! timeout, and every event, healthy endpoints' too, would wait for that room. Past the slow
//! room their deliveries are deferred. A request is judged when it starts, and again once it
//! has run for the wait budget (see [`EndpointLimits::checkpoint`]): one that was not slow
//! when it started (its endpoint has just gone down, or has not answered yet) takes a share
//! then, or, when the slow room is full, is cut short, recorded as a timed-out attempt and
//! retried. So endpoints that fail together cannot hold the whole room for a timeout before
//! they are known.
//!
//! The wait budget is the slot wait, stretched while the whole process holds its slots longer:
//! on a saturated machine every request waits for the CPU, so every endpoint looks slow alike.
//! Deferring then helps no endpoint and adds a round trip through Redis, the scheduler and the
//! broker to each deferred delivery, which slows the process further; waiting is backpressure
//! to the broker instead. Slow means slow next to the process's typical request, so a slow
//! endpoint among healthy ones is still deferred at once.

mod deferred;
mod rate;
mod slots;
mod wait_budget;

use crate::metrics::METRICS;
use crate::sender::Checkpoint;
use laabam_shared::endpoint::Endpoint;
use laabam_shared::idle_map::IdleMap;
use laabam_shared::ids::EndpointId;
use rate::RateLimits;
pub use slots::Slot;
use slots::{Slots, SlowShare, since_epoch_ms};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wait_budget::WaitBudget;

#[derive(Debug)]
pub struct EndpointLimits {
    default_limit: u32,
    budget: Arc<WaitBudget>,
    /// Held by each request to an endpoint that was slow when it started, or that turned slow.
    slow_room: Arc<Semaphore>,
    slow_room_size: usize,
    slots: Mutex<IdleMap<EndpointId, Arc<Slots>>>,
    rates: RateLimits,
}

/// A request cut short at its [`Checkpoint`]: it ran past the wait budget while the slow room
/// was full.
#[derive(Debug, thiserror::Error)]
#[error("cut short after {} ms: the endpoint turned slow while the slow room ({room} requests) was full", after.as_millis())]
pub struct CutShort {
    /// How long it had run.
    after: Duration,
    room: usize,
}

/// A delivery's turn at one of its endpoint's slots, given without waiting.
#[derive(Debug)]
pub enum Turn {
    /// A slot, taken now.
    Now(Slot),
    /// None free, but one should be within the wait budget: wait for it with
    /// [`EndpointLimits::wait`], once nothing else is held for the delivery (its event's
    /// message settled, its other deliveries under way).
    Queued(Queued),
}

/// A delivery counted among its endpoint's waiting ones until its wait ends, even if it is
/// dropped before.
#[derive(Debug)]
pub struct Queued {
    slots: Arc<Slots>,
    /// Deliveries waiting when it joined, itself included.
    ahead: usize,
    taker: Taker,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.slots.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which delivery asks for a turn at its endpoint's rate limit: one arriving with its event
/// goes behind the deliveries already deferred for the rate, one coming back from the retry set
/// goes at its turn (see [`EndpointLimits::take`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taker {
    Arrival,
    Return,
}

/// A deferred delivery's turn at its endpoint's rate limit (see [`EndpointLimits::paced_turn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacedTurn {
    /// Reserved for it: come back after this long.
    After(Duration),
    /// Every turn within [`MAX_BACKLOG`] is reserved: come back some time past it and ask again.
    PastHorizon,
}

/// The longest a deferral is stretched for an endpoint's backlog.
pub const MAX_BACKLOG: Duration = Duration::from_secs(300);

/// The shortest pause between a delivery's asks for a place across dispatchers: each is a
/// Redis call.
const PLACE_POLL: Duration = Duration::from_millis(5);

/// The share of the wait budget an endpoint none of whose requests has finished yet has for
/// its first answer (see [`EndpointLimits::wait_for_slot`]).
const FIRST_ANSWER_GRACE: f64 = 1.0 / 8.0;

impl EndpointLimits {
    /// `slow_room` is how many requests to slow endpoints may be in flight at once.
    pub fn new(default_limit: u32, slot_wait: Duration, slow_room: usize) -> Self {
        let slow_room = slow_room.clamp(1, Semaphore::MAX_PERMITS);
        EndpointLimits {
            default_limit: default_limit.max(1),
            budget: Arc::new(WaitBudget::new(slot_wait)),
            slow_room: Arc::new(Semaphore::new(slow_room)),
            slow_room_size: slow_room,
            slots: Mutex::default(),
            rates: RateLimits::default(),
        }
    }

    /// A slot for one request to `endpoint` now, or a place among its waiting deliveries when
    /// one should free up within the wait budget, without waiting; `None` means defer: no slot
    /// soon enough, or over the rate limit. Over a rate limit, an arriving delivery is also
    /// deferred while the tokens to come are promised to deliveries deferred before it, so
    /// under a sustained excess they go in the order their events came.
    pub fn take(&self, endpoint: &Endpoint, taker: Taker) -> Option<Turn> {
        let slots = self.slots_of(endpoint);
        match slots.semaphore.clone().try_acquire_owned() {
            Ok(permit) => {
                // A slot taken while none was held starts the clock: for an endpoint that never
                // answers, and for one idle since its last release, whose stall is measured
                // from now, not from that release (else a burst after an idle spell would look
                // like a stall and be deferred instead of waited for).
                if slots.semaphore.available_permits() + 1 == slots.limit as usize {
                    slots.progress_ms.store(since_epoch_ms(), Ordering::Relaxed);
                }
                self.rated(endpoint, permit, slots, taker).map(Turn::Now)
            }
            Err(_) => {
                let ahead = slots.waiting.fetch_add(1, Ordering::Relaxed) + 1;
                let queued = Queued { slots, ahead, taker };
                self.wait_allowed(&queued.slots, ahead).map(|_| Turn::Queued(queued))
            }
        }
    }

    /// Waits for the slot a [`Turn::Queued`] delivery was promised; `None` means defer after
    /// all: the endpoint turned out slower than it looked, or is at its rate limit.
    pub async fn wait(&self, queued: Queued, endpoint: &Endpoint) -> Option<Slot> {
        let permit = self.wait_for_slot(&queued.slots, queued.ahead).await?;
        self.rated(endpoint, permit, queued.slots.clone(), queued.taker)
    }

    /// The slot `permit` grants, unless the endpoint is over its rate limit, or is slow while
    /// the slow room is full.
    fn rated(
        &self,
        endpoint: &Endpoint,
        permit: OwnedSemaphorePermit,
        slots: Arc<Slots>,
        taker: Taker,
    ) -> Option<Slot> {
        let slow = if slots.held_ms() > self.budget.ms() {
            Some(SlowShare::take(&self.slow_room)?)
        } else {
            None
        };
        if !self.rates.try_take(endpoint, taker) {
            METRICS.over_rate_limit.inc();
            return None;
        }
        Some(Slot {
            _permit: permit,
            slow,
            slots,
            cut_after_ms: None,
            sent: None,
        })
    }

    /// The point at which a request on `slot` that was not slow when it started is judged
    /// again: once it has run for the wait budget, still unanswered, it is slow, and takes a
    /// share of the slow room, or, when none is free, is cut short, so requests to endpoints
    /// that were healthy a moment ago never hold more of the in-flight room than the slow room
    /// allows for longer than the budget. `None` for a request already on a share.
    pub fn checkpoint<'a>(
        &'a self,
        slot: &'a mut Slot,
    ) -> Option<Checkpoint<impl FnOnce() -> Result<(), CutShort> + 'a>> {
        if slot.slow.is_some() {
            return None;
        }
        // From the request's start: a delivery of a wide fan-out may have held its slot for a
        // while already, waiting for its turn at the in-flight room.
        let started = Instant::now();
        Some(Checkpoint {
            after: Duration::from_secs_f64(self.budget.ms() / 1000.0),
            go_on: move || match SlowShare::take(&self.slow_room) {
                Some(share) => {
                    slot.slow = Some(share);
                    Ok(())
                }
                None => {
                    let after = started.elapsed();
                    slot.cut_after_ms = Some(after.as_secs_f64() * 1000.0);
                    METRICS.cut_short.inc();
                    Err(CutShort {
                        after,
                        room: self.slow_room_size,
                    })
                }
            },
        })
    }

    /// Waits for one of `slots` with `ahead` deliveries waiting (this one included), or `None`
    /// to defer. It waits only for an endpoint that answers within the budget, and only when
    /// the queue ahead should clear in time: each waiting delivery holds its share of the
    /// process's in-flight room.
    ///
    /// An endpoint none of whose requests has finished yet (new, or this process has just
    /// started on a backlog, when every endpoint is) has a short grace, an eighth of the
    /// budget from its first request, to answer; once one has answered it is judged like any
    /// other, so a healthy endpoint's burst waits milliseconds instead of a deferral's second
    /// or more. Waiting the whole budget for one that never answers would hold that room for
    /// its whole backlog that long.
    async fn wait_for_slot(&self, slots: &Slots, ahead: usize) -> Option<OwnedSemaphorePermit> {
        loop {
            let answered = slots.held.ms() > 0.0;
            let wait = self.wait_allowed(slots, ahead)?;
            match tokio::time::timeout(wait, slots.semaphore.clone().acquire_owned()).await {
                Ok(permit) => return permit.ok(),
                // It answered meanwhile (another delivery took that slot): judge it again.
                Err(_) if !answered && slots.held.ms() > 0.0 => continue,
                Err(_) => return None,
            }
        }
    }

    /// How long a delivery with `ahead` waiting (itself included) may wait for one of `slots`:
    /// `None` unless the endpoint answers within the budget and the queue ahead should clear in
    /// time (see [`EndpointLimits::wait_for_slot`]).
    fn wait_allowed(&self, slots: &Slots, ahead: usize) -> Option<Duration> {
        let budget_ms = self.budget.ms();
        let held_ms = slots.held_ms();
        let expected_ms = ahead as f64 * held_ms / slots.limit as f64;
        let wait_ms = if slots.held.ms() > 0.0 {
            budget_ms
        } else {
            budget_ms * FIRST_ANSWER_GRACE - held_ms
        };
        (held_ms <= budget_ms && expected_ms <= budget_ms && wait_ms > 0.0)
            .then(|| Duration::from_secs_f64(wait_ms / 1000.0))
    }

    /// Splits every endpoint's rate limit among the `dispatchers` running, so that together
    /// they keep to it, and has endpoints' own concurrency limits kept together while more than
    /// one runs (see `laabam_shared::store::DISPATCHER_SEEN_EVERY`).
    pub fn share_among(&self, dispatchers: usize) {
        self.rates.share_among(dispatchers);
    }

    /// The `max_concurrency` that the dispatchers running must keep together for `endpoint`,
    /// holding a place in Redis for each request (see `Store::hold_request_slot`): its own,
    /// while more than one runs. The default limit stays per process: it protects each
    /// process's in-flight room, not the endpoint.
    pub fn held_together(&self, endpoint: &Endpoint) -> Option<u32> {
        endpoint.max_concurrency.filter(|_| self.rates.dispatchers() > 1)
    }

    /// How often, and until when, a delivery refused a place among `endpoint`'s requests across
    /// dispatchers (see [`EndpointLimits::held_together`]) asks again before it is deferred:
    /// four times per typical hold of its requests (no more often than every [`PLACE_POLL`]),
    /// within the wait budget, for an endpoint that has answered within it; `None` to defer at
    /// once, as for a slow one. Asked once per hold, each delivery of a steady stream found the one
    /// before it still running, having itself waited a hold, and so waited a whole hold too.
    pub fn place_retry(&self, endpoint: &Endpoint) -> Option<(Duration, Instant)> {
        let slots = self.slots_of(endpoint);
        let (held_ms, budget_ms) = (slots.held_ms(), self.budget.ms());
        (slots.held.ms() > 0.0 && held_ms <= budget_ms).then(|| {
            let every = Duration::from_secs_f64(held_ms / 4000.0).max(PLACE_POLL);
            (every, Instant::now() + Duration::from_secs_f64(budget_ms / 1000.0))
        })
    }

    /// How long the deliveries already deferred for `endpoint` will take to pass through its
    /// slots (at most [`MAX_BACKLOG`]).
    pub fn deferral_backlog(&self, endpoint: &Endpoint) -> Duration {
        let slots = self.slots_of(endpoint);
        let ahead = slots.deferred.ahead(since_epoch_ms());
        let ms = ahead as f64 * slots.held_ms() / slots.limit as f64;
        Duration::from_secs_f64(ms / 1000.0).min(MAX_BACKLOG)
    }

    /// A turn at `endpoint`'s rate limit for a delivery deferred now, at least `earliest` from
    /// now; `None` when it has no rate limit. Each turn is reserved as it is given, one every
    /// 1/rate s, so its deferred deliveries come back at the rate, however many are deferred at
    /// once. Spread over a backlog's estimate instead, deliveries deferred together (an event
    /// burst's arrivals, each deciding before the others were counted) came back together,
    /// found the bucket empty but for a few, and were deferred again, over and over, for as
    /// long as the rate needed to drain them: 200 deliveries at 10/s were deferred 1,214 times.
    pub fn paced_turn(&self, endpoint: &Endpoint, earliest: Duration) -> Option<PacedTurn> {
        self.rates.reserve(endpoint, earliest)
    }

    /// A delivery to `endpoint` was deferred, to come back after `delay`: it counts in the
    /// endpoint's backlog until then.
    pub fn deferred(&self, endpoint: &Endpoint, delay: Duration) {
        let due_ms = since_epoch_ms().saturating_add(delay.as_millis() as u64);
        self.slots_of(endpoint).deferred.add(due_ms);
    }

    fn slots_of(&self, endpoint: &Endpoint) -> Arc<Slots> {
        let limit = endpoint.max_concurrency.unwrap_or(self.default_limit).max(1);
        let mut slots = self.slots.lock().expect("limits lock");
        // Every acquire and deferral looks its endpoint up: only a new entry copies the id.
        if let Some(known) = slots.get(&endpoint.id)
            && known.limit == limit
        {
            return known.clone();
        }
        slots.prune(|s| s.idle());
        let entry = slots
            .entry(endpoint.id.clone())
            .or_insert_with(|| Arc::new(Slots::new(limit, self.budget.clone())));
        if entry.limit != limit {
            // The owner changed the limit: start afresh; old permits drain away.
            *entry = Arc::new(Slots::new(limit, self.budget.clone()));
        }
        entry.clone()
    }
}

#[cfg(test)]
mod tests;
