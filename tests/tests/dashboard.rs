//! The account owner's dashboard in a real headless Chromium (Debian's package, driven by
//! playwright-core) against the running producer, dispatcher and retry scheduler, with real
//! receivers: the browser script (tests/browser/dashboard.mjs) signs in, creates an endpoint,
//! sends test events, watches a failing endpoint's rate drop, redelivers and recovers, rotates
//! the secret, switches language and saves a screenshot of each main page in
//! target/dashboard-screenshots/. The receiver examples the catalog page shows run here as real
//! receivers that answer 401 to a bad signature.

use laabam_tests::ports::free_port;
use laabam_tests::workspace::{node_packages, root};
use laabam_tests::{ApiClient, Captured, Receiver, Reply, TestEnv, wait_until};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ADMIN: &str = "test-operator-token";

/// A child process killed when the test ends, pass or fail.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Registers an endpoint for one of the dashboard's receiver examples and starts the example
/// with the endpoint's secret.
async fn example_receiver(client: &ApiClient, program: &str, file: &str) -> Running {
    let port = free_port();
    let created = client
        .post(
            "/v1/endpoints",
            json!({ "url": format!("http://127.0.0.1:{port}/webhooks"), "description": file }),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.json);
    let child = Command::new(program)
        .arg(root().join("producer/dashboard").join(file))
        .arg(port.to_string())
        .env("WEBHOOK_SECRET", created.json["secret"].as_str().unwrap())
        .env("NODE_PATH", node_packages())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} starts: {e}"));
    let running = Running(child);
    wait_until(&format!("{file} listening"), Duration::from_secs(20), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    running
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_account_owner_runs_their_webhooks_from_the_browser() {
    node_packages();
    let mut env = TestEnv::new().await;
    env.start_dispatcher(&["--retry-max-attempts", "2"]);
    env.start_scheduler(&[]);
    let api = env.start_api(ADMIN).await;
    let (_, owner) = api.new_account(ADMIN, "browser owner").await;
    let (_, examples) = api.new_account(ADMIN, "receiver examples").await;
    let healthy = Receiver::ok().await;
    let failing = Receiver::start(|_, _| Reply::Status(500)).await;
    let _node = example_receiver(&examples, "node", "example-receiver.js").await;
    let _python = example_receiver(&examples, "python3", "example-receiver.py").await;

    let screenshots = root().join("target/dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&screenshots);
    let browser = tokio::process::Command::new("node")
        .arg(root().join("tests/browser/dashboard.mjs"))
        .env("BASE_URL", &api.base)
        .env("OWNER_KEY", owner.token().unwrap())
        .env("EXAMPLES_KEY", examples.token().unwrap())
        .env("OK_URL", &healthy.url)
        .env("FAIL_URL", &failing.url)
        .env("SCREENSHOTS", &screenshots)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), browser)
        .await
        .expect("the browser test finishes within 4 minutes")
        .expect("node runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the browser test failed:\n{log}");

    // What the browser did reached the real receivers, signed.
    let signed = |c: &Captured| c.header("webhook-signature").starts_with("v1,");
    assert!(healthy.requests().iter().all(signed));
    // One test event, then the redelivered and the recovered one, after the URL came back.
    assert_eq!(healthy.count(), 3, "{log}");
    // Two test events failed twice each (two attempts allowed here).
    assert_eq!(failing.count(), 4, "{log}");
    for page in [
        "01-sign-in",
        "03-endpoint",
        "04-webhooks",
        "05-delivery",
        "06-catalog",
        "07-webhooks-vi",
    ] {
        let file = screenshots.join(format!("{page}.png"));
        assert!(
            std::fs::metadata(&file).is_ok_and(|m| m.len() > 5_000),
            "{} was not saved",
            file.display()
        );
    }
}
