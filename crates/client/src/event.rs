//! What the [`Client`](crate::Client) tells the application: events and counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use pushgrid_wire::msg;

/// What happened, in order, on the [`Client`]'s event channel. The channel closes
/// when the client stopped for good (closed, auth failure, single-login kick).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// AUTH succeeded on `room_addr` (the room's address as [`RoomAddress`](crate::RoomAddress)
    /// prints it: a bare `host:port` for plain TCP, else with its scheme).
    Connected {
        conn_id: u64,
        room_addr: String,
        heartbeat: Duration,
    },
    /// A message not seen before (duplicates by `msg_id` are filtered out).
    /// Broadcasts come in offset order per topic, each offset once (see
    /// [`Event::BroadcastGap`] for offsets that will not come).
    Push(msg::Push),
    /// Offsets `first..=last` of `topic`'s stream (in `epoch`) will not be
    /// handed to the application: the stream no longer holds them, or the
    /// SDK stopped waiting for them (too many messages held behind them, a
    /// topic it cannot ask for again). The next broadcast of the topic
    /// follows them.
    BroadcastGap {
        topic: String,
        epoch: u64,
        first: u64,
        last: u64,
    },
    /// The connection ended; the client reconnects unless it was closed.
    Disconnected { reason: String },
    /// No room could be reached this round (every address failed: refused,
    /// TLS certificate not trusted, no WebSocket there...); the client tries
    /// again after `retry_in`. Dropped rather than waited for when the event
    /// channel is full.
    ConnectFailed { reason: String, retry_in: Duration },
    /// The server sent KICK; a `Disconnected` follows.
    Kicked(msg::Kick),
    /// The server refused AUTH permanently; the client stopped.
    AuthFailed {
        code: msg::ErrorCode,
        message: String,
    },
    /// The server answered a SUB: `recovered` says whether the messages missed
    /// since the last known offset were replayed (they arrive as `Push` events
    /// before this one).
    Subscribed {
        topic: String,
        recovered: bool,
        /// The gap, said plainly: this was a resubscription from a known position
        /// (after a reconnect) and the topic's history no longer covers it, so
        /// broadcasts between that position and `offset` never reach this device
        /// (the app should refetch its state). Always false on a first SUB.
        missed: bool,
        offset: u64,
        epoch: u64,
    },
    /// The server answered (or the connection lost) an UPSTREAM frame.
    UpstreamAck {
        seq: u32,
        client_msg_id: String,
        ok: bool,
        error: Option<String>,
    },
}

/// Counters since [`Client::start`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Pushes handed to the application (duplicates excluded).
    pub pushes_received: u64,
    /// Pushes dropped because their `msg_id` was seen before (or, for a
    /// broadcast, its topic offset was handed over already).
    pub duplicates_dropped: u64,
    /// Successful connections after the first one.
    pub reconnects: u64,
    /// Successful connections (AUTH_OK received), the first included.
    pub connects: u64,
    /// Message ids sent in ACK frames (re-acks included).
    pub acks_sent: u64,
    /// Broadcasts that arrived ahead of a missing offset of their topic and
    /// were held until it came.
    pub broadcasts_held: u64,
    /// Broadcast offsets given up on ([`Event::BroadcastGap`]).
    pub broadcast_offsets_skipped: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) pushes_received: AtomicU64,
    pub(crate) duplicates_dropped: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) acks_sent: AtomicU64,
    pub(crate) broadcasts_held: AtomicU64,
    pub(crate) broadcast_offsets_skipped: AtomicU64,
    pub(crate) connected: AtomicBool,
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> ClientStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ClientStats {
            pushes_received: load(&self.pushes_received),
            duplicates_dropped: load(&self.duplicates_dropped),
            reconnects: load(&self.reconnects),
            connects: load(&self.connects),
            acks_sent: load(&self.acks_sent),
            broadcasts_held: load(&self.broadcasts_held),
            broadcast_offsets_skipped: load(&self.broadcast_offsets_skipped),
        }
    }
}
