//! `baseline`: the bare pipeline the machine's practical limit is read from.

use crate::load::{events, publish};
use crate::measure::{Meter, Run, latencies};
use crate::roles::{self, Role};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use laabam_shared::clock::now_ms;
use laabam_shared::signing::Secret;
use laabam_shared::topology;
use laabam_tests::{Receiver, TestEnv, wait_until};
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `baseline`, or `baseline at R/s` when paced.
pub(crate) fn baseline_name(rate: Option<f64>) -> String {
    rate.map_or_else(|| "baseline".into(), |r| format!("baseline at {r:.0}/s"))
}

/// The bare pipeline: one queue, consume, sign, POST, ack; no records, no retries. It consumes
/// the project's own dispatch queue, so the broker does the same routing and queueing work as
/// in `throughput` (a queue of its own would leave the dispatch queue bound too, and every
/// publish would be written to both). Paced at `rate`, it is the floor `latency` is read
/// against: what publish to receive costs on this host with nothing of ours in the path.
pub(crate) async fn baseline(n: usize, rate: Option<f64>) -> Run {
    let env = TestEnv::new().await;
    let rx = Role::Receiver.run(Receiver::ok()).await;
    env.declare_topology().await;
    // Opened on the pipeline's threads, so the connection's own tasks (decoding deliveries,
    // sending acks) run, and are counted, there.
    let before = roles::threads();
    let amqp_url = env.amqp_url.clone();
    let (conn, mut consumer) = Role::Pipeline
        .run(async move {
            let conn = laabam_shared::startup::amqp_connect(&amqp_url, "baseline")
                .await
                .unwrap();
            let channel = conn.create_channel().await.unwrap();
            channel.basic_qos(1024, Default::default()).await.unwrap();
            let consumer = channel
                .basic_consume(
                    topology::DISPATCH_QUEUE.into(),
                    "b".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            (conn, consumer)
        })
        .await;
    Role::Pipeline.adopt_broker_threads(&before);
    let secret = Secret::generate();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let url: hyper::Uri = rx.url.parse().unwrap();
    let worker = Role::Pipeline.spawn(async move {
        let sem = Arc::new(tokio::sync::Semaphore::new(1024));
        while let Some(Ok(delivery)) = consumer.next().await {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let (client, url, secret) = (client.clone(), url.clone(), secret.clone());
            tokio::spawn(async move {
                let ts = now_ms() / 1000;
                let sig = secret.sign("id", ts, &delivery.data);
                let req = hyper::Request::post(url)
                    .header("content-type", "application/json")
                    .header("webhook-signature", sig)
                    .body(Full::new(Bytes::from(delivery.data.clone())))
                    .unwrap();
                let _ = client.request(req).await;
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                drop(permit);
            });
        }
    });
    let publisher = Arc::new(env.publisher().await);
    let meter = Meter::start(&[]);
    let started = Instant::now();
    publish(publisher, events(n), 128, rate).await;
    wait_until("every delivery", Duration::from_secs(600), || async { rx.count() >= n }).await;
    let seconds = started.elapsed().as_secs_f64();
    let (usage, redis_bytes, traffic) = meter.stop(&[]);
    worker.abort();
    let _ = conn.close(200, "done".into()).await;
    println!(
        "  receivers: {} connections accepted (keep-alive reuses the rest)",
        rx.connections()
    );
    Run {
        scenario: baseline_name(rate),
        deliveries: n,
        seconds,
        lat: latencies(&[rx]),
        usage,
        redis_bytes,
        traffic,
        extra: json!({}),
    }
}
