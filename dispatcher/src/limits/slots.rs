//! One endpoint's request slots, and the slot a request holds: releasing it feeds the moving
//! averages that say whether the endpoint, and the process, is slow.

use super::deferred::DeferredAhead;
use super::wait_budget::WaitBudget;
use crate::metrics::METRICS;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One endpoint's request slots, how many deliveries wait for one, and how long one is held.
#[derive(Debug)]
pub(super) struct Slots {
    pub(super) limit: u32,
    pub(super) semaphore: Arc<Semaphore>,
    pub(super) waiting: AtomicUsize,
    pub(super) held: HeldTime,
    /// When a slot was last released or its request sent, or a slot taken while none was held,
    /// in ms since [`EPOCH`]:
    /// while every slot is held, the time since says each is held at least about that long,
    /// long before the first slow request finishes and the moving average learns it.
    pub(super) progress_ms: AtomicU64,
    /// Deliveries this process deferred that are not due yet.
    pub(super) deferred: DeferredAhead,
    /// The process-wide budget, which every release feeds as well.
    pub(super) budget: Arc<WaitBudget>,
}

/// The origin of [`Slots::progress_ms`].
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

pub(super) fn since_epoch_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// A moving average of how long a slot is held, in ms (f64 bits; 0 until the first release).
#[derive(Debug, Default)]
pub(super) struct HeldTime(AtomicU64);

impl HeldTime {
    pub(super) fn ms(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    pub(super) fn observe(&self, ms: f64) {
        let old = self.ms();
        let new = if old == 0.0 { ms } else { old * 0.8 + ms * 0.2 };
        self.0.store(new.to_bits(), Ordering::Relaxed);
    }

    pub(super) fn observe_at_least(&self, ms: f64) {
        self.0.store(self.ms().max(ms).to_bits(), Ordering::Relaxed);
    }
}

/// The right to one request to an endpoint; releasing it after its request records how long
/// it was held.
#[derive(Debug)]
pub struct Slot {
    pub(super) _permit: OwnedSemaphorePermit,
    /// Its share of the slow room, when its endpoint was slow or the request turned slow.
    pub(super) slow: Option<SlowShare>,
    pub(super) slots: Arc<Slots>,
    /// How long its request had run when it was cut short, in ms (see [`super::EndpointLimits::checkpoint`]).
    pub(super) cut_after_ms: Option<f64>,
    /// When its request went out (see [`Slot::sending`]).
    pub(super) sent: Option<Instant>,
}

impl Slot {
    /// Marks the request going out. A slot's hold teaches the averages from here, so they say
    /// how long the endpoint takes, not how long its delivery took to begin: measured from the
    /// slot's taking, a Redis stall of seconds while deliveries began (or failed to) taught an
    /// endpoint answering in a millisecond an average of seconds, and its next deliveries were
    /// deferred for tens of seconds as if it were slow. A slot given back unused teaches nothing.
    pub fn sending(&mut self) {
        self.sent = Some(Instant::now());
        self.slots.progress_ms.store(since_epoch_ms(), Ordering::Relaxed);
    }
}

/// One request's share of the slow room, counted in the gauge while held.
#[derive(Debug)]
pub(super) struct SlowShare {
    _permit: OwnedSemaphorePermit,
}

impl SlowShare {
    pub(super) fn take(room: &Arc<Semaphore>) -> Option<Self> {
        let permit = room.clone().try_acquire_owned().ok()?;
        METRICS.slow_room_in_use.inc();
        Some(SlowShare { _permit: permit })
    }
}

impl Drop for SlowShare {
    fn drop(&mut self) {
        METRICS.slow_room_in_use.dec();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        match (self.sent, self.cut_after_ms) {
            // Given back unused: a free slot again, and nothing learnt.
            (None, _) => {}
            // It would have run longer still: the endpoint is slow from now on, so its next
            // deliveries are judged by the slow room instead of being cut in turn. The budget
            // does not learn from it: its length is the budget's own, and counting it would
            // stretch the budget towards the hanging endpoints it is meant to tell apart.
            (Some(_), Some(ran_ms)) => self.slots.held.observe_at_least(ran_ms),
            (Some(sent), None) => {
                let ms = sent.elapsed().as_secs_f64() * 1000.0;
                self.slots.held.observe(ms);
                self.slots.budget.observe(ms);
            }
        }
        self.slots.progress_ms.store(since_epoch_ms(), Ordering::Relaxed);
    }
}

impl Slots {
    pub(super) fn new(limit: u32, budget: Arc<WaitBudget>) -> Self {
        Slots {
            limit,
            semaphore: Arc::new(Semaphore::new(limit as usize)),
            waiting: AtomicUsize::new(0),
            held: HeldTime::default(),
            progress_ms: AtomicU64::new(0),
            deferred: DeferredAhead::default(),
            budget,
        }
    }

    /// How long a slot is held: the moving average, or, while every slot has been held
    /// without one released for longer than that, the time since one was.
    pub(super) fn held_ms(&self) -> f64 {
        let average = self.held.ms();
        if self.semaphore.available_permits() > 0 {
            return average;
        }
        let stalled = since_epoch_ms().saturating_sub(self.progress_ms.load(Ordering::Relaxed));
        average.max(stalled as f64)
    }

    pub(super) fn idle(&self) -> bool {
        self.semaphore.available_permits() == self.limit as usize
            && self.waiting.load(Ordering::Relaxed) == 0
            && self.deferred.ahead(since_epoch_ms()) == 0
    }
}
