//! Per-caller or per-endpoint state that must stay bounded without being scanned on every new
//! key: the dispatcher's limits per endpoint and the API's rate buckets per credential.

use std::collections::HashMap;
use std::hash::Hash;
use std::ops::{Deref, DerefMut};

/// The smallest size at which idle entries are looked for.
pub const PRUNE_ABOVE: usize = 10_000;

/// Entries by key. Idle ones are dropped once the map has grown past its bound, and the bound
/// then becomes twice what is left: with more keys busy at once than [`PRUNE_ABOVE`], a fixed
/// bound had every new key (and, for rate limits, every take) scan the whole map under its
/// lock for nothing to drop.
#[derive(Debug)]
pub struct IdleMap<K, T> {
    entries: HashMap<K, T>,
    prune_above: usize,
}

impl<K, T> Default for IdleMap<K, T> {
    fn default() -> Self {
        IdleMap {
            entries: HashMap::new(),
            prune_above: PRUNE_ABOVE,
        }
    }
}

impl<K: Eq + Hash, T> IdleMap<K, T> {
    /// Drops the entries `idle` says can go, if the map has grown past its bound.
    pub fn prune(&mut self, mut idle: impl FnMut(&T) -> bool) {
        if self.entries.len() > self.prune_above {
            self.entries.retain(|_, entry| !idle(entry));
            self.prune_above = (self.entries.len() * 2).max(PRUNE_ABOVE);
        }
    }
}

impl<K, T> Deref for IdleMap<K, T> {
    type Target = HashMap<K, T>;

    fn deref(&self) -> &Self::Target {
        &self.entries
    }
}

impl<K, T> DerefMut for IdleMap<K, T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(map: &mut IdleMap<usize, bool>, n: usize, idle: bool, looked: &mut usize) {
        for _ in 0..n {
            map.prune(|idle| {
                *looked += 1;
                *idle
            });
            let key = map.len();
            map.insert(key, idle);
        }
    }

    #[test]
    fn busy_entries_past_the_bound_are_looked_at_once_per_doubling_and_idle_ones_go() {
        let mut map = IdleMap::default();
        let mut looked = 0;
        add(&mut map, 3 * PRUNE_ABOVE, false, &mut looked);
        assert_eq!(map.len(), 3 * PRUNE_ABOVE, "every entry busy: none dropped");
        assert!(
            looked < 4 * PRUNE_ABOVE,
            "{looked} looks for {} entries: scanned at 10,001 and 20,002 only",
            map.len()
        );
        let mut idle_added = 0;
        loop {
            let before = map.len();
            add(&mut map, 1, true, &mut looked);
            idle_added += 1;
            if map.len() < before {
                break;
            }
        }
        assert_eq!(
            map.len(),
            3 * PRUNE_ABOVE + 1,
            "the idle ones went, the busy ones and the one just added are left"
        );
        assert!(
            idle_added <= PRUNE_ABOVE + 10,
            "{idle_added} idle ones added before a drop: the bound is twice what the last one left"
        );
    }
}
