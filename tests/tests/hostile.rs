//! Hostile and broken endpoints: every attempt fails with a clear, recorded error within its
//! timeout, reading a bounded amount, and nothing else is held back.

use laabam_shared::clock::now_ms;
use laabam_shared::delivery::Outcome;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::{AccountId, DeliveryId};
use laabam_tests::{Receiver, Reply, TestEnv, wait_finished, wait_until};
use serde_json::value::RawValue;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A raw TCP endpoint that reads the request head and then does `behave` with the socket.
async fn raw_endpoint<F, Fut>(behave: F) -> String
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}/hook", listener.local_addr().unwrap().port());
    let behave = std::sync::Arc::new(behave);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let behave = behave.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut buf).await;
                behave(socket).await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_endpoints_fail_clearly_within_the_timeout() {
    let mut env = TestEnv::new().await;
    let endless = raw_endpoint(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\n\r\n")
            .await;
        let chunk = vec![b'x'; 16 * 1024];
        // A body with no length that never ends: read up to the cap, then dropped.
        for _ in 0..100_000 {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
    })
    .await;
    let trickle = raw_endpoint(|mut s| async move {
        for b in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-slow: " {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let redirect = raw_endpoint(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/elsewhere\r\ncontent-length: 0\r\n\r\n")
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await;
    let garbage = raw_endpoint(|mut s| async move {
        let _ = s.write_all(b"SMTP READY\r\n\r\nthis is not http at all\r\n").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await;
    let healthy = Receiver::ok().await;
    // TLS: a certificate for another name, and one from a CA nobody trusts.
    let wrong_name = Receiver::start_tls(&["not-this-host.example"], |_, _| Reply::Status(200)).await;
    let untrusted = Receiver::start_tls(&["127.0.0.1"], |_, _| Reply::Status(200)).await;

    let mut endpoints = Vec::new();
    for url in [
        &endless,
        &trickle,
        &redirect,
        &garbage,
        &healthy.url,
        &wrong_name.url,
        &untrusted.url,
    ] {
        endpoints.push(env.endpoint("acct_hostile", url, None).await);
    }
    // The dispatcher trusts the wrong-name receiver's CA (so only the name is wrong), not the other's.
    let ca = wrong_name.ca_file.clone().unwrap();
    env.start_dispatcher(&[
        "--http-timeout",
        "1500ms",
        "--retry-max-attempts",
        "1",
        "--extra-ca-file",
        ca.to_str().unwrap(),
    ]);
    let data = RawValue::from_string(r#"{"payment_id":"p","reason":"r"}"#.into()).unwrap();
    let event = Envelope::new(
        "payment.failed",
        AccountId::parse("acct_hostile").unwrap(),
        data,
        None,
        now_ms(),
    )
    .unwrap();
    let published = Instant::now();
    env.publisher().await.publish(&event).await.unwrap();

    let store = env.store().await;
    let expected = [
        (Outcome::Http5xx, "response body"),
        (Outcome::Timeout, "no complete response"),
        (Outcome::Http3xx, ""),
        (Outcome::InvalidResponse, ""),
        (Outcome::Success, ""),
        (Outcome::TlsError, "not valid for name"),
        (Outcome::TlsError, "invalid peer certificate"),
    ];
    for (ep, (outcome, fragment)) in endpoints.iter().zip(expected) {
        let id = DeliveryId::for_pair(&event.id, &ep.id);
        wait_finished(&store, &id).await;
        let attempts = store.attempts(&id).await.unwrap();
        assert_eq!(attempts.len(), 1);
        let a = &attempts[0];
        assert_eq!(a.outcome, outcome, "{}: {a:?}", ep.url.as_str());
        assert!(
            a.duration_ms <= 1_700,
            "{}: within the timeout, took {} ms",
            ep.url.as_str(),
            a.duration_ms
        );
        if !fragment.is_empty() {
            let said = format!(
                "{} {}",
                a.error.as_deref().unwrap_or(""),
                a.response_excerpt.as_deref().unwrap_or("")
            );
            assert!(said.contains(fragment), "{}: {said}", ep.url.as_str());
        }
        if let Some(excerpt) = &a.response_excerpt {
            assert!(excerpt.len() <= 4096, "excerpts are capped");
        }
    }
    assert_eq!(healthy.count(), 1);
    assert!(published.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endpoints_never_hold_back_healthy_ones_nor_exceed_their_limit() {
    let mut env = TestEnv::new().await;
    let never = Receiver::start(|_, _| Reply::After(Duration::from_secs(3600), 200)).await;
    let slow = Receiver::start(|_, _| Reply::After(Duration::from_secs(9), 200)).await;
    let mut healthy = Vec::new();
    for _ in 0..10 {
        healthy.push(Receiver::ok().await);
    }
    for rx in [&never, &slow].into_iter().chain(healthy.iter()) {
        env.endpoint("acct_slow", &rx.url, None).await;
    }
    let limit = 4;
    env.start_dispatcher(&[
        "--http-timeout",
        "10s",
        "--endpoint-concurrency",
        &limit.to_string(),
        "--defer-delay",
        "200ms",
    ]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let events: Vec<Envelope> = (0..200)
        .map(|n| {
            let data = RawValue::from_string(format!(r#"{{"payment_id":"p{n}","reason":"r"}}"#)).unwrap();
            Envelope::new(
                "payment.failed",
                AccountId::parse("acct_slow").unwrap(),
                data,
                None,
                now_ms(),
            )
            .unwrap()
        })
        .collect();
    let started = Instant::now();
    for e in &events {
        publisher.publish(e).await.unwrap();
    }
    for rx in &healthy {
        wait_until(
            "every healthy endpoint has every event",
            Duration::from_secs(30),
            || async { rx.per_event().len() == events.len() },
        )
        .await;
    }
    let healthy_done = started.elapsed();
    println!("200 events to 10 healthy endpoints in {healthy_done:?} beside a hung and a 9 s endpoint");
    assert!(
        healthy_done < Duration::from_secs(9),
        "healthy endpoints finished while the slow ones were still pending"
    );
    assert!(
        never.peak_concurrency() <= limit,
        "the hung endpoint held {} requests",
        never.peak_concurrency()
    );
    assert!(
        slow.peak_concurrency() <= limit,
        "the slow endpoint held {} requests",
        slow.peak_concurrency()
    );
    assert!(
        never.count() <= limit && slow.count() <= limit,
        "no more requests than the limit while they hang"
    );
}
