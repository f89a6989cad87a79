//! Ports for processes that must be told where to listen before they start.
//!
//! A port found by binding port 0 comes from the kernel's ephemeral range, the same range it
//! hands to outgoing connections: between the probe's close and the process's own bind, a
//! connection (to a receiver, the broker, Redis) can take it, and the process exits with
//! "address in use" (a `fanout` benchmark run was lost that way). Ports below that range are
//! only ever taken by a bind, so they are drawn from there. The scripts draw theirs through the
//! `free-port` binary.

use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;
use std::ops::RangeInclusive;

/// The lowest port drawn: above the well-known and most registered service ports.
const LOWEST: u16 = 10_000;

/// A port on 127.0.0.1 that was free a moment ago and that no outgoing connection will take.
pub fn free_port() -> u16 {
    let range = outside_ephemeral(ephemeral_range());
    let span = u64::from(range.end() - range.start()) + 1;
    let random = RandomState::new();
    first_free((0u64..10_000).map(|draw| range.start() + (random.hash_one(draw) % span) as u16))
        .expect("a free port outside the ephemeral range")
}

/// The first of `candidates` that can be bound on 127.0.0.1 now.
fn first_free(mut candidates: impl Iterator<Item = u16>) -> Option<u16> {
    candidates.find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// The kernel's ephemeral port range, or Linux's default where it cannot be read.
fn ephemeral_range() -> RangeInclusive<u16> {
    let read = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let bounds: Option<Vec<u16>> = read.map(|s| s.split_whitespace().filter_map(|n| n.parse().ok()).collect());
    match bounds.as_deref() {
        Some(&[low, high]) if low <= high => low..=high,
        _ => 32_768..=60_999,
    }
}

/// The larger of the stretches below and above `ephemeral` (below it starting at [`LOWEST`]).
fn outside_ephemeral(ephemeral: RangeInclusive<u16>) -> RangeInclusive<u16> {
    let below = LOWEST..=ephemeral.start().saturating_sub(1).max(LOWEST);
    let above = ephemeral.end().saturating_add(1)..=u16::MAX;
    if below.end() - below.start() >= above.end() - above.start() {
        below
    } else {
        above
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_can_be_bound_and_lie_outside_the_ephemeral_range() {
        let ephemeral = ephemeral_range();
        for _ in 0..50 {
            let port = free_port();
            assert!(
                !ephemeral.contains(&port),
                "{port} is in the ephemeral range {ephemeral:?}"
            );
            assert!(port >= LOWEST, "{port} is below {LOWEST}");
            TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }

    #[test]
    fn a_port_in_use_is_passed_over() {
        let taken = TcpListener::bind(("127.0.0.1", free_port())).unwrap();
        let in_use = taken.local_addr().unwrap().port();
        let free = free_port();
        assert_eq!(first_free([in_use, free].into_iter()), Some(free));
    }

    #[test]
    fn the_wider_stretch_outside_the_ephemeral_range_is_used() {
        assert_eq!(outside_ephemeral(32_768..=60_999), 10_000..=32_767);
        assert_eq!(outside_ephemeral(10_500..=40_000), 40_001..=65_535);
        assert_eq!(outside_ephemeral(1_024..=65_535), 10_000..=10_000);
    }
}
