//! A test's namespace and the components running in it.

use laabam_dispatcher::DispatcherConfig;
use laabam_producer::Publisher;
use laabam_retry_scheduler::SchedulerConfig;
use laabam_shared::clock::now_ms;
use laabam_shared::endpoint::{Endpoint, NewEndpoint};
use laabam_shared::ids::AccountId;
use laabam_shared::store::{Account, DISPATCHER_SEEN_EVERY, Store, StoreConfig};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const AMQP_BASE: &str = "amqp://guest:guest@127.0.0.1:5672";
const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Test logs go through the test writer (shown only for failing tests); `RUST_LOG` tunes them.
pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Runs `rabbitmqctl` with `args`, which must succeed; returns what it printed.
pub(crate) fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("rabbitmqctl runs (is RabbitMQ installed? see scripts/services)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One test's own RabbitMQ vhost and Redis prefix. Dropping it stops what it started and
/// removes both, so tests run in parallel and leave nothing behind.
#[derive(Debug)]
pub struct TestEnv {
    pub name: String,
    pub amqp_url: String,
    pub redis_url: String,
    pub prefix: String,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    children: Vec<Child>,
    /// The `/metrics` of the API started last in this process.
    api_metrics: Option<String>,
}

/// Settings a test changes from the fast test defaults (as extra command-line flags).
pub type Flags<'a> = &'a [&'a str];

impl TestEnv {
    pub async fn new() -> Self {
        init_logs();
        let name = format!("laabam-test-{}", ulid::Ulid::new().to_string().to_lowercase());
        let vhost = name.clone();
        tokio::task::spawn_blocking(move || {
            rabbitmqctl(&["add_vhost", &vhost]);
            rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        })
        .await
        .expect("vhost setup");
        TestEnv {
            amqp_url: format!("{AMQP_BASE}/{name}"),
            redis_url: REDIS_URL.to_owned(),
            prefix: format!("{name}:"),
            name,
            stop: CancellationToken::new(),
            tasks: Vec::new(),
            children: Vec::new(),
            api_metrics: None,
        }
    }

    /// Runs `laabam-producer` with this environment's connections and `args`, to its end.
    pub fn producer(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("laabam-producer"))
            .args(self.connection_flags())
            .args(args)
            .output()
            .expect("laabam-producer runs")
    }

    /// The connection flags every component of this test shares.
    pub fn connection_flags(&self) -> Vec<String> {
        [
            "--amqp-url",
            &self.amqp_url,
            "--redis-url",
            &self.redis_url,
            "--redis-prefix",
            &self.prefix,
            "--connect-timeout",
            "10s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Connection flags plus a free metrics port, for the long-running components.
    pub fn common_flags(&self) -> Vec<String> {
        let mut flags = self.connection_flags();
        flags.extend(["--metrics-addr".to_owned(), "127.0.0.1:0".to_owned()]);
        flags
    }

    /// `laabam-producer serve` flags: the API on `api_port`, its metrics on `metrics_addr`
    /// (`127.0.0.1:0` where the test does not read them), then the test's own.
    pub fn producer_flags(&self, api_port: u16, metrics_addr: &str, extra: Flags<'_>) -> Vec<String> {
        let mut flags = self.connection_flags();
        flags.extend(
            [
                "serve",
                "--http-addr",
                &format!("127.0.0.1:{api_port}"),
                "--metrics-addr",
                metrics_addr,
            ]
            .map(String::from),
        );
        flags.extend(extra.iter().map(|s| s.to_string()));
        flags
    }

    /// Dispatcher flags: millisecond-scale retries, short timeouts, then the test's own.
    pub fn dispatcher_flags(&self, extra: Flags<'_>) -> Vec<String> {
        let mut flags = self.common_flags();
        flags.extend(
            [
                "--retry-first-delay",
                "100ms",
                "--retry-max-delay",
                "400ms",
                "--retry-max-attempts",
                "5",
                "--http-timeout",
                "2s",
                "--lease-margin",
                "1s",
                "--defer-delay",
                "50ms",
                "--allow-private-targets",
                "true",
            ]
            .iter()
            .chain(extra)
            .map(|s| s.to_string()),
        );
        flags
    }

    pub fn scheduler_flags(&self, extra: Flags<'_>) -> Vec<String> {
        let mut flags = self.common_flags();
        flags.extend(
            ["--poll", "20ms", "--claim-lease", "2s"]
                .iter()
                .chain(extra)
                .map(|s| s.to_string()),
        );
        flags
    }

    pub async fn store(&self) -> Store {
        self.store_sealed(None, None).await
    }

    /// An account and one API key of it (as shown once), made in the store directly: for a test
    /// that starts an API of its own and needs a caller before it answers.
    pub async fn account_with_key(&self, name: &str) -> (Account, String) {
        let store = self.store().await;
        let account = store
            .create_account(name, None, now_ms())
            .await
            .expect("account created");
        let (key, _) = store.create_api_key(&account.id, now_ms()).await.expect("key issued");
        (account, key)
    }

    /// A plain Redis connection, for a test that reads or plants keys the store does not expose
    /// (keys under [`TestEnv::prefix`] go when the environment is dropped).
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .expect("Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("Redis connection")
    }

    /// A store that seals endpoint secrets with `key` (and opens with `previous` too).
    pub async fn store_sealed(&self, key: Option<&str>, previous: Option<&str>) -> Store {
        let config = StoreConfig {
            secret_key: key.map(str::to_owned),
            secret_key_previous: previous.map(str::to_owned),
            ..self.store_config()
        };
        Self::connect_store(&config).await
    }

    /// The configuration of [`TestEnv::store`], for a test that changes a setting.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            url: self.redis_url.clone(),
            prefix: self.prefix.clone(),
            retry_shards: 1,
            retention: Duration::from_secs(3600),
            history_per_endpoint: 10_000,
            arrival_linger: Duration::ZERO,
            secret_key: None,
            secret_key_previous: None,
        }
    }

    /// A store with a changed configuration (see [`TestEnv::store_config`]); panics if Redis
    /// cannot be reached, which no test can go on without.
    pub async fn connect_store(config: &StoreConfig) -> Store {
        Store::connect(config, Duration::from_secs(10))
            .await
            .expect("Redis reachable")
    }

    pub async fn publisher(&self) -> Publisher {
        Publisher::connect(&self.amqp_url, Duration::from_secs(10), Default::default())
            .await
            .expect("RabbitMQ reachable")
    }

    /// Registers an endpoint directly in the store.
    pub async fn endpoint(&self, account: &str, url: &str, events: Option<&[&str]>) -> Endpoint {
        let ep = new_endpoint(account, url, events);
        self.store().await.create_endpoint(&ep, None).await.expect("stored");
        ep
    }

    /// Runs a dispatcher in this process until the environment is dropped.
    pub fn start_dispatcher(&mut self, extra: Flags<'_>) {
        let flags = self.dispatcher_flags(extra);
        self.start_in_process::<DispatcherConfig, _, _>(flags, laabam_dispatcher::run);
    }

    /// Runs `n` dispatchers in this process, returning once each has heard that all run (they
    /// say so in Redis every `DISPATCHER_SEEN_EVERY`).
    pub async fn start_dispatchers_together(&mut self, n: usize, extra: Flags<'_>) {
        for _ in 0..n {
            self.start_dispatcher(extra);
        }
        let store = self.store().await;
        let conn = self.redis().await;
        let running = store.keys().dispatchers();
        crate::wait_until("the dispatchers say they run", Duration::from_secs(10), || {
            let mut conn = conn.clone();
            let running = running.clone();
            async move {
                redis::AsyncCommands::zcard::<_, usize>(&mut conn, &running)
                    .await
                    .unwrap()
                    == n
            }
        })
        .await;
        // Each has heard of the others by its next round.
        tokio::time::sleep(2 * DISPATCHER_SEEN_EVERY).await;
    }

    /// Runs a retry scheduler in this process until the environment is dropped.
    pub fn start_scheduler(&mut self, extra: Flags<'_>) {
        let flags = self.scheduler_flags(extra);
        self.start_in_process::<SchedulerConfig, _, _>(flags, laabam_retry_scheduler::run);
    }

    /// Parses `flags` exactly as the binary would and runs the component's `run`.
    fn start_in_process<C, Fut, E>(&mut self, flags: Vec<String>, run: fn(C, CancellationToken) -> Fut)
    where
        C: clap::Parser + Send + 'static,
        Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let config = C::parse_from(std::iter::once("laabam".to_owned()).chain(flags));
        let stop = self.stop.child_token();
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = run(config, stop).await {
                panic!("component failed to start: {e}");
            }
        }));
    }

    /// Serves the HTTP API in this process; returns a client without credentials.
    pub async fn start_api(&mut self, admin_token: &str) -> crate::ApiClient {
        self.start_api_with(admin_token, &[]).await
    }

    /// What the API started last in this process reports on its operations port's `/metrics`,
    /// with the metrics of every component in this process.
    pub async fn api_metrics(&self) -> String {
        let url = self.api_metrics.as_deref().expect("an API was started");
        crate::api::plain_text(url).await
    }

    /// [`Self::start_api`] with extra flags (later flags win).
    pub async fn start_api_with(&mut self, admin_token: &str, extra: Flags<'_>) -> crate::ApiClient {
        use clap::Parser;
        #[derive(clap::Parser)]
        #[command(args_override_self = true)]
        struct Serve {
            #[command(flatten)]
            common: laabam_shared::config::CommonArgs,
            #[command(flatten)]
            serve: laabam_producer::api::ServeArgs,
        }
        let mut args = vec!["laabam-producer".to_owned()];
        args.extend(self.connection_flags());
        args.extend(
            [
                "--http-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--admin-token",
                admin_token,
                "--allow-private-targets",
                "true",
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let cli = Serve::parse_from(args);
        let started = laabam_producer::api::start(&cli.common, &cli.serve, self.stop.child_token())
            .await
            .expect("API starts");
        self.tasks.push(started.task);
        self.api_metrics = Some(format!("http://{}/metrics", started.metrics_addr));
        crate::ApiClient::new(&format!("http://{}", started.addr))
    }

    /// Starts a real binary of the workspace (built on first use) with these flags; it is
    /// killed when the environment is dropped.
    pub fn spawn_binary(&mut self, name: &str, flags: &[String]) -> u32 {
        self.spawn_binary_with(name, flags, &[("RUST_LOG", &log_level())], None)
    }

    /// Like [`Self::spawn_binary`], with extra environment variables and stderr sent to a file.
    pub fn spawn_binary_with(
        &mut self,
        name: &str,
        flags: &[String],
        envs: &[(&str, &str)],
        stderr: Option<&std::path::Path>,
    ) -> u32 {
        let mut command = Command::new(binary(name));
        command.args(flags).envs(envs.iter().copied());
        if let Some(path) = stderr {
            command.stderr(std::fs::File::create(path).expect("log file"));
        }
        self.spawn(command, name)
    }

    /// [`Self::spawn_binary`] with its soft open-file limit set to `soft` (its hard limit kept),
    /// as a service manager's default of 1,024 does, by util-linux's `prlimit`, which execs it.
    pub fn spawn_binary_with_open_files(&mut self, name: &str, flags: &[String], soft: u64) -> u32 {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={soft}:"))
            .arg("--")
            .arg(binary(name))
            .args(flags)
            .env("RUST_LOG", log_level());
        self.spawn(command, name)
    }

    /// [`Self::spawn_binary_with`] on a clock shifted `by` (`+30s`, `-25s`), by Debian's
    /// libfaketime (package `faketime`, which `scripts/services` installs) preloaded into it;
    /// its monotonic clock, which times its timeouts, is left alone.
    pub fn spawn_binary_on_clock(
        &mut self,
        name: &str,
        flags: &[String],
        by: &str,
        stderr: Option<&std::path::Path>,
    ) -> u32 {
        let found = std::fs::read_dir("/usr/lib")
            .expect("/usr/lib")
            .filter_map(Result::ok)
            .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
            .find(|lib| lib.exists());
        let lib = found.expect("libfaketime is missing: scripts/services installs it (Debian package faketime)");
        let log = log_level();
        let envs = [
            ("RUST_LOG", log.as_str()),
            ("LD_PRELOAD", lib.to_str().expect("a UTF-8 path")),
            ("FAKETIME", by),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ];
        self.spawn_binary_with(name, flags, &envs, stderr)
    }

    fn spawn(&mut self, mut command: Command, name: &str) -> u32 {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// SIGKILLs a binary started by [`Self::spawn_binary`].
    pub fn kill(&mut self, pid: u32) {
        if let Some(child) = self.children.iter_mut().find(|c| c.id() == pid) {
            child.kill().expect("kill");
            child.wait().expect("reap");
        }
    }

    /// Closes every connection of this test's vhost from the broker's side, as a broker
    /// restart or a network cut would.
    pub async fn cut_connections(&self) {
        let vhost = self.name.clone();
        tokio::task::spawn_blocking(move || {
            rabbitmqctl(&[
                "close_all_connections",
                "--vhost",
                &vhost,
                "--limit",
                "1000",
                "test cut",
            ])
        })
        .await
        .expect("close connections");
    }

    /// Sends SIGTERM to a binary started by [`Self::spawn_binary`] and waits for it to exit.
    pub async fn terminate(&mut self, pid: u32) -> std::process::ExitStatus {
        let mut child = {
            let index = self
                .children
                .iter()
                .position(|c| c.id() == pid)
                .expect("a child of this test");
            self.children.remove(index)
        };
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        tokio::task::spawn_blocking(move || child.wait().expect("wait"))
            .await
            .expect("join")
    }

    /// Publishes the way a publisher that knows nothing of our library does (the README's AMQP
    /// contract only), with confirms.
    pub async fn plain_publish(&self, routing_key: &str, body: &[u8], props: lapin::BasicProperties) {
        self.plain_publish_to(laabam_shared::topology::EVENTS_EXCHANGE, routing_key, body, props)
            .await;
    }

    /// Like [`Self::plain_publish`], to any exchange of this vhost.
    pub async fn plain_publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: lapin::BasicProperties,
    ) {
        let conn = laabam_shared::startup::amqp_connect(&self.amqp_url, "plain-publisher")
            .await
            .expect("connect");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "the broker confirmed");
        let _ = conn.close(200, "done".into()).await;
    }

    /// Declares the topology, as `laabam-producer topology` does before plain publishers start.
    pub async fn declare_topology(&self) {
        let conn = laabam_shared::startup::amqp_connect(&self.amqp_url, "laabam-test")
            .await
            .expect("connect");
        // Bound, not a temporary: a channel dropped just before its connection closes has its
        // own close overtaken by the connection's, which lapin logs as a connection error.
        let channel = conn.create_channel().await.expect("channel");
        laabam_shared::topology::declare(&channel, Default::default())
            .await
            .expect("declare");
        let _ = conn.close(200, "done".into()).await;
    }

    /// Reads one message from a queue of this vhost, with its headers.
    pub async fn get_message(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        let conn = laabam_shared::startup::amqp_connect(&self.amqp_url, "laabam-test")
            .await
            .expect("connect");
        let channel = conn.create_channel().await.expect("channel");
        let msg = channel
            .basic_get(queue.into(), lapin::options::BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        let _ = conn.close(200, "done".into()).await;
        msg
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.stop.cancel();
        for task in &self.tasks {
            task.abort();
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::panic::catch_unwind(|| rabbitmqctl(&["delete_vhost", &self.name]));
        if let Ok(client) = redis::Client::open(self.redis_url.as_str())
            && let Ok(mut conn) = client.get_connection()
        {
            let keys: Vec<String> = redis::Commands::scan_match(&mut conn, format!("{}*", self.prefix))
                .map(|iter| iter.filter_map(Result::ok).collect())
                .unwrap_or_default();
            for chunk in keys.chunks(500) {
                let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
            }
        }
    }
}

/// The `n`th of distinct `invoice.paid` events of `account`, published at `at_ms`.
pub fn invoice_paid(account: &AccountId, n: usize, at_ms: i64) -> laabam_shared::envelope::Envelope {
    numbered_event(
        "invoice.paid",
        account,
        format!(r#"{{"invoice_id":"inv_{n}","payment_id":"pay_{n}","amount":{n}}}"#),
        at_ms,
    )
}

/// The `n`th of distinct `payment.failed` events of `account`, published at `at_ms`.
pub fn payment_failed(account: &AccountId, n: usize, at_ms: i64) -> laabam_shared::envelope::Envelope {
    numbered_event(
        "payment.failed",
        account,
        format!(r#"{{"payment_id":"pay_{n}","reason":"card_declined"}}"#),
        at_ms,
    )
}

fn numbered_event(
    event_type: &str,
    account: &AccountId,
    data: String,
    at_ms: i64,
) -> laabam_shared::envelope::Envelope {
    let data = serde_json::value::RawValue::from_string(data).expect("JSON");
    laabam_shared::envelope::Envelope::new(event_type, account.clone(), data, None, at_ms).expect("a valid event")
}

/// The `n`th of distinct `payment.failed` events of `account`, published now: for tests where
/// only the event's identity matters.
pub fn numbered(account: &str, n: usize) -> laabam_shared::envelope::Envelope {
    payment_failed(&AccountId::parse(account).expect("a valid account id"), n, now_ms())
}

/// `n` distinct `payment.failed` events of `account`.
pub fn sample_events(account: &str, n: usize) -> Vec<laabam_shared::envelope::Envelope> {
    (0..n).map(|i| numbered(account, i)).collect()
}

/// Publishes every event through our library, 100 at a time, and asserts the broker confirmed
/// each.
pub async fn publish_all(publisher: &Publisher, events: &[laabam_shared::envelope::Envelope]) {
    for chunk in events.chunks(100) {
        let results = futures_util::future::join_all(chunk.iter().map(|e| publisher.publish(e))).await;
        assert!(results.iter().all(Result::is_ok), "every publish confirmed");
    }
}

/// An endpoint of `account` delivering to `url` (every event type when `events` is `None`),
/// not stored yet: for tests that store it themselves (many at once, or in a sealed store).
pub fn new_endpoint(account: &str, url: &str, events: Option<&[&str]>) -> Endpoint {
    Endpoint::create(
        AccountId::parse(account).expect("a valid account id"),
        NewEndpoint {
            url: url.to_owned(),
            events: events.map(|e| e.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        },
        now_ms(),
    )
    .expect("valid endpoint")
}

/// The log level of spawned binaries: the test's own `RUST_LOG`, or warnings.
fn log_level() -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// The path of a workspace binary, building the workspace's binaries once per test process.
pub fn binary(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let workspace = crate::workspace::root();
    let exe = std::env::current_exe().expect("test binary path");
    let release = exe.ancestors().any(|d| d.file_name().is_some_and(|n| n == "release"));
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let profile: &[&str] = if release { &["--release"] } else { &[] };
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--bins"])
            .args(profile)
            .current_dir(&workspace)
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building the binaries failed");
    });
    // target/<profile>/deps/<test> → target/<profile>/<name>; a binary of the target dir itself
    // (laabam-bench) sits next to the others.
    let dir = exe.parent().expect("target dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target dir")
    } else {
        dir
    };
    dir.join(name)
}
