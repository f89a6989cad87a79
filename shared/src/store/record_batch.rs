//! Attempts' records written to Redis in batches: one script call for every record that is
//! waiting when the previous call returns.
//!
//! A call costs the client a command, a reply and wake-ups on two tasks whatever it carries
//! (7–11 µs of CPU in `laabam-bench redis-calls`), and a busy dispatcher finishes attempts by
//! the thousand per second. So records queue here and one writer sends them together: while
//! its call is out, the records that arrive wait for it to return and then leave in one call
//! of at most 16; a lone record goes at once, waiting for nothing. Measured, the client's CPU
//! per record fell from 6.4–10.7 µs to 3.5–5.9 µs; Redis's hardly moved, its per-call share
//! being small beside the commands. Two variants measured worse (`fanout` and `throughput`,
//! interleaved): batches of up to 64 saved no more CPU and raised the dispatcher's peak memory
//! by 10–15 MiB, and letting full batches overlap up to four calls cost 2–11% more dispatcher
//! CPU. The price of one call at a time is a bound of 16 records per Redis round trip per
//! process: 32,000/s with Redis half a millisecond away, 16,000/s at 1 ms; past that, run more
//! dispatcher processes. The queue needs no bound of its own: each record's caller waits for
//! its answer, so it holds at most the attempts in flight.
//!
//! The script applies the records in the order they came, each exactly as it would alone;
//! what records of one endpoint share (statistics, health) it writes once per call.
//! When a call fails, every record in it gets the error, as each would have alone: its caller
//! retries, and a record that did reach Redis before the reply was lost finds its lease already
//! released, so its retry only logs the attempt again.

use super::deliveries::RECORD;
use super::script_call::ScriptCall;
use prometheus::{Histogram, register_histogram};
use redis::aio::ConnectionManager;
use redis::{Arg, Cmd, ErrorKind, RedisError};
use std::sync::LazyLock;
use tokio::sync::{mpsc, oneshot};

/// Records per call at most: a call of 16 keeps Redis busy for about a quarter of a millisecond.
const MAX_BATCH: usize = 16;
/// Records per call, so an operator sees the bound coming: calls that are mostly full mean
/// records wait behind Redis's round trip, and another dispatcher process would take them.
/// Only processes that record attempts (dispatchers) touch it, so only they export it.
pub static RECORDS_PER_CALL: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "laabam_dispatcher_records_per_redis_call",
        "Attempt records written per Redis call (at most 16)",
        vec![1.0, 2.0, 4.0, 8.0, 15.0, 16.0]
    )
    .expect("registered once")
});
/// Keys per record, as the script reads them.
const KEYS_PER_RECORD: usize = 6;

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
    /// Starts the writer on the current Tokio runtime; `call_args` lead every call's arguments.
    pub(super) fn start(conn: ConnectionManager, call_args: Cmd) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(waiting, conn, call_args));
        RecordWriter { queue }
    }

    pub(super) async fn write(&self, record: PreparedRecord) -> Result<Answer, RedisError> {
        let stopped = || RedisError::from((ErrorKind::Client, "the record writer has stopped"));
        let (answer, answered) = oneshot::channel();
        self.queue.send(Waiting { record, answer }).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

/// Copies `args`, built as a command's arguments, into `call`.
fn append(call: &mut ScriptCall<'_>, args: &Cmd) {
    for arg in args.args_iter() {
        if let Arg::Simple(bytes) = arg {
            call.arg(bytes);
        }
    }
}

async fn write_batches(mut waiting: mpsc::UnboundedReceiver<Waiting>, mut conn: ConnectionManager, call_args: Cmd) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while waiting.recv_many(&mut batch, MAX_BATCH).await > 0 {
        RECORDS_PER_CALL.observe(batch.len() as f64);
        let mut call = ScriptCall::new(&RECORD, batch.len() * KEYS_PER_RECORD);
        for w in &batch {
            for key in &w.record.keys {
                call.key(key);
            }
        }
        append(&mut call, &call_args);
        for w in &batch {
            append(&mut call, &w.record.args);
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
