//! The operator's view: the deploy/ Prometheus rules and Grafana dashboard, evaluated by a real
//! Prometheus scraping the real processes under load with injected failures.

use laabam_tests::ports::free_port;
use laabam_tests::{ApiClient, Receiver, Reply, TestEnv, wait_until};
use lapin::BasicProperties;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn deploy(file: &str) -> PathBuf {
    laabam_tests::workspace::root().join("deploy").join(file)
}

fn tool(name: &str) -> &str {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success());
    assert!(
        found.unwrap_or(false),
        "{name} is missing: scripts/services installs it (Debian package prometheus)"
    );
    name
}

#[test]
fn promtool_accepts_the_config_and_the_alert_unit_tests_pass() {
    for args in [
        ["check", "config", "prometheus/prometheus.yml"],
        ["check", "rules", "prometheus/alerts.yml"],
        ["test", "rules", "prometheus/alerts.test.yml"],
    ] {
        let file = deploy(args[2]);
        let args = [args[0], args[1], file.to_str().unwrap()];
        let out = Command::new(tool("promtool")).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A Prometheus of the test's own, killed when dropped.
struct Prometheus {
    child: Child,
    api: ApiClient,
    _dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

impl Prometheus {
    fn start(jobs: &[(&str, u16)]) -> Self {
        let dir = std::env::temp_dir().join(format!("laabam-prom-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).unwrap();
        let scrape: String = jobs
            .iter()
            .map(|(job, port)| {
                format!("  - job_name: {job}\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n")
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n{scrape}",
            deploy("prometheus/alerts.yml").display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            child,
            api: ApiClient::new(&format!("http://127.0.0.1:{port}")),
            _dir: dir,
        }
    }

    /// An instant query: the result vector.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let encoded: String = expr
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let answer = self.api.get(&format!("/api/v1/query?query={encoded}")).await;
        assert_eq!(answer.json["status"], "success", "{expr}: {:?}", answer.json);
        answer.json["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    async fn value(&self, expr: &str) -> f64 {
        let result = self.query(expr).await;
        assert_eq!(result.len(), 1, "{expr} should give one series: {result:?}");
        result[0]["value"][1].as_str().unwrap().parse().unwrap()
    }
}

/// Metric names in a text of expressions: `laabam_…` and `process_…` identifiers.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if (rest.starts_with("laabam_") || rest.starts_with("process_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
        {
            let len = rest
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            names.insert(rest[..len].to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_evaluate_to_what_the_traffic_implies() {
    let mut env = TestEnv::new().await;
    let (_, key) = env.account_with_key("observed").await;

    let (api_port, producer_port, dispatcher_port, scheduler_port) =
        (free_port(), free_port(), free_port(), free_port());
    let api_flags = env.producer_flags(
        api_port,
        &format!("127.0.0.1:{producer_port}"),
        &["--allow-private-targets", "true"],
    );
    env.spawn_binary("laabam-producer", &api_flags);
    let mut flags = env.dispatcher_flags(&["--metrics-per-endpoint", "true", "--retry-max-attempts", "10"]);
    flags.extend(["--metrics-addr".into(), format!("127.0.0.1:{dispatcher_port}")]);
    env.spawn_binary("laabam-dispatcher", &flags);
    let mut flags = env.scheduler_flags(&[]);
    flags.extend(["--metrics-addr".into(), format!("127.0.0.1:{scheduler_port}")]);
    env.spawn_binary("laabam-retry-scheduler", &flags);
    let prometheus = Prometheus::start(&[
        ("laabam-producer", producer_port),
        ("laabam-dispatcher", dispatcher_port),
        ("laabam-retry-scheduler", scheduler_port),
    ]);

    for port in [api_port, producer_port, dispatcher_port, scheduler_port] {
        wait_until("the process listens", Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
    }
    let api = ApiClient::new(&format!("http://127.0.0.1:{api_port}"));
    wait_until("the API is ready", Duration::from_secs(30), || async {
        api.get("/readyz").await.status == 200
    })
    .await;
    let client = api.with_token(&key);
    let healthy = Receiver::ok().await;
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    // Fails every 10th request it receives: a 10%-failing endpoint.
    let flaky = Receiver::start(move |_, _| {
        if counter.fetch_add(1, Ordering::SeqCst) % 10 == 9 {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let mut endpoint_ids = Vec::new();
    for url in [&healthy.url, &flaky.url] {
        let created = client.post("/v1/endpoints", json!({ "url": url })).await;
        assert_eq!(created.status, 201, "{:?}", created.json);
        endpoint_ids.push(created.json["id"].as_str().unwrap().to_owned());
    }

    // Steady load: 25 events/s for 16 s over HTTP, and one poison message near the end.
    let types = ["invoice.created", "invoice.paid", "customer.created", "payment.failed"];
    let examples: Vec<Value> = types
        .iter()
        .map(|t| serde_json::from_str(laabam_shared::catalog::lookup(t).unwrap().example).unwrap())
        .collect();
    let events = 400;
    for n in 0..events {
        let answer = client
            .post("/v1/events", json!({ "type": types[n % 4], "data": examples[n % 4] }))
            .await;
        assert_eq!(answer.status, 202);
        if n == events - 50 {
            poison(&env).await;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    wait_until("every event at both endpoints", Duration::from_secs(60), || async {
        healthy.per_event().len() == events && flaky.per_event().len() == events
    })
    .await;
    // Let Prometheus scrape the final counts and evaluate the rules.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Every dashboard query returns data.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/dashboards/laabam-webhooks.json")).unwrap())
            .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().replace("$__rate_interval", "1m"))
        })
        .collect();
    for expr in &exprs {
        assert!(
            !prometheus.query(expr).await.is_empty(),
            "dashboard query returned nothing: {expr}"
        );
    }

    // Values match the traffic: the flaky endpoint answered 90% of requests with 2xx.
    let requests = (healthy.count() + flaky.count()) as f64;
    let ok = (healthy.count() + flaky.count() - flaky.count() / 10) as f64;
    let overall = prometheus.value(&exprs[0]).await;
    println!("success rate: Prometheus {overall:.4}, receivers {:.4}", ok / requests);
    assert!(
        (overall - ok / requests).abs() < 0.03,
        "overall success rate {overall} vs {}",
        ok / requests
    );
    for series in prometheus.query(&exprs[2]).await {
        let rate: f64 = series["value"][1].as_str().unwrap().parse().unwrap();
        let expected = if series["metric"]["endpoint_id"] == endpoint_ids[0].as_str() {
            1.0
        } else {
            0.9
        };
        assert!(
            (rate - expected).abs() < 0.04,
            "endpoint {}: {rate} vs {expected}",
            series["metric"]["endpoint_id"]
        );
    }
    for series in prometheus.query(&exprs[1]).await {
        let rate: f64 = series["value"][1].as_str().unwrap_or("NaN").parse().unwrap_or(f64::NAN);
        assert!(rate.is_nan() || (0.85..=1.0).contains(&rate), "by type: {series:?}");
    }
    assert!(
        prometheus
            .value("sum(rate(laabam_producer_events_published_total{result=\"confirmed\"}[1m]))")
            .await
            > 3.0
    );
    assert_eq!(
        prometheus
            .value("sum(laabam_api_requests_total{method=\"POST\",route=\"/v1/events\",status=\"202\"})")
            .await,
        events as f64,
        "every publish over the API counted by its route and status"
    );
    assert_eq!(prometheus.value("sum(laabam_dispatcher_consuming)").await, 1.0);
    assert_eq!(
        prometheus.value("max(laabam_scheduler_retry_shards)").await,
        1.0,
        "one shard, as configured"
    );
    // The 250 ms slot wait, stretched (at most eightfold) only if the machine is saturated.
    let budget = prometheus.value("laabam_dispatcher_slot_wait_budget_seconds").await;
    assert!((0.25..=2.0).contains(&budget), "wait budget {budget} s");
    assert!(
        prometheus
            .value(
                "histogram_quantile(0.99, sum by (le) (rate(laabam_dispatcher_attempt_duration_seconds_bucket[1m])))"
            )
            .await
            < 1.0
    );
    // Records and arrivals leave in batches of one to sixty-four.
    for items in ["records", "arrivals"] {
        let per_call = prometheus
            .value(&format!(
                "sum(rate(laabam_dispatcher_{items}_per_redis_call_sum[1m])) / sum(rate(laabam_dispatcher_{items}_per_redis_call_count[1m]))"
            ))
            .await;
        assert!((1.0..=64.0).contains(&per_call), "{items} per Redis call {per_call}");
    }
    assert_eq!(
        prometheus
            .query("process_resident_memory_bytes{job=~\"laabam-.*\"}")
            .await
            .len(),
        3
    );

    // Alerts: dead letters fire; the others stay quiet on this traffic.
    wait_until("the dead-letter alert fires", Duration::from_secs(20), || async {
        !prometheus
            .query("ALERTS{alertname=\"LaabamDeadLetters\",reason=\"unknown_type\"}")
            .await
            .is_empty()
    })
    .await;
    let rules: String = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    for quiet in [
        "LaabamDeliverySuccessRateLow",
        "LaabamRetryBacklogGrowing",
        "LaabamRetryDueLagHigh",
        "LaabamNoDispatcherConsuming",
        "LaabamApiServerErrors",
    ] {
        assert!(
            prometheus
                .query(&format!("ALERTS{{alertname=\"{quiet}\"}}"))
                .await
                .is_empty(),
            "{quiet} should not fire"
        );
    }

    // Every metric a dashboard or rule names is exported by some process.
    let mut exported = BTreeSet::new();
    for port in [producer_port, dispatcher_port, scheduler_port] {
        let text = laabam_tests::api::plain_text(&format!("http://127.0.0.1:{port}/metrics")).await;
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            exported.insert(line.split_whitespace().nth(2).unwrap().to_owned());
        }
    }
    let referenced = metric_names(&format!("{}\n{rules}", exprs.join("\n")));
    for name in &referenced {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            exported.contains(name) || exported.contains(base),
            "{name} is named by deploy/ but exported by no process"
        );
    }
    println!(
        "{} metrics referenced by the dashboard and rules, all exported",
        referenced.len()
    );
}

async fn poison(env: &TestEnv) {
    let body = br#"{"type":"invoice.exploded","account_id":"acct_x","data":{}}"#;
    env.plain_publish("invoice.exploded", body, BasicProperties::default())
        .await;
}

/// Each process measures its clock against Redis's and says how far off it is. A scheduler
/// started 30 s ahead (libfaketime) reports about -30 s and warns; one beside it on this host's
/// clock reports about 0 and does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_whose_clock_is_off_says_by_how_much() {
    let mut env = TestEnv::new().await;
    let logs = std::env::temp_dir().join(format!("laabam-clock-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&logs).unwrap();
    let mut reported = Vec::new();
    for (name, shift) in [("ahead", Some("+30s")), ("in-step", None)] {
        let addr = format!("127.0.0.1:{}", free_port());
        let flags = env.scheduler_flags(&["--metrics-addr", &addr]);
        let log = logs.join(name);
        match shift {
            Some(by) => env.spawn_binary_on_clock("laabam-retry-scheduler", &flags, by, Some(&log)),
            None => env.spawn_binary_with("laabam-retry-scheduler", &flags, &[("RUST_LOG", "warn")], Some(&log)),
        };
        reported.push((offset_reported(&addr).await, log));
    }
    let warned = |log: &PathBuf| {
        std::fs::read_to_string(log)
            .unwrap()
            .contains("clock and Redis's differ")
    };
    let (ahead, in_step) = (&reported[0], &reported[1]);
    println!("offsets reported: {:.3} s ahead, {:.3} s in step", ahead.0, in_step.0);
    assert!((ahead.0 + 30.0).abs() < 1.0, "30 s ahead, reported {}", ahead.0);
    assert!(warned(&ahead.1), "the process ahead warns");
    assert!(in_step.0.abs() < 0.5, "in step, reported {}", in_step.0);
    assert!(!warned(&in_step.1), "the process in step does not warn");
    std::fs::remove_dir_all(&logs).unwrap();
}

/// `laabam_clock_offset_seconds` of the process serving operations on `addr`, once exported.
async fn offset_reported(addr: &str) -> f64 {
    const NAME: &str = "laabam_clock_offset_seconds";
    wait_until("the clock offset exported", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
            && laabam_tests::api::plain_text(&format!("http://{addr}/metrics"))
                .await
                .contains(NAME)
    })
    .await;
    laabam_tests::api::metric(addr, NAME).await
}
