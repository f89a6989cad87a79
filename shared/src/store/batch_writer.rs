//! Writes in batches: one transaction for every item (an event's arrival, an attempt's record)
//! that is waiting when the previous one is in.
//!
//! A call costs the client a command, a reply and wake-ups on two tasks whatever it carries
//! (7–11 µs of CPU in `laabam-bench redis-calls`), and a busy dispatcher makes thousands a
//! second. So items queue here and one writer per kind of item sends them together: while its
//! call is out, the items that arrive wait for it to return and then leave in one call of at
//! most [`MAX_BATCH`] (and at most [`MAX_KEYS`] keys, so no call holds Redis for long). A lone
//! arrival goes at once unless the dispatcher is told to let it wait (`LAABAM_ARRIVAL_LINGER`,
//! its attempt waiting with it); a lone record waits up to [`RECORD_LINGER`] for company, since
//! nothing waits on it but the attempt's room in the in-flight bound. Measured
//! on records, the client's CPU per record fell from 6.4–10.7 µs to 3.5–5.9 µs; Redis's hardly
//! moved, its per-call share being small beside the commands. Letting full batches overlap up
//! to four calls cost 2–11% more dispatcher CPU.
//! The price of one call at a time is a bound of [`MAX_BATCH`] items per call per writer, and a
//! call (two round trips since session 46: its reads, then its writes) is its own work in Redis
//! plus wake-ups and the other calls Redis serves meanwhile. With 16 a call that was the bound:
//! `fanout` (ten records per event) sent full calls of 16 records once every 0.8 ms and stopped at
//! about 19,000 deliveries/s with a tenth of the two cores idle. With 64 its calls carry four times
//! as many records for a round trip three times as long (2.6 ms), and it delivered a quarter more;
//! calls stay mostly full, but with the cores nearly busy a larger bound gains little (see
//! [`MAX_BATCH`]). Past that, run more dispatcher processes. The queue needs no bound of its own:
//! each item's caller waits for its answer, so it holds at most the items in flight.
//!
//! A batch is applied in the order its items came, each exactly as it would be alone, with one
//! answer per item. When a call fails, every item in it gets the error, as each would have
//! alone: the caller cannot tell whether its item reached Redis, and each writer is built so
//! that doing an item again is safe (a record finds its lease already released; an arrival
//! finds its deliveries known, their leases still in the retry set).

use super::watched::Watched;
use prometheus::{Histogram, register_histogram};
use redis::{ErrorKind, RedisError};
use std::future::Future;
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
/// Arrivals wait only as long as their store is told to (`StoreConfig::arrival_linger`, zero by
/// default): the attempt follows them.
pub(super) const RECORD_LINGER: Duration = Duration::from_millis(2);

/// Keys per call at most, unless one item alone has more. A transaction holds Redis while it
/// runs, so a call's size is its stall for every other client: 16 arrivals of events with a
/// hundred endpoints each would hold it for about 14 ms. Seventeen arrivals of ten endpoints
/// (578 keys) still fit in one call.
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

/// What one kind of item is written by: its writer, called with a batch at a time.
pub(super) trait Writer: Send + 'static {
    type Item: Send + Sync + 'static;
    type Answer: Send + 'static;

    /// The keys `item` adds to a call, for [`MAX_KEYS`].
    fn keys(item: &Self::Item) -> usize;

    /// Writes `batch` in order, answering one value per item.
    fn write(
        &mut self,
        conn: &mut Watched,
        batch: &[&Self::Item],
    ) -> impl Future<Output = Result<Vec<Self::Answer>, RedisError>> + Send;
}

struct Waiting<W: Writer> {
    item: W::Item,
    answer: oneshot::Sender<Result<W::Answer, RedisError>>,
    /// When it was queued: it waits for others at most [`Batched::linger`] past this.
    since: Instant,
}

/// The queue in front of one writer; cheap to clone. The writer stops when every clone is gone.
pub(super) struct BatchWriter<W: Writer> {
    queue: mpsc::UnboundedSender<Waiting<W>>,
}

impl<W: Writer> Clone for BatchWriter<W> {
    fn clone(&self) -> Self {
        BatchWriter {
            queue: self.queue.clone(),
        }
    }
}

/// How a writer batches: its histogram of items per call (registered on first use), and how
/// long a call that is not full waits for more items.
pub(super) struct Batched {
    pub(super) per_call: &'static LazyLock<Histogram>,
    /// Zero by default for what a caller is waiting on to go on (an arrival: the attempt
    /// follows it). An item waits at most this long past its queueing, so under load, when
    /// items have waited through the previous call already, it adds nothing.
    pub(super) linger: Duration,
}

impl<W: Writer> BatchWriter<W> {
    /// Starts `writer` on the current Tokio runtime, on a connection of its own.
    pub(super) fn start(writer: W, conn: Watched, batched: Batched) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(waiting, writer, conn, batched));
        BatchWriter { queue }
    }

    /// Sends `item` with the next call and waits for its answer.
    pub(super) async fn write(&self, item: W::Item) -> Result<W::Answer, RedisError> {
        let stopped = || RedisError::from((ErrorKind::Client, "the batch writer has stopped"));
        let (answer, answered) = oneshot::channel();
        let since = Instant::now();
        self.queue
            .send(Waiting { item, answer, since })
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

async fn write_batches<W: Writer>(
    mut waiting: mpsc::UnboundedReceiver<Waiting<W>>,
    mut writer: W,
    mut conn: Watched,
    batched: Batched,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut held = None;
    while next_call(&mut batch, &mut held, &mut waiting, batched.linger)
        .await
        .is_some()
    {
        batched.per_call.observe(batch.len() as f64);
        let items: Vec<&W::Item> = batch.iter().map(|w| &w.item).collect();
        match writer.write(&mut conn, &items).await {
            Ok(answers) if answers.len() == batch.len() => {
                for (w, answer) in batch.drain(..).zip(answers) {
                    let _ = w.answer.send(Ok(answer));
                }
            }
            Ok(answers) => {
                let e = RedisError::from((
                    ErrorKind::UnexpectedReturnType,
                    "a batch's answers do not match its items",
                    format!("{} answers for {} items", answers.len(), batch.len()),
                ));
                fail_all(&mut batch, &e);
            }
            Err(e) => fail_all(&mut batch, &e),
        }
    }
}

/// Waits for an item, then fills `batch` for the next call with the items waiting until
/// `linger` past the first one's queueing, within [`MAX_BATCH`] items and [`MAX_KEYS`] keys.
/// The call is led by the item `held` back from the last one if
/// any, and the first item that would not fit is held back to lead the next. None when every
/// queue clone is gone and nothing is left.
async fn next_call<W: Writer>(
    batch: &mut Vec<Waiting<W>>,
    held: &mut Option<Waiting<W>>,
    waiting: &mut mpsc::UnboundedReceiver<Waiting<W>>,
    linger: Duration,
) -> Option<()> {
    // Not `held.take().or(…)`: its argument would wait for an item even with one held.
    let first = match held.take() {
        Some(first) => first,
        None => waiting.recv().await?,
    };
    let deadline = first.since + linger;
    let mut keys = W::keys(&first.item);
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
        let next_keys = W::keys(&next.item);
        if keys + next_keys > MAX_KEYS {
            *held = Some(next);
            break;
        }
        keys += next_keys;
        batch.push(next);
    }
    Some(())
}

fn fail_all<W: Writer>(batch: &mut Vec<Waiting<W>>, e: &RedisError) {
    for w in batch.drain(..) {
        let _ = w.answer.send(Err(e.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items that are only their number of keys.
    struct Keys;

    impl Writer for Keys {
        type Item = usize;
        type Answer = ();

        fn keys(item: &usize) -> usize {
            *item
        }

        async fn write(&mut self, _: &mut Watched, batch: &[&usize]) -> Result<Vec<()>, RedisError> {
            Ok(vec![(); batch.len()])
        }
    }

    /// An item of `keys` keys, queued at `since`, whose answer no one awaits.
    fn queued(keys: usize, since: Instant) -> Waiting<Keys> {
        let (answer, _) = oneshot::channel();
        Waiting {
            item: keys,
            answer,
            since,
        }
    }

    /// The sizes (in keys) of the calls that items of `keys` keys, all waiting at once, leave in.
    async fn calls(keys: &[usize]) -> Vec<Vec<usize>> {
        let (queue, mut waiting) = mpsc::unbounded_channel::<Waiting<Keys>>();
        for &n in keys {
            queue.send(queued(n, Instant::now())).unwrap();
        }
        drop(queue);
        let (mut calls, mut batch, mut held) = (Vec::new(), Vec::new(), None);
        while next_call(&mut batch, &mut held, &mut waiting, Duration::ZERO)
            .await
            .is_some()
        {
            calls.push(batch.drain(..).map(|w| w.item).collect());
        }
        calls
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
    fn send_later(queue: &mpsc::UnboundedSender<Waiting<Keys>>, since: Instant, after: Duration) {
        let queue = queue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = queue.send(queued(0, since));
        });
    }

    /// A call that is not full waits for items until `linger` past its first item's queueing;
    /// an item that has waited that long already goes at once, the next one in a call of its own.
    #[tokio::test]
    async fn a_call_waits_for_more_items_until_linger_past_its_first() {
        let linger = Duration::from_secs(1);
        let (queue, mut waiting) = mpsc::unbounded_channel::<Waiting<Keys>>();
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
