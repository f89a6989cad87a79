//! A connection of one writer's own, for transactions guarded by `WATCH`.
//!
//! A `WATCH` belongs to the connection it was sent on, and the store's shared connection
//! reconnects on its own: a transaction sent after a silent reconnect would run unguarded. This
//! connection never reconnects behind its writer's back. After any error it is dropped, and the
//! next call opens a new one, on which nothing is watched.

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ErrorKind, Pipeline, RedisError, RedisResult, Value};
use std::time::Duration;

/// How often a transaction is tried again when a watched key changed between its reads and its
/// writes, before its items fail. Only another process writing the same delivery or event at the
/// same moment (a scheduler taking an expired lease, a redelivered message) changes one.
const MAX_TRIES: u32 = 16;

pub(super) struct Watched {
    client: Client,
    config: AsyncConnectionConfig,
    conn: Option<MultiplexedConnection>,
}

impl Watched {
    pub(super) fn new(client: Client) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        Watched {
            client,
            config,
            conn: None,
        }
    }

    /// Sends `pipe`, opening the connection first if there is none; any error drops it.
    pub(super) async fn query(&mut self, pipe: &Pipeline) -> RedisResult<Value> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(
                self.client
                    .get_multiplexed_async_connection_with_config(&self.config)
                    .await?,
            ),
        };
        let answer = pipe.query_async(conn).await;
        if answer.is_err() {
            self.conn = None;
        }
        answer
    }

    /// An optimistic transaction: sends `reads`, which start with a `WATCH`, hands their replies
    /// to `writes`, and sends what it builds as one `MULTI`/`EXEC`, which Redis refuses if a
    /// watched key changed meanwhile; then it starts over. Answers what `writes` made of the
    /// replies, with the replies of the transaction's commands; or `None`, with nothing watched
    /// any more, when `writes` found that it needs more reads than these to decide.
    pub(super) async fn transact<P>(
        &mut self,
        reads: &Pipeline,
        mut writes: impl FnMut(Vec<Value>) -> Option<(Pipeline, P)>,
    ) -> Result<Option<(P, Vec<Value>)>, RedisError> {
        for _ in 0..MAX_TRIES {
            let read = match self.query(reads).await? {
                Value::Array(values) => values,
                other => vec![other],
            };
            let Some((mut transaction, plan)) = writes(read) else {
                self.query(redis::pipe().cmd("UNWATCH").ignore()).await?;
                return Ok(None);
            };
            match self.query(transaction.atomic()).await? {
                Value::Array(replies) => return Ok(Some((plan, replies))),
                Value::Nil => continue,
                other => {
                    return Err(RedisError::from((
                        ErrorKind::UnexpectedReturnType,
                        "a transaction answered neither its replies nor nil",
                        format!("{other:?}"),
                    )));
                }
            }
        }
        Err(RedisError::from((
            ErrorKind::Client,
            "the keys a transaction watched kept changing",
            format!("{MAX_TRIES} tries"),
        )))
    }
}

/// A reply's bytes, if it is a string (`None` for nil or anything else).
pub(super) fn text(value: Option<&Value>) -> Option<&[u8]> {
    match value {
        Some(Value::BulkString(b)) => Some(b),
        _ => None,
    }
}

/// A reply's number, whether Redis answered an integer or a string holding one.
pub(super) fn number(value: Option<&Value>) -> Option<u64> {
    match value {
        Some(Value::Int(n)) => u64::try_from(*n).ok(),
        other => text(other).and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()),
    }
}

/// Each command of `pipe` as its words joined by spaces, for tests to compare.
#[cfg(test)]
pub(super) fn commands_of(pipe: &Pipeline) -> Vec<String> {
    let word = |arg: redis::Arg<&[u8]>| match arg {
        redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        _ => "?".to_owned(),
    };
    pipe.cmd_iter()
        .map(|cmd| cmd.args_iter().map(word).collect::<Vec<_>>().join(" "))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the Redis the test suite starts (`LAABAM_REDIS_URL`, else the local one).
    #[tokio::test]
    async fn a_transaction_refused_because_a_watched_key_changed_starts_over_from_its_reads() {
        let url = std::env::var("LAABAM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let client = Client::open(url).unwrap();
        let key = format!("laabam-test-watched:{}", std::process::id());
        let mut other = client.get_connection().unwrap();
        redis::cmd("SET").arg(&key).arg(1).exec(&mut other).unwrap();
        let mut watched = Watched::new(client);
        let mut reads = redis::pipe();
        reads.cmd("WATCH").arg(&key).ignore().cmd("GET").arg(&key);
        let mut seen = Vec::new();
        let answer = watched
            .transact(&reads, |read| {
                let value: i64 = redis::from_redis_value(read[0].clone()).unwrap();
                seen.push(value);
                if seen.len() == 1 {
                    // Another client writes between the reads and the transaction.
                    redis::cmd("INCR").arg(&key).exec(&mut other).unwrap();
                }
                let mut tx = redis::pipe();
                tx.cmd("SET").arg(&key).arg(value * 10).ignore().cmd("GET").arg(&key);
                Some((tx, value))
            })
            .await
            .unwrap();
        let final_value: i64 = redis::cmd("GET").arg(&key).query(&mut other).unwrap();
        redis::cmd("DEL").arg(&key).exec(&mut other).unwrap();
        assert_eq!(seen, [1, 2], "read again after the refusal");
        let (plan, replies) = answer.unwrap();
        assert_eq!(plan, 2);
        assert_eq!(replies, [Value::BulkString(b"20".to_vec())]);
        assert_eq!(final_value, 20, "the refused writes left nothing");
    }
}
