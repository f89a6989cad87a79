//! The load generator: events of the benchmark account, published through our `Publisher`
//! with confirms, as fast as possible or paced.

use laabam_producer::Publisher;
use laabam_shared::clock::now_ms;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::AccountId;
use laabam_shared::topology;
use laabam_tests::TestEnv;
use laabam_tests::env::invoice_paid;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) fn events(n: usize) -> Vec<Envelope> {
    let account = AccountId::parse("acct_bench").unwrap();
    (0..n).map(|i| invoice_paid(&account, i, now_ms())).collect()
}

/// Publishes with `concurrency` tasks, each awaiting its confirms; optionally paced to `rate`/s.
pub(crate) async fn publish(publisher: Arc<Publisher>, events: Vec<Envelope>, concurrency: usize, rate: Option<f64>) {
    let events = Arc::new(events);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (publisher, events) = (publisher.clone(), events.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < events.len() {
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let mut e = events[i].clone();
                e.timestamp = laabam_shared::clock::format_rfc3339_ms(now_ms());
                publisher.publish(&e).await.expect("confirmed");
                i += concurrency;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

pub(crate) async fn publisher(env: &TestEnv, queues: u16) -> Arc<Publisher> {
    Arc::new(
        Publisher::connect(
            &env.amqp_url,
            Duration::from_secs(10),
            topology::Layout {
                dispatch_queues: queues,
            },
        )
        .await
        .expect("RabbitMQ reachable"),
    )
}
