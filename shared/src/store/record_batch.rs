//! Attempts' records written to Redis in batches: one script call for every record that is
//! waiting when the previous call returns.
//!
//! Each call costs Redis about 4.6 µs and the client 7–11 µs (a command, a reply, a wake-up)
//! whatever it carries (`laabam-bench redis-calls`), and a busy dispatcher finishes attempts by
//! the thousand per second. So records queue here and one writer sends them together: under
//! load each call carries as many as arrived while the last one was in Redis, and a lone
//! record goes at once, waiting for nothing. One call at a time is what makes them gather:
//! with several in flight, each would leave as soon as it came. The script applies them in the order they came,
//! each exactly as it would alone. When a call fails, every record in it gets the error, as
//! each would have alone: its caller retries, and a record that did reach Redis before the
//! reply was lost finds its lease already released, so its retry only logs the attempt again.

use super::deliveries::RECORD;
use super::script_call::ScriptCall;
use redis::aio::ConnectionManager;
use redis::{Arg, Cmd, ErrorKind, RedisError};
use tokio::sync::{mpsc, oneshot};

/// Records per call at most. One call of 64 keeps Redis busy for about a millisecond, and with
/// one call at a time it bounds a dispatcher's records at 64 per round trip: 128,000/s with
/// Redis half a millisecond away, 32,000/s at 2 ms, above what one dispatcher delivers.
const MAX_BATCH: usize = 64;
/// Keys per record, as the script reads them.
pub(super) const KEYS_PER_RECORD: usize = 6;

/// What the script answers per record: applied (1) or not, and the endpoint's failing-since.
pub(super) type Answer = (i64, String);

/// A record ready to join a call: its keys, then its arguments.
pub(super) struct PreparedRecord {
    pub(super) keys: [String; KEYS_PER_RECORD],
    pub(super) args: Cmd,
}

struct Waiting {
    record: PreparedRecord,
    answer: oneshot::Sender<Result<Answer, RedisError>>,
}

/// The queue in front of the writer; cheap to clone. The writer stops when every clone is gone.
#[derive(Clone)]
pub(super) struct RecordWriter {
    queue: mpsc::UnboundedSender<Waiting>,
}

impl RecordWriter {
    /// Starts the writer on the current Tokio runtime.
    pub(super) fn start(conn: ConnectionManager) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(waiting, conn));
        RecordWriter { queue }
    }

    pub(super) async fn write(&self, record: PreparedRecord) -> Result<Answer, RedisError> {
        let stopped = || RedisError::from((ErrorKind::Client, "the record writer has stopped"));
        let (answer, answered) = oneshot::channel();
        self.queue.send(Waiting { record, answer }).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

async fn write_batches(mut waiting: mpsc::UnboundedReceiver<Waiting>, mut conn: ConnectionManager) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while waiting.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut call = ScriptCall::new(&RECORD, batch.len() * KEYS_PER_RECORD);
        for w in &batch {
            for key in &w.record.keys {
                call.key(key);
            }
        }
        for w in &batch {
            for arg in w.record.args.args_iter() {
                if let Arg::Simple(bytes) = arg {
                    call.arg(bytes);
                }
            }
        }
        match call.invoke::<Vec<Answer>>(&mut conn).await {
            Ok(answers) if answers.len() == batch.len() => {
                for (w, answer) in batch.drain(..).zip(answers) {
                    let _ = w.answer.send(Ok(answer));
                }
            }
            Ok(answers) => {
                let e = RedisError::from((
                    ErrorKind::UnexpectedReturnType,
                    "record answers do not match the records",
                    format!("{} answers for {} records", answers.len(), batch.len()),
                ));
                fail_all(&mut batch, &e);
            }
            Err(e) => fail_all(&mut batch, &e),
        }
    }
}

fn fail_all(batch: &mut Vec<Waiting>, e: &RedisError) {
    for w in batch.drain(..) {
        let _ = w.answer.send(Err(e.clone()));
    }
}
