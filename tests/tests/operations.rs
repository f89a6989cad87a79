//! Running it: readiness follows dependencies, work (and records waiting to be written) survives
//! a Redis restart, and the logs are structured and free of secrets.

use futures_util::future::join_all;
use laabam_shared::clock::now_ms;
use laabam_shared::delivery::DeliveryStatus;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::AccountId;
use laabam_tests::deliveries::{Success, begin_events, quiet_endpoints};
use laabam_tests::env::numbered;
use laabam_tests::own_redis::OwnRedis;
use laabam_tests::report::{fault_row, ids_of};
use laabam_tests::{ApiClient, Receiver, Reply, TestEnv, wait_until};
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis_nothing_is_lost_and_logs_hold_no_secrets() {
    let mut redis = OwnRedis::start();
    let mut env = TestEnv::new().await;
    env.redis_url = redis.url();
    let event = |n: usize| numbered("acct_ops", n);
    // The first attempt of the first event fails, so a retry is pending in Redis when it stops.
    let retried = event(0);
    let rx = Receiver::failing_first_attempt_of(retried.id.as_str()).await;
    let ep = env.endpoint("acct_ops", &rx.url, None).await;

    let metrics_port = laabam_tests::ports::free_port();
    let mut flags = env.dispatcher_flags(&["--retry-first-delay", "5s", "--retry-max-delay", "5s"]);
    flags.extend(["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")]);
    let log = std::env::temp_dir().join(format!("laabam-dispatcher-{}.log", ulid::Ulid::new()));
    env.spawn_binary_with(
        "laabam-dispatcher",
        &flags,
        &[
            ("LAABAM_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,laabam_dispatcher=debug,laabam_shared=debug"),
        ],
        Some(&log),
    );
    env.start_scheduler(&[]);
    let ops = ApiClient::new(&format!("http://127.0.0.1:{metrics_port}"));
    let ready = |expected: u16| answers_readyz(metrics_port, expected);
    wait_until("ready", Duration::from_secs(30), || ready(200)).await;
    assert_eq!(ops.get("/healthz").await.status, 200);

    let publisher = env.publisher().await;
    publisher.publish(&retried).await.unwrap();
    wait_until("the first attempt failed", Duration::from_secs(20), || async {
        rx.count() == 1
    })
    .await;
    publisher.publish(&event(1)).await.unwrap();
    wait_until("first delivery", Duration::from_secs(20), || async { rx.count() == 2 }).await;

    // Redis goes away with a retry pending: readiness drops; an event published meanwhile
    // waits in the broker.
    redis.stop();
    wait_until("not ready while Redis is down", Duration::from_secs(15), || ready(503)).await;
    let during = event(2);
    publisher.publish(&during).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rx.count(), 2, "nothing can be delivered without recording it");

    // Redis is back (with its append-only file): readiness returns and the event arrives.
    redis.restart();
    wait_until("ready again", Duration::from_secs(30), || ready(200)).await;
    wait_until(
        "the event published during the outage",
        Duration::from_secs(30),
        || async { rx.per_event().contains_key(during.id.as_str()) },
    )
    .await;
    let after = event(3);
    publisher.publish(&after).await.unwrap();
    wait_until("delivery goes on", Duration::from_secs(20), || async {
        rx.per_event().contains_key(after.id.as_str())
    })
    .await;
    wait_until(
        "the retry pending across the restart",
        Duration::from_secs(30),
        || async { rx.per_event().get(retried.id.as_str()) == Some(&2) },
    )
    .await;
    let mut arrivals = rx.per_event();
    // The planned failed attempt is not a duplicate.
    *arrivals.get_mut(retried.id.as_str()).unwrap() -= 1;
    let ids: Vec<String> = arrivals.keys().cloned().collect();
    assert_eq!(ids.len(), 4);
    let (lost, _) = fault_row(
        "Redis down with a retry pending, then restarted (append-only)",
        &ids,
        &arrivals,
        1,
    );
    assert_eq!(lost, 0);

    // Logs: one JSON object per line, with event and delivery ids, and no secret of any kind.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty());
    let span_of = |line: &serde_json::Value, name: &str| {
        line["spans"]
            .as_array()
            .and_then(|spans| spans.iter().find(|s| s["name"] == name).cloned())
    };
    let finished: Vec<&serde_json::Value> = lines.iter().filter(|l| l["message"] == "attempt finished").collect();
    assert!(!finished.is_empty(), "attempts are logged");
    let attempt_span = span_of(finished[0], "attempt").unwrap();
    for field in ["event_id", "endpoint_id", "delivery_id", "attempt"] {
        assert!(
            !attempt_span[field].is_null(),
            "attempt logs carry {field}: {attempt_span}"
        );
    }
    // The event that waited out the outage was handed back under its own id.
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "dependency failed; handing the message back"
                && span_of(l, "event").is_some_and(|s| s["event_id"] == during.id.as_str())),
        "the handed-back message is logged with its event id"
    );
    let secret = ep.secret.expose();
    for forbidden in [secret.as_str(), &secret["whsec_".len()..], "v1,", "guest:guest"] {
        assert!(!text.contains(forbidden), "logs contain {forbidden:?}");
    }
    let _ = std::fs::remove_file(&log);
}

/// At the default level a success writes no line (every attempt is in the delivery's log
/// already), while an attempt that failed is logged with its ids; a log that is not a terminal
/// gets no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_default_level_only_attempts_that_failed_are_logged_and_without_colour_codes() {
    let mut env = TestEnv::new().await;
    let events = laabam_tests::env::sample_events("acct_quiet", 5);
    let rx = Receiver::failing_first_attempt_of(events[0].id.as_str()).await;
    env.endpoint("acct_quiet", &rx.url, None).await;
    let log = std::env::temp_dir().join(format!("laabam-dispatcher-{}.log", ulid::Ulid::new()));
    let flags = env.dispatcher_flags(&[]);
    env.spawn_binary_with("laabam-dispatcher", &flags, &[("RUST_LOG", "info")], Some(&log));
    env.start_scheduler(&[]);
    laabam_tests::env::publish_all(&env.publisher().await, &events).await;
    wait_until(
        "every event delivered, one of them on its retry",
        Duration::from_secs(30),
        || async { rx.count() == 6 },
    )
    .await;

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains('\u{1b}'), "no escape codes in a file: {text}");
    let finished: Vec<&str> = text.lines().filter(|l| l.contains("attempt finished")).collect();
    assert_eq!(finished.len(), 1, "only the failed attempt is logged: {text}");
    let line = finished[0];
    for expected in [
        events[0].id.as_str(),
        "delivery_id=dlv_",
        "endpoint_id=ep_",
        "attempt=1",
        "status_code=500",
        "next=\"retrying\"",
    ] {
        assert!(line.contains(expected), "{expected} in {line}");
    }
    let _ = std::fs::remove_file(&log);
}

/// Records made while Redis is down each get an error to retry (none waits forever behind the
/// others sent with it), and once Redis is back each goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_made_while_redis_is_down_each_fail_and_go_through_once_it_is_back() {
    let mut redis = OwnRedis::start();
    let mut env = TestEnv::new().await;
    env.redis_url = redis.url();
    let store = env.store().await;
    let account = AccountId::parse("acct_down").unwrap();
    let endpoints = quiet_endpoints(&store, &account, 2).await;
    let now = now_ms();
    let begins = begin_events(&store, &endpoints, now, 0..20).await;
    let success = Success::at(now);
    let records: Vec<_> = begins.iter().map(|b| success.record(b)).collect();

    redis.stop();
    let answers = tokio::time::timeout(
        Duration::from_secs(60),
        join_all(records.iter().map(|r| store.record(r))),
    )
    .await
    .expect("every record is answered while Redis is down");
    for (i, answer) in answers.iter().enumerate() {
        assert!(answer.is_err(), "record {i} went through without Redis: {answer:?}");
    }

    redis.restart();
    wait_until("Redis is back", Duration::from_secs(30), || store.ping()).await;
    let answers = join_all(records.iter().map(|r| store.record(r))).await;
    for (i, (begin, answer)) in begins.iter().zip(answers).enumerate() {
        assert!(answer.unwrap().applied, "record {i}");
        let state = store.delivery(&begin.job.delivery).await.unwrap().unwrap();
        assert_eq!(state.status, DeliveryStatus::Succeeded, "delivery {i}");
        assert_eq!(
            store.attempts(&begin.job.delivery).await.unwrap().len(),
            1,
            "delivery {i}"
        );
    }
}

/// A Redis out of memory (`maxmemory` reached under `noeviction`, as production runs it)
/// refuses writes until an operator frees or adds memory. The API answers that with 503 and
/// what Redis said, as for a Redis that is down, not with a bare 500 "internal error" (as it
/// did); an event published meanwhile waits in the broker and is delivered once Redis takes
/// writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_out_of_memory_answers_503_and_loses_nothing() {
    let redis = OwnRedis::start();
    let mut env = TestEnv::new().await;
    env.redis_url = redis.url();
    let rx = Receiver::ok().await;
    let api = env.start_api("oom-operator").await;
    let (_, client) = api.new_account("oom-operator", "oom").await;
    let created = client.post("/v1/endpoints", serde_json::json!({ "url": rx.url })).await;
    assert_eq!(created.status, 201, "{:?}", created.json);
    env.start_dispatcher(&[]);
    let config = |maxmemory: &str| {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port().to_string(), "config", "set", "maxmemory", maxmemory])
            .output()
            .unwrap();
        assert!(out.status.success());
    };
    config("1");

    let refused = client
        .post(
            "/v1/endpoints",
            serde_json::json!({ "url": "http://127.0.0.1:9/other" }),
        )
        .await;
    assert_eq!(refused.status, 503, "{:?}", refused.json);
    assert_eq!(refused.json["error"]["code"], "unavailable");
    let message = refused.json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("Redis cannot take this request for now (OOM)"),
        "{message}"
    );
    let event = serde_json::json!({ "type": "payment.failed", "data": { "payment_id": "p", "reason": "r" } });
    let published = client.post("/v1/events", event).await;
    assert_eq!(published.status, 202, "the broker takes it: {:?}", published.json);

    config("0");
    wait_until(
        "the event published during the refusal delivered",
        Duration::from_secs(30),
        || async { rx.count() == 1 },
    )
    .await;
    assert_eq!(
        rx.requests()[0].header("webhook-id"),
        published.json["id"].as_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_and_the_scheduler_stop_cleanly_on_sigterm() {
    let mut env = TestEnv::new().await;
    let api_port = laabam_tests::ports::free_port();
    let ops_port = laabam_tests::ports::free_port();
    let api_flags = env.producer_flags(api_port, &format!("127.0.0.1:{ops_port}"), &["--api-timeout", "2s"]);
    let producer = env.spawn_binary("laabam-producer", &api_flags);
    let scheduler = env.spawn_binary("laabam-retry-scheduler", &env.scheduler_flags(&[]));
    // Probes reach the API's port and the operations port alike.
    for port in [api_port, ops_port] {
        wait_until("ready", Duration::from_secs(30), || answers_readyz(port, 200)).await;
    }
    // A client dripping a request's head, which the API may wait for until its idle timeout
    // (75 s): at shutdown it waits only the shutdown grace (the request time limit) for it.
    let mut dripping = tokio::net::TcpStream::connect(("127.0.0.1", api_port)).await.unwrap();
    let drip = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut line: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\n";
        while dripping.write_all(line).await.is_ok() {
            line = b"X-Slow: yes\r\n";
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for pid in [producer, scheduler] {
        let started = std::time::Instant::now();
        let status = env.terminate(pid).await;
        assert!(status.success(), "clean exit: {status:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "stopped within its bound");
    }
    drip.await.unwrap();
}

/// The dispatcher turns transparent huge pages off for itself before it allocates much: its
/// allocator's arenas are advised as huge-page memory, and each 2 MiB region touched stayed
/// resident whole (README, Performance: peaks of 70–80 MiB became 52–54).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_runs_without_transparent_huge_pages_and_stops_cleanly() {
    let mut env = TestEnv::new().await;
    let metrics_port = laabam_tests::ports::free_port();
    let mut flags = env.dispatcher_flags(&[]);
    flags.extend(["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")]);
    let dispatcher = env.spawn_binary("laabam-dispatcher", &flags);
    let status = format!("/proc/{dispatcher}/status");
    let huge_pages = || {
        std::fs::read_to_string(&status)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:").map(|v| v.trim().to_owned()))
    };
    // `THP_enabled: 1` until the first line of `main` has run, and for good without it.
    wait_until("transparent huge pages off", Duration::from_secs(10), || async {
        huge_pages().as_deref() == Some("0")
    })
    .await;
    // Stopped once it serves, as an operator would stop it: a SIGTERM before `main` has installed
    // its handlers takes the default action, which is not what this test is about.
    wait_until("ready", Duration::from_secs(30), || answers_readyz(metrics_port, 200)).await;
    let exit = env.terminate(dispatcher).await;
    assert!(exit.success(), "clean exit: {exit:?}");
}

/// Whether the process serving operations on `port` listens and answers `/readyz` with `status`
/// within a second.
async fn answers_readyz(port: u16, status: u16) -> bool {
    if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        return false;
    }
    let ops = ApiClient::new(&format!("http://127.0.0.1:{port}"));
    tokio::time::timeout(Duration::from_secs(1), ops.get("/readyz"))
        .await
        .is_ok_and(|a| a.status == status)
}

/// A Redis that stops answering for a while with every connection kept open (`CLIENT PAUSE`,
/// as a failover or a slow command does) delays deliveries and loses none: calls past the 5 s
/// response limit fail and their events are handed back to the broker, the scheduler claims
/// nothing meanwhile, and once Redis answers again everything is delivered, a retry that came
/// due during the pause included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pausing_every_client_delays_deliveries_and_loses_none() {
    let redis = OwnRedis::start();
    let mut env = TestEnv::new().await;
    env.redis_url = redis.url();
    let event = |n: usize| numbered("acct_pause", n);
    let events: Vec<Envelope> = (0..150).map(event).collect();
    let retried = events[0].id.to_string();
    let rx = Receiver::failing_first_attempt_of(&retried).await;
    env.endpoint("acct_pause", &rx.url, None).await;
    env.start_dispatcher(&[]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    for e in &events[..50] {
        publisher.publish(e).await.unwrap();
    }
    wait_until("the first events delivered", Duration::from_secs(20), || async {
        rx.per_event().len() == 50
    })
    .await;
    // The first event's retry comes due 4-6 s after its failed attempt: within the pause.
    redis.pause(9000);
    for e in &events[50..] {
        publisher.publish(e).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rx.per_event().len(), 50, "nothing is delivered without recording it");
    wait_until(
        "every event delivered after the pause, and the retry",
        Duration::from_secs(60),
        || async {
            let seen = rx.per_event();
            // At least: delivery is at least once, and the fault row below counts duplicates.
            seen.len() == 150 && seen.get(retried.as_str()).is_some_and(|&n| n >= 2)
        },
    )
    .await;
    let mut arrivals = rx.per_event();
    *arrivals.get_mut(retried.as_str()).unwrap() -= 1; // its planned failed attempt
    let ids = ids_of(&events);
    let (lost, _) = fault_row(
        "Redis pauses every client for 9 s (CLIENT PAUSE), a retry due meanwhile",
        &ids,
        &arrivals,
        1,
    );
    assert_eq!(lost, 0);
}

/// Deliveries begun as Redis comes back from a stall shorter than its response limit have
/// little of their lease left: each arrival's lease was reckoned when its message came, before
/// the stall. Sent then, a slow endpoint's attempt would still be running when the lease ends
/// and the scheduler sends the delivery again; the dispatcher leaves each to its lease instead,
/// and every event arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_begun_late_by_a_redis_stall_are_left_to_their_lease_and_arrive_once() {
    let redis = OwnRedis::start();
    let mut env = TestEnv::new().await;
    env.redis_url = redis.url();
    // Fewer than an endpoint's 16 slots, so that none waits for one and is deferred.
    let events: Vec<Envelope> = (0..12).map(|n| numbered("acct_stall", n)).collect();
    // Slower than what is left of a lease after the stall, quicker than the 2 s HTTP timeout.
    let rx = Receiver::start(|_, _| Reply::After(Duration::from_millis(1500), 200)).await;
    env.endpoint("acct_stall", &rx.url, None).await;
    let metrics_addr = format!("127.0.0.1:{}", laabam_tests::ports::free_port());
    env.start_dispatcher(&["--metrics-addr", &metrics_addr]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    // The first finds the endpoint, which the dispatcher then keeps: the rest need Redis only
    // to begin their deliveries.
    publisher.publish(&events[0]).await.unwrap();
    wait_until("the first event delivered", Duration::from_secs(20), || async {
        rx.count() == 1
    })
    .await;
    // Each lease (2 s of HTTP timeout and 1 s of margin) ends about when the pause does.
    redis.pause(3000);
    for e in &events[1..] {
        publisher.publish(e).await.unwrap();
    }
    wait_until("every event delivered", Duration::from_secs(30), || async {
        rx.per_event().len() == events.len()
    })
    .await;
    // A second request would have followed the first by the time the scheduler takes to
    // notice an ended lease (20 ms here) while the first was being answered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let twice: Vec<_> = rx.per_event().into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(twice.is_empty(), "events sent more than once: {twice:?}");
    let left = laabam_tests::api::metric(&metrics_addr, "laabam_dispatcher_attempts_left_to_lease_total").await;
    assert!(left >= 1.0, "no attempt was left to its lease");
}

/// `n` endpoints of `account`, each on a receiver (a port) of its own.
async fn endpoints_each_on_its_own_receiver(env: &mut TestEnv, account: &str, n: usize) -> Vec<Receiver> {
    let mut receivers = Vec::new();
    for _ in 0..n {
        let rx = Receiver::ok().await;
        env.endpoint(account, &rx.url, None).await;
        receivers.push(rx);
    }
    receivers
}

/// Each process raises its soft open-file limit to the hard one: a dispatcher started with 128
/// (a service manager's default is 1,024) delivers an event to 150 endpoints, each of them a
/// connection kept open for reuse. With 128 it could not open the connections past it ("Too
/// many open files"), and its retries failed the same way while the others stayed open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_started_with_few_open_files_raises_its_limit_and_reaches_every_endpoint() {
    let mut env = TestEnv::new().await;
    let receivers = endpoints_each_on_its_own_receiver(&mut env, "acct_files", 150).await;
    let dispatcher = env.spawn_binary_with_open_files("laabam-dispatcher", &env.dispatcher_flags(&[]), 128);
    let limits = format!("/proc/{dispatcher}/limits");
    let open_files = || {
        let text = std::fs::read_to_string(&limits).unwrap_or_default();
        text.lines().find(|l| l.starts_with("Max open files")).map(|l| {
            l.split_whitespace()
                .skip(3)
                .take(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
    };
    wait_until(
        "the soft limit raised to the hard one",
        Duration::from_secs(30),
        || async { matches!(open_files().as_deref(), Some([soft, hard]) if soft == hard && soft != "128") },
    )
    .await;
    let publisher = env.publisher().await;
    publisher.publish(&numbered("acct_files", 0)).await.unwrap();
    wait_until("every endpoint reached", Duration::from_secs(30), || async {
        receivers.iter().all(|rx| rx.count() == 1)
    })
    .await;
}

/// A dispatcher that reached many endpoints keeps at most `LAABAM_HTTP_IDLE_CONNECTIONS` of
/// their connections open for reuse, closing those idle longest: each costs memory and a file
/// descriptor, and one per endpoint host for 90 s took 50 MiB for 3,000 endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_keeps_at_most_its_bound_of_idle_connections_however_many_endpoints_it_reached() {
    let mut env = TestEnv::new().await;
    let receivers = endpoints_each_on_its_own_receiver(&mut env, "acct_idle", 60).await;
    let metrics_addr = format!("127.0.0.1:{}", laabam_tests::ports::free_port());
    let mut flags = env.dispatcher_flags(&["--http-idle-connections", "20"]);
    flags.extend(["--metrics-addr".into(), metrics_addr.clone()]);
    env.spawn_binary("laabam-dispatcher", &flags);
    let publisher = env.publisher().await;
    for n in 0..2 {
        publisher.publish(&numbered("acct_idle", n)).await.unwrap();
        wait_until("every endpoint reached", Duration::from_secs(30), || async {
            receivers.iter().all(|rx| rx.count() == n + 1)
        })
        .await;
    }
    let open = || receivers.iter().map(Receiver::open_connections).sum::<usize>();
    wait_until(
        "the connections past the bound closed",
        Duration::from_secs(10),
        || async { open() <= 20 },
    )
    .await;
    // Those kept stay open, and were reused: the second event found the first's newest 20.
    assert_eq!(open(), 20);
    let idle = laabam_tests::api::metric(&metrics_addr, "laabam_dispatcher_idle_connections").await;
    assert_eq!(idle, 20.0);
    let accepted: usize = receivers.iter().map(Receiver::connections).sum();
    assert!(accepted < 120, "{accepted} connections for 120 requests: none reused");
}

/// The dispatcher's endpoint cache is bounded by endpoints, not by accounts, and one account
/// may fill most of it: with room for 100, an account of 60 endpoints is read from Redis once,
/// and stays cached through events of 40 accounts seen once each (more than the room left),
/// while an account of 120 is read for each of its events and still reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_cache_holds_at_most_its_bound_of_endpoints_keeps_the_busy_accounts_and_serves_those_past_it() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    let once: Vec<String> = (0..40).map(|n| format!("acct_once_{n}")).collect();
    let accounts = [("acct_wide", 60), ("acct_widest", 120)]
        .into_iter()
        .chain(once.iter().map(|a| (a.as_str(), 1)));
    for (account, n) in accounts {
        for _ in 0..n {
            env.endpoint(account, &rx.url, None).await;
        }
    }
    let metrics_addr = format!("127.0.0.1:{}", laabam_tests::ports::free_port());
    let mut flags = env.dispatcher_flags(&["--cached-endpoints", "100"]);
    flags.extend(["--metrics-addr".into(), metrics_addr.clone()]);
    env.spawn_binary("laabam-dispatcher", &flags);
    let publisher = env.publisher().await;
    let mut delivered = 0;
    let mut deliver = async |account: &str, n: usize, event: usize| {
        publisher.publish(&numbered(account, event)).await.unwrap();
        delivered += n;
        wait_until("every endpoint reached", Duration::from_secs(30), || async {
            rx.count() == delivered
        })
        .await;
    };
    let loads = || laabam_tests::api::metric(&metrics_addr, "laabam_dispatcher_endpoint_loads_total");
    deliver("acct_wide", 60, 0).await;
    deliver("acct_wide", 60, 1).await;
    assert_eq!(loads().await, 1.0, "the wide account is read once");
    for account in &once {
        deliver(account, 1, 0).await;
        deliver("acct_wide", 60, 2).await;
    }
    assert_eq!(
        loads().await,
        41.0,
        "the wide account stays cached; each account seen once is read"
    );
    deliver("acct_widest", 120, 0).await;
    deliver("acct_widest", 120, 1).await;
    assert_eq!(loads().await, 43.0, "an account past the cache is read for each event");
    let cached = laabam_tests::api::metric(&metrics_addr, "laabam_dispatcher_cached_endpoints").await;
    assert!(cached <= 100.0, "{cached} endpoints cached");
}
