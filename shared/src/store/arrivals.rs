//! Events' arrivals, a batch at a time, as one optimistic transaction without Lua.
//!
//! Each arrival is applied as if alone, in the order they came: if the account's endpoints are
//! still at the version the dispatcher chose the deliveries from, the event is stored (first
//! copy wins) and each of its deliveries that does not exist yet is created, under a lease or
//! deferred. The reads that decide it (the endpoints' versions, whether the events are stored)
//! go under a `WATCH` of those keys (see `watched`), so an endpoint change or another copy of
//! the event stored before the writes makes Redis refuse them, and the batch starts over.
//!
//! When a copy is the first, none of its deliveries can exist (they are only ever created here,
//! with the event, and a redelivery extends both), so only a repeated copy, which is rare (a
//! message redelivered after a dispatcher died), needs its deliveries' existence read: the
//! batch then reads again, watching those too. The retry shards, the account's indexes and each
//! endpoint's history get their entries in one `ZADD` per key after the batch's last event
//! (see `sorted_sets`), then the upkeep their flags ask for (see `upkeep`).

use super::batch_writer::Writer;
use super::sorted_sets::SortedSetWrites;
use super::watched::{Watched, number, text};
use crate::delivery::DeliveryStatus;
use bytes::Bytes;
use redis::{Cmd, Pipeline, RedisError, Value};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

/// An event's arrival waiting to be written, with its keys; owned, as it waits in the writer's
/// queue.
#[derive(Debug)]
pub(super) struct Arrival {
    pub(super) endpoints_version_key: String,
    /// The version the deliveries were chosen from.
    pub(super) endpoints_version: u64,
    pub(super) event_key: String,
    pub(super) events_index: String,
    pub(super) deliveries_index: String,
    pub(super) body: Bytes,
    pub(super) now_ms: i64,
    /// The event's id and account, which each of its deliveries' states names.
    pub(super) event_id: String,
    pub(super) account: String,
    /// Whether this write also trims the account's indexes and renews their lifetime.
    pub(super) events_upkeep: bool,
    pub(super) deliveries_upkeep: bool,
    pub(super) deliveries: Vec<Beginning>,
}

/// A delivery to create with its event, unless it exists.
#[derive(Debug)]
pub(super) struct Beginning {
    pub(super) state: String,
    pub(super) due: String,
    pub(super) history: String,
    /// The retry job, as the retry set holds it.
    pub(super) job: String,
    pub(super) delivery: String,
    pub(super) endpoint: String,
    pub(super) event_type: String,
    pub(super) due_ms: i64,
    /// `Some` to attempt now (pending, leased until `due_ms`); `None` to defer to `due_ms`.
    pub(super) lease: Option<String>,
    pub(super) history_upkeep: bool,
}

/// The answer to an arrival.
#[derive(Debug)]
pub(super) enum Arrived {
    /// The endpoints changed since the version given; nothing was written.
    Stale,
    Begun {
        /// The body stored by an earlier copy; `None` when this copy was stored.
        stored: Option<Vec<u8>>,
        /// Per delivery: created now (`true`) or already known.
        created: Vec<bool>,
    },
}

/// The writer of arrivals: their keys' lifetime and the bounds of the indexes they add to.
pub(super) struct ArrivalWriter {
    pub(super) ttl_secs: u64,
    pub(super) events_kept: u32,
    pub(super) deliveries_kept: u32,
}

impl Writer for ArrivalWriter {
    type Item = Arrival;
    type Answer = Arrived;

    /// As many as the script it replaced took.
    fn keys(a: &Arrival) -> usize {
        4 + 3 * a.deliveries.len()
    }

    async fn write(&mut self, conn: &mut Watched, batch: &[&Arrival]) -> Result<Vec<Arrived>, RedisError> {
        // Events stored before the batch whose deliveries' existence is read too.
        let mut repeated: HashSet<&str> = HashSet::default();
        loop {
            let reads = reads_of(batch, &repeated);
            let decided = conn
                .transact(&reads.pipe, |read| self.plan(batch, &reads, read, &mut repeated))
                .await?;
            if let Some((answers, _)) = decided {
                return Ok(answers);
            }
        }
    }
}

impl ArrivalWriter {
    /// Decides each arrival from the reads, in the batch's order, and builds the transaction;
    /// `None` (with the events to read more of added to `repeated`) when an event turned out to
    /// be stored whose deliveries were not read.
    fn plan<'b>(
        &self,
        batch: &[&'b Arrival],
        reads: &Reads<'b>,
        read: Vec<Value>,
        repeated: &mut HashSet<&'b str>,
    ) -> Option<(Pipeline, Vec<Arrived>)> {
        let (fetched, exists) = read.split_first().unwrap_or((&Value::Nil, &[]));
        let mut values = match fetched {
            Value::Array(values) => values.iter(),
            _ => [].iter(),
        };
        // A version that does not parse matches none (a missing one is 0, as no change made it).
        let versions: HashMap<&str, Option<u64>> = reads
            .versions
            .iter()
            .map(|&key| {
                let value = values.next();
                let version = if text(value).is_none() { Some(0) } else { number(value) };
                (key, version)
            })
            .collect();
        // Each event as the batch leaves it.
        let mut events: HashMap<&str, Stored> = reads
            .events
            .iter()
            .map(|&key| (key, text(values.next()).map_or(Stored::No, Stored::Before)))
            .collect();
        let mut existing: HashSet<&str> = reads
            .states
            .iter()
            .zip(exists)
            .filter(|(_, exists)| matches!(exists, Value::Int(1)))
            .map(|(&state, _)| state)
            .collect();
        let unread: Vec<&str> = batch
            .iter()
            .filter(|a| {
                matches!(events[a.event_key.as_str()], Stored::Before(_)) && !repeated.contains(a.event_key.as_str())
            })
            .map(|a| a.event_key.as_str())
            .collect();
        if !unread.is_empty() {
            repeated.extend(unread);
            return None;
        }
        let mut tx = redis::pipe();
        let mut entries = SortedSetWrites::default();
        let mut upkeeps: Vec<(&str, Option<u32>)> = Vec::new();
        let answers = batch
            .iter()
            .map(|a| {
                if versions[a.endpoints_version_key.as_str()] != Some(a.endpoints_version) {
                    return Arrived::Stale;
                }
                let event = events.get_mut(a.event_key.as_str()).expect("every event is read");
                let stored = match event {
                    Stored::No => None,
                    Stored::Before(body) | Stored::InBatch(body) => Some(body.to_vec()),
                };
                if stored.is_none() {
                    tx.cmd("SET")
                        .arg(&a.event_key)
                        .arg(&a.body[..])
                        .arg("EX")
                        .arg(self.ttl_secs)
                        .ignore();
                    *event = Stored::InBatch(&a.body);
                    entries.add(&a.events_index, a.now_ms, &a.event_id);
                }
                if a.events_upkeep {
                    upkeeps.push((&a.events_index, Some(self.events_kept)));
                }
                let created = a
                    .deliveries
                    .iter()
                    .map(|d| {
                        let create = stored.is_none() || !existing.contains(d.state.as_str());
                        if create {
                            self.begin(&mut tx, a, d);
                            entries.add(&d.due, d.due_ms, &d.job);
                            entries.add(&d.history, a.now_ms, &d.delivery);
                            entries.add(&a.deliveries_index, a.now_ms, &d.delivery);
                            existing.insert(&d.state);
                        }
                        if d.history_upkeep {
                            upkeeps.push((&d.history, None));
                        }
                        create
                    })
                    .collect();
                if a.deliveries_upkeep {
                    upkeeps.push((&a.deliveries_index, Some(self.deliveries_kept)));
                }
                Arrived::Begun { stored, created }
            })
            .collect();
        entries.send(&mut tx);
        for (key, kept) in upkeeps {
            if let Some(kept) = kept {
                tx.cmd("ZREMRANGEBYRANK")
                    .arg(key)
                    .arg(0)
                    .arg(-i64::from(kept) - 1)
                    .ignore();
            }
            tx.cmd("EXPIRE").arg(key).arg(self.ttl_secs).ignore();
        }
        Some((tx, answers))
    }

    /// Creates `d`'s state, under a lease (pending) or deferred (retrying) until its next
    /// attempt (its entry in the retry set goes with the batch's others). `attempts` and
    /// `cycle_start` stay absent until a record or a redelivery writes them, and every reader
    /// takes absent as 0: two fields fewer cost Redis 2% less per delivery.
    fn begin(&self, tx: &mut Pipeline, a: &Arrival, d: &Beginning) {
        // Sized beforehand: the command's buffers would otherwise regrow a few times each.
        let bytes = [&d.state, &a.event_id, &d.endpoint, &a.account, &d.event_type]
            .iter()
            .map(|s| s.len())
            .sum::<usize>()
            + d.lease.as_ref().map_or(0, String::len)
            + 96;
        let mut hset = Cmd::with_capacity(16, bytes);
        hset.arg("HSET")
            .arg(&d.state)
            .arg("event")
            .arg(&a.event_id)
            .arg("endpoint")
            .arg(&d.endpoint)
            .arg("account")
            .arg(&a.account)
            .arg("type")
            .arg(&d.event_type)
            .arg("created")
            .arg(a.now_ms)
            .arg("status");
        match &d.lease {
            Some(lease) => hset.arg(DeliveryStatus::Pending.as_str()).arg("lease").arg(lease),
            None => hset
                .arg(DeliveryStatus::Retrying.as_str())
                .arg("next_attempt")
                .arg(d.due_ms),
        };
        tx.add_command(hset).ignore();
        tx.cmd("EXPIRE").arg(&d.state).arg(self.ttl_secs).ignore();
    }
}

/// An event's body as a batch's arrivals find it: not stored, stored before the batch (as
/// read), or stored by an earlier copy in the batch; copied only for a copy that asks for it.
enum Stored<'b> {
    No,
    Before(&'b [u8]),
    InBatch(&'b [u8]),
}

/// What a batch's decisions need read, all watched: the endpoints' versions and the events
/// (one `MGET`), and the states of the deliveries of events stored before the batch.
struct Reads<'b> {
    pipe: Pipeline,
    versions: Vec<&'b str>,
    events: Vec<&'b str>,
    states: Vec<&'b str>,
}

fn reads_of<'b>(batch: &[&'b Arrival], repeated: &HashSet<&str>) -> Reads<'b> {
    let mut versions: Vec<&str> = Vec::new();
    let mut events: Vec<&str> = Vec::with_capacity(batch.len());
    let mut seen: HashSet<&str> = HashSet::default();
    let mut states: Vec<&str> = Vec::new();
    for a in batch {
        if !versions.contains(&a.endpoints_version_key.as_str()) {
            versions.push(&a.endpoints_version_key);
        }
        if seen.insert(&a.event_key) {
            events.push(&a.event_key);
            if repeated.contains(a.event_key.as_str()) {
                states.extend(a.deliveries.iter().map(|d| d.state.as_str()));
            }
        }
    }
    let mut pipe = redis::pipe();
    pipe.cmd("WATCH").arg(&versions).arg(&events).arg(&states).ignore();
    pipe.cmd("MGET").arg(&versions).arg(&events);
    for state in &states {
        pipe.cmd("EXISTS").arg(*state);
    }
    Reads {
        pipe,
        versions,
        events,
        states,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::watched::commands_of;

    const WRITER: ArrivalWriter = ArrivalWriter {
        ttl_secs: 60,
        events_kept: 100,
        deliveries_kept: 1000,
    };

    /// An arrival of event `event` at endpoints version `version`, with a delivery per state.
    fn arrival(event: &str, version: u64, states: &[&str]) -> Arrival {
        Arrival {
            endpoints_version_key: "ver".into(),
            endpoints_version: version,
            event_key: event.into(),
            events_index: "evt-index".into(),
            deliveries_index: "dlv-index".into(),
            body: format!("body of {event}").into_bytes().into(),
            now_ms: 7,
            event_id: event.into(),
            account: "acct".into(),
            events_upkeep: false,
            deliveries_upkeep: false,
            deliveries: states
                .iter()
                .map(|&state| Beginning {
                    state: state.into(),
                    due: "due".into(),
                    history: "history".into(),
                    job: format!("job of {state}"),
                    delivery: state.into(),
                    endpoint: "ep".into(),
                    event_type: "invoice.paid".into(),
                    due_ms: 9,
                    lease: Some("lease".into()),
                    history_upkeep: false,
                })
                .collect(),
        }
    }

    fn bulk(value: &str) -> Value {
        Value::BulkString(value.into())
    }

    /// Each command's first two words.
    fn heads(tx: &Pipeline) -> Vec<String> {
        commands_of(tx)
            .iter()
            .map(|c| c.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect()
    }

    fn created(answer: &Arrived) -> (Option<String>, Vec<bool>) {
        match answer {
            Arrived::Begun { stored, created } => (
                stored.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
                created.clone(),
            ),
            Arrived::Stale => panic!("stale"),
        }
    }

    #[test]
    fn a_stale_arrival_writes_nothing_and_a_second_copy_in_the_batch_finds_the_first() {
        let batch = [
            arrival("e1", 3, &["d1"]),
            arrival("e2", 2, &["d2"]),
            arrival("e1", 3, &["d1", "d3"]),
        ];
        let batch: Vec<&Arrival> = batch.iter().collect();
        let mut repeated = HashSet::default();
        let reads = reads_of(&batch, &repeated);
        let read = vec![Value::Array(vec![bulk("3"), Value::Nil, Value::Nil])];
        let (tx, answers) = WRITER.plan(&batch, &reads, read, &mut repeated).unwrap();
        assert!(matches!(answers[1], Arrived::Stale));
        assert_eq!(created(&answers[0]), (None, vec![true]));
        assert_eq!(created(&answers[2]), (Some("body of e1".into()), vec![false, true]));
        assert_eq!(
            heads(&tx),
            [
                "SET e1",
                "HSET d1",
                "EXPIRE d1",
                "HSET d3",
                "EXPIRE d3",
                "ZADD evt-index",
                "ZADD due",
                "ZADD history",
                "ZADD dlv-index"
            ]
        );
    }

    #[test]
    fn an_event_stored_before_is_read_again_with_its_deliveries() {
        let batch = [arrival("e1", 0, &["d1", "d2"])];
        let batch: Vec<&Arrival> = batch.iter().collect();
        let mut repeated = HashSet::default();
        let reads = reads_of(&batch, &repeated);
        let read = vec![Value::Array(vec![Value::Nil, bulk("stored body")])];
        assert!(WRITER.plan(&batch, &reads, read, &mut repeated).is_none());
        assert_eq!(repeated, HashSet::from_iter(["e1"]));

        let reads = reads_of(&batch, &repeated);
        assert_eq!(reads.states, ["d1", "d2"]);
        let read = vec![
            Value::Array(vec![Value::Nil, bulk("stored body")]),
            Value::Int(1),
            Value::Int(0),
        ];
        let (tx, answers) = WRITER.plan(&batch, &reads, read, &mut repeated).unwrap();
        assert_eq!(created(&answers[0]), (Some("stored body".into()), vec![false, true]));
        assert_eq!(
            heads(&tx),
            ["HSET d2", "EXPIRE d2", "ZADD due", "ZADD history", "ZADD dlv-index"]
        );
    }
}
