//! The accept loops: one per device listener.

use std::sync::Arc;
use std::time::Duration;

use pushgrid_common::CancellationToken;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::transport::Transport;
use crate::{Room, conn};

/// Accepts devices on one listener until `stop`, each under a permit of the
/// room's connection cap, and serves each in a task of the room's tracker.
pub(crate) async fn accept_loop(
    room: Arc<Room>,
    listener: TcpListener,
    transport: Transport,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(5);
    let mut backoff = FIRST_BACKOFF;
    loop {
        // Take the permit before accepting: a full room leaves new devices in
        // the kernel's backlog instead of accepting and dropping them.
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = FIRST_BACKOFF;
                ::metrics::counter!("pushgrid_room_accepted_total", "transport" => transport.as_str())
                    .increment(1);
                room.tracker
                    .spawn(conn::serve(room.clone(), stream, peer, transport, permit));
            }
            Err(error) => {
                // EMFILE/ENFILE (out of file descriptors) and friends: the
                // pending connection stays in the backlog and accept would
                // fail again at once, so back off instead of spinning.
                drop(permit);
                let kind = match error.raw_os_error() {
                    Some(code) if code == 24 || code == 23 => "out_of_files",
                    _ => "other",
                };
                ::metrics::counter!("pushgrid_room_accept_errors_total", "kind" => kind)
                    .increment(1);
                tracing::warn!(%error, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
