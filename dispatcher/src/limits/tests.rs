use super::rate::TokenBucket;
use super::*;

impl EndpointLimits {
    /// A slot now, or after waiting for one, or `None` to defer: a turn taken and waited
    /// for at once, its request sent.
    async fn acquire(&self, endpoint: &Endpoint) -> Option<Slot> {
        let mut slot = match self.take(endpoint, Taker::Arrival)? {
            Turn::Now(slot) => slot,
            Turn::Queued(queued) => self.wait(queued, endpoint).await?,
        };
        slot.sending();
        Some(slot)
    }
}
use laabam_shared::endpoint::NewEndpoint;
use laabam_shared::ids::AccountId;
use std::time::Duration;

/// A deferral's delay that no test outlasts.
const LATER: Duration = Duration::from_secs(600);

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
    let refused = METRICS.over_rate_limit.get();
    for _ in 0..10 {
        admitted += usize::from(limits.acquire(&ep).await.is_some());
    }
    assert_eq!(admitted, 3);
    assert!(
        METRICS.over_rate_limit.get() >= refused + 7,
        "each refusal counted (other tests may count theirs)"
    );
    let start = Instant::now();
    let mut bucket = TokenBucket::new(2, 2.0, start);
    assert!(
        bucket.try_take(start, Taker::Arrival)
            && bucket.try_take(start, Taker::Arrival)
            && !bucket.try_take(start, Taker::Arrival)
    );
    assert!(bucket.try_take(start + Duration::from_millis(500), Taker::Arrival));
    assert!(!bucket.try_take(start + Duration::from_millis(500), Taker::Arrival));
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

/// Limits whose endpoint has two slots and has held one for 200 ms, past the 10 ms slot wait.
async fn two_slots_held_200_ms() -> (EndpointLimits, Endpoint) {
    let limits = EndpointLimits::new(2, Duration::from_millis(10), ROOM);
    let ep = endpoint(None);
    let slow = limits.acquire(&ep).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(slow);
    (limits, ep)
}

#[tokio::test]
async fn deferrals_to_a_slow_endpoint_are_spread_over_the_time_its_slots_need() {
    let (limits, ep) = two_slots_held_200_ms().await;
    assert_eq!(
        limits.deferral_backlog(&ep),
        Duration::ZERO,
        "nothing deferred ahead yet"
    );
    limits.deferred(&ep, LATER);
    let second = limits.deferral_backlog(&ep).as_millis();
    assert!(
        (90..=130).contains(&second),
        "one ahead, 200 ms a slot, two slots: {second} ms"
    );
    limits.deferred(&ep, LATER);
    assert!(
        limits.deferral_backlog(&ep).as_millis() > second,
        "each deferral adds its share"
    );
}

#[tokio::test]
async fn a_deferral_leaves_the_backlog_once_it_is_due_whoever_takes_it_back() {
    let (limits, ep) = two_slots_held_200_ms().await;
    limits.deferred(&ep, Duration::from_millis(50));
    limits.deferred(&ep, LATER);
    let both = limits.deferral_backlog(&ep);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let one = limits.deferral_backlog(&ep);
    assert!(
        one > Duration::ZERO && one < both,
        "the one due in 50 ms no longer ahead: {one:?}, against {both:?} before"
    );
}

#[tokio::test]
async fn an_endpoint_holding_every_slot_is_known_slow_before_it_answers() {
    let limits = EndpointLimits::new(2, Duration::from_millis(100), ROOM);
    let ep = endpoint(None);
    let _held = [limits.acquire(&ep).await.unwrap(), limits.acquire(&ep).await.unwrap()];
    tokio::time::sleep(Duration::from_millis(200)).await;
    limits.deferred(&ep, LATER);
    limits.deferred(&ep, LATER);
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
    let Some(Turn::Queued(first)) = limits.take(&ep, Taker::Arrival) else {
        panic!("a new endpoint's slot is waited for within its grace");
    };
    let Some(Turn::Queued(second)) = limits.take(&ep, Taker::Arrival) else {
        panic!("still within the grace");
    };
    assert_eq!(waiting(), 2, "counted from the moment each was queued, before any wait");
    drop(second);
    assert_eq!(waiting(), 1, "a dropped place is given up");
    drop(held);
    assert!(limits.wait(first, &ep).await.is_some(), "the released slot");
    assert_eq!(waiting(), 0);
}

/// An endpoint is judged by its requests, not by how long its deliveries took to begin: a
/// Redis stall of seconds while they began (or failed to) says nothing about it. A slot given
/// back unused teaches nothing, and one whose request went out late teaches only the request.
#[tokio::test]
async fn a_slot_held_before_its_request_teaches_only_the_request() {
    let limits = Arc::new(EndpointLimits::new(1, Duration::from_millis(100), ROOM));
    let ep = endpoint(None);
    hold(&limits, &ep, 5).await;
    limits.deferred(&ep, LATER);
    let (typical, backlog) = (limits.budget.typical.ms(), limits.deferral_backlog(&ep));
    let now = || match limits.take(&ep, Taker::Arrival) {
        Some(Turn::Now(slot)) => slot,
        _ => panic!("a free slot"),
    };
    let unused = now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(unused);
    let mut late = now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    late.sending();
    assert!(
        matches!(limits.take(&ep, Taker::Arrival), Some(Turn::Queued(_))),
        "its one slot held 300 ms, but its request just went out: waited for, not judged stalled"
    );
    drop(late);
    // Each learnt at most a request answered at once, never the 300 ms before it.
    assert!(
        limits.budget.typical.ms() <= typical,
        "the process's typical hold: {} ms against {typical} ms before",
        limits.budget.typical.ms()
    );
    assert!(
        limits.deferral_backlog(&ep) <= backlog,
        "one deferral ahead: {:?} against {backlog:?} before",
        limits.deferral_backlog(&ep)
    );
    let busy = limits.acquire(&ep).await.unwrap();
    assert!(
        waiter_gets_the_slot(&limits, &ep, busy, 20).await,
        "still a fast endpoint: its burst waits for its slot"
    );
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
    let now = |ep: &Endpoint| match limits.take(ep, Taker::Arrival) {
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
        limits.take(&b, Taker::Arrival).is_none(),
        "cut: slow now, deferred while the slow room is full"
    );
    drop(first);
    fast_traffic(&limits, &fast).await;
    assert!(
        matches!(limits.take(&b, Taker::Arrival), Some(Turn::Now(ref slot)) if slot.slow.is_some()),
        "with the share back, a slow request on a share"
    );
}

#[tokio::test]
async fn a_delivery_refused_a_place_across_dispatchers_asks_again_only_while_the_wait_is_short() {
    let limits = EndpointLimits::new(1, Duration::from_millis(100), ROOM);
    let (fast, slow) = (endpoint(Some(1)), endpoint(Some(1)));
    assert!(
        limits.place_retry(&fast).is_none(),
        "no answer yet: how long a place takes is not known"
    );
    hold(&limits, &slow, 300).await;
    // The process's typical request is short: the wait budget is not stretched.
    let healthy = endpoint(None);
    for _ in 0..10 {
        hold(&limits, &healthy, 0).await;
    }
    hold(&limits, &fast, 40).await;
    let (every, until) = limits.place_retry(&fast).expect("a fast endpoint is waited for");
    let every_ms = every.as_secs_f64() * 1000.0;
    assert!(
        (5.0..=20.0).contains(&every_ms),
        "asked four times per 40 ms hold, not once: every {every_ms} ms"
    );
    let budget = Duration::from_secs_f64(limits.budget.ms() / 1000.0);
    assert!(until <= Instant::now() + budget, "within the wait budget, {budget:?}");
    assert!(limits.place_retry(&slow).is_none(), "a slow one is deferred at once");
}
