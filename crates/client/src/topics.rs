//! Broadcast topics as ordered streams on the device.
//!
//! Every topic is a stream with an offset and an epoch. The room sends each
//! connection a topic's messages in offset order, but a device still sees
//! offsets out of line in three cases: after a reconnect (a live message of
//! `all`, which needs no SUB, can come before the replay of the SUB that
//! carries the device's position), when a room gave up waiting for a missing
//! offset (the offsets jump), and when copies come twice (a replay and a live
//! copy). [`TopicStreams`] turns what arrives into what the application may
//! see, per topic:
//!
//! * offsets at or below the last one handed to the application (in the same
//!   epoch), and messages of an older epoch, are duplicates and dropped;
//! * the next offset goes out at once, with whatever was held behind it;
//! * a later offset is held, and the SDK asks the room for the missing ones
//!   (a SUB from its position, unless one is already on its way): the replay
//!   comes before the SUB_OK, so the gap is filled in order;
//! * the SDK gives up on missing offsets (and says which, as
//!   [`Delivery::Gap`]) when the stream no longer holds them (SUB_OK with
//!   `recovered = false`), when a replay made no progress, when more than
//!   [`MAX_HELD`] messages wait, or for a topic it cannot ask for again (one
//!   the application did not subscribe to, other than `all`);
//! * a newer epoch means the stream restarted: what was held of the old one
//!   goes out in order and the position starts over in the new epoch.
//!
//! The position of each topic (the last offset handed to the application,
//! and its epoch) is what the SUB after every reconnect carries.
//!
//! Plain state, no I/O: the client task sends the SUBs and emits the events.

use std::collections::{BTreeMap, HashMap};

use pushgrid_wire::{ALL_TOPIC, msg};

/// Most broadcasts held for one topic while an earlier offset is missing;
/// past it the SDK stops waiting (the missing offsets become a gap).
pub(crate) const MAX_HELD: usize = 10_000;

/// What the application gets, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Delivery {
    Push(msg::Push),
    /// Offsets `first..=last` of the topic's stream in `epoch` will not be
    /// handed to the application.
    Gap {
        topic: String,
        epoch: u64,
        first: u64,
        last: u64,
    },
}

/// What one broadcast or SUB_OK changed.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Outcome {
    /// For the application, in this order.
    pub deliveries: Vec<Delivery>,
    /// Copies dropped (offset already handed over, or an older epoch).
    pub duplicates: u64,
    /// Messages that arrived ahead of a missing offset and were held.
    pub held: u64,
    /// Send this SUB now: it asks for the missing offsets.
    pub resubscribe: Option<msg::Sub>,
    /// SUB_OK only: a resubscription from a known position that the stream
    /// could not replay (see `Event::Subscribed::missed`).
    pub missed: bool,
}

impl Outcome {
    fn push(&mut self, push: msg::Push) {
        self.deliveries.push(Delivery::Push(push));
    }

    /// Offsets handed to the application past a gap, counted once each.
    pub fn skipped(&self) -> u64 {
        self.deliveries
            .iter()
            .map(|delivery| match delivery {
                Delivery::Gap { first, last, .. } => last.saturating_sub(*first) + 1,
                Delivery::Push(_) => 0,
            })
            .sum()
    }
}

/// One topic as the device sees it.
#[derive(Debug, Default)]
struct TopicStream {
    /// The application subscribed: a SUB goes out after every connect.
    wanted: bool,
    /// (epoch, last offset handed to the application); None until a
    /// broadcast or a SUB_OK says where the stream is.
    position: Option<(u64, u64)>,
    /// A SUB is on its way on this connection: the offset it asked from.
    sub_from: Option<u64>,
    /// Messages ahead of a missing offset, by (epoch, offset).
    held: BTreeMap<(u64, u64), msg::Push>,
}

impl TopicStream {
    /// The SUB that resumes from the position (offset 0, epoch 0: a first
    /// subscription) and marks it on its way.
    fn sub(&mut self, topic: &str) -> msg::Sub {
        let (epoch, offset) = self.position.unwrap_or((0, 0));
        self.sub_from = Some(offset);
        msg::Sub {
            topic: topic.to_string(),
            since_offset: offset,
            epoch,
        }
    }

    fn hold(&mut self, push: msg::Push, out: &mut Outcome) {
        out.held += 1;
        self.held.insert((push.epoch, push.offset), push);
    }

    /// Hands over the held messages that are next in line.
    fn release_next(&mut self, out: &mut Outcome) {
        let Some((epoch, mut offset)) = self.position else {
            return;
        };
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() != (epoch, offset + 1) {
                break;
            }
            out.push(entry.remove());
            offset += 1;
        }
        self.position = Some((epoch, offset));
    }

    /// Hands over held messages up to `until` (epoch, offset) in order,
    /// past the offsets missing between them (each reported as a gap).
    fn release_until(&mut self, topic: &str, until: (u64, u64), out: &mut Outcome) {
        while let Some(entry) = self.held.first_entry() {
            let (epoch, offset) = *entry.key();
            if (epoch, offset) > until {
                break;
            }
            let push = entry.remove();
            match self.position {
                Some((known, last)) if known == epoch && offset > last + 1 => {
                    out.deliveries.push(Delivery::Gap {
                        topic: topic.to_string(),
                        epoch,
                        first: last + 1,
                        last: offset - 1,
                    });
                }
                _ => {}
            }
            self.position = Some((epoch, offset));
            out.push(push);
        }
    }

    /// Stops waiting: everything held goes out in order, past the gaps.
    fn give_up(&mut self, topic: &str, out: &mut Outcome) {
        self.release_until(topic, (u64::MAX, u64::MAX), out);
    }

    /// A broadcast of the stream's epoch or a newer one, position known.
    fn offer(&mut self, topic: &str, push: msg::Push, recoverable: bool, out: &mut Outcome) {
        let Some((epoch, last)) = self.position else {
            return;
        };
        if push.epoch > epoch {
            // The stream restarted: the old one's rest cannot be asked for.
            self.give_up(topic, out);
            self.position = Some((push.epoch, 0));
            return self.offer(topic, push, recoverable, out);
        }
        let offset = push.offset;
        if offset <= last || self.held.contains_key(&(epoch, offset)) {
            out.duplicates += 1;
            return;
        }
        if offset == last + 1 {
            self.position = Some((epoch, offset));
            out.push(push);
            self.release_next(out);
            return;
        }
        self.hold(push, out);
        if !recoverable {
            self.give_up(topic, out);
        } else if self.held.len() > MAX_HELD {
            tracing::warn!(
                topic,
                held = self.held.len(),
                "too many broadcasts held behind a missing offset; giving up on it"
            );
            self.give_up(topic, out);
        } else if self.sub_from.is_none() {
            out.resubscribe = Some(self.sub(topic));
        }
    }
}

/// Every topic the device receives broadcasts of.
#[derive(Debug, Default)]
pub(crate) struct TopicStreams {
    topics: HashMap<String, TopicStream>,
}

impl TopicStreams {
    /// The application subscribes; true when it was not subscribed (a SUB
    /// is to be sent when connected, see [`Self::sub`]).
    pub fn subscribe(&mut self, topic: &str) -> bool {
        let stream = self.topics.entry(topic.to_string()).or_default();
        !std::mem::replace(&mut stream.wanted, true)
    }

    /// The SUB for `topic` on this connection (from its position).
    pub fn sub(&mut self, topic: &str) -> msg::Sub {
        self.topics.entry(topic.to_string()).or_default().sub(topic)
    }

    /// The application unsubscribes; true when it was subscribed. The
    /// topic's position is forgotten.
    pub fn unsubscribe(&mut self, topic: &str) -> bool {
        self.topics
            .remove(topic)
            .is_some_and(|stream| stream.wanted)
    }

    /// SUBs for a new connection: every subscribed topic, and any topic with
    /// messages held behind a gap, from its position.
    pub fn resubscriptions(&mut self) -> Vec<msg::Sub> {
        self.topics
            .iter_mut()
            .filter(|(_, stream)| stream.wanted || !stream.held.is_empty())
            .map(|(topic, stream)| stream.sub(topic))
            .collect()
    }

    /// The connection ended: its SUBs will get no answer.
    pub fn session_ended(&mut self) {
        for stream in self.topics.values_mut() {
            stream.sub_from = None;
        }
    }

    /// A broadcast PUSH from the room.
    pub fn on_push(&mut self, push: msg::Push) -> Outcome {
        let mut out = Outcome::default();
        let topic = push.topic.clone();
        let is_all = topic == ALL_TOPIC;
        let Some(stream) = self.topics.get_mut(&topic) else {
            if !is_all {
                // Not subscribed (an UNSUB crossed it): nothing to order by.
                out.push(push);
                return out;
            }
            let stream = self.topics.entry(topic).or_default();
            stream.position = Some((push.epoch, push.offset));
            out.push(push);
            return out;
        };
        let recoverable = stream.wanted || is_all;
        match stream.position {
            None if stream.sub_from.is_some() => {
                // The SUB_OK will say where the stream is.
                stream.hold(push, &mut out);
                if stream.held.len() > MAX_HELD {
                    stream.give_up(&topic, &mut out);
                }
            }
            None => {
                stream.position = Some((push.epoch, push.offset));
                out.push(push);
            }
            Some((epoch, _)) if push.epoch < epoch => out.duplicates += 1,
            Some(_) => stream.offer(&topic, push, recoverable, &mut out),
        }
        out
    }

    /// A SUB_OK: the replay of the messages after the SUB's position came
    /// before it; sets the position when it was unknown, gives up on what
    /// the stream no longer holds.
    pub fn on_sub_ok(&mut self, ok: &msg::SubOk) -> Outcome {
        let mut out = Outcome::default();
        let topic = ok.topic.as_str();
        let Some(stream) = self.topics.get_mut(topic) else {
            return out;
        };
        let asked_from = stream.sub_from.take();
        match stream.position {
            None => {
                // A first subscription starts at the stream's position, or
                // just before what arrived live already (`all`).
                stream.held.retain(|(epoch, _), _| *epoch == ok.epoch);
                let first_held = stream.held.keys().next().map(|(_, offset)| *offset);
                let start =
                    first_held.map_or(ok.offset, |first| ok.offset.min(first.saturating_sub(1)));
                stream.position = Some((ok.epoch, start));
            }
            Some((0, 0)) if ok.epoch != 0 => {
                // The device saw the stream empty (no epoch yet) and it has
                // begun since; a SUB from (0, 0) reads as a first
                // subscription, so ask again from the start of its epoch:
                // everything in it is what the device missed.
                stream.position = Some((ok.epoch, 0));
                stream.held.retain(|(epoch, _), _| *epoch == ok.epoch);
                stream.release_next(&mut out);
                if ok.offset > stream.position.map_or(0, |(_, last)| last) {
                    out.resubscribe = Some(stream.sub(topic));
                }
                return out;
            }
            Some((epoch, _)) if ok.recovered && ok.epoch == epoch => {}
            Some((epoch, last)) => {
                // Not recoverable: the stream restarted or was trimmed past
                // the position. What is held up to its head goes out.
                out.missed = ok.epoch != epoch || ok.offset > last;
                stream.release_until(topic, (ok.epoch, ok.offset), &mut out);
                let (epoch, last) = stream.position.unwrap_or((ok.epoch, 0));
                if epoch != ok.epoch {
                    stream.position = Some((ok.epoch, ok.offset));
                } else if ok.offset > last {
                    out.deliveries.push(Delivery::Gap {
                        topic: topic.to_string(),
                        epoch,
                        first: last + 1,
                        last: ok.offset,
                    });
                    stream.position = Some((epoch, ok.offset));
                }
            }
        }
        stream.release_next(&mut out);
        if stream.held.is_empty() {
            return out;
        }
        // A gap is left: a replay cut short (it stops after some pages) is
        // continued; one that made no progress will not fill it.
        let progressed = match (asked_from, stream.position) {
            (Some(from), Some((_, last))) => last > from,
            _ => false,
        };
        if ok.recovered && progressed && (stream.wanted || topic == ALL_TOPIC) {
            out.resubscribe = Some(stream.sub(topic));
        } else {
            stream.give_up(topic, &mut out);
        }
        out
    }

    #[cfg(test)]
    fn position(&self, topic: &str) -> Option<(u64, u64)> {
        self.topics.get(topic).and_then(|stream| stream.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(topic: &str, offset: u64, epoch: u64) -> msg::Push {
        msg::Push {
            msg_id: epoch * 1000 + offset,
            kind: msg::PushKind::Broadcast as i32,
            topic: topic.into(),
            offset,
            epoch,
            ..Default::default()
        }
    }

    fn sub_ok(topic: &str, recovered: bool, offset: u64, epoch: u64) -> msg::SubOk {
        msg::SubOk {
            topic: topic.into(),
            recovered,
            offset,
            epoch,
        }
    }

    /// Offsets handed over, with gaps as negative first offsets.
    fn shown(out: &Outcome) -> Vec<i64> {
        out.deliveries
            .iter()
            .map(|delivery| match delivery {
                Delivery::Push(push) => push.offset as i64,
                Delivery::Gap { first, .. } => -(*first as i64),
            })
            .collect()
    }

    /// Subscribed to `topic`, SUB answered at offset `at` of epoch 7.
    fn subscribed(topic: &str, at: u64) -> TopicStreams {
        let mut streams = TopicStreams::default();
        assert!(streams.subscribe(topic));
        assert!(!streams.subscribe(topic), "once");
        let sub = streams.sub(topic);
        assert_eq!(
            (sub.since_offset, sub.epoch),
            (0, 0),
            "a first subscription"
        );
        let out = streams.on_sub_ok(&sub_ok(topic, false, at, 7));
        assert!(!out.missed && out.deliveries.is_empty());
        streams
    }

    #[test]
    fn a_stream_seen_empty_is_replayed_from_its_start_once_it_began() {
        let mut streams = TopicStreams::default();
        assert!(streams.subscribe("news"));
        let sub = streams.sub("news");
        // The stream has no message yet: no epoch either.
        let out = streams.on_sub_ok(&sub_ok("news", true, 0, 0));
        assert!(!out.missed && out.deliveries.is_empty() && out.resubscribe.is_none());
        assert_eq!(streams.position("news"), Some((0, 0)));
        assert_eq!((sub.since_offset, sub.epoch), (0, 0));

        // Reconnected after offsets 1 to 3 of epoch 9 were published: the SUB
        // from (0, 0) reads as a first one, so its SUB_OK is followed by a
        // SUB from the start of epoch 9, not by a report of missed messages.
        streams.session_ended();
        let resubs = streams.resubscriptions();
        assert_eq!(resubs.len(), 1);
        let out = streams.on_sub_ok(&sub_ok("news", true, 3, 9));
        assert!(!out.missed, "nothing is lost yet");
        assert!(out.deliveries.is_empty());
        let again = out.resubscribe.expect("a SUB from the start of epoch 9");
        assert_eq!((again.since_offset, again.epoch), (0, 9));
        for offset in 1..=3 {
            assert_eq!(
                shown(&streams.on_push(push("news", offset, 9))),
                [offset as i64]
            );
        }
        let out = streams.on_sub_ok(&sub_ok("news", true, 3, 9));
        assert!(!out.missed && out.deliveries.is_empty() && out.resubscribe.is_none());
        assert_eq!(streams.position("news"), Some((9, 3)));
    }

    #[test]
    fn in_order_offsets_go_out_and_copies_are_dropped() {
        let mut streams = subscribed("news", 4);
        assert_eq!(shown(&streams.on_push(push("news", 5, 7))), [5]);
        assert_eq!(shown(&streams.on_push(push("news", 6, 7))), [6]);
        let copy = streams.on_push(push("news", 5, 7));
        assert!(copy.deliveries.is_empty());
        assert_eq!(copy.duplicates, 1);
        let older = streams.on_push(push("news", 9, 6));
        assert_eq!(older.duplicates, 1, "an older epoch");
        assert_eq!(streams.position("news"), Some((7, 6)));
    }

    #[test]
    fn a_gap_is_held_and_asked_for_then_filled_in_order() {
        let mut streams = subscribed("news", 4);
        streams.on_push(push("news", 5, 7));
        let ahead = streams.on_push(push("news", 8, 7));
        assert!(ahead.deliveries.is_empty());
        assert_eq!(ahead.held, 1);
        let sub = ahead
            .resubscribe
            .expect("the missing offsets are asked for");
        assert_eq!(
            (sub.topic.as_str(), sub.since_offset, sub.epoch),
            ("news", 5, 7)
        );
        // Another one ahead: held, no second SUB while one is on its way.
        let more = streams.on_push(push("news", 9, 7));
        assert!(more.resubscribe.is_none() && more.deliveries.is_empty());
        // The replay (6, 7, 8), then SUB_OK; the live copy of 8 was held.
        assert_eq!(shown(&streams.on_push(push("news", 6, 7))), [6]);
        assert_eq!(shown(&streams.on_push(push("news", 7, 7))), [7, 8, 9]);
        let copy = streams.on_push(push("news", 8, 7));
        assert_eq!(copy.duplicates, 1);
        let ok = streams.on_sub_ok(&sub_ok("news", true, 9, 7));
        assert!(!ok.missed && ok.deliveries.is_empty() && ok.resubscribe.is_none());
        assert_eq!(shown(&streams.on_push(push("news", 10, 7))), [10]);
    }

    #[test]
    fn a_gap_the_stream_no_longer_holds_is_given_up_and_reported() {
        let mut streams = subscribed("news", 4);
        streams.on_push(push("news", 5, 7));
        assert!(streams.on_push(push("news", 9, 7)).resubscribe.is_some());
        let ok = streams.on_sub_ok(&sub_ok("news", false, 9, 7));
        assert!(ok.missed);
        assert_eq!(shown(&ok), [-6, 9], "6 to 8 are gone, 9 goes out");
        assert_eq!(ok.skipped(), 3);
        assert_eq!(streams.position("news"), Some((7, 9)));
    }

    #[test]
    fn live_messages_of_all_before_the_sub_replay_wait_for_it() {
        // The device knew `all` up to 10 before the reconnect.
        let mut streams = TopicStreams::default();
        streams.subscribe(ALL_TOPIC);
        streams.sub(ALL_TOPIC);
        streams.on_sub_ok(&sub_ok(ALL_TOPIC, false, 9, 3));
        assert_eq!(shown(&streams.on_push(push(ALL_TOPIC, 10, 3))), [10]);
        streams.session_ended();
        let subs = streams.resubscriptions();
        assert_eq!(subs.len(), 1);
        assert_eq!((subs[0].since_offset, subs[0].epoch), (10, 3));
        // Live 14 and 15 come before the SUB's replay of 11 to 15.
        for offset in [14, 15] {
            let out = streams.on_push(push(ALL_TOPIC, offset, 3));
            assert!(out.deliveries.is_empty() && out.resubscribe.is_none());
        }
        let mut shown_all = Vec::new();
        for offset in 11..=15 {
            shown_all.extend(shown(&streams.on_push(push(ALL_TOPIC, offset, 3))));
        }
        assert_eq!(shown_all, [11, 12, 13, 14, 15], "in order, each once");
        let ok = streams.on_sub_ok(&sub_ok(ALL_TOPIC, true, 15, 3));
        assert!(ok.deliveries.is_empty() && !ok.missed);
    }

    #[test]
    fn all_without_a_subscription_is_ordered_from_the_first_message() {
        let mut streams = TopicStreams::default();
        assert_eq!(shown(&streams.on_push(push(ALL_TOPIC, 20, 3))), [20]);
        assert_eq!(streams.on_push(push(ALL_TOPIC, 20, 3)).duplicates, 1);
        // A jump (the device was away): asked for, since `all` needs no SUB
        // to be received but may be resubscribed to recover.
        let ahead = streams.on_push(push(ALL_TOPIC, 23, 3));
        let sub = ahead.resubscribe.expect("recovered by a SUB of all");
        assert_eq!(sub.since_offset, 20);
        assert_eq!(
            streams.resubscriptions().len(),
            1,
            "held: asked again on a new connection"
        );
    }

    #[test]
    fn a_first_subscription_of_all_starts_before_what_came_live() {
        let mut streams = TopicStreams::default();
        streams.subscribe(ALL_TOPIC);
        streams.sub(ALL_TOPIC);
        for offset in [31, 32] {
            assert!(
                streams
                    .on_push(push(ALL_TOPIC, offset, 3))
                    .deliveries
                    .is_empty()
            );
        }
        let ok = streams.on_sub_ok(&sub_ok(ALL_TOPIC, false, 32, 3));
        assert_eq!(shown(&ok), [31, 32]);
        assert!(!ok.missed);
    }

    #[test]
    fn a_replay_cut_short_is_continued_and_one_without_progress_given_up() {
        let mut streams = subscribed("news", 0);
        assert!(streams.on_push(push("news", 50, 7)).resubscribe.is_some());
        for offset in 1..=20 {
            streams.on_push(push("news", offset, 7));
        }
        // The replay stopped at 20 (pages): asked again from there.
        let ok = streams.on_sub_ok(&sub_ok("news", true, 49, 7));
        let sub = ok.resubscribe.expect("continued");
        assert_eq!(sub.since_offset, 20);
        // This time nothing came: give up on 21 to 49.
        let ok = streams.on_sub_ok(&sub_ok("news", true, 49, 7));
        assert_eq!(shown(&ok), [-21, 50]);
        assert!(ok.resubscribe.is_none());
    }

    #[test]
    fn a_new_epoch_starts_over() {
        let mut streams = subscribed("news", 4);
        streams.on_push(push("news", 5, 7));
        streams.on_push(push("news", 7, 7));
        // Restarted stream: held 7 goes out (6 reported), then 1 of epoch 8.
        let out = streams.on_push(push("news", 1, 8));
        assert_eq!(shown(&out), [-6, 7, 1]);
        assert_eq!(streams.position("news"), Some((8, 1)));
        // A resubscription answered with a newer epoch: told, restarted there.
        streams.session_ended();
        streams.resubscriptions();
        let ok = streams.on_sub_ok(&sub_ok("news", false, 3, 9));
        assert!(ok.missed);
        assert_eq!(streams.position("news"), Some((9, 3)));
    }

    #[test]
    fn topics_not_subscribed_are_not_held_and_too_many_held_end_the_wait() {
        let mut streams = TopicStreams::default();
        assert_eq!(shown(&streams.on_push(push("stray", 9, 1))), [9]);
        assert!(streams.resubscriptions().is_empty());

        let mut streams = subscribed("news", 0);
        let mut released = Vec::new();
        for offset in 2..=(MAX_HELD as u64 + 2) {
            released.extend(shown(&streams.on_push(push("news", offset, 7))));
        }
        assert_eq!(released.len(), MAX_HELD + 2, "one gap and every message");
        assert_eq!(released[0], -1);
        assert!(streams.unsubscribe("news"));
        assert!(!streams.unsubscribe("news"));
    }
}
