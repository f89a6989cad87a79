//! The process-wide wait budget: how long a delivery may wait for a busy endpoint's slot.

use super::slots::HeldTime;
use crate::metrics::METRICS;
use std::time::Duration;

/// A delivery may wait this many of the process's typical slot holds for a slot...
const TYPICAL_HOLDS: f64 = 4.0;

/// ...but never more than this many slot waits: a process whose every endpoint is slow still
/// defers rather than let one endpoint's queue hold the broker messages others need.
const MAX_STRETCH: f64 = 8.0;

/// How long a delivery may wait for a busy endpoint's slot: the slot wait, or a few of the
/// process's typical slot holds when that is longer (a saturated machine), up to a cap.
/// Exported as a gauge, so an operator sees why deliveries are waited for or deferred.
#[derive(Debug)]
pub(super) struct WaitBudget {
    /// The slot wait, in ms: the budget's floor.
    floor_ms: f64,
    /// How long any endpoint's slot is held, across the process: the measure of "slow".
    pub(super) typical: HeldTime,
}

impl WaitBudget {
    pub(super) fn new(slot_wait: Duration) -> Self {
        let budget = WaitBudget {
            floor_ms: slot_wait.as_secs_f64() * 1000.0,
            typical: HeldTime::default(),
        };
        METRICS.slot_wait_budget.set(budget.ms() / 1000.0);
        budget
    }

    pub(super) fn ms(&self) -> f64 {
        (TYPICAL_HOLDS * self.typical.ms()).clamp(self.floor_ms, self.floor_ms * MAX_STRETCH)
    }

    pub(super) fn observe(&self, held_ms: f64) {
        self.typical.observe(held_ms);
        METRICS.slot_wait_budget.set(self.ms() / 1000.0);
    }
}
