//! `laabam-producer`: publish events, manage endpoints and declare the topology from a shell.
//! Every command prints JSON on stdout and human messages on stderr.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use laabam_producer::Publisher;
use laabam_producer::api::ServeArgs;
use laabam_shared::clock::now_ms;
use laabam_shared::config::{CommonArgs, Settings, parse_settings};
use laabam_shared::endpoint::{Endpoint, NewEndpoint};
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::{AccountId, EndpointId, EventId};
use laabam_shared::store::{Store, StoreConfig};
use laabam_shared::{shutdown, startup, telemetry, topology};
use serde_json::value::RawValue;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "laabam-producer",
    version,
    about = "Publish events and manage endpoints of Laabam Webhooks"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

impl Settings for Cli {}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API until SIGTERM.
    Serve(ServeArgs),
    /// Manage accounts directly in Redis (operators bootstrapping without the API).
    #[command(subcommand)]
    Account(AccountCommand),
    /// Manage account API keys directly in Redis.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Publish one event and print its id once the broker confirmed it.
    Publish {
        #[arg(long)]
        account: String,
        #[arg(long = "type")]
        event_type: String,
        /// The payload, as a JSON object.
        #[arg(long)]
        data: String,
        /// Choose the event id (the idempotency key) instead of generating one.
        #[arg(long)]
        id: Option<String>,
    },
    /// Manage endpoints directly in Redis.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Declare every exchange and queue (for operators, and publishers that start first), and
    /// retire the queues a former layout of more dispatch queues left behind.
    Topology,
    /// Send what was kept aside back to where it was first published, once its cause is gone:
    /// `unroutable` (events no queue was bound for) or `dead` (dead letters; one still poison
    /// is dead-lettered again). Moves what the queue holds now, each message confirmed first.
    Replay {
        #[arg(value_enum)]
        kept: topology::Kept,
    },
    /// Make a key for LAABAM_SECRET_KEY.
    #[command(subcommand)]
    SecretKey(SecretKeyCommand),
    /// Manage the sealing of stored endpoint secrets.
    #[command(subcommand)]
    Secrets(SecretsCommand),
}

#[derive(Subcommand)]
enum SecretKeyCommand {
    /// Print a new random sealing key (base64 of 32 bytes).
    Generate,
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Re-seal every endpoint secret with LAABAM_SECRET_KEY, opening old ones with
    /// LAABAM_SECRET_KEY_PREVIOUS: the second step of a key rotation.
    Reencrypt,
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Create an account and print it.
    Create {
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Issue an API key for an account and print it (shown this once).
    Create {
        #[arg(long)]
        account: String,
    },
}

#[derive(Subcommand)]
enum EndpointCommand {
    /// Register an endpoint and print it, with its signing secret.
    Create {
        #[arg(long)]
        account: String,
        #[arg(long)]
        url: String,
        /// Comma-separated event types; all types when left out.
        #[arg(long, value_delimiter = ',')]
        events: Option<Vec<String>>,
        #[arg(long, default_value = "")]
        description: String,
        /// Requests in flight to this endpoint at once, for the deployment.
        #[arg(long)]
        max_concurrency: Option<u32>,
    },
    /// List an account's endpoints (without secrets).
    List {
        #[arg(long)]
        account: String,
    },
    /// Delete an endpoint.
    Delete {
        #[arg(long)]
        id: String,
    },
}

fn print(value: &Value) {
    println!("{value}");
}

fn without_secret(ep: &Endpoint) -> Value {
    let mut v = serde_json::to_value(ep).expect("endpoints serialize");
    if let Some(obj) = v.as_object_mut() {
        obj.remove("secret");
    }
    v
}

async fn store(common: &CommonArgs) -> anyhow::Result<Store> {
    Ok(Store::connect(&StoreConfig::from(common), common.connect_timeout).await?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let common = &cli.common;
    match cli.command {
        Command::Serve(args) => {
            let shutdown = shutdown::on_signals();
            let started = laabam_producer::api::start(common, &args, shutdown).await?;
            eprintln!(
                "serving the HTTP API on http://{} and metrics on http://{}/metrics",
                started.addr, started.metrics_addr
            );
            started.task.await?;
        }
        Command::Account(AccountCommand::Create { name }) => {
            let account = store(common).await?.create_account(&name, None, now_ms()).await?;
            eprintln!("created account {}", account.id);
            print(&serde_json::to_value(&account)?);
        }
        Command::Key(KeyCommand::Create { account }) => {
            let account = AccountId::parse(account).context("--account")?;
            let store = store(common).await?;
            if store.get_account(&account).await?.is_none() {
                bail!("no account {account}");
            }
            let (key, info) = store.create_api_key(&account, now_ms()).await?;
            eprintln!("created API key {} for {account}; it is shown only now", info.prefix);
            print(&json!({ "key": key, "prefix": info.prefix, "account_id": account }));
        }
        Command::Publish {
            account,
            event_type,
            data,
            id,
        } => {
            let account = AccountId::parse(account).context("--account")?;
            let data = RawValue::from_string(data).context("--data is not valid JSON")?;
            let id = id.map(EventId::parse).transpose().context("--id")?;
            let envelope = Envelope::new(&event_type, account, data, id, now_ms())?;
            store(common)
                .await?
                .ensure_account(&envelope.account_id, envelope.account_id.as_str(), now_ms())
                .await?;
            let publisher = Publisher::connect(&common.amqp_url, common.connect_timeout, common.layout()).await?;
            publisher.publish(&envelope).await?;
            eprintln!("published {} ({})", envelope.id, envelope.event_type);
            print(&json!({ "id": envelope.id, "type": envelope.event_type, "timestamp": envelope.timestamp }));
        }
        Command::Endpoint(EndpointCommand::Create {
            account,
            url,
            events,
            description,
            max_concurrency,
        }) => {
            let account = AccountId::parse(account).context("--account")?;
            let ep = Endpoint::create(
                account,
                NewEndpoint {
                    url,
                    events,
                    description,
                    max_concurrency,
                    ..Default::default()
                },
                now_ms(),
            )?;
            let store = store(common).await?;
            store
                .ensure_account(&ep.account_id, ep.account_id.as_str(), now_ms())
                .await?;
            store.create_endpoint(&ep, None).await?;
            eprintln!("created endpoint {} for {}", ep.id, ep.url.as_str());
            let mut out = without_secret(&ep);
            out["secret"] = Value::String(ep.secret.expose());
            print(&out);
        }
        Command::Endpoint(EndpointCommand::List { account }) => {
            let account = AccountId::parse(account).context("--account")?;
            let eps = store(common).await?.list_endpoints(&account).await?;
            print(&Value::Array(eps.iter().map(without_secret).collect()));
        }
        Command::Endpoint(EndpointCommand::Delete { id }) => {
            let id = EndpointId::parse(id).context("--id")?;
            if !store(common).await?.delete_endpoint(&id).await? {
                bail!("no endpoint {id}");
            }
            eprintln!("deleted endpoint {id}");
            print(&json!({ "id": id, "deleted": true }));
        }
        Command::SecretKey(SecretKeyCommand::Generate) => {
            eprintln!("set it as LAABAM_SECRET_KEY on every process; keep it out of version control");
            print(&json!({ "key": laabam_shared::sealing::SecretSealer::generate_key() }));
        }
        Command::Secrets(SecretsCommand::Reencrypt) => {
            if common.secret_key.is_none() {
                bail!("LAABAM_SECRET_KEY is not set: there is no key to seal with");
            }
            let count = store(common).await?.reseal_all_endpoints().await?;
            eprintln!("re-sealed the secrets of {count} endpoints with the current key");
            print(&json!({ "endpoints": count }));
        }
        Command::Replay { kept } => {
            let conn = declared_topology(common).await?;
            let replayed = topology::replay_kept(&conn, kept).await?;
            startup::amqp_close(&conn, "done").await;
            eprintln!("replayed {replayed} messages from {}", kept.queue());
            print(&json!({ "queue": kept.queue(), "replayed": replayed }));
        }
        Command::Topology => {
            let conn = declared_topology(common).await?;
            let layout = common.layout();
            eprintln!("topology declared");
            let retired = topology::retire_former_shards(&conn, layout).await?;
            for r in &retired {
                eprintln!("retired {}: {} messages moved back", r.queue, r.moved);
            }
            let mut exchanges = vec![
                topology::EVENTS_EXCHANGE,
                topology::UNROUTABLE_EXCHANGE,
                topology::RETRY_EXCHANGE,
                topology::DEAD_EXCHANGE,
            ];
            if layout.sharded() {
                exchanges.push(topology::DISPATCH_SHARDS_EXCHANGE);
            }
            let mut queues = layout.dispatch_queues();
            queues.extend(layout.retry_queues());
            queues.extend([topology::UNROUTABLE_QUEUE, topology::DEAD_QUEUE].map(String::from));
            startup::amqp_close(&conn, "done").await;
            print(&json!({ "exchanges": exchanges, "queues": queues, "retired": retired }));
        }
    }
    Ok(())
}

/// A connection to the broker with every exchange and queue declared, for commands that then
/// move messages between them.
async fn declared_topology(common: &CommonArgs) -> anyhow::Result<lapin::Connection> {
    let conn = startup::amqp_connect_within(&common.amqp_url, "laabam-producer", common.connect_timeout).await?;
    topology::declare(&conn.create_channel().await?, common.layout()).await?;
    Ok(conn)
}

#[tokio::main]
async fn main() {
    let cli: Cli = parse_settings();
    telemetry::init(cli.common.log_format);
    laabam_shared::open_files::raise_limit();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
