//! The calls a run made, counted by the services themselves: Redis's commands and the reads of
//! its sockets (`INFO stats`), and the reads and writes of the broker's socket on every AMQP
//! connection (`rabbitmqctl list_connections`). Per delivery they show what batching saves
//! where CPU time is too noisy to: how many commands a delivery costs Redis, in how many round
//! trips they come, and how often the broker wakes for a delivery's frames (several frames that
//! arrive together are one read).

use crate::measure::{counter_of, redis_info, stdout_of};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::ops::Add;

/// Counts over a run, of the whole system (the scheduler's polls and the bench's own calls
/// included).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Traffic {
    pub(crate) redis_commands: u64,
    pub(crate) redis_reads: u64,
    pub(crate) broker_reads: u64,
    pub(crate) broker_writes: u64,
}

impl Add for Traffic {
    type Output = Traffic;

    fn add(self, other: Traffic) -> Traffic {
        Traffic {
            redis_commands: self.redis_commands + other.redis_commands,
            redis_reads: self.redis_reads + other.redis_reads,
            broker_reads: self.broker_reads + other.broker_reads,
            broker_writes: self.broker_writes + other.broker_writes,
        }
    }
}

impl Traffic {
    fn per(&self, deliveries: usize) -> [f64; 4] {
        [
            self.redis_commands,
            self.redis_reads,
            self.broker_reads,
            self.broker_writes,
        ]
        .map(|n| n as f64 / deliveries.max(1) as f64)
    }

    /// Each count per delivery, as written to a run's JSON.
    pub(crate) fn per_delivery(&self, deliveries: usize) -> Value {
        let [redis_commands, redis_reads, broker_reads, broker_writes] = self.per(deliveries);
        json!({ "redis_commands": redis_commands, "redis_reads": redis_reads,
            "broker_reads": broker_reads, "broker_writes": broker_writes })
    }

    /// The same, as printed under a run's table.
    pub(crate) fn line(&self, deliveries: usize) -> String {
        let [redis_commands, redis_reads, broker_reads, broker_writes] = self.per(deliveries);
        format!(
            "  per delivery: Redis {redis_commands:.2} commands in {redis_reads:.2} socket reads; \
RabbitMQ {broker_reads:.2} socket reads, {broker_writes:.2} writes"
        )
    }
}

/// The counters at one moment: Redis's totals, and each broker connection's by its process (a
/// connection opened during a run counts from zero; one closed during it is not counted).
pub(crate) struct Counters {
    redis_commands: u64,
    redis_reads: u64,
    broker: HashMap<String, (u64, u64)>,
}

impl Counters {
    pub(crate) fn read(redis_port: u16) -> Self {
        let stats = redis_info(redis_port, "stats");
        let connections = stdout_of(
            "rabbitmqctl",
            &[
                "list_connections",
                "pid",
                "recv_cnt",
                "send_cnt",
                "-q",
                "--no-table-headers",
            ],
        );
        Counters {
            redis_commands: counter_of(&stats, "total_commands_processed"),
            redis_reads: counter_of(&stats, "total_reads_processed"),
            broker: broker_counts(&connections),
        }
    }

    pub(crate) fn since(&self, before: &Counters) -> Traffic {
        let (mut broker_reads, mut broker_writes) = (0, 0);
        for (pid, (reads, writes)) in &self.broker {
            let (reads_before, writes_before) = before.broker.get(pid).copied().unwrap_or_default();
            broker_reads += reads.saturating_sub(reads_before);
            broker_writes += writes.saturating_sub(writes_before);
        }
        Traffic {
            redis_commands: self.redis_commands.saturating_sub(before.redis_commands),
            redis_reads: self.redis_reads.saturating_sub(before.redis_reads),
            broker_reads,
            broker_writes,
        }
    }
}

/// Socket reads and writes by connection, from lines of `pid recv_cnt send_cnt`.
fn broker_counts(listing: &str) -> HashMap<String, (u64, u64)> {
    listing
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let pid = fields.next()?;
            let reads = fields.next()?.parse().ok()?;
            let writes = fields.next()?.parse().ok()?;
            Some((pid.to_owned(), (reads, writes)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(redis_commands: u64, redis_reads: u64, broker: &str) -> Counters {
        Counters {
            redis_commands,
            redis_reads,
            broker: broker_counts(broker),
        }
    }

    #[test]
    fn a_run_counts_what_each_connection_added_and_all_of_one_opened_during_it() {
        let before = counters(100, 40, "<rabbit@h.1.10.0>\t5\t7\n<rabbit@h.1.11.0>\t50\t60\n");
        let after = counters(
            1_100,
            240,
            "<rabbit@h.1.10.0>\t305\t407\n<rabbit@h.1.12.0>\t20\t30\nnot a connection line\n",
        );
        let traffic = after.since(&before);
        assert_eq!(
            traffic,
            Traffic {
                redis_commands: 1_000,
                redis_reads: 200,
                broker_reads: 320,
                broker_writes: 430,
            }
        );
        assert_eq!(traffic.per_delivery(100)["redis_commands"], json!(10.0));
        assert_eq!(
            traffic.line(100),
            "  per delivery: Redis 10.00 commands in 2.00 socket reads; RabbitMQ 3.20 socket reads, 4.30 writes"
        );
        assert_eq!((traffic + traffic).broker_writes, 860);
    }
}
