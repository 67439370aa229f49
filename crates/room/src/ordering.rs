//! The per-topic ordering stage: a topic's broadcasts leave this room in
//! offset order, whatever order center's Broadcast calls arrive in.
//!
//! center answers a broadcast call once saver stored it and then fans it out
//! in the background, so with several broadcasts in flight (or several
//! centers) the room can get offset 7 before offset 6. For every topic the
//! room keeps the next offset it expects and holds later ones until the
//! missing one arrives:
//!
//! * a missing offset is waited for `broadcast_gap_wait_ms` (default 100 ms),
//!   then fetched from saver's stream (the topic history), again every
//!   `broadcast_gap_wait_ms` while the fetch fails;
//! * after `broadcast_gap_give_up_ms` (default 5 s), or at once when the
//!   stream no longer holds the offset, or when more than [`MAX_PENDING`]
//!   messages wait, the room gives up on it: the held messages go out, and
//!   the devices see the offsets jump (the SDK then resubscribes from its
//!   last offset and gets what the stream still holds, or `recovered=false`).
//!   Counted in `pushgrid_room_broadcast_gaps_skipped_total`;
//! * an offset below the next expected one (a copy already fetched, a late
//!   duplicate) is dropped;
//! * a new epoch (the stream restarted at offset 1) starts over at offset 1,
//!   whether a message or a SUB's position shows it first (the connections
//!   subscribed here are owed the new stream from its start); a message of
//!   an older epoch is dropped.
//!
//! Where a topic starts: at the position a SUB read from saver (the device
//! wants what comes after it), at offset 1 of a new stream, or, for a topic
//! the room knows nothing of yet (the app-wide topic `all` needs no SUB), at
//! the lowest offset that arrived within `broadcast_gap_wait_ms` of the first.
//! A topic without subscribers in this room (other than `all`) keeps no
//! state; a topic quiet for [`IDLE_FORGET`] is forgotten.
//!
//! The stage itself ([`TopicOrder`]) is plain state, without I/O; the room
//! fans out what it releases while still holding the topic's lock, so two
//! releases of one topic cannot overtake each other on the way to the
//! connections' queues.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use pushgrid_proto::cluster::BroadcastMessage;
use tokio::time::Instant;

/// Most messages held for one topic while an offset is missing; past it the
/// room stops waiting for the missing one.
pub(crate) const MAX_PENDING: usize = 10_000;
/// A topic with nothing held and no message for this long is forgotten.
pub(crate) const IDLE_FORGET: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
pub(crate) struct OrderConfig {
    /// How long a missing offset is waited for before saver is asked.
    pub gap_wait: Duration,
    /// How long after the gap opened the room stops trying to fill it.
    pub give_up: Duration,
}

/// What the room counts of the stage (metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Messages that arrived ahead of a missing offset and were held.
    pub held: u64,
    /// Copies dropped: below the next expected offset (or an older epoch).
    pub dropped: u64,
    /// Offsets given up on.
    pub skipped: u64,
    /// Offsets fetched from saver that filled a gap.
    pub fetched: u64,
}

/// The next thing the topic's timer has to do.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// Nothing is waiting any more: the timer ends.
    Done,
    /// Sleep until then, then step again.
    Wait(Instant),
    /// Ask saver for the stream after `since_offset` (then [`TopicOrder::fill`]).
    Fetch { since_offset: u64, epoch: u64 },
    /// Fan these out (in this order), then step again.
    Deliver(Vec<BroadcastMessage>),
}

/// One topic's position and the messages held behind a missing offset.
#[derive(Debug)]
pub(crate) struct TopicOrder {
    /// The stream's epoch; 0 until the first message or SUB says.
    epoch: u64,
    /// The next offset to fan out; None until the start is known.
    next: Option<u64>,
    pending: BTreeMap<u64, BroadcastMessage>,
    /// Since when the oldest wait (unknown start, or the current gap) lasts.
    waiting_since: Option<Instant>,
    last_fetch: Option<Instant>,
    /// A timer task serves this topic.
    pub(crate) timer: bool,
    last_active: Instant,
    pub(crate) counts: Counts,
}

impl TopicOrder {
    pub fn new(now: Instant) -> TopicOrder {
        TopicOrder {
            epoch: 0,
            next: None,
            pending: BTreeMap::new(),
            waiting_since: None,
            last_fetch: None,
            timer: false,
            last_active: now,
            counts: Counts::default(),
        }
    }

    /// The offset expected next, if known.
    #[cfg(test)]
    pub fn next(&self) -> Option<u64> {
        self.next
    }

    /// Messages are held (a timer must serve the topic).
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Nothing held and no message since `now - idle`.
    pub fn idle(&self, now: Instant, idle: Duration) -> bool {
        self.pending.is_empty() && !self.timer && now.duration_since(self.last_active) >= idle
    }

    /// A message from center: returns what may go out now, in order.
    pub fn offer(&mut self, message: BroadcastMessage, now: Instant) -> Vec<BroadcastMessage> {
        self.last_active = now;
        let mut ready = Vec::new();
        if self.epoch == 0 {
            self.epoch = message.epoch;
        } else if message.epoch < self.epoch {
            self.counts.dropped += 1;
            return ready;
        } else if message.epoch > self.epoch {
            // The stream restarted at offset 1: what was held of the old
            // stream goes out as it is (its gap can no longer be filled).
            ready.extend(std::mem::take(&mut self.pending).into_values());
            self.epoch = message.epoch;
            self.next = Some(1);
            self.waiting_since = None;
            self.last_fetch = None;
        }
        let offset = message.offset;
        match self.next {
            None if offset == 1 => self.next = Some(1),
            None => {
                self.hold(message, now);
                return ready;
            }
            Some(_) => {}
        }
        let next = self.next.unwrap_or(offset);
        if offset < next || self.pending.contains_key(&offset) {
            self.counts.dropped += 1;
        } else if offset == next {
            self.next = Some(next + 1);
            ready.push(message);
            self.release(&mut ready, now);
        } else {
            self.hold(message, now);
        }
        ready
    }

    fn hold(&mut self, message: BroadcastMessage, now: Instant) {
        self.counts.held += 1;
        self.pending.insert(message.offset, message);
        self.waiting_since.get_or_insert(now);
    }

    /// Moves the held messages that are next in line to `ready`. Call after
    /// `next` was set or moved: a gap left behind is a new one.
    fn release(&mut self, ready: &mut Vec<BroadcastMessage>, now: Instant) {
        let Some(mut next) = self.next else {
            return;
        };
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != next {
                break;
            }
            ready.push(entry.remove());
            next += 1;
        }
        self.next = Some(next);
        self.last_fetch = None;
        self.waiting_since = if self.pending.is_empty() {
            None
        } else {
            Some(now)
        };
    }

    /// A SUB read the stream's position: the topic starts after it, unless
    /// the room already knows where it is.
    pub fn learn(&mut self, offset: u64, epoch: u64, now: Instant) -> Vec<BroadcastMessage> {
        self.last_active = now;
        let mut ready = Vec::new();
        if self.epoch != 0 && epoch != 0 && epoch != self.epoch {
            if epoch < self.epoch {
                return ready;
            }
            // The stream restarted (Redis lost it) and a SUB read its
            // position before this room saw any of it: it began at offset 1,
            // and the connections already subscribed here are owed all of
            // it, so the stage starts there, not after the SUB's position
            // (the live copies of the first offsets may still be on their
            // way; if not, the gap is fetched). What was held of the old
            // stream goes out as it is, as when a message shows the new epoch.
            ready.extend(std::mem::take(&mut self.pending).into_values());
            self.epoch = epoch;
            self.next = Some(1);
            self.waiting_since = None;
            self.last_fetch = None;
            return ready;
        }
        if self.next.is_some() {
            return ready;
        }
        if epoch != 0 {
            self.epoch = epoch;
        }
        let start = match self.pending.first_key_value() {
            Some((first, _)) => (*first).min(offset + 1),
            None => offset + 1,
        };
        self.next = Some(start);
        self.release(&mut ready, now);
        ready
    }

    /// What the topic's timer does now.
    pub fn step(&mut self, now: Instant, config: &OrderConfig) -> Step {
        let Some(since) = self.waiting_since.filter(|_| !self.pending.is_empty()) else {
            self.waiting_since = None;
            return Step::Done;
        };
        let first_held = match self.pending.first_key_value() {
            Some((first, _)) => *first,
            None => return Step::Done,
        };
        let Some(next) = self.next else {
            // Unknown start: the lowest offset that came within the wait.
            let due = since + config.gap_wait;
            if now < due {
                return Step::Wait(due);
            }
            self.next = Some(first_held);
            let mut ready = Vec::new();
            self.release(&mut ready, now);
            return Step::Deliver(ready);
        };
        if now >= since + config.give_up || self.pending.len() > MAX_PENDING {
            return Step::Deliver(self.skip(first_held, next, now));
        }
        let due = match self.last_fetch {
            Some(fetched) => fetched + config.gap_wait,
            None => since + config.gap_wait,
        };
        if now < due {
            return Step::Wait(due);
        }
        self.last_fetch = Some(now);
        Step::Fetch {
            since_offset: next.saturating_sub(1),
            epoch: self.epoch,
        }
    }

    /// Gives up on the offsets from `next` to `first_held`.
    fn skip(&mut self, first_held: u64, next: u64, now: Instant) -> Vec<BroadcastMessage> {
        let missing = first_held.saturating_sub(next);
        self.counts.skipped += missing;
        tracing::warn!(
            epoch = self.epoch,
            from = next,
            to = first_held - 1,
            "broadcast offsets never arrived; devices see a gap"
        );
        self.next = Some(first_held);
        let mut ready = Vec::new();
        self.release(&mut ready, now);
        ready
    }

    /// What saver answered for a [`Step::Fetch`]: the stream's messages from
    /// the asked offset on, and whether it still held that offset.
    pub fn fill(
        &mut self,
        messages: Vec<BroadcastMessage>,
        recovered: bool,
        now: Instant,
    ) -> Vec<BroadcastMessage> {
        let Some(next) = self.next else {
            return Vec::new();
        };
        for message in messages {
            if message.epoch != self.epoch || message.offset < next {
                continue;
            }
            if !self.pending.contains_key(&message.offset) {
                self.counts.fetched += 1;
                self.pending.insert(message.offset, message);
            }
        }
        let mut ready = Vec::new();
        if self.pending.first_key_value().map(|(first, _)| *first) == Some(next) {
            self.release(&mut ready, now);
        }
        if !recovered && let Some((first, _)) = self.pending.first_key_value() {
            // The stream no longer holds the missing offsets: no use waiting.
            let first = *first;
            let next = self.next.unwrap_or(first);
            ready.extend(self.skip(first, next, now));
        }
        ready
    }
}

/// Every topic's ordering stage in this room, by `app \0 topic`.
#[derive(Default)]
pub(crate) struct Orders {
    topics: DashMap<String, Arc<Mutex<TopicOrder>>>,
}

pub(crate) fn key(app: &str, topic: &str) -> String {
    let mut key = String::with_capacity(app.len() + topic.len() + 1);
    key.push_str(app);
    key.push('\0');
    key.push_str(topic);
    key
}

pub(crate) fn lock(order: &Mutex<TopicOrder>) -> MutexGuard<'_, TopicOrder> {
    order
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Orders {
    /// The topic's stage; created when `create` (else None when unknown).
    pub fn get(&self, key: &str, create: bool) -> Option<Arc<Mutex<TopicOrder>>> {
        if let Some(order) = self.topics.get(key) {
            return Some(order.value().clone());
        }
        if !create {
            return None;
        }
        Some(
            self.topics
                .entry(key.to_string())
                .or_insert_with(|| Arc::new(Mutex::new(TopicOrder::new(Instant::now()))))
                .value()
                .clone(),
        )
    }

    /// Forgets topics quiet for `idle` with nothing held.
    pub fn forget_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let before = self.topics.len();
        self.topics
            .retain(|_, order| !order.try_lock().is_ok_and(|order| order.idle(now, idle)));
        before - self.topics.len()
    }

    pub fn len(&self) -> usize {
        self.topics.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: OrderConfig = OrderConfig {
        gap_wait: Duration::from_millis(100),
        give_up: Duration::from_secs(5),
    };

    fn message(offset: u64, epoch: u64) -> BroadcastMessage {
        BroadcastMessage {
            id: 1000 + offset,
            app: "a".into(),
            topic: "t".into(),
            offset,
            epoch,
            ..Default::default()
        }
    }

    fn offsets(messages: &[BroadcastMessage]) -> Vec<u64> {
        messages.iter().map(|message| message.offset).collect()
    }

    /// A topic whose start is known (a SUB read position 0 of epoch 9).
    fn known(now: Instant) -> TopicOrder {
        let mut order = TopicOrder::new(now);
        assert!(order.learn(0, 9, now).is_empty());
        assert_eq!(order.next(), Some(1));
        order
    }

    #[test]
    fn later_offsets_wait_for_the_missing_one_and_leave_in_order() {
        let now = Instant::now();
        let mut order = known(now);
        let mut out = Vec::new();
        for offset in [3, 2, 5, 1, 4, 6] {
            out.extend(order.offer(message(offset, 9), now));
        }
        assert_eq!(offsets(&out), [1, 2, 3, 4, 5, 6]);
        assert!(!order.waiting());
        assert_eq!(order.counts.held, 3);
        assert_eq!(order.step(now, &CONFIG), Step::Done);
    }

    #[test]
    fn copies_below_the_position_are_dropped() {
        let now = Instant::now();
        let mut order = known(now);
        assert_eq!(offsets(&order.offer(message(1, 9), now)), [1]);
        assert!(order.offer(message(1, 9), now).is_empty());
        assert!(order.offer(message(3, 9), now).is_empty());
        assert!(order.offer(message(3, 9), now).is_empty(), "held once");
        assert_eq!(order.counts.dropped, 2);
        assert_eq!(offsets(&order.offer(message(2, 9), now)), [2, 3]);
    }

    #[test]
    fn a_gap_is_fetched_from_the_stream_after_the_wait() {
        let now = Instant::now();
        let mut order = known(now);
        order.offer(message(1, 9), now);
        assert!(order.offer(message(4, 9), now).is_empty());
        assert!(order.waiting());
        assert_eq!(order.step(now, &CONFIG), Step::Wait(now + CONFIG.gap_wait));
        let later = now + CONFIG.gap_wait;
        assert_eq!(
            order.step(later, &CONFIG),
            Step::Fetch {
                since_offset: 1,
                epoch: 9
            }
        );
        // Asked again only after another wait.
        assert_eq!(
            order.step(later, &CONFIG),
            Step::Wait(later + CONFIG.gap_wait)
        );
        let fetched = vec![message(2, 9), message(3, 9), message(4, 9), message(5, 9)];
        assert_eq!(offsets(&order.fill(fetched, true, later)), [2, 3, 4, 5]);
        assert_eq!(order.counts.fetched, 3, "2, 3 and 5 (4 was held)");
        assert_eq!(order.step(later, &CONFIG), Step::Done);
        // The live copy of 5 arrives after all: dropped.
        assert!(order.offer(message(5, 9), later).is_empty());
        assert_eq!(offsets(&order.offer(message(6, 9), later)), [6]);
    }

    #[test]
    fn a_gap_the_stream_cannot_fill_is_skipped() {
        let now = Instant::now();
        let mut order = known(now);
        order.offer(message(1, 9), now);
        order.offer(message(3, 9), now);
        order.offer(message(4, 9), now);
        // Saver failing: asked every wait until the give-up, then skipped.
        let mut at = now;
        let mut fetches = 0;
        let released = loop {
            match order.step(at, &CONFIG) {
                Step::Wait(until) => at = until,
                Step::Fetch { .. } => fetches += 1,
                Step::Deliver(ready) => break ready,
                Step::Done => panic!("the gap is still open"),
            }
        };
        assert_eq!(offsets(&released), [3, 4]);
        assert!(at >= now + CONFIG.give_up);
        assert!(fetches >= 40, "{fetches}");
        assert_eq!(order.counts.skipped, 1);
        // A stream that says it no longer holds the offset: skipped at once.
        order.offer(message(7, 9), at);
        let later = at + CONFIG.gap_wait;
        assert!(matches!(order.step(later, &CONFIG), Step::Fetch { .. }));
        assert_eq!(offsets(&order.fill(Vec::new(), false, later)), [7]);
        assert_eq!(order.counts.skipped, 3);
        assert_eq!(order.step(later, &CONFIG), Step::Done);
    }

    #[test]
    fn an_unknown_start_is_the_lowest_offset_within_the_wait() {
        let now = Instant::now();
        let mut order = TopicOrder::new(now);
        assert!(order.offer(message(12, 9), now).is_empty());
        assert!(order.offer(message(11, 9), now).is_empty());
        assert_eq!(order.step(now, &CONFIG), Step::Wait(now + CONFIG.gap_wait));
        let Step::Deliver(ready) = order.step(now + CONFIG.gap_wait, &CONFIG) else {
            panic!("the start is taken after the wait");
        };
        assert_eq!(offsets(&ready), [11, 12]);
        assert_eq!(order.next(), Some(13));
        // Offset 1 is the start of a stream: no wait.
        let mut fresh = TopicOrder::new(now);
        assert_eq!(offsets(&fresh.offer(message(1, 5), now)), [1]);
    }

    #[test]
    fn a_sub_position_sets_the_start_and_releases_what_follows_it() {
        let now = Instant::now();
        let mut order = TopicOrder::new(now);
        order.offer(message(12, 9), now);
        order.offer(message(11, 9), now);
        assert_eq!(offsets(&order.learn(10, 9, now)), [11, 12]);
        // Learned again: the room already knows where the topic is.
        assert!(order.learn(30, 9, now).is_empty());
        assert_eq!(order.next(), Some(13));
        // An empty stream (no epoch yet): it starts at offset 1.
        let mut empty = TopicOrder::new(now);
        empty.learn(0, 0, now);
        assert!(empty.offer(message(2, 4), now).is_empty());
        assert_eq!(offsets(&empty.offer(message(1, 4), now)), [1, 2]);
    }

    #[test]
    fn a_new_epoch_starts_over_at_one_and_old_epochs_are_dropped() {
        let now = Instant::now();
        let mut order = known(now);
        order.offer(message(1, 9), now);
        order.offer(message(3, 9), now);
        // The stream restarted (epoch 10): held 3 goes out, then 1 of the new one.
        assert_eq!(offsets(&order.offer(message(2, 10), now)), [3]);
        assert_eq!(offsets(&order.offer(message(1, 10), now)), [1, 2]);
        assert!(order.offer(message(4, 9), now).is_empty());
        assert_eq!(order.counts.dropped, 1);
    }

    #[test]
    fn a_sub_that_reads_a_restarted_stream_first_keeps_its_first_offsets_for_the_others() {
        let now = Instant::now();
        let mut order = known(now);
        order.offer(message(1, 9), now);
        order.offer(message(3, 9), now);
        // Redis restarted (epoch 10, offsets 1 and 2 stored) and a device's
        // SUB read that before the room got either: held 3 of the old
        // stream goes out, and the new one starts at 1, not at 3.
        assert_eq!(offsets(&order.learn(2, 10, now)), [3]);
        assert_eq!(order.next(), Some(1));
        assert_eq!(offsets(&order.offer(message(1, 10), now)), [1]);
        assert_eq!(offsets(&order.offer(message(2, 10), now)), [2]);
        assert_eq!(order.counts.dropped, 0);
        // An older stream's position changes nothing.
        assert!(order.learn(7, 9, now).is_empty());
        assert_eq!(order.next(), Some(3));
    }

    #[test]
    fn too_many_held_messages_end_the_wait() {
        let now = Instant::now();
        let mut order = known(now);
        for offset in 2..=(MAX_PENDING as u64 + 2) {
            order.offer(message(offset, 9), now);
        }
        let Step::Deliver(ready) = order.step(now, &CONFIG) else {
            panic!("past the bound the room stops waiting");
        };
        assert_eq!(ready.len(), MAX_PENDING + 1);
        assert_eq!(order.counts.skipped, 1);
    }

    #[test]
    fn idle_topics_are_forgotten() {
        let orders = Orders::default();
        let key = key("a", "t");
        assert!(orders.get(&key, false).is_none());
        let order = orders.get(&key, true).unwrap_or_else(|| unreachable!());
        lock(&order).offer(message(1, 1), Instant::now());
        assert_eq!(orders.forget_idle(Duration::from_secs(600)), 0);
        assert_eq!(orders.forget_idle(Duration::ZERO), 1);
        assert_eq!(orders.len(), 0);
    }
}
