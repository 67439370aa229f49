//! Shard threads: the authenticated plain TCP connections, without a task
//! each.
//!
//! A shard is one OS thread with its own epoll instance (mio) and a slab of
//! slots, one per connection: the socket, the [`ConnHandle`], the bytes of a
//! frame not yet complete (nothing while none is) and the connection's
//! lease. An idle connection costs its slot and its handle, nothing more: no
//! task, no future, no registration with tokio's driver, no buffer. This is
//! how the room holds many connections in little memory (see
//! docs/benchmarks.md, "Room").
//!
//! Readiness is edge-triggered. A readable socket is read into the shard's
//! one buffer and its frames handled at once ([`conn::handle_frame`]: nothing
//! there waits; replays and upstream calls go to tokio tasks). Writes happen
//! here too: a handle that gets a frame while its queue was idle asks its
//! shard for a flush ([`ShardHandle::flush`]); the shard writes every queued
//! frame in vectored writes and, when the socket is full, waits for its
//! writable event. Kicks and adoptions arrive the same way, as commands.
//!
//! The shard thread enters the tokio runtime, so what it starts (ACK
//! batches, replays, polite closes) runs on the runtime's workers.
//!
//! This module is the shard thread itself; `shard_handle.rs` is the side
//! other threads use (commands, [`ShardHandle`], `Shards`).

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use pushgrid_wire::{Decoded, decode_frame};
use slab::Slab;

use crate::admission::Lease;
use crate::conn::{self, LINGER, Next, room_clock};
use crate::shard_handle::{Adoption, Broadcast, Command, Flushed, ShardHandle, WAKE_TOKEN};
use crate::transport::{DeviceStream, WRITE_TIMEOUT};
use crate::{ConnHandle, Room, metrics};

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Reads of one connection per turn before the others get theirs.
const READS_PER_TURN: usize = 4;

/// One connection of a shard.
struct Slot {
    stream: TcpStream,
    conn: Arc<ConnHandle>,
    /// The start of a frame not yet complete.
    partial: BytesMut,
    /// Room clock when the socket became full, 0 while it is not.
    stalled_since: u32,
    /// Frames were written since the last tick (its queue may hold memory).
    wrote: bool,
    /// Room clock when the device closed its sending side, 0 before: the
    /// connection ends once its answers are written.
    input_ended: u32,
    _lease: Lease,
}

struct Shard {
    room: Arc<Room>,
    handle: Arc<ShardHandle>,
    poll: Poll,
    slots: Slab<Slot>,
    /// Input of the connection being read; shared by all of them.
    read_buf: BytesMut,
    scratch: Vec<u8>,
    /// Connections whose input was not all read in their turn.
    unfinished: Vec<(usize, u64)>,
    /// Slots to flush at the end of a command batch (kept for its memory).
    dirty: Vec<usize>,
}

/// Starts one thread per shard of the room, inside the current tokio runtime.
pub(crate) fn start(room: &Arc<Room>) -> io::Result<()> {
    let runtime = tokio::runtime::Handle::current();
    let polls = room.shards.take_polls();
    let mut threads = Vec::new();
    for (index, poll) in polls.into_iter().enumerate() {
        let shard = Shard {
            room: room.clone(),
            handle: room.shards.handle(index).clone(),
            poll,
            slots: Slab::new(),
            read_buf: BytesMut::new(),
            scratch: vec![0; READ_CHUNK],
            unfinished: Vec::new(),
            dirty: Vec::new(),
        };
        let runtime = runtime.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("room-shard-{index}"))
                .spawn(move || {
                    let _runtime = runtime.enter();
                    shard.run();
                })?,
        );
    }
    room.shards.set_threads(threads);
    Ok(())
}

/// How reading a connection's input ended.
enum ReadEnd {
    /// Everything available was read and handled.
    Drained,
    /// More input may wait: read again on the next turn.
    More,
    /// The device closed its sending side (it may still read the answers).
    Ended,
    /// The socket failed.
    Failed,
    /// The device sent something that ends the connection.
    Refused(Bytes),
}

impl Shard {
    /// The shard thread's loop: socket events, then the commands that
    /// arrived, then once a second the stalled connections and idle queues;
    /// until [`Command::Stop`].
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut last_tick = room_clock();
        loop {
            let timeout = if self.unfinished.is_empty() {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            };
            if let Err(error) = self.poll.poll(&mut events, Some(timeout)) {
                if error.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(%error, "shard poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            self.handle_events(&events);
            if self.run_commands() {
                return;
            }
            let now = room_clock();
            if now != last_tick {
                last_tick = now;
                self.close_stalled(now);
                self.shrink_idle_queues();
            }
        }
    }

    /// Reads and writes what the poll reported ready, then the connections
    /// whose input was not all read in their last turn.
    fn handle_events(&mut self, events: &Events) {
        for event in events.iter() {
            if event.token() == WAKE_TOKEN {
                continue;
            }
            let key = event.token().0;
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                self.read(key, event.is_read_closed() || event.is_error());
            }
            if event.is_writable() && self.slots.contains(key) {
                self.flush(key);
            }
        }
        for (key, conn_id) in std::mem::take(&mut self.unfinished) {
            if self.holds(key, conn_id) {
                self.read(key, false);
            }
        }
    }

    /// Carries out the commands pushed since the last turn, then flushes
    /// each connection they touched once. True when one was
    /// [`Command::Stop`]: the shard has stopped.
    fn run_commands(&mut self) -> bool {
        // Cleared before the commands are taken: a command pushed after
        // the take wakes the poll again.
        self.handle.notified.store(false, Ordering::Release);
        let commands = std::mem::take(
            &mut *self
                .handle
                .commands
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        // Flushes wait for the end of the batch: a connection asked for
        // several times, or sent several broadcasts, is written once.
        let mut dirty = std::mem::take(&mut self.dirty);
        for command in commands {
            match command {
                Command::Adopt(adoption) => self.adopt(*adoption),
                Command::Flush(flushes) => {
                    for (token, conn_id) in flushes {
                        if self.holds(token as usize, conn_id) {
                            dirty.push(token as usize);
                        }
                    }
                }
                Command::Broadcast(broadcast) => self.fan_out(*broadcast, &mut dirty),
                Command::Close { token, conn_id } => {
                    if self.holds(token as usize, conn_id) {
                        self.kick(token as usize);
                    }
                }
                Command::Stop => {
                    self.stop();
                    return true;
                }
            }
        }
        dirty.sort_unstable();
        dirty.dedup();
        for key in dirty.drain(..) {
            // Closed meanwhile, or a new connection in a reused slot: a
            // flush of a connection with nothing queued costs a lock.
            if self.slots.contains(key) {
                self.flush(key);
            }
        }
        self.dirty = dirty;
        false
    }

    /// True when slot `key` holds connection `conn_id` (slots are reused).
    fn holds(&self, key: usize, conn_id: u64) -> bool {
        self.slots
            .get(key)
            .is_some_and(|slot| slot.conn.id == conn_id)
    }

    fn adopt(&mut self, adoption: Adoption) {
        let Adoption {
            conn,
            stream,
            buffered,
            lease,
        } = adoption;
        let mut stream = TcpStream::from_std(stream);
        let entry = self.slots.vacant_entry();
        let key = entry.key();
        if let Err(error) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(%error, "cannot register a connection with its shard");
            conn.close_queue();
            conn::finish(&self.room, &conn);
            metrics::closed("io");
            return;
        }
        let has_input = !buffered.is_empty();
        entry.insert(Slot {
            stream,
            conn: conn.clone(),
            partial: buffered,
            stalled_since: 0,
            wrote: false,
            input_ended: 0,
            _lease: lease,
        });
        let has_output = conn.adopted(key as u32);
        if conn.pending_kick().is_some() {
            self.kick(key);
            return;
        }
        if has_input {
            // The registration raises an event of its own for input that
            // arrived before it, the end of input included.
            self.read(key, false);
        }
        if has_output && self.slots.contains(key) {
            self.flush(key);
        }
    }

    /// Reads what the device sent and handles its frames. `ended` is set
    /// when the event says the device closed its side: then input is read
    /// to its end, a short read does not mean there is nothing more.
    fn read(&mut self, key: usize, ended: bool) {
        match self.read_input(key, ended) {
            ReadEnd::Drained => {}
            ReadEnd::More => {
                if let Some(slot) = self.slots.get(key) {
                    self.unfinished.push((key, slot.conn.id));
                }
            }
            ReadEnd::Ended => {
                if let Some(slot) = self.slots.get_mut(key)
                    && slot.input_ended == 0
                {
                    slot.input_ended = room_clock().max(1);
                }
            }
            ReadEnd::Failed => {
                self.close(key, "io");
                return;
            }
            ReadEnd::Refused(last) => {
                // The answers to the frames before the bad one go first.
                self.close_with(key, "frame_error", last, true);
                return;
            }
        }
        // Answers (PONG) go out with this turn.
        self.flush(key);
    }

    fn read_input(&mut self, key: usize, ended: bool) -> ReadEnd {
        let Some(slot) = self.slots.get_mut(key) else {
            return ReadEnd::Drained;
        };
        let buf = &mut self.read_buf;
        buf.clear();
        if !slot.partial.is_empty() {
            buf.extend_from_slice(&slot.partial);
            slot.partial = BytesMut::new();
        }
        let mut end = ReadEnd::More;
        let mut received = 0;
        for _ in 0..READS_PER_TURN {
            match (&slot.stream).read(&mut self.scratch) {
                Ok(0) => {
                    end = ReadEnd::Ended;
                    break;
                }
                Ok(count) => {
                    received += count;
                    buf.extend_from_slice(&self.scratch[..count]);
                    // A short read emptied the socket: its next bytes
                    // raise a new edge (the end of input was announced by
                    // the event, if it came).
                    if count < self.scratch.len() && !ended {
                        end = ReadEnd::Drained;
                        break;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    end = ReadEnd::Drained;
                    break;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    end = ReadEnd::Failed;
                    break;
                }
            }
        }
        if received > 0 {
            metrics::hot().bytes_in.increment(received as u64);
            slot.conn.last_seen.store(room_clock(), Ordering::Relaxed);
        }
        let max_body = self.room.admission.max_body();
        loop {
            match decode_frame(buf, max_body) {
                Ok(Decoded::Frame(frame)) => {
                    match conn::handle_frame(&self.room, &slot.conn, frame) {
                        Next::Continue => {}
                        Next::Reply(answer) => slot.conn.reply(answer, false),
                        Next::Close(last) => return ReadEnd::Refused(last),
                    }
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(error) => {
                    ::metrics::counter!("pushgrid_room_frame_errors_total").increment(1);
                    return ReadEnd::Refused(conn::error_frame(error.code(), error.to_string(), 0));
                }
            }
        }
        if !buf.is_empty() {
            slot.partial = BytesMut::from(&buf[..]);
        }
        end
    }

    /// Writes what the connection has queued, as far as the socket takes it.
    fn flush(&mut self, key: usize) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let stream = &slot.stream;
        let flushed = slot.conn.flush(|slices| {
            let mut writer: &TcpStream = stream;
            writer.write_vectored(slices)
        });
        let (bytes, frames, writes) = match flushed {
            Flushed::Done {
                bytes,
                frames,
                writes,
            } => {
                slot.stalled_since = 0;
                (bytes, frames, writes)
            }
            Flushed::Blocked {
                bytes,
                frames,
                writes,
            } => {
                if slot.stalled_since == 0 {
                    slot.stalled_since = room_clock().max(1);
                }
                (bytes, frames, writes)
            }
            Flushed::Failed => {
                self.close(key, "io");
                return;
            }
        };
        if writes > 0 {
            let hot = metrics::hot();
            hot.writes.increment(writes as u64);
            if bytes > 0 {
                slot.wrote = true;
                hot.bytes_out.increment(bytes as u64);
                hot.frames_sent.increment(frames as u64);
            }
        }
        // A device that stopped sending is closed once it has its answers.
        if slot.input_ended != 0 && slot.conn.is_drained() {
            self.close(key, "client");
        }
    }

    /// Queues a broadcast for its targets on this shard; they are written at
    /// the end of the command batch.
    fn fan_out(&mut self, broadcast: Broadcast, dirty: &mut Vec<usize>) {
        let limits = self.room.queue_limits;
        let mut delivered = 0u32;
        for (token, conn_id) in broadcast.targets {
            let key = token as usize;
            let Some(slot) = self.slots.get(key).filter(|slot| slot.conn.id == conn_id) else {
                continue; // closed meanwhile
            };
            if slot
                .conn
                .send_local(limits, broadcast.msg_id, broadcast.frame.clone())
            {
                delivered += 1;
                dirty.push(key);
            }
        }
        ::metrics::counter!("pushgrid_room_broadcast_deliveries_total")
            .increment(u64::from(delivered));
        self.room
            .peers
            .broadcast_delivered(&broadcast.app, broadcast.msg_id, delivered);
    }

    /// Sends the pending kick and closes.
    fn kick(&mut self, key: usize) {
        let Some(slot) = self.slots.get(key) else {
            return;
        };
        let code = slot
            .conn
            .pending_kick()
            .unwrap_or(pushgrid_proto::client::KickCode::Unspecified);
        let frame = conn::kick_frame(&self.room, &slot.conn, code);
        self.close_with(key, conn::kick_reason_label(code), frame, false);
    }

    /// Ends the connection in slot `key`; dropping the slot closes the socket.
    fn close(&mut self, key: usize, reason: &'static str) {
        let Some(mut slot) = self.slots.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut slot.stream);
        slot.conn.close_queue();
        conn::finish(&self.room, &slot.conn);
        metrics::closed(reason);
    }

    /// Ends the connection in slot `key` with a last frame (ERROR, KICK): the
    /// socket goes to a task that writes what is left (the rest of a frame
    /// cut short, the queued frames too with `keep_queued`) and the last
    /// frame, then closes politely. The lease goes with it, so the room
    /// counts the connection until it is gone.
    fn close_with(&mut self, key: usize, reason: &'static str, last: Bytes, keep_queued: bool) {
        let Some(mut slot) = self.slots.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut slot.stream);
        let mut frames = slot.conn.close_queue_keeping(keep_queued);
        frames.push(last);
        conn::finish(&self.room, &slot.conn);
        metrics::closed(reason);
        let Slot {
            stream,
            _lease: lease,
            ..
        } = slot;
        let stream: std::net::TcpStream = stream.into();
        self.room.tracker.spawn(async move {
            let Ok(tcp) = tokio::net::TcpStream::from_std(stream) else {
                return;
            };
            DeviceStream::Tcp(tcp).close_politely(frames, LINGER).await;
            drop(lease);
        });
    }

    /// Closes connections whose socket stayed full, or whose answers are
    /// still not all written after the device stopped sending, for longer
    /// than [`WRITE_TIMEOUT`].
    fn close_stalled(&mut self, now: u32) {
        let limit = WRITE_TIMEOUT.as_secs() as u32;
        let overdue = |since: u32| since != 0 && now.saturating_sub(since) > limit;
        let stalled: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, slot)| overdue(slot.stalled_since) || overdue(slot.input_ended))
            .map(|(key, _)| key)
            .collect();
        for key in stalled {
            self.close(key, "io");
        }
    }

    /// Gives back the queue memory of connections written to since the last
    /// tick and idle now.
    fn shrink_idle_queues(&mut self) {
        for (_, slot) in self.slots.iter_mut() {
            if std::mem::take(&mut slot.wrote) {
                slot.conn.shrink_idle();
            }
        }
    }

    /// At the end of a drain: closes every connection left.
    fn stop(&mut self) {
        let keys: Vec<usize> = self.slots.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(key, "shutdown");
        }
    }
}
