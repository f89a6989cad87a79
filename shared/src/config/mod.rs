//! Configuration every process shares. Each setting is a flag and a `LAABAM_*` variable
//! (flag wins), with a default that works against the services on a developer's machine.

mod setting_names;

pub use setting_names::{SettingNames, Settings, parse_settings};

use crate::retry::RetryPolicy;
use std::time::Duration;

/// Parses `250ms`, `5s`, `8h`, `3d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 250ms, 5s, 8h or 3d: {e}"))
}

/// Parses a duration that paces or bounds work, for which 0 does not mean "none" but breaks
/// it: a timeout every attempt fails at once, a backoff that never grows, a deferral that comes
/// straight back. Refused at start instead of found in production.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?} must be longer than 0"));
    }
    Ok(d)
}

/// A count of things held or done at once or per second, where 0 would not mean "unlimited"
/// but "nothing at all": a process that takes no message, an API that serves no request. Up to
/// a million, which no process of this machine's size comes near, so the refusal reads plainly.
pub fn at_least_one<T>() -> clap::builder::RangedU64ValueParser<T>
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
{
    clap::builder::RangedU64ValueParser::new().range(1..=1_000_000)
}

/// Parses a duration of at least `min`, which the refusal names.
pub fn parse_at_least(s: &str, min: Duration) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < min {
        return Err(format!(
            "{s:?} is shorter than {}, the least allowed",
            humantime::format_duration(min)
        ));
    }
    Ok(d)
}

/// Checks a RabbitMQ URL at start: a malformed one was retried as an unreachable broker for
/// the whole connect timeout, then reported as "could not reach RabbitMQ".
pub fn parse_amqp_url(s: &str) -> Result<String, String> {
    s.parse::<lapin::uri::AMQPUri>()
        .map(|_| s.to_owned())
        .map_err(|e| format!("not an AMQP URL like amqp://user:password@host:5672/%2f ({e})"))
}

/// Checks a Redis URL at start, for the same reason as [`parse_amqp_url`].
pub fn parse_redis_url(s: &str) -> Result<String, String> {
    redis::Client::open(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("not a Redis URL like redis://host:6379 or unix:///path ({e})"))
}

/// Checks a sealing key at start, so a bad one is refused before anything runs.
pub fn parse_secret_key(s: &str) -> Result<String, String> {
    crate::sealing::SecretSealer::new(Some(s), None)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

/// Where the platform's state lives and how long to wait for it at start.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// RabbitMQ URL; the vhost is its path (`%2f` is `/`).
    #[arg(
        long,
        env = "LAABAM_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        value_parser = parse_amqp_url
    )]
    pub amqp_url: String,
    /// Redis URL.
    #[arg(
        long,
        env = "LAABAM_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true,
        value_parser = parse_redis_url
    )]
    pub redis_url: String,
    /// Every Redis key starts with this, so several installations (or tests) share one Redis.
    #[arg(long, env = "LAABAM_REDIS_PREFIX", default_value = "laabam:")]
    pub redis_prefix: String,
    /// The retry set is split into this many sorted sets, so Redis Cluster can spread it.
    /// Every dispatcher and scheduler of one installation must agree on it.
    #[arg(long, env = "LAABAM_RETRY_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=crate::store::MAX_RETRY_SHARDS as i64))]
    pub retry_shards: u16,
    /// Event queues: 1, or N > 1 spread by a consistent hash of each event's id (needs the
    /// broker's `rabbitmq_consistent_hash_exchange` plugin). Every process must agree.
    #[arg(long, env = "LAABAM_DISPATCH_QUEUES", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=crate::topology::MAX_DISPATCH_QUEUES as i64))]
    pub dispatch_queues: u16,
    /// How long events, deliveries and attempts are kept in Redis.
    #[arg(long, env = "LAABAM_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub retention: Duration,
    /// Deliveries kept per endpoint: past it, the oldest finished ones are deleted.
    #[arg(long, env = "LAABAM_HISTORY_PER_ENDPOINT", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub history_per_endpoint: u32,
    /// Seals endpoint signing secrets in Redis (base64 of 32 bytes; `laabam-producer secret-key
    /// generate`). Without it they are stored in plaintext, with a warning at start.
    #[arg(long, env = "LAABAM_SECRET_KEY", hide_env_values = true, value_parser = parse_secret_key)]
    pub secret_key: Option<String>,
    /// The key being rotated out: still opens secrets sealed with it.
    #[arg(long, env = "LAABAM_SECRET_KEY_PREVIOUS", hide_env_values = true, value_parser = parse_secret_key)]
    pub secret_key_previous: Option<String>,
    /// How long to wait for RabbitMQ and Redis at start before exiting with an error.
    #[arg(long, env = "LAABAM_CONNECT_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub connect_timeout: Duration,
    /// `text` for people, `json` for log pipelines.
    #[arg(long, env = "LAABAM_LOG_FORMAT", default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,
}

impl CommonArgs {
    pub fn layout(&self) -> crate::topology::Layout {
        crate::topology::Layout {
            dispatch_queues: self.dispatch_queues,
        }
    }
}

/// The retry policy, as flags and variables.
#[derive(Debug, Clone, clap::Args)]
pub struct RetryArgs {
    /// Delay before the second attempt.
    #[arg(long, env = "LAABAM_RETRY_FIRST_DELAY", default_value = "5s", value_parser = parse_positive_duration)]
    pub retry_first_delay: Duration,
    /// Longest delay between two attempts (also caps Retry-After).
    #[arg(long, env = "LAABAM_RETRY_MAX_DELAY", default_value = "8h", value_parser = parse_positive_duration)]
    pub retry_max_delay: Duration,
    /// Attempts in all, the first included.
    #[arg(long, env = "LAABAM_RETRY_MAX_ATTEMPTS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub retry_max_attempts: u32,
    /// No attempt later than this after the first.
    #[arg(long, env = "LAABAM_RETRY_MAX_AGE", default_value = "3d", value_parser = parse_duration)]
    pub retry_max_age: Duration,
}

impl RetryArgs {
    /// What no single flag can tell: a longest delay shorter than the first would cap every
    /// delay below the one asked for.
    pub fn check(&self, names: &SettingNames) -> Result<(), String> {
        if self.retry_max_delay < self.retry_first_delay {
            return Err(format!(
                "{} ({}) is shorter than {} ({})",
                names.name("retry-max-delay"),
                humantime::format_duration(self.retry_max_delay),
                names.name("retry-first-delay"),
                humantime::format_duration(self.retry_first_delay)
            ));
        }
        Ok(())
    }

    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            first_delay: self.retry_first_delay,
            max_delay: self.retry_max_delay,
            max_attempts: self.retry_max_attempts,
            max_age: self.retry_max_age,
        }
    }
}

/// A URL with its password replaced, for log lines and error messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        retry: RetryArgs,
    }

    #[test]
    fn defaults_match_the_design() {
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.retry.policy(), RetryPolicy::default());
        assert_eq!(cli.common.redis_prefix, "laabam:");
        assert_eq!(cli.common.connect_timeout, Duration::from_secs(30));
    }

    #[test]
    fn malformed_urls_are_refused_at_start() {
        for args in [
            ["x", "--amqp-url", "htp://u:pw@host/%2f"],
            ["x", "--redis-url", "redix://u:pw@host"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
        for args in [
            ["x", "--amqp-url", "amqps://u:pw@host:5671/vhost?heartbeat=5"],
            ["x", "--redis-url", "redis://u:pw@host:6380/2"],
            ["x", "--redis-url", "unix:///run/redis.sock"],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
    }

    #[test]
    fn flags_take_durations_in_human_units() {
        let cli = Cli::parse_from(["x", "--retry-first-delay", "250ms", "--retry-max-age", "3d"]);
        assert_eq!(cli.retry.retry_first_delay, Duration::from_millis(250));
        assert_eq!(cli.retry.retry_max_age, Duration::from_secs(3 * 86400));
        assert!(Cli::try_parse_from(["x", "--retry-first-delay", "soon"]).is_err());
        assert!(Cli::try_parse_from(["x", "--retry-max-attempts", "0"]).is_err());
    }

    #[test]
    fn durations_that_pace_work_are_refused_when_zero_or_too_short() {
        assert!(parse_positive_duration("1ms").is_ok());
        let zero = parse_positive_duration("0s").unwrap_err();
        assert_eq!(zero, "\"0s\" must be longer than 0");
        assert!(parse_positive_duration("soon").is_err());
        assert_eq!(parse_at_least("1s", Duration::from_secs(1)), Ok(Duration::from_secs(1)));
        let short = parse_at_least("999ms", Duration::from_secs(1)).unwrap_err();
        assert_eq!(short, "\"999ms\" is shorter than 1s, the least allowed");
    }

    #[test]
    fn a_longest_retry_delay_below_the_first_is_refused() {
        let typed = |args: &[&str]| SettingNames::new(&Cli::command(), args.iter().map(Into::into), |_| false);
        let args = ["--retry-first-delay", "10s", "--retry-max-delay", "10s"];
        let cli = Cli::parse_from(std::iter::once("x").chain(args));
        assert_eq!(cli.retry.check(&typed(&args)), Ok(()));
        let args = ["--retry-first-delay", "10s", "--retry-max-delay", "9s"];
        let cli = Cli::parse_from(std::iter::once("x").chain(args));
        assert_eq!(
            cli.retry.check(&typed(&args)).unwrap_err(),
            "--retry-max-delay (9s) is shorter than --retry-first-delay (10s)"
        );
        assert!(Cli::try_parse_from(["x", "--retry-first-delay", "0s"]).is_err());
        assert!(Cli::try_parse_from(["x", "--retry-max-delay", "0s"]).is_err());
    }

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
