//! Attempts' records, a batch at a time, as one optimistic transaction without Lua.
//!
//! Each record is applied as if alone, in the order the records came: it logs the attempt (if
//! any) with its statistics and the endpoint's health, and, when the lease is still the
//! record's, moves the state on. The decisions a script made in Redis are made here, from reads
//! sent under a `WATCH` of the records' states (see `watched`): whose lease it is and the
//! attempt's number in the log. If a state changes before the writes (a scheduler took an
//! expired lease), Redis refuses them and the batch starts over from its reads.
//!
//! What no decision needs is not watched, so dispatchers recording the same endpoint never
//! refuse each other: statistics are counted with `HINCRBY` (a bucket's lifetime set once, by
//! `EXPIRE … NX`), and a failing streak starts with `HSETNX`, is read back within the
//! transaction, and ends with `HDEL` at a success. What records of one endpoint share is
//! written once per batch: the counts summed per field, the health as the last record left it.
//!
//! Counted under callgrind (`laabam-bench redis-calls --callgrind`, one endpoint per event), a
//! record costs Redis 51,200 instructions this way against 97,900 through the Lua script that
//! did it before (see the README's Performance section).

use super::batch_writer::Writer;
use super::script_call::ScriptCall;
use super::sorted_sets::SortedSetWrites;
use super::stats;
use super::watched::Watched;
use super::watched::{number, text};
use crate::delivery::{DeliveryStatus, Outcome};
use redis::aio::ConnectionManager;
use redis::{Cmd, Pipeline, RedisError, Script, Value};
use rustc_hash::FxHashMap as HashMap;
use std::sync::LazyLock;

/// The newest attempts a delivery's log keeps.
const LOG_KEPT: u64 = 100;

/// Trims an endpoint's history when a batch finished some of its deliveries and the history
/// has outgrown its bound (see `lua/trim_history.lua`). KEYS: history, health. ARGV: the history
/// kept, the key prefix, the deliveries finished.
static TRIM_HISTORY: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/trim_history.lua")));

/// A record waiting to be written, with its keys; owned, as it waits in the writer's queue.
#[derive(Debug)]
pub(super) struct Recording {
    pub(super) state: String,
    pub(super) due: String,
    pub(super) health: String,
    pub(super) stats_5m: String,
    pub(super) stats_1h: String,
    pub(super) history: String,
    pub(super) lease: String,
    /// The attempt as stored in the log, and what its statistics and health need; `None` for a
    /// deferral, which is not an attempt.
    pub(super) attempt: Option<(String, Counted)>,
    pub(super) status: DeliveryStatus,
    pub(super) attempts: u32,
    pub(super) first_attempt_ms: Option<i64>,
    pub(super) next_attempt_ms: Option<i64>,
    pub(super) reason: Option<String>,
    /// The retry job, as the retry set holds it.
    pub(super) job: String,
    pub(super) delivery: String,
}

/// What an attempt adds to its endpoint's statistics and health.
#[derive(Debug)]
pub(super) struct Counted {
    /// `outcome|latency bucket`, the statistics' field.
    pub(super) field: String,
    pub(super) status_code: Option<u16>,
    pub(super) at_ms: i64,
}

impl Counted {
    fn outcome(&self) -> &str {
        self.field.split_once('|').map_or(&self.field, |(outcome, _)| outcome)
    }

    fn is_success(&self) -> bool {
        self.outcome() == Outcome::Success.as_str()
    }
}

/// The answer to a record: whether the lease was still its own, and since when the endpoint has
/// failed without a success in between (after a failed attempt).
pub(super) type Answer = (bool, Option<i64>);

/// Keys a record stands for in a batch's bound on keys (the script it replaced took six).
const KEYS_PER_RECORD: usize = 6;

/// The writer of records: how much history each endpoint keeps, under which prefix, and the
/// shared connection its rare trims go through.
pub(super) struct RecordWriter {
    pub(super) history_kept: u32,
    pub(super) prefix: String,
    pub(super) trims: ConnectionManager,
}

impl Writer for RecordWriter {
    type Item = Recording;
    type Answer = Answer;

    fn keys(_: &Recording) -> usize {
        KEYS_PER_RECORD
    }

    async fn write(&mut self, conn: &mut Watched, batch: &[&Recording]) -> Result<Vec<Answer>, RedisError> {
        let reads = reads_of(batch);
        let kept = self.history_kept;
        let (plan, replies) = conn
            .transact(&reads.pipe, |read| Some(plan(batch, &reads, read, kept)))
            .await?
            .expect("a record's reads are all it needs");
        let answers = plan.answers(&replies);
        for &((history, health), finishes) in &plan.trims {
            let trimmed = ScriptCall::new(&TRIM_HISTORY, 2)
                .key(history)
                .key(health)
                .arg(self.history_kept)
                .arg(&self.prefix)
                .arg(finishes)
                .invoke::<()>(&mut self.trims)
                .await;
            if let Err(e) = trimmed {
                // The records are written; the history is trimmed by a later finish.
                tracing::warn!(error = %e, history, "trimming an endpoint's history failed");
            }
        }
        Ok(answers)
    }
}

/// The reads a batch's decisions need: each state's lease, log length and existence (watched),
/// and for each history a finish may trim, its length and the endpoint's `trim_at`.
struct Reads<'b> {
    pipe: Pipeline,
    states: Vec<&'b str>,
    finishing: Vec<(&'b str, &'b str)>,
}

fn reads_of<'b>(batch: &[&'b Recording]) -> Reads<'b> {
    let mut states: Vec<&str> = Vec::with_capacity(batch.len());
    let mut seen: rustc_hash::FxHashSet<&str> = Default::default();
    let mut finishing: Vec<(&str, &str)> = Vec::new();
    for r in batch {
        if seen.insert(&r.state) {
            states.push(&r.state);
        }
        let pair = (r.history.as_str(), r.health.as_str());
        if r.status.is_finished() && !finishing.contains(&pair) {
            finishing.push(pair);
        }
    }
    let mut pipe = redis::pipe();
    pipe.cmd("WATCH").arg(&states).ignore();
    for state in &states {
        pipe.cmd("HMGET").arg(*state).arg("lease").arg("logged").arg("status");
    }
    for (history, health) in &finishing {
        pipe.cmd("ZCARD").arg(*history);
        pipe.cmd("HGET").arg(*health).arg("trim_at");
    }
    Reads {
        pipe,
        states,
        finishing,
    }
}

/// A state as the batch's records so far have left it.
struct StateView {
    lease: Option<Vec<u8>>,
    logged: u64,
    exists: bool,
}

/// Where a failed attempt's streak began: at a time the batch knows, or at whatever the
/// transaction's `n`-th reply says (the endpoint's stored streak, or this batch's first failure
/// if there was none).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Streak {
    None,
    Known(i64),
    Stored(usize),
}

/// The writes built from a batch's reads, and what is needed to answer it afterwards.
struct Plan<'b> {
    /// Per record: whether it applied, and its streak.
    answers: Vec<(bool, Streak)>,
    /// Histories (with their endpoint's health) to trim once the transaction is in, with the
    /// number of their deliveries the batch finished.
    trims: Vec<((&'b str, &'b str), u32)>,
}

impl Plan<'_> {
    fn answers(&self, replies: &[Value]) -> Vec<Answer> {
        self.answers
            .iter()
            .map(|&(applied, streak)| {
                let since = match streak {
                    Streak::None => None,
                    Streak::Known(at) => Some(at),
                    Streak::Stored(n) => number(replies.get(n)).and_then(|at| i64::try_from(at).ok()),
                };
                (applied, since)
            })
            .collect()
    }
}

/// Decides each record from the reads, in the batch's order, and builds the transaction.
fn plan<'b>(batch: &[&'b Recording], reads: &Reads<'b>, read: Vec<Value>, history_kept: u32) -> (Pipeline, Plan<'b>) {
    let mut views: HashMap<&str, StateView> = HashMap::default();
    for (state, held) in reads.states.iter().zip(&read) {
        let fields = match held {
            Value::Array(fields) => fields.as_slice(),
            _ => &[],
        };
        views.insert(
            state,
            StateView {
                lease: text(fields.first()).map(<[u8]>::to_vec),
                logged: number(fields.get(1)).unwrap_or(0),
                exists: text(fields.get(2)).is_some(),
            },
        );
    }
    let mut tx = redis::pipe();
    let mut answers = Vec::with_capacity(batch.len());
    let mut counts = Counts::default();
    let mut due = SortedSetWrites::default();
    let mut healths = Healths::default();
    let mut finished: Vec<((&str, &str), u32)> = Vec::new();
    for &r in batch {
        let view = views.get_mut(r.state.as_str()).expect("every state is read");
        let ours = !r.lease.is_empty() && view.lease.as_deref() == Some(r.lease.as_bytes());
        let mut streak = Streak::None;
        let logged = r.attempt.as_ref().map(|(stored, counted)| {
            let n = view.logged + 1;
            if n > LOG_KEPT {
                tx.cmd("HDEL")
                    .arg(&r.state)
                    .arg(format!("att:{}", n - LOG_KEPT))
                    .ignore();
            }
            counts.add(&r.stats_5m, &counted.field, stats::FIVE_MINUTE_TTL_SECS);
            counts.add(&r.stats_1h, &counted.field, stats::HOUR_TTL_SECS);
            streak = healths.attempted(r, counted);
            (n, stored)
        });
        if ours {
            // Sized beforehand: the command's buffers would otherwise regrow a few times each.
            let bytes =
                r.state.len() + logged.map_or(0, |(_, stored)| stored.len()) + r.reason.as_ref().map_or(0, String::len);
            let mut hset = Cmd::with_capacity(19, bytes + 160);
            hset.arg("HSET")
                .arg(&r.state)
                .arg("status")
                .arg(r.status.as_str())
                .arg("attempts")
                .arg(r.attempts)
                .arg("lease")
                .arg("")
                .arg("next_attempt");
            match r.next_attempt_ms {
                Some(at) => hset.arg(at),
                None => hset.arg(""),
            };
            if let Some((n, stored)) = logged {
                hset.arg(format!("att:{n}")).arg(stored).arg("logged").arg(n);
                view.logged = n;
            }
            if let Some(first) = r.first_attempt_ms {
                hset.arg("first_attempt").arg(first);
            }
            if let Some(reason) = &r.reason {
                hset.arg("reason").arg(reason);
            }
            tx.add_command(hset).ignore();
            match r.next_attempt_ms {
                Some(at) => due.add(&r.due, at, &r.job),
                None => due.remove(&r.due, &r.job),
            }
            view.lease = Some(Vec::new());
            let pair = (r.history.as_str(), r.health.as_str());
            if r.status.is_finished() {
                match finished.iter_mut().find(|(p, _)| *p == pair) {
                    Some((_, n)) => *n += 1,
                    None => finished.push((pair, 1)),
                }
            }
        } else if let Some((n, stored)) = logged.filter(|_| view.exists) {
            // Only the attempt, and only into a delivery that still exists (a write would
            // recreate an expired one without a lifetime).
            tx.cmd("HSET")
                .arg(&r.state)
                .arg(format!("att:{n}"))
                .arg(stored)
                .arg("logged")
                .arg(n)
                .ignore();
            view.logged = n;
        }
        answers.push((ours, streak));
    }
    due.send(&mut tx);
    counts.write(&mut tx);
    let stored_at = healths.write(&mut tx);
    // A streak read back from Redis is the reply of its endpoint's `HGET`, the transaction's
    // only replies.
    for (_, streak) in &mut answers {
        if let Streak::Stored(h) = *streak {
            *streak = Streak::Stored(stored_at[h].expect("a stored streak was read back"));
        }
    }
    let trims = reads
        .finishing
        .iter()
        .zip(read[reads.states.len()..].chunks(2))
        .filter(|(_, size_and_mark)| {
            let size = number(size_and_mark.first()).unwrap_or(0);
            let trim_at = number(size_and_mark.get(1));
            outgrown(size, trim_at, history_kept)
        })
        .filter_map(|(pair, _)| finished.iter().find(|(p, _)| p == pair).copied())
        .collect();
    (tx, Plan { answers, trims })
}

/// Whether a history of `size` entries is due a trim: past its bound by more than the slack the
/// trim allows (a 64th), and not waiting, after a scan that found too few finished deliveries
/// to delete, until it has grown to `trim_at`. A filter that spares most batches the trim's
/// round trip; the script decides again on what it finds when it runs, since other writers may
/// have trimmed or added meanwhile.
fn outgrown(size: u64, trim_at: Option<u64>, history_kept: u32) -> bool {
    let kept = u64::from(history_kept);
    size > kept + kept / 64 && trim_at.is_none_or(|at| size >= at)
}

/// The batch's attempts counted per statistics bucket and field.
#[derive(Default)]
struct Counts<'b> {
    at: HashMap<(&'b str, &'b str), usize>,
    counted: Vec<(&'b str, &'b str, u64)>,
    /// Each bucket once, with its lifetime.
    buckets: HashMap<&'b str, u64>,
}

impl<'b> Counts<'b> {
    fn add(&mut self, bucket: &'b str, field: &'b str, ttl_secs: u64) {
        let next = self.counted.len();
        let i = *self.at.entry((bucket, field)).or_insert(next);
        if i == next {
            self.counted.push((bucket, field, 0));
            self.buckets.insert(bucket, ttl_secs);
        }
        self.counted[i].2 += 1;
    }

    /// A bucket's first count sets its lifetime; `NX` leaves a running one alone.
    fn write(&self, tx: &mut Pipeline) {
        for &(bucket, field, n) in &self.counted {
            tx.cmd("HINCRBY").arg(bucket).arg(field).arg(n).ignore();
        }
        for (bucket, ttl) in &self.buckets {
            tx.cmd("EXPIRE").arg(*bucket).arg(*ttl).arg("NX").ignore();
        }
    }
}

/// An endpoint's health as the batch's attempts leave it.
struct Health<'b> {
    key: &'b str,
    /// The last attempt, and its delivery.
    last: &'b Counted,
    last_delivery: &'b str,
    last_success: Option<i64>,
    /// The streak the last attempt left; `Streak::None` after a success.
    streak: Streak,
    /// The first failure before any success in the batch, which may start a streak.
    first_failure: Option<i64>,
}

/// The field that holds since when an endpoint has failed; absent while it does not. (Stores
/// written by the Lua scripts kept an empty `failing_since` instead, which `HSETNX` could not
/// tell from a streak; a success removes it.)
const FAILING_FROM: &str = "failing_from";

#[derive(Default)]
struct Healths<'b> {
    at: HashMap<&'b str, usize>,
    list: Vec<Health<'b>>,
}

impl<'b> Healths<'b> {
    /// Counts `r`'s attempt into its endpoint's health; answers the streak it leaves, where
    /// `Streak::Stored` names the endpoint (its place in the list) until the writes are built.
    fn attempted(&mut self, r: &'b Recording, counted: &'b Counted) -> Streak {
        let next = self.list.len();
        let h = *self.at.entry(r.health.as_str()).or_insert(next);
        if h == next {
            self.list.push(Health {
                key: &r.health,
                last: counted,
                last_delivery: &r.delivery,
                last_success: None,
                streak: Streak::None,
                first_failure: None,
            });
        }
        let health = &mut self.list[h];
        health.last = counted;
        health.last_delivery = &r.delivery;
        if counted.is_success() {
            health.last_success = Some(counted.at_ms);
            health.streak = Streak::None;
        } else if health.streak == Streak::None {
            health.streak = match health.last_success {
                Some(_) => Streak::Known(counted.at_ms),
                None => {
                    health.first_failure = Some(counted.at_ms);
                    Streak::Stored(h)
                }
            };
        }
        health.streak
    }

    /// Writes each endpoint's health; answers, per endpoint, the place among the transaction's
    /// replies of its stored streak, for those whose streak was read back.
    fn write(&self, tx: &mut Pipeline) -> Vec<Option<usize>> {
        let mut replies = 0;
        let mut stored_at = Vec::with_capacity(self.list.len());
        for health in &self.list {
            stored_at.push(health.first_failure.map(|at| {
                tx.cmd("HSETNX").arg(health.key).arg(FAILING_FROM).arg(at).ignore();
                tx.cmd("HGET").arg(health.key).arg(FAILING_FROM);
                replies += 1;
                replies - 1
            }));
            let last = health.last;
            tx.cmd("HSET")
                .arg(health.key)
                .arg("last_at")
                .arg(last.at_ms)
                .arg("last_outcome")
                .arg(last.outcome())
                .arg("last_status");
            match last.status_code {
                Some(code) => tx.arg(code),
                None => tx.arg(""),
            };
            tx.arg("last_delivery").arg(health.last_delivery);
            if let Some(at) = health.last_success {
                tx.arg("last_success").arg(at);
            }
            match health.streak {
                Streak::Known(at) => {
                    tx.arg(FAILING_FROM).arg(at).ignore();
                }
                Streak::None => {
                    tx.ignore()
                        .cmd("HDEL")
                        .arg(health.key)
                        .arg(FAILING_FROM)
                        .arg("failing_since")
                        .ignore();
                }
                Streak::Stored(_) => {
                    tx.ignore();
                }
            }
        }
        stored_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::watched::commands_of;

    /// A record of `state` under `lease` on one endpoint; an attempt at `at` when `success` is
    /// given.
    fn recording(state: &str, lease: &str, attempt: Option<(bool, i64)>, status: DeliveryStatus) -> Recording {
        Recording {
            state: state.into(),
            due: "due".into(),
            health: "health".into(),
            stats_5m: "5m".into(),
            stats_1h: "1h".into(),
            history: "history".into(),
            lease: lease.into(),
            attempt: attempt.map(|(success, at_ms)| {
                let outcome = if success { "success" } else { "http5xx" };
                let counted = Counted {
                    field: format!("{outcome}|0"),
                    status_code: None,
                    at_ms,
                };
                (format!("attempt at {at_ms}"), counted)
            }),
            status,
            attempts: 1,
            first_attempt_ms: None,
            next_attempt_ms: None,
            reason: None,
            job: format!("job of {state}"),
            delivery: state.into(),
        }
    }

    /// A state's `HMGET lease logged status` as Redis answers it.
    fn held(lease: Option<&str>, logged: Option<&str>, exists: bool) -> Value {
        let bulk = |v: Option<&str>| v.map_or(Value::Nil, |v| Value::BulkString(v.into()));
        Value::Array(vec![bulk(lease), bulk(logged), bulk(exists.then_some("pending"))])
    }

    /// Plans `batch` on `read`, then answers it as if the transaction's replies were `replies`.
    fn planned(batch: &[Recording], read: Vec<Value>, replies: &[Value]) -> (Vec<String>, Vec<Answer>) {
        let batch: Vec<&Recording> = batch.iter().collect();
        let reads = reads_of(&batch);
        let (tx, plan) = plan(&batch, &reads, read, 6400);
        (commands_of(&tx), plan.answers(replies))
    }

    #[test]
    fn a_streak_is_read_back_from_redis_until_a_success_in_the_batch_ends_it() {
        use DeliveryStatus::{Retrying, Succeeded};
        let batch = [
            recording("s1", "l1", Some((false, 10)), Retrying),
            recording("s2", "l2", Some((false, 20)), Retrying),
            recording("s3", "l3", Some((true, 30)), Succeeded),
            recording("s4", "l4", Some((false, 40)), Retrying),
            recording("s5", "l5", Some((false, 50)), Retrying),
        ];
        let mut read: Vec<Value> = (1..=5).map(|i| held(Some(&format!("l{i}")), None, true)).collect();
        read.extend([Value::Int(5), Value::Nil]);
        // Redis held a streak from 5 already.
        let (commands, answers) = planned(&batch, read, &[Value::BulkString(b"5".to_vec())]);
        assert_eq!(
            answers,
            [
                (true, Some(5)),
                (true, Some(5)),
                (true, None),
                (true, Some(40)),
                (true, Some(40))
            ]
        );
        assert!(
            commands.contains(&"HSETNX health failing_from 10".to_owned()),
            "{commands:?}"
        );
        let health = commands.iter().position(|c| c == "HGET health failing_from").unwrap();
        assert_eq!(
            commands[health + 1],
            "HSET health last_at 50 last_outcome http5xx last_status  last_delivery s5 last_success 30 failing_from 40"
        );
        assert!(commands.contains(&"HINCRBY 5m http5xx|0 4".to_owned()));
        assert!(commands.contains(&"HINCRBY 1h success|0 1".to_owned()));
        assert!(commands.contains(&"EXPIRE 5m 7200 NX".to_owned()));
        assert!(!commands.iter().any(|c| c.starts_with("HDEL health")));
    }

    #[test]
    fn a_success_last_ends_the_streak_and_nothing_is_read_back() {
        let batch = [recording("s1", "l1", Some((true, 30)), DeliveryStatus::Succeeded)];
        let read = vec![held(Some("l1"), None, true), Value::Int(0), Value::Nil];
        let (commands, answers) = planned(&batch, read, &[]);
        assert_eq!(answers, [(true, None)]);
        assert!(commands.contains(&"HDEL health failing_from failing_since".to_owned()));
        assert!(
            !commands
                .iter()
                .any(|c| c.starts_with("HSETNX") || c.starts_with("HGET"))
        );
        assert!(commands.contains(&"ZREM due job of s1".to_owned()));
    }

    #[test]
    fn only_the_lease_holder_moves_the_state_and_every_attempt_is_logged_in_order() {
        use DeliveryStatus::Retrying;
        let batch = [
            recording("s", "expired", Some((false, 10)), Retrying),
            recording("s", "current", Some((false, 20)), Retrying),
            recording("s", "current", None, Retrying),
            recording("gone", "l", Some((false, 30)), Retrying),
        ];
        let read = vec![held(Some("current"), Some("100"), true), held(None, None, false)];
        let (commands, answers) = planned(&batch, read, &[Value::BulkString(b"10".to_vec())]);
        assert_eq!(
            answers.iter().map(|a| a.0).collect::<Vec<_>>(),
            [false, true, false, false]
        );
        let of_states: Vec<&String> = commands
            .iter()
            .filter(|c| matches!(c.split(' ').nth(1), Some("s" | "gone")))
            .collect();
        assert_eq!(
            of_states,
            [
                "HDEL s att:1",
                "HSET s att:101 attempt at 10 logged 101",
                "HDEL s att:2",
                "HSET s status retrying attempts 1 lease  next_attempt  att:102 attempt at 20 logged 102",
            ],
            "the lease released, a record under it moves nothing; a gone state gets no attempt"
        );
        assert_eq!(answers[3], (false, Some(10)), "every failure shares the stored streak");
    }

    #[test]
    fn a_history_is_trimmed_past_its_slack_unless_a_scan_asked_to_wait() {
        assert!(!outgrown(6500, None, 6400));
        assert!(outgrown(6501, None, 6400));
        assert!(!outgrown(6501, Some(6600), 6400));
        assert!(outgrown(6600, Some(6600), 6400));
    }
}
