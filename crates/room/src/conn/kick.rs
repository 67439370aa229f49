//! Kicking devices: the KICK frame and its reasons, and the sweeper that
//! kicks connections whose heartbeats stopped.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use pushgrid_proto::client::{Kick, KickCode};
use pushgrid_wire::{Op, encode};
use tokio::time::Instant;

use super::room_clock;
use crate::{ConnHandle, Room};

pub(crate) fn kick_reason_label(code: KickCode) -> &'static str {
    match code {
        KickCode::Shutdown => "kick_shutdown",
        KickCode::SlowConsumer => "kick_slow_consumer",
        KickCode::SingleLogin => "kick_single_login",
        KickCode::ByApi => "kick_by_api",
        KickCode::Heartbeat => "kick_heartbeat",
        KickCode::Unavailable => "kick_unavailable",
        KickCode::Unspecified => "kick",
    }
}

/// The KICK frame for a pending kick.
pub(crate) fn kick_frame(room: &Room, conn: &ConnHandle, code: KickCode) -> Bytes {
    let reason = room
        .kick_reasons
        .remove(&conn.id)
        .map(|(_, reason)| reason)
        .unwrap_or_else(|| {
            match code {
                KickCode::SlowConsumer => "outbound queue full",
                KickCode::Heartbeat => "no heartbeat",
                KickCode::SingleLogin => "logged in elsewhere",
                KickCode::Shutdown => "room is draining; reconnect elsewhere",
                KickCode::Unavailable => "a service is unavailable; reconnect later",
                _ => "kicked",
            }
            .to_string()
        });
    let mut kick = Kick {
        code: code as i32,
        reason,
        ..Default::default()
    };
    let spread = |window_ms: u32| {
        if window_ms == 0 {
            0
        } else {
            rand::random::<u32>() % window_ms
        }
    };
    match code {
        KickCode::Shutdown => {
            // Spread the reconnects over the drain window, and point each
            // device at another live room.
            kick.reconnect_after_ms =
                spread(room.admission.limits().drain_window.as_millis() as u32);
            kick.reconnect_to = room.reconnect_target(conn);
        }
        // Devices sent away together must not come back together.
        KickCode::Unavailable => kick.reconnect_after_ms = 1000 + spread(9000),
        _ => {}
    }
    ::metrics::counter!("pushgrid_room_kicks_total", "code" => code.as_str_name()).increment(1);
    encode(Op::Kick, 0, &kick)
}

/// Kicks connections silent for 2.5 heartbeat intervals, and forgets the
/// connect-rate state of quiet addresses. One task for the whole room,
/// waking a few times per interval.
pub(crate) async fn sweep_silent_connections(room: Arc<Room>) {
    let heartbeat = room.config.heartbeat_secs.max(1);
    let allowed_silence = heartbeat * 5 / 2;
    let period =
        Duration::from_millis(u64::from(heartbeat) * 1000 / 4).max(Duration::from_millis(250));
    let mut last_tidy = Instant::now();
    loop {
        tokio::select! {
            _ = room.background_stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let now = room_clock();
        let mut kicked = 0u64;
        let silent: Vec<Arc<ConnHandle>> = room
            .conns
            .iter()
            .filter(|entry| {
                now.saturating_sub(entry.last_seen.load(Ordering::Relaxed)) > allowed_silence
            })
            .map(|entry| entry.value().clone())
            .collect();
        // Kicked outside the map's locks: a shard kick takes the queue's.
        for conn in silent {
            if conn.kick(KickCode::Heartbeat) {
                kicked += 1;
            }
        }
        if kicked > 0 {
            ::metrics::counter!("pushgrid_room_heartbeat_kicks_total").increment(kicked);
        }
        if last_tidy.elapsed() > Duration::from_secs(60) {
            room.admission.tidy();
            last_tidy = Instant::now();
        }
    }
}
