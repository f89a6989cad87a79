//! Sorted-set writes gathered across a batch and sent as one `ZADD` and one `ZREM` per key.
//!
//! In a transaction every command costs Redis its queueing and a `QUEUED` reply, and the client
//! a command to build and two replies to parse, so a batch's entries for one key (an account's
//! index, a retry shard) go together. A member's last write in the batch is the one sent, which
//! is what the writes one at a time would have left.

use redis::Pipeline;
use rustc_hash::FxHashMap;

/// One key's members to add, with their scores, and to remove.
type KeyWrites<'b> = (Vec<(i64, &'b str)>, Vec<&'b str>);

#[derive(Default)]
pub(super) struct SortedSetWrites<'b> {
    /// Each (key, member)'s place in `writes`.
    at: FxHashMap<(&'b str, &'b str), usize>,
    /// Per key and member, the score to add it with, or `None` to remove it.
    writes: Vec<(&'b str, &'b str, Option<i64>)>,
}

impl<'b> SortedSetWrites<'b> {
    pub(super) fn add(&mut self, key: &'b str, score: i64, member: &'b str) {
        self.write(key, member, Some(score));
    }

    pub(super) fn remove(&mut self, key: &'b str, member: &'b str) {
        self.write(key, member, None);
    }

    fn write(&mut self, key: &'b str, member: &'b str, score: Option<i64>) {
        let next = self.writes.len();
        let i = *self.at.entry((key, member)).or_insert(next);
        if i == next {
            self.writes.push((key, member, score));
        } else {
            self.writes[i].2 = score;
        }
    }

    /// Adds the gathered writes to `tx`, keys in the order first written, replies ignored.
    pub(super) fn send(&self, tx: &mut Pipeline) {
        let mut keys: Vec<&str> = Vec::new();
        let mut by_key: FxHashMap<&str, KeyWrites> = FxHashMap::default();
        for &(key, member, score) in &self.writes {
            let (adds, removes) = by_key.entry(key).or_insert_with(|| {
                keys.push(key);
                Default::default()
            });
            match score {
                Some(score) => adds.push((score, member)),
                None => removes.push(member),
            }
        }
        for key in keys {
            let (adds, removes) = &by_key[key];
            if !adds.is_empty() {
                tx.cmd("ZADD").arg(key);
                for &(score, member) in adds {
                    tx.arg(score).arg(member);
                }
                tx.ignore();
            }
            if !removes.is_empty() {
                tx.cmd("ZREM").arg(key).arg(removes).ignore();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::watched::commands_of;

    #[test]
    fn each_key_gets_one_zadd_and_one_zrem_with_each_members_last_write() {
        let mut writes = SortedSetWrites::default();
        writes.add("due", 5, "a");
        writes.add("idx", 1, "a");
        writes.remove("due", "b");
        writes.add("due", 6, "c");
        writes.remove("due", "a");
        writes.add("due", 7, "b");
        let mut tx = redis::pipe();
        writes.send(&mut tx);
        assert_eq!(commands_of(&tx), ["ZADD due 7 b 6 c", "ZREM due a", "ZADD idx 1 a"]);
    }
}
