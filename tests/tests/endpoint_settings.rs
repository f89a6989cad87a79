//! What an endpoint's settings promise: custom headers on every delivery, a rate limit that
//! spaces deliveries out, and a bounded history whose cost per delivery is known.

use futures_util::future::join_all;
use laabam_shared::clock::now_ms;
use laabam_shared::delivery::DeliveryStatus;
use laabam_shared::endpoint::{Endpoint, NewEndpoint};
use laabam_shared::ids::{AccountId, DeliveryId};
use laabam_shared::store::{AccountEndpoints, Begin, DeliveryFilter, Store};
use laabam_tests::deliveries::{Success, begin_events, begin_events_together, quiet_endpoints};
use laabam_tests::env::{publish_all, sample_events};
use laabam_tests::{Receiver, TestEnv, wait_until};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_rate_limits_and_bounded_history_apply() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    let account = AccountId::parse("acct_settings").unwrap();
    let ep = Endpoint::create(
        account.clone(),
        NewEndpoint {
            url: rx.url.clone(),
            rate_limit: Some(2),
            headers: BTreeMap::from([("x-tenant".to_owned(), "t1".to_owned())]),
            ..Default::default()
        },
        now_ms(),
    )
    .unwrap();
    let store = env.store().await;
    store.create_endpoint(&ep, None).await.unwrap();
    env.start_dispatcher(&["--history-per-endpoint", "5"]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let events = sample_events(account.as_str(), 8);
    assert!(
        join_all(events.iter().map(|e| publisher.publish(e)))
            .await
            .iter()
            .all(Result::is_ok)
    );
    wait_until("all 8 delivered", Duration::from_secs(30), || async { rx.count() == 8 }).await;

    let requests = rx.requests();
    assert!(
        requests.iter().all(|r| r.header("x-tenant") == "t1"),
        "custom header on every delivery"
    );
    // 2 per second with a full bucket of 2: 8 deliveries cannot arrive in under ~3 s.
    let span = requests.last().unwrap().at - requests.first().unwrap().at;
    assert!(
        span >= Duration::from_millis(2500),
        "rate limit spaced deliveries over {span:?}"
    );

    // History: the endpoint keeps its 5 newest deliveries; older finished ones are deleted.
    wait_until("all recorded", Duration::from_secs(10), || async {
        let page = store
            .list_deliveries(&account, &DeliveryFilter::default(), None, 50)
            .await
            .unwrap();
        page.items
            .iter()
            .all(|d| d.status == laabam_shared::delivery::DeliveryStatus::Succeeded)
    })
    .await;
    let filter = DeliveryFilter {
        endpoint: Some(ep.id.clone()),
        ..Default::default()
    };
    assert_eq!(
        store
            .list_deliveries(&account, &filter, None, 50)
            .await
            .unwrap()
            .items
            .len(),
        5
    );
    let mut conn = redis::Client::open(env.redis_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let states: Vec<String> = redis::Commands::scan_match::<_, String>(&mut conn, format!("{}dlv:*", env.prefix))
        .unwrap()
        .filter_map(Result::ok)
        .collect();
    assert_eq!(
        states.len(),
        5,
        "older finished deliveries were deleted, and each is one key: {states:?}"
    );
    // The indexes an event writes to expire with the retention, though their upkeep is not
    // done on every write.
    let keys = store.keys();
    for index in [
        keys.account_events(&account),
        keys.account_deliveries(&account),
        keys.endpoint_deliveries(&ep.id),
    ] {
        let ttl: i64 = redis::cmd("TTL").arg(&index).query(&mut conn).unwrap();
        assert!(ttl > 3000, "{index} expires with the retention: TTL {ttl}");
    }

    // A delivered state keeps Redis' compact hash encoding, its attempt log included.
    for key in &states {
        let encoding: String = redis::cmd("OBJECT").arg("ENCODING").arg(key).query(&mut conn).unwrap();
        assert_eq!(encoding, "listpack", "{key}");
        let logged: Option<String> = redis::cmd("HGET").arg(key).arg("att:1").query(&mut conn).unwrap();
        assert!(logged.is_some(), "{key} holds its attempt");
    }

    // What one delivery costs in Redis: its state with its attempt log, and its share of the event.
    let usage = |key: &str, conn: &mut redis::Connection| -> u64 {
        redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .query::<Option<u64>>(conn)
            .unwrap()
            .unwrap_or(0)
    };
    let per_delivery: u64 = states.iter().map(|k| usage(k, &mut conn)).sum::<u64>() / states.len() as u64;
    let event_key = format!("{}evt:{}:{}", env.prefix, account, events[0].id);
    let per_event = usage(&event_key, &mut conn);
    println!(
        "Redis memory: {per_delivery} bytes per delivery (state + attempt log), {per_event} bytes per stored event"
    );
    assert!(per_delivery < 2048, "a delivery costs {per_delivery} bytes");
}

/// An endpoint of a new `account` limited to `rate` deliveries a second, delivering to `rx`.
async fn rate_limited_endpoint(env: &TestEnv, rx: &Receiver, account: &str, rate: u32) -> (Store, AccountId, Endpoint) {
    let account = AccountId::parse(account).unwrap();
    let new = NewEndpoint {
        url: rx.url.clone(),
        rate_limit: Some(rate),
        ..Default::default()
    };
    let ep = Endpoint::create(account.clone(), new, now_ms()).unwrap();
    let store = env.store().await;
    store.create_endpoint(&ep, None).await.unwrap();
    (store, account, ep)
}

/// A burst past an endpoint's rate limit is deferred to come back at the rate, each delivery at
/// a turn of its own. Spread like a slow endpoint's backlog instead, the deferred deliveries came
/// back together, found the bucket empty but for a few, and were deferred again and again while
/// the rate drained them (200 deliveries at 10/s were deferred 1,214 times, 1,000 at 50/s 5,803
/// times; now once each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_rate_limit_comes_back_at_the_rate() {
    const EVENTS: usize = 40;
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    let (store, account, ep) = rate_limited_endpoint(&env, &rx, "acct_paced", 10).await;
    env.start_dispatcher(&[]);
    let events = sample_events(account.as_str(), EVENTS);
    publish_all(&env.publisher().await, &events).await;
    let ids: Vec<_> = events.iter().map(|e| DeliveryId::for_pair(&e.id, &ep.id)).collect();
    // No scheduler yet: the deferred deliveries stay in the retry set with their due times.
    let states = || async {
        store
            .deliveries(&ids)
            .await
            .unwrap()
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
    };
    wait_until("each delivered or deferred", Duration::from_secs(30), || async {
        let states = states().await;
        states.len() == EVENTS
            && states
                .iter()
                .all(|d| matches!(d.status, DeliveryStatus::Retrying | DeliveryStatus::Succeeded))
    })
    .await;
    let mut due: Vec<i64> = states().await.iter().filter_map(|d| d.next_attempt_ms).collect();
    due.sort_unstable();
    let deferred = due.len();
    assert!(
        deferred >= EVENTS / 2,
        "the bucket holds 10: {deferred} of {EVENTS} deferred"
    );
    let spread = due[deferred - 1] - due[0];
    println!("{deferred} deferred, due over {spread} ms");
    assert!(
        spread >= (deferred as i64 - 1) * 90,
        "{deferred} deferrals due within {spread} ms: not at 10 a second"
    );
    env.start_scheduler(&[]);
    wait_until("all delivered", Duration::from_secs(30), || async {
        rx.count() == EVENTS
    })
    .await;
    let requests = rx.requests();
    let span = requests.last().unwrap().at - requests.first().unwrap().at;
    assert!(
        span >= Duration::from_millis(2_500),
        "{EVENTS} requests at 10 a second with a bucket of 10 took {span:?}"
    );
}

/// A history held over its bound by unfinished deliveries (a backlog behind a slow endpoint)
/// keeps them, and the finishes behind them do not look at them again until the history has
/// grown by another batch; once it has, the finished ones are trimmed back to the bound.
#[tokio::test]
async fn a_history_held_up_by_unfinished_deliveries_is_not_rescanned_on_every_finish() {
    let env = TestEnv::new().await;
    let (store, endpoints) = keeping_few(&env, "acct_trim").await;
    let ep = endpoints.endpoints[0].clone();
    let now = now_ms();
    let begin = |n: usize, first: usize| begin_events(&store, &endpoints, now, first..first + n);
    let success = Success::at(now);
    let mut conn = env.redis().await;
    let history = store.keys().endpoint_deliveries(&ep.id);
    let health = store.keys().endpoint_health(&ep.id);

    // The oldest 50 stay unfinished while the 100 after them finish.
    let backlog = begin(150, 0).await;
    finish(&store, &success, &backlog[50..]).await;
    let len: usize = redis::AsyncCommands::zcard(&mut conn, &history).await.unwrap();
    assert_eq!(len, 150, "the oldest entries are unfinished: none can go");
    let trim_at: Option<usize> = redis::AsyncCommands::hget(&mut conn, &health, "trim_at").await.unwrap();
    assert_eq!(
        trim_at,
        Some(152),
        "the first scan found nothing to delete; the next waits for another batch"
    );

    // The backlog finishes; once the history grows past that point, it is trimmed to the bound.
    finish(&store, &success, &backlog[..50]).await;
    let more = begin(20, 150).await;
    finish(&store, &success, &more).await;
    let len: usize = redis::AsyncCommands::zcard(&mut conn, &history).await.unwrap();
    assert!(
        (KEEP as usize..=KEEP as usize + 2).contains(&len),
        "trimmed back to {KEEP} newest: {len}"
    );
    let newest: Vec<String> = redis::AsyncCommands::zrange(&mut conn, &history, -20, -1)
        .await
        .unwrap();
    let expected: Vec<String> = more.iter().map(|b| b.job.delivery.as_str().to_owned()).collect();
    assert_eq!(newest, expected, "the newest deliveries are the ones kept");
}

/// Arrivals and finishes that share the store's calls, as a busy dispatcher's do, act as they
/// would one by one: every arrival reads the endpoints' version the call found, and each finish
/// trims the history from the size the finishes before it in the same call left, so the history
/// ends at its bound, not below it.
#[tokio::test]
async fn arrivals_and_finishes_sharing_calls_keep_the_history_at_its_bound() {
    let env = TestEnv::new().await;
    let (store, endpoints) = keeping_few(&env, "acct_shared_calls").await;
    let now = now_ms();
    let success = Success::at(now);
    // Up to the point past which finishes trim, then 30 more: their finishes share calls and
    // each trims up to three of the oldest, all finished, until the history is back at its bound
    // (one call's finishes trimming from the size the call began with would take it to about 70).
    let mut begins = begin_events_together(&store, &endpoints, now, 0..KEEP as usize + 2).await;
    let begun = store
        .delivery(&begins[0].job.delivery)
        .await
        .unwrap()
        .expect("visible from its arrival");
    assert_eq!(
        (begun.status, begun.attempts),
        (DeliveryStatus::Pending, 0),
        "begun, not attempted yet"
    );
    finish_together(&store, &success, &begins).await;
    let more = begin_events_together(&store, &endpoints, now, KEEP as usize + 2..KEEP as usize + 32).await;
    finish_together(&store, &success, &more).await;
    begins.extend(more);
    let mut conn = env.redis().await;
    let history = store.keys().endpoint_deliveries(&endpoints.endpoints[0].id);
    let len: usize = redis::AsyncCommands::zcard(&mut conn, &history).await.unwrap();
    assert!(
        (KEEP as usize..=KEEP as usize + 2).contains(&len),
        "trimmed back to {KEEP} newest: {len}"
    );
    let newest: Vec<String> = redis::AsyncCommands::zrange(&mut conn, &history, 0, -1).await.unwrap();
    let expected: Vec<String> = begins[begins.len() - len..]
        .iter()
        .map(|b| b.job.delivery.as_str().to_owned())
        .collect();
    assert_eq!(newest, expected, "the newest deliveries are the ones kept");
}

/// The history bound of the trimming tests: trimmed past 130, in batches of 3 (KEEP / 64 + 1).
const KEEP: u32 = 128;

/// A store that keeps [`KEEP`] deliveries per endpoint, and one quiet endpoint of `account`.
async fn keeping_few(env: &TestEnv, account: &str) -> (Store, AccountEndpoints) {
    let store = TestEnv::connect_store(&laabam_shared::store::StoreConfig {
        history_per_endpoint: KEEP,
        ..env.store_config()
    })
    .await;
    let endpoints = quiet_endpoints(&store, &AccountId::parse(account).unwrap(), 1).await;
    (store, endpoints)
}

/// Records each delivery's success under its lease, one by one.
async fn finish(store: &Store, success: &Success, begins: &[Begin]) {
    for begin in begins {
        assert!(store.record(&success.record(begin)).await.unwrap().applied);
    }
}

/// Records each delivery's success under its lease, all at once, so they share calls.
async fn finish_together(store: &Store, success: &Success, begins: &[Begin]) {
    let records = begins.iter().map(|b| {
        let record = success.record(b);
        async move { assert!(store.record(&record).await.unwrap().applied) }
    });
    join_all(records).await;
}

/// Under a rate limit that is exceeded for a while, the deliveries deferred for it go in the
/// order their events came. An event arriving while deferred deliveries wait for their turns
/// used to take the token that had come back for the oldest of them, which was then deferred
/// again behind every later one: the oldest events waited longest, and some were deferred over
/// and over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_exceeded_for_a_while_delivers_in_the_order_events_came() {
    const EVENTS: usize = 80;
    const RATE: u32 = 10;
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    let (_, account, _) = rate_limited_endpoint(&env, &rx, "acct_overload", RATE).await;
    env.start_dispatcher(&[]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let events = sample_events(account.as_str(), EVENTS);
    // Twice the rate, for four seconds.
    let mut every = tokio::time::interval(Duration::from_millis(500 / RATE as u64));
    let mut published = HashMap::new();
    for event in &events {
        every.tick().await;
        publisher.publish(event).await.unwrap();
        published.insert(event.id.to_string(), Instant::now());
    }
    wait_until("all delivered", Duration::from_secs(60), || async {
        rx.count() == EVENTS
    })
    .await;
    let requests = rx.requests();
    let order: HashMap<String, usize> = events.iter().enumerate().map(|(i, e)| (e.id.to_string(), i)).collect();
    let delivered: Vec<(usize, Duration)> = requests
        .iter()
        .map(|r| {
            let id = r.json()["id"].as_str().unwrap().to_owned();
            (order[&id], r.at.saturating_duration_since(published[&id]))
        })
        .collect();
    let mut latest = 0;
    let mut overtaken = 0;
    for (n, _) in &delivered {
        // Delivered after an event published at least five events (a quarter second) later.
        if latest >= n + 5 {
            overtaken += 1;
        }
        latest = latest.max(*n);
    }
    let mut waits: Vec<Duration> = delivered.iter().map(|(_, w)| *w).collect();
    waits.sort_unstable();
    let longest = waits[EVENTS - 1];
    println!(
        "overtaken {overtaken} of {EVENTS}; waits: median {:?}, longest {longest:?}; order {:?}",
        waits[EVENTS / 2],
        delivered.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    // A turn's delivery held up past its lateness (a stalled machine) may let one arrival by.
    assert!(
        overtaken <= 3,
        "{overtaken} deliveries overtaken by events that came later"
    );
    // The bucket's 10 at once, one more a returning delivery may borrow, then one every 100 ms
    // (less one interval for the receiver's clock against the dispatcher's).
    let span = requests[EVENTS - 1].at - requests[0].at;
    let least = Duration::from_millis(1_000 * (EVENTS - RATE as usize - 2) as u64 / RATE as u64);
    assert!(span >= least, "{EVENTS} requests in {span:?}: over the rate");
}

/// An endpoint's rate limit holds for the whole deployment: each dispatcher running keeps to
/// its share of it. Each used to allow the whole rate, so two dispatchers delivered up to twice
/// the limit an endpoint's owner had set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatchers_running_together_keep_to_one_rate_limit() {
    const EVENTS: usize = 60;
    const RATE: u32 = 10;
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    let (_, account, _) = rate_limited_endpoint(&env, &rx, "acct_shared_rate", RATE).await;
    env.start_scheduler(&[]);
    env.start_dispatchers_together(2, &[]).await;
    publish_all(&env.publisher().await, &sample_events(account.as_str(), EVENTS)).await;
    wait_until("all delivered", Duration::from_secs(60), || async {
        rx.count() == EVENTS
    })
    .await;
    let requests = rx.requests();
    let span = requests[EVENTS - 1].at - requests[0].at;
    println!("{EVENTS} requests over {span:?}");
    // The two shares' 5 tokens at once, one more each a returning delivery may borrow, then one
    // every 100 ms between them (less one interval for the receiver's clock).
    let least = Duration::from_millis(1_000 * (EVENTS - RATE as usize - 3) as u64 / RATE as u64);
    assert!(span >= least, "{EVENTS} requests in {span:?}: over the rate limit");
}
