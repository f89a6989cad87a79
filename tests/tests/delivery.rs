//! Events published through our library and through a plain AMQP client reach exactly the
//! subscribed endpoints, unchanged and signed; events arriving together are each stored and
//! begun as alone.

use futures_util::future::join_all;
use laabam_shared::catalog::CATALOG;
use laabam_shared::clock::now_ms;
use laabam_shared::delivery::DeliveryStatus;
use laabam_shared::endpoint::Endpoint;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::AccountId;
use laabam_shared::signing::Secret;
use laabam_shared::store::{ARRIVALS_PER_CALL, Begin, DeliveryFilter, Ingest};
use laabam_tests::deliveries::{leased_begins, quiet_endpoints};
use laabam_tests::env::invoice_paid;
use laabam_tests::receiver::Captured;
use laabam_tests::workspace::{node_packages, root};
use laabam_tests::{Receiver, TestEnv, wait_until};
use lapin::BasicProperties;
use serde_json::json;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn assert_signed(req: &Captured, ep: &Endpoint) {
    for name in ["webhook-signature", "x-laabam-signature"] {
        req.verify(&ep.secret, name)
            .unwrap_or_else(|e| panic!("{name} does not verify: {e}"));
    }
    assert_eq!(req.header("content-type"), "application/json");
    assert!(req.header("user-agent").starts_with("Laabam-Webhooks/"));
}

/// One event of each catalog type for `account`, its data the catalog's example.
fn catalog_examples(account: &AccountId) -> Vec<Envelope> {
    CATALOG
        .iter()
        .map(|spec| {
            let data = RawValue::from_string(spec.example.to_owned()).unwrap();
            Envelope::new(spec.name, account.clone(), data, None, now_ms()).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_reaches_exactly_its_subscribers_signed_and_unchanged() {
    let mut env = TestEnv::new().await;
    let all = Receiver::ok().await;
    let paid_only = Receiver::ok().await;
    let other_account = Receiver::ok().await;
    let ep_all = env.endpoint("acct_a", &all.url, None).await;
    let ep_paid = env.endpoint("acct_a", &paid_only.url, Some(&["invoice.paid"])).await;
    env.endpoint("acct_b", &other_account.url, None).await;
    env.start_dispatcher(&[]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;

    // Through our library: every catalog type.
    let published = catalog_examples(&AccountId::parse("acct_a").unwrap());
    for event in &published {
        publisher.publish(event).await.unwrap();
    }
    // Through a plain client: every type again, one with every recommended property, the
    // others with a bare body that leaves out id and timestamp.
    for (i, spec) in CATALOG.iter().enumerate() {
        let body = format!(
            r#"{{"type":"{}","account_id":"acct_a","data":{}}}"#,
            spec.name, spec.example
        );
        let props = if i == 0 {
            BasicProperties::default()
                .with_message_id("plain-msg-1".into())
                .with_timestamp(1_795_840_920)
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
        } else {
            BasicProperties::default()
        };
        env.plain_publish(spec.name, body.as_bytes(), props).await;
    }

    let expected_all = 2 * CATALOG.len();
    wait_until("every event at the all-types endpoint", WAIT, || async {
        all.count() >= expected_all
    })
    .await;
    wait_until("both invoice.paid at the paid-only endpoint", WAIT, || async {
        paid_only.count() >= 2
    })
    .await;
    // Give stragglers (there must be none) a moment before asserting exact counts.
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(all.count(), expected_all);
    assert!(
        all.per_event().values().all(|&n| n == 1),
        "each event once: {:?}",
        all.per_event()
    );
    assert_eq!(paid_only.count(), 2);
    assert_eq!(other_account.count(), 0, "another account's endpoint got nothing");

    for req in all.requests() {
        assert_signed(&req, &ep_all);
    }
    for req in paid_only.requests() {
        assert_signed(&req, &ep_paid);
        assert_eq!(req.json()["type"], "invoice.paid");
    }

    // Library events arrive byte for byte as published.
    let requests = all.requests();
    for env in &published {
        let req = requests
            .iter()
            .find(|r| r.header("webhook-id") == env.id.as_str())
            .expect("delivered");
        assert_eq!(req.body, env.to_json(), "{}", env.event_type);
    }
    // Plain events keep their data exactly and get a stable id and timestamp.
    let with_props = requests
        .iter()
        .find(|r| r.header("webhook-id") == "plain-msg-1")
        .expect("message_id used as id");
    assert_eq!(with_props.json()["timestamp"], "2026-11-28T04:42:00.000Z");
    for spec in &CATALOG[1..] {
        let req = requests
            .iter()
            .find(|r| {
                r.json()["type"] == spec.name
                    && r.header("webhook-id").starts_with("evt_")
                    && !published.iter().any(|p| p.id.as_str() == r.header("webhook-id"))
            })
            .expect("plain event delivered");
        let body = String::from_utf8(req.body.to_vec()).unwrap();
        assert!(body.ends_with(&format!(r#""data":{}}}"#, spec.example)), "{body}");
        assert!(req.json()["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republished_event_without_id_is_recognised_and_not_delivered_twice() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    env.endpoint("acct_a", &rx.url, None).await;
    env.declare_topology().await;
    env.start_dispatcher(&[]);
    let body =
        br#"{"type":"payment.failed","account_id":"acct_a","data":{"payment_id":"p1","reason":"card_declined"}}"#;
    env.plain_publish("payment.failed", body, BasicProperties::default())
        .await;
    wait_until("first copy delivered", WAIT, || async { rx.count() == 1 }).await;
    env.plain_publish("payment.failed", body, BasicProperties::default())
        .await;
    // A different event after the copy: once it arrives, the copy has been processed too.
    let marker =
        br#"{"id":"evt_marker","type":"payment.failed","account_id":"acct_a","data":{"payment_id":"p2","reason":"x"}}"#;
    env.plain_publish("payment.failed", marker, BasicProperties::default())
        .await;
    wait_until("marker delivered", WAIT, || async {
        rx.per_event().contains_key("evt_marker")
    })
    .await;
    assert_eq!(
        rx.count(),
        2,
        "the republished copy kept its id and was not delivered again"
    );
}

/// A busy endpoint's connections are kept and reused: however its requests come and go, the
/// dispatcher opens about one connection per request slot, not one per burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_endpoint_is_served_over_reused_connections() {
    const SLOTS: usize = 128;
    const EVENTS: usize = 8000;
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    env.endpoint("acct_busy", &rx.url, None).await;
    env.start_dispatcher(&["--endpoint-concurrency", &SLOTS.to_string()]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    laabam_tests::env::publish_all(&publisher, &laabam_tests::env::sample_events("acct_busy", EVENTS)).await;
    wait_until("every event delivered", Duration::from_secs(120), || async {
        rx.count() >= EVENTS
    })
    .await;
    // A request may open a connection while another is on its way back to the pool (each slot
    // can race once), so the bound is two per slot; one connection per burst would be hundreds.
    assert!(
        rx.connections() <= 2 * SLOTS,
        "{} connections for {} requests at most {SLOTS} at a time",
        rx.connections(),
        rx.count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_endpoints_are_delivered_with_an_extra_trusted_ca() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::start_tls(&["127.0.0.1", "localhost"], |_, _| laabam_tests::Reply::Status(204)).await;
    let ep = env.endpoint("acct_a", &rx.url, None).await;
    let ca = rx.ca_file.clone().unwrap();
    env.start_dispatcher(&["--extra-ca-file", ca.to_str().unwrap()]);
    let publisher = env.publisher().await;
    let data = RawValue::from_string(r#"{"customer_id":"c","name":"n","email":"e@x"}"#.into()).unwrap();
    let event = Envelope::new(
        "customer.created",
        AccountId::parse("acct_a").unwrap(),
        data,
        None,
        now_ms(),
    )
    .unwrap();
    publisher.publish(&event).await.unwrap();
    wait_until("delivered over TLS", WAIT, || async { rx.count() == 1 }).await;
    assert_signed(&rx.requests()[0], &ep);
    let store = env.store().await;
    let delivery = laabam_shared::ids::DeliveryId::for_pair(&event.id, &ep.id);
    wait_until("recorded as succeeded", WAIT, || async {
        store
            .delivery(&delivery)
            .await
            .unwrap()
            .is_some_and(|d| d.status == laabam_shared::delivery::DeliveryStatus::Succeeded)
    })
    .await;
}

/// The dispatcher caches each account's endpoints; every change must still reach the very next
/// event: a new endpoint, a changed subscription, a deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_reach_a_running_dispatcher_on_the_next_event() {
    let mut env = TestEnv::new().await;
    let first = Receiver::ok().await;
    let second = Receiver::ok().await;
    let mut ep_first = env.endpoint("acct_changes", &first.url, None).await;
    env.start_dispatcher(&[]);
    let publisher = env.publisher().await;
    let store = env.store().await;
    let events = laabam_tests::env::sample_events("acct_changes", 4);
    let send = |i: usize| publisher.publish(&events[i]);
    let got = |rx: &Receiver, i: usize| rx.per_event().contains_key(events[i].id.as_str());

    send(0).await.unwrap();
    wait_until("the first event at the first endpoint", WAIT, || async {
        got(&first, 0)
    })
    .await;

    let ep_second = env.endpoint("acct_changes", &second.url, None).await;
    send(1).await.unwrap();
    wait_until("the second event at both endpoints", WAIT, || async {
        got(&first, 1) && got(&second, 1)
    })
    .await;

    ep_first.events = Some(vec!["customer.created".into()]);
    store.save_endpoint(&ep_first).await.unwrap();
    send(2).await.unwrap();
    wait_until("the third event at the second endpoint", WAIT, || async {
        got(&second, 2)
    })
    .await;

    store.delete_endpoint(&ep_second.id).await.unwrap();
    ep_first.events = None;
    store.save_endpoint(&ep_first).await.unwrap();
    send(3).await.unwrap();
    wait_until("the fourth event at the first endpoint", WAIT, || async {
        got(&first, 3)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert!(
        !got(&first, 2),
        "the first endpoint unsubscribed from payment.failed before event 3"
    );
    assert!(!got(&second, 3), "the deleted endpoint got nothing after its deletion");
    assert!(!got(&second, 0), "the second endpoint did not exist yet");
}

/// Events that arrive at the same moment share script calls (every arrival waiting when the
/// previous call returns goes in the next), and each must be stored and begun as it would be
/// alone: events of two accounts with three and two endpoints, one with nobody to deliver to,
/// one whose endpoints changed since they were read (nothing written for it), and a second copy
/// of an earlier event (its deliveries known, the first copy's body answered).
///
/// On one thread, so that "together" is certain: every arrival is queued before the writer first
/// runs. On two, a loaded machine can let the writer send each arrival before the next is queued
/// (CI once saw 40 arrivals leave in 40 calls), and the test would measure the scheduler.
#[tokio::test(flavor = "current_thread")]
async fn events_arriving_together_are_each_stored_and_begun_as_alone() {
    let env = TestEnv::new().await;
    let store = env.store().await;
    let now = now_ms();
    let three = quiet_endpoints(&store, &AccountId::parse("acct_three").unwrap(), 3).await;
    let two = quiet_endpoints(&store, &AccountId::parse("acct_two").unwrap(), 2).await;
    let (stale, nobody, copy, copied) = (17, 22, 39, 3);
    let events: Vec<Envelope> = (0..40)
        .map(|i| {
            let account = if i % 2 == 0 { &three } else { &two }.endpoints[0].account_id.clone();
            invoice_paid(&account, i, now + i as i64)
        })
        .collect();
    let arrivals: Vec<(&Envelope, Vec<u8>, u64, Vec<Begin>)> = (0..40)
        .map(|i| {
            let endpoints = if i % 2 == 0 { &three } else { &two };
            let event = if i == copy { &events[copied] } else { &events[i] };
            let body = if i == copy {
                b"a second copy".to_vec()
            } else {
                event.to_json()
            };
            let version = endpoints.version + u64::from(i == stale);
            let begins = if i == nobody {
                Vec::new()
            } else {
                leased_begins(event, &endpoints.endpoints, i * 3, now + 30_000)
            };
            (event, body, version, begins)
        })
        .collect();
    let (calls_before, sent_before) = (ARRIVALS_PER_CALL.get_sample_count(), ARRIVALS_PER_CALL.get_sample_sum());
    let answers = join_all(
        arrivals
            .iter()
            .map(|(event, body, version, begins)| store.ingest(event, body, *version, begins, now)),
    )
    .await;
    let calls = ARRIVALS_PER_CALL.get_sample_count() - calls_before;
    let sent = ARRIVALS_PER_CALL.get_sample_sum() - sent_before;
    assert!(
        sent >= 40.0 && (calls as f64) < sent,
        "{sent} arrivals went in {calls} calls"
    );

    for (i, ((event, body, _, begins), answer)) in arrivals.iter().zip(answers).enumerate() {
        let stored = store.event_body(&event.account_id, &event.id).await.unwrap();
        let states = join_all(begins.iter().map(|b| store.delivery(&b.job.delivery))).await;
        match answer.unwrap() {
            Ingest::Stale => {
                assert_eq!(i, stale, "only the arrival with a changed version is stale");
                assert_eq!(stored, None, "nothing stored for the stale arrival");
                assert!(states.iter().all(|s| s.as_ref().unwrap().is_none()), "nor begun");
            }
            Ingest::Begun {
                body: answered,
                created,
            } if i == copy => {
                assert_eq!(answered, events[copied].to_json(), "the first copy's body answers");
                assert_eq!(created, vec![false; begins.len()], "its deliveries are known");
            }
            Ingest::Begun {
                body: answered,
                created,
            } => {
                assert_ne!(i, stale, "arrival {i}");
                assert_eq!(&answered, body, "arrival {i}");
                assert_eq!(stored.as_ref(), Some(body), "arrival {i}");
                assert_eq!(created, vec![true; begins.len()], "arrival {i}");
                for (begin, state) in begins.iter().zip(states) {
                    let state = state
                        .unwrap()
                        .unwrap_or_else(|| panic!("arrival {i}: a delivery begun"));
                    assert_eq!(state.status, DeliveryStatus::Pending, "arrival {i}");
                    assert_eq!(
                        (&state.event_id, &state.endpoint_id),
                        (&event.id, &begin.job.endpoint),
                        "arrival {i}"
                    );
                }
            }
        }
    }
    // Each account's listings hold its own events and deliveries, and nothing of the stale one.
    for (endpoints, events_listed, deliveries_listed) in [(&three, 20, 19 * 3), (&two, 18, 18 * 2)] {
        let account = &endpoints.endpoints[0].account_id;
        let listed = store.list_events(account, None, 100).await.unwrap();
        assert_eq!(listed.items.len(), events_listed, "{account}'s events");
        let filter = DeliveryFilter::default();
        let listed = store.list_deliveries(account, &filter, None, 100).await.unwrap();
        assert_eq!(listed.items.len(), deliveries_listed, "{account}'s deliveries");
    }
}

/// The Standard Webhooks reference libraries, each run by a script that reads checks as JSON
/// on stdin and answers a verdict for each.
#[derive(Debug, Clone, Copy)]
enum ReferenceLibrary {
    /// npm `standardwebhooks` (tests/browser/standard-webhooks.mjs).
    TypeScript,
    /// PyPI `standardwebhooks` (tests/clients/standard_webhooks_verify.py, in target/deploy-tools).
    Python,
}

impl ReferenceLibrary {
    /// Verifies each request with the secret paired with it: "ok", or why the library refused it.
    fn verify(self, checks: &[(&Captured, &Secret)]) -> Vec<String> {
        node_packages();
        let input: Vec<_> = checks
            .iter()
            .map(|(req, secret)| {
                json!({
                    "secret": secret.expose(),
                    "body": std::str::from_utf8(&req.body).expect("a UTF-8 body"),
                    "headers": {
                        "webhook-id": req.header("webhook-id"),
                        "webhook-timestamp": req.header("webhook-timestamp"),
                        "webhook-signature": req.header("webhook-signature"),
                    },
                })
            })
            .collect();
        let mut command = match self {
            ReferenceLibrary::TypeScript => script("node", "tests/browser/standard-webhooks.mjs"),
            ReferenceLibrary::Python => script(
                root().join("target/deploy-tools/bin/python"),
                "tests/clients/standard_webhooks_verify.py",
            ),
        };
        let out = run_fed(&mut command, json!(input).to_string().as_bytes());
        assert!(out.status.success(), "the {self:?} verifier failed");
        serde_json::from_slice(&out.stdout).expect("a JSON array of verdicts")
    }
}

/// `interpreter` running the repository's script at `path`.
fn script(interpreter: impl AsRef<std::ffi::OsStr>, path: &str) -> Command {
    let mut command = Command::new(interpreter);
    command.arg(root().join(path));
    command
}

/// Runs `command` with `input` on its stdin, and its stdout kept; stderr goes to the test's.
fn run_fed(command: &mut Command, input: &[u8]) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?} runs (scripts/services and scripts/browser-setup install it): {e}"));
    let mut stdin = child.stdin.take().expect("the child's stdin");
    stdin.write_all(input).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// A receiver built on either Standard Webhooks reference library verifies our deliveries
/// unchanged (the contract's promise): first attempts of every event type, a retry signed
/// afresh, and, after a rotation, a header with two signatures that each secret verifies alone.
/// The same request with one byte of its body changed is refused, so the check can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_webhooks_reference_libraries_verify_our_deliveries() {
    let mut env = TestEnv::new().await;
    let account = AccountId::parse("acct_std").unwrap();
    let events = catalog_examples(&account);
    let rx = Receiver::failing_first_attempt_of(events[0].id.as_str()).await;
    let mut ep = env.endpoint(account.as_str(), &rx.url, None).await;
    env.start_dispatcher(&[]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    for e in &events {
        publisher.publish(e).await.unwrap();
    }
    let before = events.len() + 1;
    wait_until("every event, and the first one's retry", WAIT, || async {
        rx.count() >= before
    })
    .await;

    let old = ep.secret.clone();
    ep.rotate_secret(now_ms(), Duration::from_secs(3600));
    env.store().await.save_endpoint(&ep).await.unwrap();
    let after = invoice_paid(&account, 1, now_ms());
    publisher.publish(&after).await.unwrap();
    let is_after = |req: &Captured| req.header("webhook-id") == after.id.as_str();
    wait_until("the event after the rotation", WAIT, || async {
        rx.requests().iter().any(is_after)
    })
    .await;

    // Every request but the last event's was signed before the rotation, with the old secret.
    let requests = rx.requests();
    let (rotated, signed_before): (Vec<_>, Vec<_>) = requests.iter().partition(|req| is_after(req));
    let rotated = rotated[0];
    assert_eq!(rotated.header("webhook-signature").split(' ').count(), 2);
    let mut tampered = rotated.clone();
    let mut body = tampered.body.to_vec();
    body[1] ^= 1;
    tampered.body = body.into();
    let mut checks: Vec<(&Captured, &Secret)> = signed_before.into_iter().map(|req| (req, &old)).collect();
    checks.extend([(rotated, &ep.secret), (rotated, &old), (&tampered, &ep.secret)]);

    for library in [ReferenceLibrary::TypeScript, ReferenceLibrary::Python] {
        let verdicts = library.verify(&checks);
        let (tampered_verdict, the_rest) = verdicts.split_last().unwrap();
        assert!(the_rest.iter().all(|v| v == "ok"), "{library:?}: {verdicts:?}");
        assert!(
            tampered_verdict.starts_with("WebhookVerificationError")
                && tampered_verdict.contains("No matching signature found"),
            "{library:?}: {tampered_verdict}"
        );
    }
}

/// A publisher with nothing of ours but the public contract: an AMQP client of another language
/// run on a script of tests/clients/, which reads envelopes one per line on stdin.
enum PlainClient {
    /// The README's example: Python's pika (Debian's python3-pika, installed by
    /// scripts/services, so Debian's own python3).
    Pika,
    /// Node's amqplib (tests/browser's npm packages).
    Amqplib,
}

impl PlainClient {
    /// Publishes `lines` through the client and returns once it has exited, having waited for
    /// the broker's confirms.
    fn publish(&self, amqp_url: &str, lines: &[String]) {
        let mut command = match self {
            PlainClient::Pika => script("/usr/bin/python3", "tests/clients/publish_with_pika.py"),
            PlainClient::Amqplib => {
                let mut node = script("node", "tests/clients/publish_with_amqplib.cjs");
                node.env("NODE_PATH", node_packages());
                node
            }
        };
        let out = run_fed(command.arg(amqp_url), lines.join("\n").as_bytes());
        assert!(out.status.success(), "published and confirmed");
    }
}

/// Events published by `client` are delivered as our library's are: every catalog type with
/// the id and timestamp it was given, and a bare envelope without either, which gets an id of
/// its own; each once, signed, with its data.
async fn plain_client_events_are_delivered_signed(client: PlainClient, account: &str) {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    let ep = env.endpoint(account, &rx.url, None).await;
    env.start_dispatcher(&[]);
    // A publisher declares the topology, as `laabam-producer topology` would before plain
    // publishers start.
    drop(env.publisher().await);
    let mut lines: Vec<String> = CATALOG
        .iter()
        .map(|spec| {
            format!(
                r#"{{"id":"evt_plain_{}","type":"{}","account_id":"{account}","timestamp":"2026-12-06T10:00:00.000Z","data":{}}}"#,
                spec.name, spec.name, spec.example
            )
        })
        .collect();
    lines.push(format!(
        r#"{{"type":"payment.failed","account_id":"{account}","data":{{"payment_id":"p","reason":"r"}}}}"#
    ));
    client.publish(&env.amqp_url, &lines);

    wait_until("every event the client published", WAIT, || async {
        rx.count() >= lines.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let requests = rx.requests();
    assert_eq!(requests.len(), lines.len(), "each event once");
    let delivered: HashMap<String, serde_json::Value> = requests
        .iter()
        .map(|req| {
            assert_signed(req, &ep);
            let body = req.json();
            assert_eq!(req.header("webhook-id"), body["id"]);
            (body["id"].as_str().unwrap().to_owned(), body)
        })
        .collect();
    for spec in CATALOG {
        let body = &delivered[&format!("evt_plain_{}", spec.name)];
        assert_eq!(body["type"], spec.name);
        assert_eq!(body["account_id"], account);
        assert_eq!(body["timestamp"], "2026-12-06T10:00:00.000Z");
        let example: serde_json::Value = serde_json::from_str(spec.example).unwrap();
        assert_eq!(body["data"], example, "{} arrives with its data", spec.name);
    }
    let bare: Vec<_> = delivered.keys().filter(|id| !id.starts_with("evt_plain_")).collect();
    assert_eq!(bare.len(), 1, "the bare envelope got an id of its own: {bare:?}");
    assert!(bare[0].starts_with("evt_"), "{bare:?}");
}

/// The README's publishing example, as written (tests/clients/publish_with_pika.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_with_pika_as_the_readme_shows_are_delivered_signed() {
    plain_client_events_are_delivered_signed(PlainClient::Pika, "acct_pika").await;
}

/// The other client the contract names: Node's amqplib (tests/clients/publish_with_amqplib.cjs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_with_node_amqplib_are_delivered_signed() {
    plain_client_events_are_delivered_signed(PlainClient::Amqplib, "acct_amqplib").await;
}
