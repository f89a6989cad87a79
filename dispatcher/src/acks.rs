//! Acknowledgements, coalesced: one `basic.ack` with `multiple` settles every message up to a
//! delivery tag, so a channel that settles thousands of messages a second sends a handful of
//! frames instead of one per message, and the broker does the work once per frame.
//!
//! A multiple ack may only cover tags that are all settled, so a message still being handled
//! holds back the acks of the ones after it. Those are not held for long: once a settled
//! message has waited [`LINGER`] behind an unsettled one, it is acknowledged on its own, so a
//! slow fan-out never fills the prefetch window with finished messages.
//!
//! Settling never waits for the frame: a message's deliveries are begun in Redis under leases
//! before it is settled, so a lost ack only means a redelivery that finds them already known.

use crate::metrics::METRICS;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a settled message waits for the messages before it to settle before it is
/// acknowledged on its own.
pub const LINGER: Duration = Duration::from_millis(5);

/// What was decided about one delivery tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ack(u64),
    /// Handed back to the broker; sent at once, on its own.
    Requeue(u64),
}

/// A frame to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Every outstanding tag up to and including `tag`: `messages` of them.
    AckUpTo {
        tag: u64,
        messages: u64,
    },
    AckOne(u64),
    RequeueOne(u64),
}

/// A tag settled but not yet covered by a multiple ack.
#[derive(Debug, Clone, Copy)]
enum Waiting {
    /// Waiting for an ack (since when is kept in `AckWindow::oldest`).
    Ack,
    /// Already settled at the broker (acked alone, or requeued): nothing more to send for it.
    Sent,
}

/// Which tags of one channel are settled, and which frames settle them. Tags are numbered from
/// 1 in the order the broker delivers them on the channel, so every tag up to the highest one
/// settled was delivered.
#[derive(Debug, Default)]
pub struct AckWindow {
    /// Every tag up to this one is settled at the broker.
    settled_upto: u64,
    waiting: BTreeMap<u64, Waiting>,
    /// Tags waiting for an ack, oldest first, so the linger needs no scan of `waiting`; entries
    /// settled since are skipped as they reach the front.
    oldest: VecDeque<(Instant, u64)>,
}

impl AckWindow {
    /// Takes one decision; a requeue is a frame of its own, returned at once.
    pub fn settle(&mut self, settle: Settle, now: Instant) -> Option<Frame> {
        match settle {
            Settle::Ack(tag) => {
                self.waiting.insert(tag, Waiting::Ack);
                self.oldest.push_back((now, tag));
                None
            }
            Settle::Requeue(tag) => {
                self.waiting.insert(tag, Waiting::Sent);
                Some(Frame::RequeueOne(tag))
            }
        }
    }

    /// The frames that settle what can be settled now: one multiple ack for the settled run
    /// after `settled_upto`, and single acks for tags that waited `LINGER` behind a gap.
    pub fn flush(&mut self, now: Instant) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut ack_upto = None;
        let mut messages = 0;
        while let Some(entry) = self.waiting.first_entry() {
            if *entry.key() != self.settled_upto + 1 {
                break;
            }
            self.settled_upto += 1;
            if matches!(entry.remove(), Waiting::Ack) {
                ack_upto = Some(self.settled_upto);
                messages += 1;
            }
        }
        if let Some(tag) = ack_upto {
            frames.push(Frame::AckUpTo { tag, messages });
        }
        while let Some(&(since, tag)) = self.oldest.front() {
            if let Some(waiting @ Waiting::Ack) = self.waiting.get_mut(&tag) {
                if now.duration_since(since) < LINGER {
                    break;
                }
                *waiting = Waiting::Sent;
                frames.push(Frame::AckOne(tag));
            }
            self.oldest.pop_front();
        }
        frames
    }

    /// When the oldest tag held behind a gap is due to be acknowledged on its own.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.oldest
            .iter()
            .find(|(_, tag)| matches!(self.waiting.get(tag), Some(Waiting::Ack)))
            .map(|(since, _)| *since + LINGER)
    }
}

/// The sending side of one channel's acknowledgements; cheap to clone.
#[derive(Debug, Clone)]
pub struct Acks {
    tx: mpsc::UnboundedSender<Settle>,
}

impl Acks {
    /// Starts the task that acknowledges on `channel`. It ends, after settling everything it
    /// was given, once every `Acks` handle is dropped.
    pub fn start(channel: Channel) -> (Acks, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Acks { tx }, tokio::spawn(run(channel, rx)))
    }

    pub fn settle(&self, settle: Settle) {
        // The task outlives every handle, so the send only fails once the session is over, when
        // the broker redelivers whatever was not acknowledged anyway.
        let _ = self.tx.send(settle);
    }
}

async fn run(channel: Channel, mut rx: mpsc::UnboundedReceiver<Settle>) {
    let mut window = AckWindow::default();
    loop {
        let next = match window.next_deadline() {
            Some(deadline) => tokio::select! {
                next = rx.recv() => next,
                _ = tokio::time::sleep_until(deadline) => {
                    send(&channel, window.flush(Instant::now())).await;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(first) = next else { break };
        let now = Instant::now();
        let mut requeues: Vec<Frame> = window.settle(first, now).into_iter().collect();
        // Everything already waiting goes into the same flush.
        while let Ok(more) = rx.try_recv() {
            requeues.extend(window.settle(more, now));
        }
        send(&channel, requeues).await;
        send(&channel, window.flush(now)).await;
    }
    // The session is ending: acknowledge what is settled, gaps or not.
    let far = Instant::now() + LINGER;
    send(&channel, window.flush(far)).await;
}

async fn send(channel: &Channel, frames: Vec<Frame>) {
    for frame in frames {
        // With the messages an ack settles, counted once it is sent.
        let (result, acked) = match frame {
            Frame::AckUpTo { tag, messages } => (
                channel.basic_ack(tag, BasicAckOptions { multiple: true }).await,
                messages,
            ),
            Frame::AckOne(tag) => (channel.basic_ack(tag, BasicAckOptions { multiple: false }).await, 1),
            Frame::RequeueOne(tag) => {
                let options = BasicNackOptions {
                    requeue: true,
                    multiple: false,
                };
                (channel.basic_nack(tag, options).await, 0)
            }
        };
        match result {
            Ok(()) if acked > 0 => METRICS.messages_per_ack.observe(acked as f64),
            Ok(()) => {}
            // The channel is gone: the broker redelivers what it did not see settled, and the
            // deliveries already begun are recognised and skipped.
            Err(e) => tracing::warn!(error = %e, ?frame, "acknowledgement not sent"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn in_order_settles_become_one_frame() {
        let mut w = AckWindow::default();
        let now = Instant::now();
        for tag in 1..=5 {
            w.settle(Settle::Ack(tag), now);
        }
        assert_eq!(w.flush(now), vec![Frame::AckUpTo { tag: 5, messages: 5 }]);
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn a_gap_holds_later_tags_only_for_the_linger() {
        let mut w = AckWindow::default();
        let now = Instant::now();
        w.settle(Settle::Ack(1), now);
        w.settle(Settle::Ack(3), now);
        assert_eq!(w.flush(now), vec![Frame::AckUpTo { tag: 1, messages: 1 }]);
        assert_eq!(w.next_deadline(), Some(now + LINGER));
        assert_eq!(w.flush(now + LINGER), vec![Frame::AckOne(3)]);
        // Tag 2 settles: the run through 3 is settled, and 3 needs no second ack.
        w.settle(Settle::Ack(2), now + LINGER);
        assert_eq!(w.flush(now + LINGER), vec![Frame::AckUpTo { tag: 2, messages: 1 }]);
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn a_requeue_is_sent_alone_and_not_acknowledged() {
        let mut w = AckWindow::default();
        let now = Instant::now();
        assert_eq!(w.settle(Settle::Requeue(1), now), Some(Frame::RequeueOne(1)));
        assert_eq!(w.flush(now), vec![]);
        w.settle(Settle::Ack(2), now);
        assert_eq!(w.flush(now), vec![Frame::AckUpTo { tag: 2, messages: 1 }]);
    }

    proptest! {
        /// However tags settle and however time passes, each frame names a tag the broker still
        /// holds unsettled (else it closes the channel), a multiple ack covers only tags
        /// decided as acks and counts the messages it settles, and once all are decided, every
        /// tag is settled at the broker.
        #[test]
        fn frames_settle_each_tag_once(
            acks in proptest::collection::vec(any::<bool>(), 1..60),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 60),
            steps in proptest::collection::vec(0u64..8, 60),
        ) {
            let n = acks.len() as u64;
            let mut tags: Vec<u64> = (1..=n).collect();
            for (i, index) in order.iter().enumerate().take(tags.len()) {
                let j = i + index.index(tags.len() - i);
                tags.swap(i, j);
            }
            let is_ack = |tag: u64| acks[tag as usize - 1];
            let mut outstanding: BTreeSet<u64> = (1..=n).collect();
            let mut decided = BTreeSet::new();
            let mut apply = |frame: Frame, decided: &BTreeSet<u64>| -> Result<(), TestCaseError> {
                match frame {
                    Frame::AckUpTo { tag: t, messages } => {
                        prop_assert!(outstanding.contains(&t), "multiple ack of unknown tag {}", t);
                        let covered: Vec<u64> = outstanding.range(..=t).copied().collect();
                        prop_assert_eq!(messages, covered.len() as u64, "messages counted for the ack of {}", t);
                        for tag in covered {
                            prop_assert!(decided.contains(&tag) && is_ack(tag), "ack of undecided or requeued tag {}", tag);
                            outstanding.remove(&tag);
                        }
                    }
                    Frame::AckOne(t) => {
                        prop_assert!(is_ack(t) && outstanding.remove(&t), "bad single ack {}", t);
                    }
                    Frame::RequeueOne(t) => {
                        prop_assert!(!is_ack(t) && outstanding.remove(&t), "bad requeue {}", t);
                    }
                }
                Ok(())
            };
            let mut w = AckWindow::default();
            let mut now = Instant::now();
            for (tag, step) in tags.iter().zip(&steps) {
                now += Duration::from_millis(*step);
                decided.insert(*tag);
                let settle = if is_ack(*tag) { Settle::Ack(*tag) } else { Settle::Requeue(*tag) };
                if let Some(frame) = w.settle(settle, now) {
                    apply(frame, &decided)?;
                }
                for frame in w.flush(now) {
                    apply(frame, &decided)?;
                }
            }
            prop_assert_eq!(w.next_deadline(), None);
            prop_assert!(outstanding.is_empty(), "left unsettled: {:?}", outstanding);
        }
    }
}
