//! The accept loops, one per device listener, and what follows an accept:
//! admission, opening the connection (`conn`), then handing a plain TCP
//! connection to its shard or running a TLS/WebSocket connection's loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pushgrid_common::CancellationToken;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::admission::Lease;
use crate::conn::{self, LINGER, Opened};
use crate::shard_handle::Adoption;
use crate::transport::{DeviceStream, Transport};
use crate::{Room, metrics};

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
                    .spawn(serve(room.clone(), stream, peer, transport, permit));
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

/// Serves one accepted socket: opens it, then hands a plain TCP connection
/// to its shard, or runs a TLS/WebSocket connection's loop until it closes.
async fn serve(
    room: Arc<Room>,
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    permit: OwnedSemaphorePermit,
) {
    let ip_slot = match room.admission.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            drop(permit);
            let message = refusal.message(&room.admission.limits());
            return Box::pin(conn::refuse_at_accept(
                tcp, peer, transport, refusal, message,
            ))
            .await;
        }
    };
    let lease = Lease::new(ip_slot, permit);
    // Handshake, AUTH and the register call: large state, needed once, so boxed.
    let Some(opened) = Box::pin(conn::open(&room, tcp, peer, transport)).await else {
        return;
    };
    let Opened {
        mut stream,
        handle,
        mut buf,
    } = opened;
    if let Some(shard) = handle.shard().cloned() {
        let DeviceStream::Tcp(tcp) = stream else {
            unreachable!("shard connections are plain TCP");
        };
        match tcp.into_std() {
            Ok(stream) => shard.adopt(Adoption {
                conn: handle,
                stream,
                buffered: buf,
                lease,
            }),
            Err(error) => {
                tracing::warn!(%error, "cannot hand the connection to its shard");
                handle.close_queue();
                conn::finish(&room, &handle);
                metrics::closed("io");
            }
        }
        return;
    }
    let last = Box::pin(conn::task_loop(&room, &handle, &mut stream, &mut buf)).await;
    let kick = handle.pending_kick();
    // After a bad frame the answers to the frames before it go first; a
    // kicked device gets the KICK without what was queued.
    let mut frames = handle.close_queue_keeping(last.is_some() && kick.is_none());
    conn::finish(&room, &handle);
    let reason = match (&last, kick) {
        (Some(_), Some(code)) => conn::kick_reason_label(code),
        (Some(_), None) => "frame_error",
        (None, _) => "client",
    };
    metrics::closed(reason);
    if let Some(last_frame) = last {
        frames.push(last_frame);
        Box::pin(stream.close_politely(frames, LINGER)).await;
    }
    drop(lease);
}
