//! Script calls in batches: one call for every item (an event's arrival, an attempt's record)
//! that is waiting when the previous call returns.
//!
//! A call costs the client a command, a reply and wake-ups on two tasks whatever it carries
//! (7–11 µs of CPU in `laabam-bench redis-calls`), and a busy dispatcher makes thousands a
//! second. So items queue here and one writer per script sends them together: while its call
//! is out, the items that arrive wait for it to return and then leave in one call of at most
//! [`MAX_BATCH`] (and at most [`MAX_KEYS`] keys, so no call holds Redis for long). A lone
//! arrival goes at once, waiting for nothing; a lone record waits up to [`RECORD_LINGER`] for
//! company, since nothing waits on it but the attempt's room in the in-flight bound. Measured
//! on records, the client's CPU per record fell from 6.4–10.7 µs to 3.5–5.9 µs; Redis's hardly
//! moved, its per-call share being small beside the commands. Letting full batches overlap up to four calls cost 2–11% more dispatcher CPU.
//! The price of one call at a time is a bound of [`MAX_BATCH`] items per Redis round trip per
//! writer, and a round trip is the call's own work in Redis plus wake-ups and the other calls
//! Redis serves meanwhile. With 16 a call that was the bound: `fanout` (ten records per
//! event) sent full calls of 16 records once every 0.8 ms and stopped at about 19,000
//! deliveries/s with a tenth of the two cores idle. With 64 its calls carry four times as many
//! records for a round trip three times as long (2.6 ms), and it delivered a quarter more;
//! calls stay mostly full, but with the cores nearly busy a larger bound gains little (see
//! [`MAX_BATCH`]). Past that, run more dispatcher processes. The queue needs no bound of its
//! own: each item's caller waits for its answer, so it holds at most the items in flight.
//!
//! A batched script applies the items in the order they came, each exactly as it would alone,
//! and answers one value per item. When a call fails, every item in it gets the error, as each
//! would have alone: the caller cannot tell whether its item reached Redis, and each script is
//! written so that doing an item again is safe (a record finds its lease already released; an
//! arrival finds its deliveries known, their leases still in the retry set).

use super::script_call::ScriptCall;
use prometheus::{Histogram, register_histogram};
use redis::aio::ConnectionManager;
use redis::{Arg, Cmd, ErrorKind, FromRedisValue, RedisError, Script};
use std::sync::LazyLock;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Items per call at most: a call of 64 records keeps Redis busy for about a millisecond, which
/// every other client of Redis may wait behind. 16 made the writer the limit of a busy
/// dispatcher (see above); 100 (the key bound's limit for records) gained 3% more in `fanout`
/// for a longer stall and 10 MiB more of dispatcher memory.
const MAX_BATCH: usize = 64;

/// How long an attempt's record waits for others when the writer is idle. Under load records
/// queue behind the call that is out and this adds nothing; at a moderate rate each call carried
/// two records, and a call costs Redis about as much as the records it carries (`latency` at
/// 3,000 events/s: about 50 µs of Redis CPU per call on top of 19 µs per record). A record is
/// not on the way to the endpoint (the request has been answered, and the endpoint's slot
/// released), so waiting costs only the attempt's room in the in-flight bound for that long.
/// Arrivals do not wait: the attempt follows them.
pub(super) const RECORD_LINGER: Duration = Duration::from_millis(2);

/// Keys per call at most, unless one item alone has more. A script holds Redis while it runs,
/// so a call's size is its stall for every other client: 16 arrivals of events with a hundred
/// endpoints each would hold it for about 14 ms. Seventeen arrivals of ten endpoints (578 keys)
/// still fit in one call.
const MAX_KEYS: usize = 600;

/// The buckets of the items-per-call histograms: mostly full calls (63–64) mean items wait
/// behind Redis's round trip, and another dispatcher process would take them.
const PER_CALL_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 63.0, 64.0];

/// Attempts' records per call. Only processes that record attempts (dispatchers) touch it, so
/// only they export it.
pub static RECORDS_PER_CALL: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "laabam_dispatcher_records_per_redis_call",
        "Attempt records written per Redis call (at most 64)",
        PER_CALL_BUCKETS.to_vec()
    )
    .expect("registered once")
});

/// Events' arrivals (each event stored with its deliveries begun) per call; dispatchers only.
pub static ARRIVALS_PER_CALL: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "laabam_dispatcher_arrivals_per_redis_call",
        "Events stored with their deliveries begun per Redis call (at most 64)",
        PER_CALL_BUCKETS.to_vec()
    )
    .expect("registered once")
});

/// An item ready to join a call: its keys, then its arguments, each written as a command's.
pub(super) struct Prepared {
    pub(super) keys: Cmd,
    pub(super) args: Cmd,
}

struct Waiting<A> {
    item: Prepared,
    answer: oneshot::Sender<Result<A, RedisError>>,
    /// When it was queued: it waits for others at most [`Batched::linger`] past this.
    since: Instant,
}

impl<A> Waiting<A> {
    fn keys(&self) -> usize {
        self.item.keys.args_iter().len()
    }
}

/// The queue in front of one script's writer; cheap to clone. The writer stops when every clone
/// is gone.
pub(super) struct BatchWriter<A> {
    queue: mpsc::UnboundedSender<Waiting<A>>,
}

impl<A> Clone for BatchWriter<A> {
    fn clone(&self) -> Self {
        BatchWriter {
            queue: self.queue.clone(),
        }
    }
}

/// What a writer calls: the script, the arguments that lead every call (the same for every
/// item), its histogram of items per call (registered on first use), and how long a call that
/// is not full waits for more items.
pub(super) struct Batched {
    pub(super) script: &'static Script,
    pub(super) call_args: Cmd,
    pub(super) per_call: &'static LazyLock<Histogram>,
    /// Zero for what a caller is waiting on to go on (an arrival: the attempt follows it). An
    /// item waits at most this long past its queueing, so under load, when items have waited
    /// through the previous call already, it adds nothing.
    pub(super) linger: Duration,
}

impl<A: FromRedisValue + Send + 'static> BatchWriter<A> {
    /// Starts the writer on the current Tokio runtime.
    pub(super) fn start(conn: ConnectionManager, batched: Batched) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(waiting, conn, batched));
        BatchWriter { queue }
    }

    /// Sends `item` with the next call and waits for its answer.
    pub(super) async fn write(&self, item: Prepared) -> Result<A, RedisError> {
        let stopped = || RedisError::from((ErrorKind::Client, "the batch writer has stopped"));
        let (answer, answered) = oneshot::channel();
        let since = Instant::now();
        self.queue
            .send(Waiting { item, answer, since })
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

/// The values of `args`, written as a command's arguments.
fn values(args: &Cmd) -> impl Iterator<Item = &[u8]> {
    args.args_iter().filter_map(|arg| {
        if let Arg::Simple(bytes) = arg {
            Some(bytes)
        } else {
            None
        }
    })
}

async fn write_batches<A: FromRedisValue>(
    mut waiting: mpsc::UnboundedReceiver<Waiting<A>>,
    mut conn: ConnectionManager,
    batched: Batched,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut held = None;
    while let Some(keys) = next_call(&mut batch, &mut held, &mut waiting, batched.linger).await {
        batched.per_call.observe(batch.len() as f64);
        let call = call_of(&batched, &batch, keys);
        match call.invoke::<Vec<A>>(&mut conn).await {
            Ok(answers) if answers.len() == batch.len() => {
                for (w, answer) in batch.drain(..).zip(answers) {
                    let _ = w.answer.send(Ok(answer));
                }
            }
            Ok(answers) => {
                let e = RedisError::from((
                    ErrorKind::UnexpectedReturnType,
                    "a batched script's answers do not match its items",
                    format!("{} answers for {} items", answers.len(), batch.len()),
                ));
                fail_all(&mut batch, &e);
            }
            Err(e) => fail_all(&mut batch, &e),
        }
    }
}

/// The call that carries `batch`, whose items have `keys` keys in all: every item's keys, then
/// the arguments every call leads with, then every item's arguments, in buffers sized for them
/// beforehand.
fn call_of<'a, A>(batched: &'a Batched, batch: &[Waiting<A>], keys: usize) -> ScriptCall<'a> {
    let parts = batch
        .iter()
        .flat_map(|w| [&w.item.keys, &w.item.args])
        .chain([&batched.call_args]);
    let (args, bytes) = parts.fold((0, 0), |(args, bytes), part| {
        (
            args + part.args_iter().len(),
            bytes + values(part).map(<[u8]>::len).sum::<usize>(),
        )
    });
    let mut call = ScriptCall::with_capacity(batched.script, keys, args, bytes);
    for key in batch.iter().flat_map(|w| values(&w.item.keys)) {
        call.key(key);
    }
    for arg in values(&batched.call_args).chain(batch.iter().flat_map(|w| values(&w.item.args))) {
        call.arg(arg);
    }
    call
}

/// Waits for an item, then fills `batch` for the next call with the items waiting until
/// `linger` past the first one's queueing, within [`MAX_BATCH`] items and [`MAX_KEYS`] keys,
/// and answers the call's keys. The call is led by the item `held` back from the last one if
/// any, and the first item that would not fit is held back to lead the next. None when every
/// queue clone is gone and nothing is left.
async fn next_call<A>(
    batch: &mut Vec<Waiting<A>>,
    held: &mut Option<Waiting<A>>,
    waiting: &mut mpsc::UnboundedReceiver<Waiting<A>>,
    linger: Duration,
) -> Option<usize> {
    // Not `held.take().or(…)`: its argument would wait for an item even with one held.
    let first = match held.take() {
        Some(first) => first,
        None => waiting.recv().await?,
    };
    let deadline = first.since + linger;
    let mut keys = first.keys();
    batch.push(first);
    while batch.len() < MAX_BATCH {
        let next = match waiting.try_recv() {
            Ok(next) => next,
            Err(_) if Instant::now() >= deadline => break,
            Err(_) => match tokio::time::timeout_at(deadline, waiting.recv()).await {
                Ok(Some(next)) => next,
                Ok(None) | Err(_) => break,
            },
        };
        if keys + next.keys() > MAX_KEYS {
            *held = Some(next);
            break;
        }
        keys += next.keys();
        batch.push(next);
    }
    Some(keys)
}

fn fail_all<A>(batch: &mut Vec<Waiting<A>>, e: &RedisError) {
    for w in batch.drain(..) {
        let _ = w.answer.send(Err(e.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An item of `keys` keys and `args` arguments, queued at `since`, whose answer no one awaits.
    fn queued(keys: usize, args: &[&str], since: Instant) -> Waiting<()> {
        let mut item = Prepared {
            keys: Cmd::new(),
            args: Cmd::new(),
        };
        for k in 0..keys {
            item.keys.arg(format!("key:{k}"));
        }
        for arg in args {
            item.args.arg(*arg);
        }
        let (answer, _) = oneshot::channel();
        Waiting { item, answer, since }
    }

    /// The sizes (in keys) of the calls that items of `keys` keys, all waiting at once, leave in.
    async fn calls(keys: &[usize]) -> Vec<Vec<usize>> {
        let (queue, mut waiting) = mpsc::unbounded_channel::<Waiting<()>>();
        for &n in keys {
            queue.send(queued(n, &[], Instant::now())).unwrap();
        }
        drop(queue);
        let (mut calls, mut batch, mut held) = (Vec::new(), Vec::new(), None);
        while let Some(keys) = next_call(&mut batch, &mut held, &mut waiting, Duration::ZERO).await {
            let call: Vec<usize> = batch.drain(..).map(|w| w.keys()).collect();
            assert_eq!(keys, call.iter().sum::<usize>(), "the call's keys as counted");
            calls.push(call);
        }
        calls
    }

    #[test]
    fn a_call_is_built_in_buffers_sized_for_it() {
        static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new("return {}"));
        let mut call_args = Cmd::new();
        call_args.arg(86_400).arg("laabam:");
        let batched = Batched {
            script: &SCRIPT,
            call_args,
            per_call: &RECORDS_PER_CALL,
            linger: Duration::ZERO,
        };
        for sizes in [vec![3], vec![3, 3, 4], vec![1000, 2]] {
            let batch: Vec<_> = sizes
                .iter()
                .map(|&n| queued(n, &["a body", "", "17"], Instant::now()))
                .collect();
            let call = call_of(&batched, &batch, sizes.iter().sum());
            assert!(call.fills_its_buffers(), "items of {sizes:?} keys");
        }
    }

    #[tokio::test]
    async fn small_items_leave_sixty_four_to_a_call() {
        let sizes: Vec<usize> = calls(&[6; 150]).await.iter().map(Vec::len).collect();
        assert_eq!(sizes, [64, 64, 22]);
    }

    #[tokio::test]
    async fn a_call_stops_short_of_the_key_bound_and_the_item_that_would_cross_it_leads_the_next() {
        assert_eq!(
            calls(&[304, 295, 2, 304, 1000, 34, 34]).await,
            [vec![304, 295], vec![2, 304], vec![1000], vec![34, 34]]
        );
        assert_eq!(calls(&[300, 300, 1]).await, [vec![300, 300], vec![1]]);
    }

    /// An item queued at `since`, sent to `queue` after `after`.
    fn send_later(queue: &mpsc::UnboundedSender<Waiting<()>>, since: Instant, after: Duration) {
        let queue = queue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = queue.send(queued(0, &[], since));
        });
    }

    /// A call that is not full waits for items until `linger` past its first item's queueing;
    /// an item that has waited that long already goes at once, the next one in a call of its own.
    #[tokio::test]
    async fn a_call_waits_for_more_items_until_linger_past_its_first() {
        let linger = Duration::from_secs(1);
        let (queue, mut waiting) = mpsc::unbounded_channel::<Waiting<()>>();
        let (mut batch, mut held) = (Vec::new(), None);
        send_later(&queue, Instant::now(), Duration::ZERO);
        send_later(&queue, Instant::now(), Duration::from_millis(20));
        next_call(&mut batch, &mut held, &mut waiting, linger).await;
        assert_eq!(batch.len(), 2, "the second item came within the linger");
        batch.clear();

        send_later(&queue, Instant::now() - linger, Duration::ZERO);
        send_later(&queue, Instant::now(), Duration::from_millis(20));
        next_call(&mut batch, &mut held, &mut waiting, linger).await;
        assert_eq!(batch.len(), 1, "the first item had waited its linger before it came");
        batch.clear();
        next_call(&mut batch, &mut held, &mut waiting, linger).await;
        assert_eq!(batch.len(), 1);
    }
}
