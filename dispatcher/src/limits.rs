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
//! Both limits are per dispatcher process.
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

use crate::metrics::METRICS;
use crate::sender::Checkpoint;
use laabam_shared::endpoint::Endpoint;
use laabam_shared::ids::EndpointId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct EndpointLimits {
    default_limit: u32,
    budget: Arc<WaitBudget>,
    /// Held by each request to an endpoint that was slow when it started, or that turned slow.
    slow_room: Arc<Semaphore>,
    slow_room_size: usize,
    slots: Mutex<HashMap<EndpointId, Arc<Slots>>>,
    rates: Mutex<HashMap<EndpointId, TokenBucket>>,
}

/// A bucket of `rate` tokens refilled continuously at `rate` per second.
#[derive(Debug)]
struct TokenBucket {
    rate: u32,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(rate: u32, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate as f64,
            refilled: now,
        }
    }

    fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One endpoint's request slots, how many deliveries wait for one, and how long one is held.
#[derive(Debug)]
struct Slots {
    limit: u32,
    semaphore: Arc<Semaphore>,
    waiting: AtomicUsize,
    held: HeldTime,
    /// When a slot was last released, or taken while none was held, in ms since [`EPOCH`]:
    /// while every slot is held, the time since says each is held at least about that long,
    /// long before the first slow request finishes and the moving average learns it.
    progress_ms: AtomicU64,
    /// Deliveries this process deferred that have not come back yet.
    deferred: AtomicUsize,
    /// The process-wide budget, which every release feeds as well.
    budget: Arc<WaitBudget>,
}

/// The origin of [`Slots::progress_ms`].
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn since_epoch_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// A moving average of how long a slot is held, in ms (f64 bits; 0 until the first release).
#[derive(Debug, Default)]
struct HeldTime(AtomicU64);

impl HeldTime {
    fn ms(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    fn observe(&self, ms: f64) {
        let old = self.ms();
        let new = if old == 0.0 { ms } else { old * 0.8 + ms * 0.2 };
        self.0.store(new.to_bits(), Ordering::Relaxed);
    }

    fn observe_at_least(&self, ms: f64) {
        self.0.store(self.ms().max(ms).to_bits(), Ordering::Relaxed);
    }
}

/// The right to one request to an endpoint; releasing it records how long it was held.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    /// Its share of the slow room, when its endpoint was slow or the request turned slow.
    slow: Option<SlowShare>,
    taken: Instant,
    slots: Arc<Slots>,
    /// How long its request had run when it was cut short, in ms (see [`EndpointLimits::checkpoint`]).
    cut_after_ms: Option<f64>,
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

/// One request's share of the slow room, counted in the gauge while held.
#[derive(Debug)]
struct SlowShare {
    _permit: OwnedSemaphorePermit,
}

impl SlowShare {
    fn take(room: &Arc<Semaphore>) -> Option<Self> {
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
        if let Some(ran_ms) = self.cut_after_ms {
            // It would have run longer still: the endpoint is slow from now on, so its next
            // deliveries are judged by the slow room instead of being cut in turn. The budget
            // does not learn from it: its length is the budget's own, and counting it would
            // stretch the budget towards the hanging endpoints it is meant to tell apart.
            self.slots.held.observe_at_least(ran_ms);
        } else {
            let ms = self.taken.elapsed().as_secs_f64() * 1000.0;
            self.slots.held.observe(ms);
            self.slots.budget.observe(ms);
        }
        self.slots.progress_ms.store(since_epoch_ms(), Ordering::Relaxed);
    }
}

impl Slots {
    fn new(limit: u32, budget: Arc<WaitBudget>) -> Self {
        Slots {
            limit,
            semaphore: Arc::new(Semaphore::new(limit as usize)),
            waiting: AtomicUsize::new(0),
            held: HeldTime::default(),
            progress_ms: AtomicU64::new(0),
            deferred: AtomicUsize::new(0),
            budget,
        }
    }

    /// How long a slot is held: the moving average, or, while every slot has been held
    /// without one released for longer than that, the time since one was.
    fn held_ms(&self) -> f64 {
        let average = self.held.ms();
        if self.semaphore.available_permits() > 0 {
            return average;
        }
        let stalled = since_epoch_ms().saturating_sub(self.progress_ms.load(Ordering::Relaxed));
        average.max(stalled as f64)
    }

    fn idle(&self) -> bool {
        self.semaphore.available_permits() == self.limit as usize
            && self.waiting.load(Ordering::Relaxed) == 0
            && self.deferred.load(Ordering::Relaxed) == 0
    }
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
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.slots.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The longest a deferral is stretched for an endpoint's backlog.
pub const MAX_BACKLOG: Duration = Duration::from_secs(300);

/// A delivery may wait this many of the process's typical slot holds for a slot...
const TYPICAL_HOLDS: f64 = 4.0;

/// ...but never more than this many slot waits: a process whose every endpoint is slow still
/// defers rather than let one endpoint's queue hold the broker messages others need.
const MAX_STRETCH: f64 = 8.0;

/// The share of the wait budget an endpoint none of whose requests has finished yet has for
/// its first answer (see [`EndpointLimits::wait_for_slot`]).
const FIRST_ANSWER_GRACE: f64 = 1.0 / 8.0;

/// How long a delivery may wait for a busy endpoint's slot: the slot wait, or a few of the
/// process's typical slot holds when that is longer (a saturated machine), up to a cap.
/// Exported as a gauge, so an operator sees why deliveries are waited for or deferred.
#[derive(Debug)]
struct WaitBudget {
    /// The slot wait, in ms: the budget's floor.
    floor_ms: f64,
    /// How long any endpoint's slot is held, across the process: the measure of "slow".
    typical: HeldTime,
}

impl WaitBudget {
    fn new(slot_wait: Duration) -> Self {
        let budget = WaitBudget {
            floor_ms: slot_wait.as_secs_f64() * 1000.0,
            typical: HeldTime::default(),
        };
        METRICS.slot_wait_budget.set(budget.ms() / 1000.0);
        budget
    }

    fn ms(&self) -> f64 {
        (TYPICAL_HOLDS * self.typical.ms()).clamp(self.floor_ms, self.floor_ms * MAX_STRETCH)
    }

    fn observe(&self, held_ms: f64) {
        self.typical.observe(held_ms);
        METRICS.slot_wait_budget.set(self.ms() / 1000.0);
    }
}

/// Idle entries are dropped when the map grows past this, so it stays bounded.
const PRUNE_ABOVE: usize = 10_000;

impl EndpointLimits {
    /// `slow_room` is how many requests to slow endpoints may be in flight at once.
    pub fn new(default_limit: u32, slot_wait: Duration, slow_room: usize) -> Self {
        let slow_room = slow_room.clamp(1, Semaphore::MAX_PERMITS);
        EndpointLimits {
            default_limit: default_limit.max(1),
            budget: Arc::new(WaitBudget::new(slot_wait)),
            slow_room: Arc::new(Semaphore::new(slow_room)),
            slow_room_size: slow_room,
            slots: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of the endpoint's rate limit, if it has one.
    fn try_rate(&self, endpoint: &Endpoint) -> bool {
        let Some(rate) = endpoint.rate_limit else {
            return true;
        };
        let now = Instant::now();
        let mut rates = self.rates.lock().expect("limits lock");
        if rates.len() > PRUNE_ABOVE {
            rates.retain(|_, b| b.tokens < b.rate as f64);
        }
        let bucket = rates
            .entry(endpoint.id.clone())
            .or_insert_with(|| TokenBucket::new(rate, now));
        if bucket.rate != rate {
            *bucket = TokenBucket::new(rate, now);
        }
        bucket.try_take(now)
    }

    /// A slot for one request to `endpoint` now, or a place among its waiting deliveries when
    /// one should free up within the wait budget, without waiting; `None` means defer: no slot
    /// soon enough, or over the rate limit.
    pub fn take(&self, endpoint: &Endpoint) -> Option<Turn> {
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
                self.rated(endpoint, permit, slots).map(Turn::Now)
            }
            Err(_) => {
                let ahead = slots.waiting.fetch_add(1, Ordering::Relaxed) + 1;
                let queued = Queued { slots, ahead };
                self.wait_allowed(&queued.slots, ahead).map(|_| Turn::Queued(queued))
            }
        }
    }

    /// Waits for the slot a [`Turn::Queued`] delivery was promised; `None` means defer after
    /// all: the endpoint turned out slower than it looked, or is at its rate limit.
    pub async fn wait(&self, queued: Queued, endpoint: &Endpoint) -> Option<Slot> {
        let permit = self.wait_for_slot(&queued.slots, queued.ahead).await?;
        self.rated(endpoint, permit, queued.slots.clone())
    }

    /// The slot `permit` grants, unless the endpoint is over its rate limit, or is slow while
    /// the slow room is full.
    fn rated(&self, endpoint: &Endpoint, permit: OwnedSemaphorePermit, slots: Arc<Slots>) -> Option<Slot> {
        let slow = if slots.held_ms() > self.budget.ms() {
            Some(SlowShare::take(&self.slow_room)?)
        } else {
            None
        };
        self.try_rate(endpoint).then(|| Slot {
            _permit: permit,
            slow,
            taken: Instant::now(),
            slots,
            cut_after_ms: None,
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

    /// How long the deliveries already deferred for `endpoint` will take to pass through its
    /// slots (at most [`MAX_BACKLOG`]).
    pub fn deferral_backlog(&self, endpoint: &Endpoint) -> Duration {
        let slots = self.slots_of(endpoint);
        let ahead = slots.deferred.load(Ordering::Relaxed);
        let ms = ahead as f64 * slots.held_ms() / slots.limit as f64;
        Duration::from_secs_f64(ms / 1000.0).min(MAX_BACKLOG)
    }

    /// A delivery to `endpoint` was deferred.
    pub fn deferred(&self, endpoint: &Endpoint) {
        self.slots_of(endpoint).deferred.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery to `endpoint` came back from the retry set.
    pub fn returned(&self, endpoint: &Endpoint) {
        let _ = self
            .slots_of(endpoint)
            .deferred
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
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
        if slots.len() > PRUNE_ABOVE {
            slots.retain(|_, s| !s.idle());
        }
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
mod tests {
    use super::*;

    impl EndpointLimits {
        /// A slot now, or after waiting for one, or `None` to defer: a turn taken and waited
        /// for at once.
        async fn acquire(&self, endpoint: &Endpoint) -> Option<Slot> {
            match self.take(endpoint)? {
                Turn::Now(slot) => Some(slot),
                Turn::Queued(queued) => self.wait(queued, endpoint).await,
            }
        }
    }
    use laabam_shared::endpoint::NewEndpoint;
    use laabam_shared::ids::AccountId;
    use std::time::Duration;

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

    const WAIT: Duration = Duration::from_millis(50);
    /// A slow room no test of the other limits reaches.
    const ROOM: usize = 1024;

    /// Asserts that `ep` gets no slot, and returns how long the decision took.
    async fn time_to_defer(limits: &EndpointLimits, ep: &Endpoint) -> Duration {
        let started = Instant::now();
        assert!(limits.acquire(ep).await.is_none(), "deferred");
        started.elapsed()
    }

    #[tokio::test]
    async fn a_rate_limit_admits_its_rate_then_refills() {
        let limits = EndpointLimits::new(100, WAIT, ROOM);
        let mut ep = endpoint(None);
        ep.rate_limit = Some(3);
        let mut admitted = 0;
        for _ in 0..10 {
            admitted += usize::from(limits.acquire(&ep).await.is_some());
        }
        assert_eq!(admitted, 3);
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2, start);
        assert!(bucket.try_take(start) && bucket.try_take(start) && !bucket.try_take(start));
        assert!(bucket.try_take(start + Duration::from_millis(500)));
        assert!(!bucket.try_take(start + Duration::from_millis(500)));
    }

    #[tokio::test]
    async fn at_most_the_limit_is_handed_out_and_slots_come_back() {
        let limits = EndpointLimits::new(2, WAIT, ROOM);
        let ep = endpoint(None);
        assert!(limits.acquire(&ep).await.is_some(), "released at once: a fast endpoint");
        let a = limits.acquire(&ep).await.unwrap();
        let _b = limits.acquire(&ep).await.unwrap();
        assert!(
            time_to_defer(&limits, &ep).await >= WAIT,
            "a full fast endpoint is waited for before deferring"
        );
        drop(a);
        assert!(limits.acquire(&ep).await.is_some());
    }

    /// Whether a delivery arriving while `busy` holds `ep`'s only slot gets that slot when
    /// `busy` is released `after` it arrived.
    async fn waiter_gets_the_slot(limits: &Arc<EndpointLimits>, ep: &Endpoint, busy: Slot, after: u64) -> bool {
        let waiter = tokio::spawn({
            let (limits, ep) = (limits.clone(), ep.clone());
            async move { limits.acquire(&ep).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(after)).await;
        drop(busy);
        waiter.await.unwrap()
    }

    #[tokio::test]
    async fn a_waiter_gets_the_slot_a_finished_request_frees() {
        let limits = Arc::new(EndpointLimits::new(1, Duration::from_secs(5), ROOM));
        let ep = endpoint(None);
        drop(limits.acquire(&ep).await.unwrap());
        let first = limits.acquire(&ep).await.unwrap();
        assert!(waiter_gets_the_slot(&limits, &ep, first, 20).await);
    }

    #[tokio::test]
    async fn a_burst_to_a_new_endpoint_waits_for_its_first_answer() {
        // A grace of 50 ms for the first answer.
        let limits = Arc::new(EndpointLimits::new(1, Duration::from_millis(400), ROOM));
        let ep = endpoint(None);
        let first = limits.acquire(&ep).await.unwrap();
        assert!(
            waiter_gets_the_slot(&limits, &ep, first, 20).await,
            "no request had finished, and the first answered within the grace: waited for"
        );
    }

    #[tokio::test]
    async fn a_new_endpoint_is_judged_like_any_other_once_it_has_answered() {
        let limits = Arc::new(EndpointLimits::new(1, Duration::from_millis(400), ROOM));
        let ep = endpoint(None);
        let first = limits.acquire(&ep).await.unwrap();
        // The first answers after 10 ms, and the delivery waiting ahead holds the slot for
        // 60 ms: the second waiter is still waiting when the 50 ms grace ends.
        let ahead = tokio::spawn({
            let (limits, ep) = (limits.clone(), ep.clone());
            async move {
                let slot = limits.acquire(&ep).await;
                tokio::time::sleep(Duration::from_millis(60)).await;
                slot.is_some()
            }
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
        let behind = tokio::spawn({
            let (limits, ep) = (limits.clone(), ep.clone());
            async move { limits.acquire(&ep).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(8)).await;
        drop(first);
        assert!(ahead.await.unwrap(), "the first waiter got the released slot");
        assert!(
            behind.await.unwrap(),
            "it answered within the grace, so the second waited on past it"
        );
    }

    #[tokio::test]
    async fn a_new_endpoint_that_does_not_answer_is_deferred_after_its_grace() {
        // A grace of 25 ms for the first answer.
        let limits = EndpointLimits::new(1, Duration::from_millis(200), ROOM);
        let ep = endpoint(None);
        let _stuck = limits.acquire(&ep).await.unwrap();
        assert!(
            time_to_defer(&limits, &ep).await >= Duration::from_millis(24),
            "its first request has just begun: waited for until the grace ran out"
        );
        assert!(
            time_to_defer(&limits, &ep).await < Duration::from_millis(5),
            "no answer within the grace: deferred at once"
        );
    }

    /// Holds one slot of `ep` for `ms`.
    async fn hold(limits: &EndpointLimits, ep: &Endpoint, ms: u64) {
        let slot = limits.acquire(ep).await.unwrap();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        drop(slot);
    }

    #[tokio::test]
    async fn a_slow_endpoint_is_deferred_at_once_instead_of_waited_for() {
        let limits = EndpointLimits::new(1, Duration::from_millis(100), ROOM);
        let (ep, healthy) = (endpoint(None), endpoint(None));
        hold(&limits, &ep, 300).await;
        for _ in 0..10 {
            hold(&limits, &healthy, 0).await;
        }
        let _busy = limits.acquire(&ep).await.unwrap();
        assert!(
            time_to_defer(&limits, &ep).await < Duration::from_millis(100),
            "slow next to the healthy endpoint: deferred at once, not after the wait"
        );
    }

    #[tokio::test]
    async fn when_every_request_is_slow_alike_a_busy_endpoint_is_waited_for() {
        // A saturated machine: every hold is long, the endpoint is no slower than the rest.
        let limits = Arc::new(EndpointLimits::new(1, Duration::from_millis(50), ROOM));
        let ep = endpoint(None);
        hold(&limits, &ep, 100).await;
        let busy = limits.acquire(&ep).await.unwrap();
        assert!(
            waiter_gets_the_slot(&limits, &ep, busy, 150).await,
            "held 100 ms like every request: waited past the 50 ms slot wait, not deferred"
        );
    }

    #[tokio::test]
    async fn a_process_slow_everywhere_still_defers_past_the_stretched_wait() {
        let limits = EndpointLimits::new(1, Duration::from_millis(10), ROOM);
        let ep = endpoint(None);
        hold(&limits, &ep, 200).await;
        let _busy = limits.acquire(&ep).await.unwrap();
        assert!(
            time_to_defer(&limits, &ep).await < Duration::from_millis(50),
            "a 200 ms hold is past 8 slot waits whatever the process does: deferred at once"
        );
    }

    #[tokio::test]
    async fn deferrals_to_a_slow_endpoint_are_spread_over_the_time_its_slots_need() {
        let limits = EndpointLimits::new(2, Duration::from_millis(10), ROOM);
        let ep = endpoint(None);
        let slow = limits.acquire(&ep).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(slow);
        assert_eq!(
            limits.deferral_backlog(&ep),
            Duration::ZERO,
            "nothing deferred ahead yet"
        );
        limits.deferred(&ep);
        let second = limits.deferral_backlog(&ep).as_millis();
        assert!(
            (90..=130).contains(&second),
            "one ahead, 200 ms a slot, two slots: {second} ms"
        );
        limits.deferred(&ep);
        assert!(
            limits.deferral_backlog(&ep).as_millis() > second,
            "each deferral adds its share"
        );
        for _ in 0..3 {
            limits.returned(&ep);
        }
        assert_eq!(
            limits.deferral_backlog(&ep),
            Duration::ZERO,
            "the count never goes below zero"
        );
    }

    #[tokio::test]
    async fn an_endpoint_holding_every_slot_is_known_slow_before_it_answers() {
        let limits = EndpointLimits::new(2, Duration::from_millis(100), ROOM);
        let ep = endpoint(None);
        let _held = [limits.acquire(&ep).await.unwrap(), limits.acquire(&ep).await.unwrap()];
        tokio::time::sleep(Duration::from_millis(200)).await;
        limits.deferred(&ep);
        limits.deferred(&ep);
        let backlog = limits.deferral_backlog(&ep).as_millis();
        assert!(
            (180..=400).contains(&backlog),
            "two ahead, slots held 200 ms so far, two slots: {backlog} ms"
        );
    }

    #[tokio::test]
    async fn a_fast_endpoint_that_stalls_is_deferred_at_once() {
        let limits = EndpointLimits::new(1, Duration::from_millis(100), ROOM);
        let ep = endpoint(None);
        let quick = limits.acquire(&ep).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(quick);
        let _stuck = limits.acquire(&ep).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            time_to_defer(&limits, &ep).await < Duration::from_millis(50),
            "no slot released for longer than the wait: deferred at once"
        );
    }

    #[tokio::test]
    async fn an_endpoint_limit_overrides_the_default() {
        let limits = EndpointLimits::new(8, WAIT, ROOM);
        let serial = endpoint(Some(1));
        let _only = limits.acquire(&serial).await.unwrap();
        assert!(limits.acquire(&serial).await.is_none());
        assert!(limits.acquire(&endpoint(None)).await.is_some());
    }

    #[tokio::test]
    async fn a_queued_delivery_counts_as_waiting_until_it_gets_its_slot_or_is_dropped() {
        let limits = EndpointLimits::new(1, WAIT, ROOM);
        let ep = endpoint(None);
        let held = limits.acquire(&ep).await.unwrap();
        let waiting = || limits.slots_of(&ep).waiting.load(Ordering::Relaxed);
        let Some(Turn::Queued(first)) = limits.take(&ep) else {
            panic!("a new endpoint's slot is waited for within its grace");
        };
        let Some(Turn::Queued(second)) = limits.take(&ep) else {
            panic!("still within the grace");
        };
        assert_eq!(waiting(), 2, "counted from the moment each was queued, before any wait");
        drop(second);
        assert_eq!(waiting(), 1, "a dropped place is given up");
        drop(held);
        assert!(limits.wait(first, &ep).await.is_some(), "the released slot");
        assert_eq!(waiting(), 0);
    }

    /// An endpoint that was idle for longer than the budget and then filled its slots in a
    /// burst is judged by how long its requests take, not by how long ago one last finished.
    #[tokio::test]
    async fn a_burst_after_an_idle_spell_is_waited_for() {
        let limits = Arc::new(EndpointLimits::new(1, Duration::from_millis(100), ROOM));
        let ep = endpoint(None);
        hold(&limits, &ep, 5).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let busy = limits.acquire(&ep).await.unwrap();
        assert!(
            waiter_gets_the_slot(&limits, &ep, busy, 20).await,
            "a fast endpoint's burst waits for its slot"
        );
    }

    /// Requests that end at once, bringing the process's typical hold, and so the budget, back
    /// to the slot wait.
    async fn fast_traffic(limits: &EndpointLimits, fast: &Endpoint) {
        for _ in 0..30 {
            hold(limits, fast, 0).await;
        }
    }

    /// Requests to slow endpoints share the slow room: past it a slow endpoint's delivery is
    /// deferred though a slot of its own is free, a fast endpoint's is not, and a request that
    /// ends gives its share back.
    #[tokio::test]
    async fn slow_endpoints_share_a_bounded_room() {
        let limits = EndpointLimits::new(4, Duration::from_millis(10), 2);
        let (a, b, fast) = (endpoint(None), endpoint(None), endpoint(None));
        for ep in [&a, &b] {
            hold(&limits, ep, 50).await;
        }
        fast_traffic(&limits, &fast).await;
        let now = |ep: &Endpoint| match limits.take(ep) {
            Some(Turn::Now(slot)) => Some(slot),
            _ => None,
        };
        let first = now(&a).expect("a slow endpoint within the slow room");
        let _second = now(&b).expect("a second one");
        assert!(now(&a).is_none(), "the slow room is full: deferred");
        let _fast = now(&fast).expect("a fast endpoint is not held back");
        drop(first);
        assert!(now(&a).is_some(), "a share given back");
    }

    /// A request to an endpoint not known to be slow is judged again at the budget: it takes a
    /// share of the slow room, or, with none free, is cut short, and its endpoint is slow from
    /// then on.
    #[tokio::test]
    async fn a_request_that_turns_slow_takes_a_share_or_is_cut_short() {
        let limits = EndpointLimits::new(4, Duration::from_millis(20), 1);
        let (a, b, fast) = (endpoint(None), endpoint(None), endpoint(None));
        fast_traffic(&limits, &b).await;
        fast_traffic(&limits, &fast).await;
        // Each request below is still unanswered at its checkpoint.
        let mut first = limits.acquire(&a).await.unwrap();
        let typical = limits.budget.typical.ms();
        let Checkpoint { after, go_on } = limits.checkpoint(&mut first).expect("not slow when it started");
        tokio::time::sleep(after).await;
        assert!(go_on().is_ok(), "on the slow room's one share");
        assert!(first.slow.is_some());
        assert!(limits.checkpoint(&mut first).is_none(), "on a share: not judged again");
        let mut second = limits.acquire(&b).await.unwrap();
        let Checkpoint { after, go_on } = limits.checkpoint(&mut second).unwrap();
        tokio::time::sleep(after).await;
        let cut = go_on().expect_err("no share left: cut short");
        assert!(cut.after >= Duration::from_millis(20), "cut after {:?}", cut.after);
        drop(second);
        assert_eq!(
            limits.budget.typical.ms(),
            typical,
            "the budget does not learn from a cut"
        );
        fast_traffic(&limits, &fast).await;
        assert!(
            limits.take(&b).is_none(),
            "cut: slow now, deferred while the slow room is full"
        );
        drop(first);
        fast_traffic(&limits, &fast).await;
        assert!(
            matches!(limits.take(&b), Some(Turn::Now(ref slot)) if slot.slow.is_some()),
            "with the share back, a slow request on a share"
        );
    }
}
