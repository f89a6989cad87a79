//! When a write to a bounded, expiring index (an account's events and deliveries, an
//! endpoint's history) also trims it to its cap and renews its lifetime.
//!
//! Doing both on every write cost about a tenth of Redis's time per delivery (five of the
//! twenty-odd commands an event and its record run), for keys that need it far less often. A
//! process does the upkeep of a key on its first write to it, then after every
//! [`EVERY_WRITES`] writes or once an interval has passed, whichever comes first. So an index
//! holds at most that many entries past its cap per writing process, and its lifetime ends at
//! most one interval (a minute, or a 64th of the retention when that is shorter) before its
//! newest entry's would.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Writes to a key between two upkeeps of it.
const EVERY_WRITES: u32 = 64;

/// The longest time between two upkeeps of a key that is written to.
const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// Keys remembered at most; past it the process starts over, which only brings upkeeps forward.
const MAX_KEYS: usize = 100_000;

#[derive(Debug)]
pub(super) struct Upkeep {
    interval: Duration,
    marks: Mutex<HashMap<String, Mark>>,
}

/// The last upkeep of a key and the writes since.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    writes: u32,
}

impl Upkeep {
    pub(super) fn new(retention: Duration) -> Self {
        Upkeep {
            interval: (retention / 64).min(MAX_INTERVAL),
            marks: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a write to `key` and says whether it should do the key's upkeep.
    pub(super) fn due(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut marks = self.marks.lock().expect("upkeep lock");
        if let Some(mark) = marks.get_mut(key) {
            if mark.writes < EVERY_WRITES && now.duration_since(mark.at) < self.interval {
                mark.writes += 1;
                return false;
            }
            *mark = Mark { at: now, writes: 0 };
            return true;
        }
        if marks.len() >= MAX_KEYS {
            marks.clear();
        }
        marks.insert(key.to_owned(), Mark { at: now, writes: 0 });
        true
    }

    /// After a write that may not have happened (an error, or nothing written): the next write
    /// to `key` does its upkeep, so no key is left without a lifetime.
    pub(super) fn forget(&self, key: &str) {
        self.marks.lock().expect("upkeep lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_kept_up_on_its_first_write_then_every_so_many_writes() {
        let upkeep = Upkeep::new(Duration::from_secs(7 * 86_400));
        assert!(upkeep.due("a"), "first write");
        for n in 0..EVERY_WRITES {
            assert!(!upkeep.due("a"), "write {n} after the upkeep");
        }
        assert!(upkeep.due("a"), "the write after {EVERY_WRITES} without upkeep");
        assert!(upkeep.due("b"), "each key is counted on its own");
        assert!(!upkeep.due("a"));
    }

    #[test]
    fn a_key_is_kept_up_once_the_interval_has_passed() {
        // A 640 ms retention gives a 10 ms interval.
        let upkeep = Upkeep::new(Duration::from_millis(640));
        assert!(upkeep.due("a"));
        assert!(!upkeep.due("a"));
        std::thread::sleep(Duration::from_millis(20));
        assert!(upkeep.due("a"), "the interval has passed");
    }

    #[test]
    fn a_forgotten_key_is_kept_up_on_its_next_write() {
        let upkeep = Upkeep::new(Duration::from_secs(3600));
        assert!(upkeep.due("a"));
        upkeep.forget("a");
        assert!(upkeep.due("a"));
    }
}
