//! What the rest of the room holds of a live connection: who it is and the
//! frames waiting for its socket.
//!
//! Anyone may queue a frame (center's deliveries and broadcasts, replies to
//! the device's own frames); one writer drains the queue: the connection's
//! shard thread for plain TCP (see `shard.rs`), the connection's own task for
//! TLS and WebSocket. The queue is bounded by frames and bytes; a device that
//! keeps it full while its socket is full too is a slow consumer and is
//! kicked (`limits`).
//!
//! A queue can be *held* while the room replays something the device must
//! see first (the offline inbox after AUTH, a topic's history after SUB):
//! frames queued meanwhile are parked and follow the replay, so the device
//! reads the replay, then what arrived live during it, in that order.
//!
//! A shard connection's flush to its socket is in `flush`.

mod flush;
mod limits;

pub(crate) use limits::QueueLimits;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use pushgrid_proto::client::KickCode;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics;
use crate::shard_handle::{Flushes, ShardHandle};
use crate::transport::Transport;

/// How long after the inbox was replayed a live copy of one of its messages
/// is still recognised and dropped.
pub(crate) const INBOX_OVERLAP: Duration = Duration::from_secs(10);

/// A frame waiting for the socket.
pub(crate) struct Outbound {
    pub frame: Bytes,
    /// The message of a PUSH frame, 0 for other frames.
    pub msg_id: u64,
    /// Counted against the queue limits: frames center handed over. The
    /// room's own frames (replies, replays) are bounded where they are made.
    counted: bool,
}

impl Outbound {
    /// A frame of the room's own (reply, inbox or history replay).
    pub fn own(msg_id: u64, frame: Bytes) -> Outbound {
        Outbound {
            frame,
            msg_id,
            counted: false,
        }
    }
}

/// Ids of the inbox replayed after AUTH, recognised for [`INBOX_OVERLAP`]
/// when the same message also arrives live.
pub(crate) struct InboxOverlap {
    pub ids: HashSet<u64>,
    pub read_at: Instant,
}

#[derive(Default)]
struct OutQueue {
    /// Frames in write order; the first may be partly written (`offset`).
    /// Empty (no allocation) while nothing waits. While the queue is held,
    /// the frames from `held_from` on arrived during the hold: replays are
    /// inserted before them.
    frames: VecDeque<Outbound>,
    offset: u32,
    held_from: u32,
    /// Counted frames and their bytes.
    counted_frames: u32,
    counted_bytes: u32,
    /// Replays in progress.
    holds: u8,
    /// Shard connections: a flush is asked for and not yet done.
    flush_asked: bool,
    /// Shard connections: the socket was full; its writable event flushes.
    stalled: bool,
    closed: bool,
    inbox: Option<Box<InboxOverlap>>,
}

impl OutQueue {
    fn push(&mut self, outbound: Outbound) {
        if outbound.counted {
            self.counted_frames += 1;
            self.counted_bytes += outbound.frame.len() as u32;
        }
        self.frames.push_back(outbound);
    }

    fn forget(&mut self, outbound: &Outbound) {
        if outbound.counted {
            self.counted_frames -= 1;
            self.counted_bytes -= outbound.frame.len() as u32;
        }
    }

    fn hold(&mut self) {
        if self.holds == 0 {
            self.held_from = self.frames.len() as u32;
        }
        self.holds = self.holds.saturating_add(1);
    }

    /// True when a live copy of an inbox message is to be dropped; forgets
    /// the inbox ids once the overlap is over.
    fn seen_in_inbox(&mut self, msg_id: u64) -> bool {
        let Some(overlap) = &self.inbox else {
            return false;
        };
        if overlap.read_at.elapsed() > INBOX_OVERLAP {
            self.inbox = None;
            return false;
        }
        msg_id != 0 && overlap.ids.contains(&msg_id)
    }
}

/// How the writer of a connection is told that there is something to do.
pub(crate) enum Writer {
    /// A plain TCP connection: its shard thread writes.
    Shard(Arc<ShardHandle>),
    /// A TLS or WebSocket connection: its own task writes.
    Task(Box<Notify>),
}

/// What the rest of the room holds of a live, authenticated connection.
pub struct ConnHandle {
    pub id: u64,
    /// Shared by every connection of the app.
    pub app: Arc<str>,
    /// The user id, then the device id (one allocation for both).
    ident: Box<str>,
    user_len: u16,
    /// Shared by every connection of the same platform name.
    pub platform: Arc<str>,
    pub since_ms: u64,
    pub(crate) transport: Transport,
    /// Seconds since the room started, at the last frame from the device.
    pub(crate) last_seen: AtomicU32,
    /// A pending kick (a `KickCode`), 0 for none.
    kick_code: AtomicI32,
    /// The device's calls waiting on other roles (UPSTREAM, PUSH_TOKEN).
    calls: AtomicU8,
    queue: Mutex<OutQueue>,
    writer: Writer,
    /// Shard connections: the slot in the shard, once adopted.
    token: AtomicU32,
}

/// Connections grouped by their shard: (token, connection id) lists.
#[derive(Default)]
pub(crate) struct PerShard {
    groups: Vec<(Arc<ShardHandle>, Flushes)>,
}

impl PerShard {
    pub fn add(&mut self, shard: &Arc<ShardHandle>, token: u32, conn_id: u64) {
        match self
            .groups
            .iter_mut()
            .find(|(known, _)| Arc::ptr_eq(known, shard))
        {
            Some((_, slots)) => slots.push((token, conn_id)),
            None => self.groups.push((shard.clone(), vec![(token, conn_id)])),
        }
    }

    pub fn into_groups(mut self) -> Vec<(Arc<ShardHandle>, Flushes)> {
        std::mem::take(&mut self.groups)
    }
}

/// Flushes asked of shards, sent to each shard as one command when dropped.
#[derive(Default)]
pub(crate) struct Wakes {
    flushes: PerShard,
}

impl Drop for Wakes {
    fn drop(&mut self) {
        for (shard, flushes) in std::mem::take(&mut self.flushes).into_groups() {
            shard.flush_many(flushes);
        }
    }
}

/// Calls one device may have waiting on other roles at once (UPSTREAM and
/// PUSH_TOKEN frames, each a task and a gRPC call): the next one is answered
/// ERROR RATE_LIMITED for its seq, so a device that sends faster than the
/// cluster answers cannot grow the room's tasks without bound.
pub(crate) const MAX_CALLS_IN_FLIGHT: u8 = 16;

/// One call slot of a connection, given back when dropped.
pub(crate) struct CallSlot(Arc<ConnHandle>);

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The token of a connection no shard holds (yet).
const NOT_ADOPTED: u32 = u32::MAX;

/// What to tell the writer once the queue's lock is released.
#[must_use]
enum Wake {
    None,
    Notify,
    Flush(u32),
}

impl ConnHandle {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        app: Arc<str>,
        user: String,
        device: String,
        platform: Arc<str>,
        transport: Transport,
        writer: Writer,
        last_seen: u32,
    ) -> ConnHandle {
        debug_assert!(
            user.len() <= usize::from(u16::MAX),
            "user ids are at most 255 bytes"
        );
        let user_len = user.len() as u16;
        let mut ident = user;
        ident.push_str(&device);
        ConnHandle {
            id,
            app,
            ident: ident.into_boxed_str(),
            user_len,
            platform,
            since_ms: pushgrid_common::now_ms(),
            transport,
            last_seen: AtomicU32::new(last_seen),
            kick_code: AtomicI32::new(0),
            calls: AtomicU8::new(0),
            // Held from the start: the inbox replay comes first.
            queue: Mutex::new(OutQueue {
                holds: 1,
                ..OutQueue::default()
            }),
            writer,
            token: AtomicU32::new(NOT_ADOPTED),
        }
    }

    /// Takes one of the connection's [`MAX_CALLS_IN_FLIGHT`] call slots, or
    /// `None` when the device already has that many calls unanswered.
    pub(crate) fn start_call(self: &Arc<Self>) -> Option<CallSlot> {
        self.calls
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |calls| {
                (calls < MAX_CALLS_IN_FLIGHT).then_some(calls + 1)
            })
            .ok()
            .map(|_| CallSlot(self.clone()))
    }

    pub fn user(&self) -> &str {
        &self.ident[..usize::from(self.user_len)]
    }

    pub fn device(&self) -> &str {
        &self.ident[usize::from(self.user_len)..]
    }

    fn lock(&self) -> MutexGuard<'_, OutQueue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn shard(&self) -> Option<&Arc<ShardHandle>> {
        match &self.writer {
            Writer::Shard(shard) => Some(shard),
            Writer::Task(_) => None,
        }
    }

    /// The task writer's wake-up (TLS and WebSocket connections).
    pub(crate) fn notified(&self) -> Option<&Notify> {
        match &self.writer {
            Writer::Task(notify) => Some(notify),
            Writer::Shard(_) => None,
        }
    }

    /// What the writer needs after `queue` changed; call under the lock.
    fn wake_for(&self, queue: &mut OutQueue) -> Wake {
        if queue.frames.is_empty() {
            return Wake::None;
        }
        self.wake_writer(queue)
    }

    /// A wake-up for the writer even with nothing to write (the end of a
    /// replay: a shard may be waiting for it to close the connection).
    fn wake_writer(&self, queue: &mut OutQueue) -> Wake {
        if queue.holds > 0 || queue.closed {
            return Wake::None;
        }
        match &self.writer {
            Writer::Task(_) => Wake::Notify,
            Writer::Shard(_) => match self.adopted_token() {
                Some(token) if !queue.flush_asked && !queue.stalled => {
                    queue.flush_asked = true;
                    Wake::Flush(token)
                }
                _ => Wake::None,
            },
        }
    }

    fn wake(&self, wake: Wake) {
        match (wake, &self.writer) {
            (Wake::None, _) => {}
            (Wake::Notify, Writer::Task(notify)) => notify.notify_one(),
            (Wake::Flush(token), Writer::Shard(shard)) => shard.flush_many(vec![(token, self.id)]),
            _ => {}
        }
    }

    /// Queues a frame from center without waiting. A full queue (by frames
    /// or bytes) marks the device a slow consumer: it is kicked and the frame
    /// dropped (a unicast message stays in the inbox for the next
    /// connection). `msg_id` is the message of a PUSH frame, 0 for others.
    /// Shard flushes are collected in `wakes`, so that one delivery batch
    /// wakes each shard once.
    pub(crate) fn send(
        &self,
        limits: QueueLimits,
        msg_id: u64,
        frame: Bytes,
        wakes: &mut Wakes,
    ) -> bool {
        let Some(wake) = self.queue_counted(limits, msg_id, frame) else {
            return false;
        };
        match (wake, &self.writer) {
            (Wake::Flush(token), Writer::Shard(shard)) => wakes.flushes.add(shard, token, self.id),
            (wake, _) => self.wake(wake),
        }
        true
    }

    /// [`Self::send`] on the connection's own shard thread, which flushes
    /// right after (no wake-up).
    pub(crate) fn send_local(&self, limits: QueueLimits, msg_id: u64, frame: Bytes) -> bool {
        self.queue_counted(limits, msg_id, frame).is_some()
    }

    /// Queues a counted frame; None when it was refused (closed, or a full
    /// queue: the device is kicked).
    fn queue_counted(&self, limits: QueueLimits, msg_id: u64, frame: Bytes) -> Option<Wake> {
        let mut queue = self.lock();
        if queue.closed {
            return None;
        }
        if queue.seen_in_inbox(msg_id) {
            return Some(Wake::None); // the inbox replay carried it
        }
        let (frames, bytes) = (queue.counted_frames, queue.counted_bytes);
        if let Some(limit) = limits.broken(frames, bytes, frame.len(), queue.stalled) {
            drop(queue);
            metrics::queue_drop(limit);
            if self.kick(KickCode::SlowConsumer) {
                ::metrics::counter!("pushgrid_room_slow_consumer_kicks_total").increment(1);
            }
            return None;
        }
        queue.push(Outbound {
            frame,
            msg_id,
            counted: true,
        });
        Some(self.wake_for(&mut queue))
    }

    /// Queues a frame of the room's own (an answer to the device), not
    /// counted against the limits. With `wake` false the caller (the shard
    /// thread, right after the device's input) flushes by itself.
    pub(crate) fn reply(&self, frame: Bytes, wake: bool) {
        let mut queue = self.lock();
        if queue.closed {
            return;
        }
        queue.push(Outbound::own(0, frame));
        if wake {
            let wake = self.wake_for(&mut queue);
            drop(queue);
            self.wake(wake);
        }
    }

    /// Starts a replay: frames queued from now on wait for [`Self::release`].
    pub(crate) fn hold(&self) {
        self.lock().hold();
    }

    /// Ends a replay: `replay` goes out next, then what was parked. With an
    /// overlap (the ids of an inbox or topic replay), live copies of the
    /// replayed messages already parked are dropped and later ones are
    /// recognised for a while.
    pub(crate) fn release(&self, replay: Vec<Outbound>, inbox: Option<InboxOverlap>) {
        let mut queue = self.lock();
        if queue.closed {
            return;
        }
        let mut at = (queue.held_from as usize).min(queue.frames.len());
        if let Some(overlap) = inbox {
            // Live copies of the inbox's messages that came during the hold.
            let mut index = at;
            while index < queue.frames.len() {
                let msg_id = queue.frames[index].msg_id;
                if msg_id != 0 && overlap.ids.contains(&msg_id) {
                    if let Some(copy) = queue.frames.remove(index) {
                        queue.forget(&copy);
                    }
                } else {
                    index += 1;
                }
            }
            // A topic replay after the inbox's: both are recognised, for
            // the window of the later one.
            let mut overlap = overlap;
            if let Some(earlier) = queue.inbox.take()
                && earlier.read_at.elapsed() <= INBOX_OVERLAP
            {
                overlap.ids.extend(earlier.ids);
            }
            queue.inbox = Some(Box::new(overlap));
        }
        for outbound in replay {
            queue.frames.insert(at, outbound);
            at += 1;
        }
        queue.held_from = at as u32;
        queue.holds = queue.holds.saturating_sub(1);
        let wake = self.wake_writer(&mut queue);
        drop(queue);
        self.wake(wake);
    }

    /// Task writers: every whole frame that may be written now, leaving an
    /// empty queue behind (nothing while held).
    pub(crate) fn take_queued(&self) -> Vec<Bytes> {
        let mut queue = self.lock();
        if queue.holds > 0 {
            return Vec::new();
        }
        let frames = std::mem::take(&mut queue.frames);
        for outbound in &frames {
            queue.forget(outbound);
        }
        frames.into_iter().map(|outbound| outbound.frame).collect()
    }

    /// Shard writers: the connection now lives in slot `token`. True when
    /// frames are waiting for a flush. (The token is published before the
    /// queue is looked at: a frame queued meanwhile is either seen here or
    /// asks for its flush by itself.)
    pub(crate) fn adopted(&self, token: u32) -> bool {
        debug_assert_ne!(token, NOT_ADOPTED);
        self.token.store(token, Ordering::Release);
        let queue = self.lock();
        queue.holds == 0 && !queue.frames.is_empty()
    }

    fn adopted_token(&self) -> Option<u32> {
        Some(self.token.load(Ordering::Acquire)).filter(|token| *token != NOT_ADOPTED)
    }

    /// The shard and slot of an adopted shard connection.
    pub(crate) fn place(&self) -> Option<(&Arc<ShardHandle>, u32)> {
        Some((self.shard()?, self.adopted_token()?))
    }

    /// Gives back the memory of an empty queue (the shard does this a while
    /// after writing, so a busy connection keeps its queue and an idle one
    /// holds none; freeing at once would cost a free and a malloc, across
    /// threads, per frame).
    pub(crate) fn shrink_idle(&self) {
        let mut queue = self.lock();
        if queue.frames.is_empty() && queue.frames.capacity() > 0 {
            queue.frames = VecDeque::new();
        }
    }

    /// Closes the queue for good (the connection is ending): nothing more is
    /// queued or written. Returns the unwritten rest of a partly written
    /// frame, which must reach the socket before any last frame.
    pub(crate) fn close_queue(&self) -> Option<Bytes> {
        let mut unwritten = self.close_queue_keeping(false);
        unwritten.pop()
    }

    /// Closes the queue for good and returns what is left to write, in
    /// order: the rest of a partly written frame, then (with `everything`)
    /// every queued frame.
    pub(crate) fn close_queue_keeping(&self, everything: bool) -> Vec<Bytes> {
        let mut queue = self.lock();
        let closed = std::mem::replace(
            &mut *queue,
            OutQueue {
                closed: true,
                ..OutQueue::default()
            },
        );
        drop(queue);
        let offset = closed.offset as usize;
        let mut unwritten = Vec::new();
        for (index, outbound) in closed.frames.into_iter().enumerate() {
            if index == 0 && offset > 0 {
                unwritten.push(outbound.frame.slice(offset..));
            } else if everything {
                unwritten.push(outbound.frame);
            } else {
                break;
            }
        }
        unwritten
    }

    /// Asks the connection to send KICK with `code` and close; false when a
    /// kick was already pending.
    pub fn kick(&self, code: KickCode) -> bool {
        let asked = self
            .kick_code
            .compare_exchange(0, code as i32, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if asked {
            match &self.writer {
                Writer::Task(notify) => notify.notify_one(),
                Writer::Shard(shard) => {
                    // Not adopted yet: the shard sees the kick on adoption.
                    if let Some(token) = self.adopted_token() {
                        shard.close(token, self.id);
                    }
                }
            }
        }
        asked
    }

    pub(crate) fn pending_kick(&self) -> Option<KickCode> {
        match self.kick_code.load(Ordering::Acquire) {
            0 => None,
            code => Some(KickCode::try_from(code).unwrap_or(KickCode::Unspecified)),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Nothing is waiting to be written and no replay is in progress.
    pub(crate) fn is_drained(&self) -> bool {
        let queue = self.lock();
        queue.holds == 0 && queue.frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io;

    use super::*;
    use crate::shard_handle::Flushed;

    fn handle() -> ConnHandle {
        ConnHandle::new(
            7,
            Arc::from("app"),
            "user".into(),
            "dev".into(),
            Arc::from("ios"),
            Transport::Ws,
            Writer::Task(Box::default()),
            0,
        )
    }

    const LIMITS: QueueLimits = QueueLimits {
        frames: 3,
        bytes: 1000,
    };

    fn frame(byte: u8, len: usize) -> Bytes {
        Bytes::from(vec![byte; len])
    }

    #[test]
    fn the_inbox_replay_goes_first_and_drops_its_live_copies() {
        let conn = handle();
        assert!(conn.send(LIMITS, 11, frame(1, 10), &mut Wakes::default()));
        assert!(conn.send(LIMITS, 12, frame(2, 10), &mut Wakes::default()));
        assert!(
            conn.take_queued().is_empty(),
            "held until the inbox is read"
        );
        let inbox = InboxOverlap {
            ids: HashSet::from([11]),
            read_at: Instant::now(),
        };
        conn.release(vec![Outbound::own(11, frame(9, 5))], Some(inbox));
        let frames = conn.take_queued();
        assert_eq!(frames, vec![frame(9, 5), frame(2, 10)]);
        // A later live copy of an inbox message is recognised too.
        assert!(conn.send(LIMITS, 11, frame(1, 10), &mut Wakes::default()));
        assert!(conn.take_queued().is_empty());
    }

    /// The last write to the connection's socket would block.
    fn stall(conn: &ConnHandle) {
        let blocked = conn.flush(|_| Err(io::ErrorKind::WouldBlock.into()));
        assert!(matches!(blocked, Flushed::Blocked { .. }));
    }

    #[test]
    fn a_full_queue_kicks_the_slow_consumer_and_own_frames_do_not_count() {
        let conn = handle();
        conn.release(Vec::new(), None);
        assert!(conn.send(LIMITS, 99, frame(1, 10), &mut Wakes::default()));
        stall(&conn);
        assert_eq!(conn.take_queued().len(), 1);
        for index in 0..3 {
            conn.reply(frame(0, 1), true);
            assert!(conn.send(LIMITS, index + 1, frame(1, 10), &mut Wakes::default()));
        }
        assert!(
            !conn.send(LIMITS, 9, frame(1, 10), &mut Wakes::default()),
            "fourth counted frame"
        );
        assert_eq!(conn.pending_kick(), Some(KickCode::SlowConsumer));
        assert_eq!(conn.take_queued().len(), 6);
        // Taking the frames gave their room back.
        assert!(conn.send(LIMITS, 10, frame(1, 10), &mut Wakes::default()));
        // While the socket takes everything, the queue may hold four times
        // its bounds (the room has not written yet), then the device goes.
        let conn = handle();
        conn.release(Vec::new(), None);
        for index in 0..12 {
            assert!(conn.send(LIMITS, index + 1, frame(1, 10), &mut Wakes::default()));
        }
        assert!(!conn.send(LIMITS, 13, frame(1, 10), &mut Wakes::default()));
        assert_eq!(conn.pending_kick(), Some(KickCode::SlowConsumer));
    }

    #[test]
    fn a_history_replay_comes_before_what_arrived_during_it() {
        let conn = handle();
        conn.release(Vec::new(), None);
        assert!(conn.send(LIMITS, 1, frame(1, 1), &mut Wakes::default()));
        conn.hold();
        assert!(conn.send(LIMITS, 2, frame(2, 1), &mut Wakes::default()));
        conn.release(vec![Outbound::own(0, frame(7, 1))], None);
        assert_eq!(
            conn.take_queued(),
            vec![frame(1, 1), frame(7, 1), frame(2, 1)]
        );
    }

    #[test]
    fn flush_writes_in_order_keeps_a_partial_frame_and_hands_its_rest_to_the_close() {
        let conn = handle();
        conn.release(Vec::new(), None);
        for byte in 1..=3u8 {
            assert!(conn.send(LIMITS, 0, frame(byte, 4), &mut Wakes::default()));
        }
        let mut sink = Vec::new();
        // The socket takes 6 bytes, then is full.
        let mut room_left = 6;
        let flushed = conn.flush(|slices| {
            if room_left == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut taken = 0;
            for slice in slices {
                let take = slice.len().min(room_left - taken);
                sink.extend_from_slice(&slice[..take]);
                taken += take;
            }
            room_left -= taken;
            Ok(taken)
        });
        assert!(matches!(
            flushed,
            Flushed::Blocked {
                bytes: 6,
                frames: 1,
                writes: 2
            }
        ));
        assert_eq!(sink, [1, 1, 1, 1, 2, 2]);
        assert_eq!(conn.close_queue(), Some(frame(2, 2)));
        assert!(
            !conn.send(LIMITS, 0, frame(4, 1), &mut Wakes::default()),
            "closed"
        );
    }
}
