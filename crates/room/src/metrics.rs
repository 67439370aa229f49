//! The room's metrics, named `pushgrid_room_<what>_<unit>`. Counters touched
//! for every frame are registered once and kept as handles.

use std::sync::OnceLock;

use metrics::{Counter, counter, gauge};

/// Counters of the hot path: one atomic add per use.
pub(crate) struct Hot {
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub frames_sent: Counter,
    /// Write calls on sockets (frames_sent / writes: frames per write).
    pub writes: Counter,
}

/// The hot counters. The first call must come after the process installed
/// its recorder (`run` makes sure of that).
pub(crate) fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| Hot {
        bytes_in: counter!("pushgrid_room_received_bytes_total"),
        bytes_out: counter!("pushgrid_room_sent_bytes_total"),
        frames_sent: counter!("pushgrid_room_frames_sent_total"),
        writes: counter!("pushgrid_room_socket_writes_total"),
    })
}

/// A connection turned away before or at AUTH (`denied`, `not_allowed`,
/// `ip_cap`, `ip_rate`, `auth_timeout`, `bad_frame`, ...).
pub(crate) fn refused(reason: &'static str) {
    counter!("pushgrid_room_refused_total", "reason" => reason).increment(1);
}

/// An AUTH attempt by result (`ok`, `failed`, `timeout`, `bad_frame`,
/// `handshake_failed`, `unavailable`).
pub(crate) fn auth(result: &'static str) {
    counter!("pushgrid_room_auths_total", "result" => result).increment(1);
}

/// An authenticated connection closed, by reason (`client`, `io`, `kick_*`,
/// `frame_error`).
pub(crate) fn closed(reason: &'static str) {
    counter!("pushgrid_room_closes_total", "reason" => reason).increment(1);
}

/// A frame not queued because the connection's queue was full (`frames` or
/// `bytes`); the connection is kicked as a slow consumer.
pub(crate) fn queue_drop(limit: &'static str) {
    counter!("pushgrid_room_queue_drops_total", "limit" => limit).increment(1);
}

pub(crate) fn connections(count: usize) {
    gauge!("pushgrid_room_connections").set(count as f64);
}
