//! The `laabam-producer` command line: JSON on stdout, human messages on stderr, one clear
//! line when something is wrong; and every process's settings, refused at start when they
//! cannot work.

use laabam_tests::env::binary;
use laabam_tests::{Receiver, TestEnv, wait_until};
use serde_json::Value;
use std::process::{Command, Output};
use std::time::Duration;

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_endpoints_and_publish_from_the_shell() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;

    let topology = json(&env.producer(&["topology"]));
    assert!(
        topology["exchanges"]
            .as_array()
            .unwrap()
            .contains(&Value::from("laabam.events"))
    );

    let created = json(&env.producer(&[
        "endpoint",
        "create",
        "--account",
        "acct_cli",
        "--url",
        &rx.url,
        "--events",
        "invoice.paid,payment.failed",
    ]));
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ep_"));
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(created["events"], serde_json::json!(["invoice.paid", "payment.failed"]));

    let listed = json(&env.producer(&["endpoint", "list", "--account", "acct_cli"]));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(listed[0].get("secret").is_none(), "lists never show secrets");

    env.start_dispatcher(&[]);
    let published = json(&env.producer(&[
        "publish",
        "--account",
        "acct_cli",
        "--type",
        "invoice.paid",
        "--data",
        r#"{"invoice_id":"inv_1","payment_id":"pay_1","amount":50000}"#,
    ]));
    let event_id = published["id"].as_str().unwrap().to_owned();
    wait_until("the CLI's event delivered", Duration::from_secs(20), || async {
        rx.count() == 1
    })
    .await;
    assert_eq!(rx.requests()[0].header("webhook-id"), event_id);
    assert_eq!(rx.requests()[0].json()["data"]["amount"], 50000);

    let deleted = json(&env.producer(&["endpoint", "delete", "--id", &id]));
    assert_eq!(deleted["deleted"], true);
    assert_eq!(
        json(&env.producer(&["endpoint", "list", "--account", "acct_cli"])),
        serde_json::json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_missing_services_get_one_clear_line() {
    let env = TestEnv::new().await;
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "publish",
                "--account",
                "a",
                "--type",
                "invoice.exploded",
                "--data",
                "{}",
            ],
            "unknown event type \"invoice.exploded\"",
        ),
        (
            &[
                "publish",
                "--account",
                "a",
                "--type",
                "invoice.paid",
                "--data",
                r#"{"invoice_id":"i","payment_id":"p","amount":"x"}"#,
            ],
            "data.amount: must be an integer",
        ),
        (
            &["publish", "--account", "a", "--type", "invoice.paid", "--data", "{oops"],
            "--data is not valid JSON",
        ),
        (
            &["endpoint", "create", "--account", "a", "--url", "ftp://example.com/"],
            "must be an absolute http:// or https:// URL",
        ),
        (
            &[
                "endpoint",
                "create",
                "--account",
                "a",
                "--url",
                "https://example.com/",
                "--events",
                "nope",
            ],
            "unknown event type \"nope\"",
        ),
    ];
    for (args, expected) in cases {
        let out = env.producer(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
    let out = Command::new(binary("laabam-producer"))
        .args([
            "--amqp-url",
            "amqp://guest:secretpw@127.0.0.1:1/%2f",
            "--connect-timeout",
            "1s",
            "topology",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("could not reach RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f within 1s"),
        "{stderr}"
    );
    assert!(!stderr.contains("secretpw"), "no password in errors");
    let out = Command::new(binary("laabam-dispatcher"))
        .args([
            "--redis-url",
            "redis://127.0.0.1:1",
            "--amqp-url",
            &env.amqp_url,
            "--connect-timeout",
            "1s",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("could not reach Redis at redis://127.0.0.1:1 within 1s"),
        "{stderr}"
    );
}

/// A malformed URL is a setting that cannot work, refused at once (exit code 2) and named as it
/// was set; it used to be retried as an unreachable service for the whole connect timeout. A
/// refused secret (a key, a URL with its password) is named without its value, which is often
/// one typo from the real one.
#[test]
fn malformed_urls_and_secrets_are_refused_at_start_without_their_values() {
    let refused = |args: &[&str], variables: &[(&str, &str)]| {
        let out = Command::new(binary("laabam-dispatcher"))
            .args(args)
            .envs(variables.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(!stderr.contains("secretpw"), "{stderr}");
        stderr
    };
    let stderr = refused(&["--amqp-url", "htp://guest:secretpw@127.0.0.1/%2f"], &[]);
    assert!(
        stderr.contains("invalid value '(hidden)' for '--amqp-url <AMQP_URL>': not an AMQP URL"),
        "{stderr}"
    );
    let stderr = refused(&[], &[("LAABAM_REDIS_URL", "redix://:secretpw@127.0.0.1")]);
    assert!(stderr.contains("for 'LAABAM_REDIS_URL': not a Redis URL"), "{stderr}");
    let stderr = refused(&[], &[("LAABAM_SECRET_KEY", "whsec_secretpw")]);
    assert!(stderr.contains("for 'LAABAM_SECRET_KEY'"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_bootstrap_accounts_and_keys_without_the_api() {
    let mut env = TestEnv::new().await;
    let account = json(&env.producer(&["account", "create", "--name", "Acme Billing"]));
    let id = account["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("acct_"));
    assert_eq!(account["name"], "Acme Billing");
    let key = json(&env.producer(&["key", "create", "--account", &id]));
    let key = key["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("lbk_"));
    let out = env.producer(&["key", "create", "--account", "acct_nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no account acct_nobody"));

    // The key works against the API, scoped to its account.
    let api = env.start_api("cli-operator").await.with_token(&key);
    let created = api
        .post(
            "/v1/endpoints",
            serde_json::json!({ "url": "https://example.com/hooks" }),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.json);
    let listed = json(&env.producer(&["endpoint", "list", "--account", &id]));
    assert_eq!(listed[0]["id"], created.json["id"]);
}

/// A process, its flags and variables, and what its refusal says.
type Refusal = (
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static str,
);

/// Each of these once started: a scheduler with `--batch 0` claimed nothing at full speed,
/// round after round; the rest failed every attempt, cut requests short at once, retried at
/// once, published jobs twice, gave up connecting on the first try, or were quietly taken as 1
/// (a poll of 0 as 1 ms). Refused, the process exits 2 before it connects to anything (the services given are
/// unreachable, so a setting let through fails differently: with exit code 1 within a second).
/// The refusal names a setting as it was set: by its variable when the value came from there
/// (a manifest sets only variables), by its flag when typed (a typed flag wins).
#[test]
fn settings_that_cannot_work_are_refused_before_anything_starts() {
    let unreachable = [
        "--amqp-url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "--redis-url",
        "redis://127.0.0.1:1",
    ];
    let cases: [Refusal; 18] = [
        (
            "laabam-retry-scheduler",
            &["--batch", "0"],
            &[],
            "0 is not in 1..=10000",
        ),
        (
            "laabam-retry-scheduler",
            &[],
            &[("LAABAM_SCHEDULER_BATCH", "10001")],
            "'10001' for 'LAABAM_SCHEDULER_BATCH': 10001 is not in 1..=10000",
        ),
        (
            "laabam-retry-scheduler",
            &["--claim-lease", "500ms"],
            &[],
            "\"500ms\" is shorter than 1s, the least allowed",
        ),
        (
            "laabam-retry-scheduler",
            &["--poll", "0s"],
            &[],
            "\"0s\" is shorter than 1ms, the least allowed",
        ),
        (
            "laabam-dispatcher",
            &["--http-timeout", "0s"],
            &[],
            "'0s' for '--http-timeout",
        ),
        (
            "laabam-dispatcher",
            &["--defer-delay", "0ms"],
            &[],
            "'0ms' for '--defer-delay",
        ),
        (
            "laabam-dispatcher",
            &["--slot-wait", "0s"],
            &[],
            "'0s' for '--slot-wait",
        ),
        (
            "laabam-producer",
            &["topology"],
            &[("LAABAM_CONNECT_TIMEOUT", "0s")],
            "'0s' for 'LAABAM_CONNECT_TIMEOUT': \"0s\" must be longer than 0",
        ),
        (
            "laabam-dispatcher",
            &[],
            &[("LAABAM_MAX_IN_FLIGHT", "0")],
            "'0' for 'LAABAM_MAX_IN_FLIGHT': 0 is not in 1..=1000000",
        ),
        (
            "laabam-producer",
            &["serve", "--api-rate-limit", "0"],
            &[],
            "'0' for '--api-rate-limit",
        ),
        (
            "laabam-dispatcher",
            &[],
            &[("LAABAM_RETRY_FIRST_DELAY", "0s")],
            "'0s' for 'LAABAM_RETRY_FIRST_DELAY': \"0s\" must be longer than 0",
        ),
        (
            "laabam-dispatcher",
            &["--retry-max-delay", "0s"],
            &[],
            "'0s' for '--retry-max-delay",
        ),
        (
            "laabam-dispatcher",
            &["--retry-first-delay", "10s", "--retry-max-delay", "1s"],
            &[],
            "--retry-max-delay (1s) is shorter than --retry-first-delay (10s)",
        ),
        (
            "laabam-dispatcher",
            &["--retention", "1d"],
            &[],
            "--retention (1day) is shorter than --retry-max-age (3days)",
        ),
        (
            "laabam-producer",
            &["serve", "--api-timeout", "0s"],
            &[],
            "'0s' for '--api-timeout",
        ),
        (
            "laabam-producer",
            &["serve"],
            &[("LAABAM_API_TIMEOUT", "0s")],
            "'0s' for 'LAABAM_API_TIMEOUT'",
        ),
        (
            "laabam-dispatcher",
            &["--slot-wait", "0s"],
            &[("LAABAM_SLOT_WAIT", "250ms")],
            "'0s' for '--slot-wait",
        ),
        (
            "laabam-dispatcher",
            &[],
            &[("LAABAM_RETENTION", "1d")],
            "LAABAM_RETENTION (1day) is shorter than --retry-max-age (3days)",
        ),
    ];
    for (name, args, vars, expected) in cases {
        let mut command = Command::new(binary(name));
        // The producer's connection flags belong before its subcommand.
        command
            .args(unreachable)
            .args(args)
            .env("LAABAM_CONNECT_TIMEOUT", "1s")
            .envs(vars.iter().copied());
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} {args:?} {vars:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{name} {args:?}: {stderr}");
        assert!(stderr.contains(expected), "{name} {args:?} {vars:?}: {stderr}");
    }
}
