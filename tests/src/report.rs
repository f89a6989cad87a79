//! The fault table: each fault test records what was confirmed and what arrived, and
//! `scripts/test` prints the rows as one table at the end of the run.

use std::collections::HashMap;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fault-report")
}

/// The ids of `events`, as the rows take what was confirmed.
pub fn ids_of(events: &[laabam_shared::envelope::Envelope]) -> Vec<String> {
    events.iter().map(|e| e.id.to_string()).collect()
}

/// Records and prints one row. `arrivals` maps each confirmed event id to how many times it
/// arrived at its endpoint(s); `expected_per_event` is how many arrivals a loss-free,
/// duplicate-free run gives each event (the number of subscribed endpoints).
pub fn fault_row(
    fault: &str,
    confirmed: &[String],
    arrivals: &HashMap<String, usize>,
    expected_per_event: usize,
) -> (usize, usize) {
    let delivered = confirmed
        .iter()
        .filter(|id| arrivals.get(*id).copied().unwrap_or(0) >= expected_per_event)
        .count();
    let lost = confirmed.len() - delivered;
    let duplicates: usize = confirmed
        .iter()
        .map(|id| {
            arrivals
                .get(id)
                .copied()
                .unwrap_or(0)
                .saturating_sub(expected_per_event)
        })
        .sum();
    let row = format!(
        "| {fault} | {} | {delivered} | {lost} | {duplicates} |",
        confirmed.len()
    );
    println!("{row}");
    let _ = std::fs::create_dir_all(dir());
    let file: String = fault
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let _ = std::fs::write(dir().join(format!("{file}.md")), format!("{row}\n"));
    (lost, duplicates)
}

/// Waits up to `within` for every confirmed event to arrive at `rx` (one endpoint), records
/// `fault`'s row, and fails the test if any never did; returns the duplicates.
pub async fn every_confirmed_event_arrives(
    fault: &str,
    confirmed: &[String],
    rx: &crate::Receiver,
    within: std::time::Duration,
) -> usize {
    crate::wait_until(&format!("every confirmed event delivered: {fault}"), within, || async {
        let seen = rx.per_event();
        confirmed.iter().all(|id| seen.contains_key(id))
    })
    .await;
    let (lost, duplicates) = fault_row(fault, confirmed, &rx.per_event(), 1);
    assert_eq!(lost, 0, "{fault}: confirmed events lost");
    duplicates
}
