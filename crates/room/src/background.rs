//! Background tasks that follow the cluster view: the room's settings from
//! keeper, and the sessions re-sent when the register instances change.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use pushgrid_proto::cluster::Role;

use crate::{Room, admission, conn};

/// Puts keeper's `room.*` settings in force whenever the cluster view changes.
pub(crate) async fn follow_settings(room: Arc<Room>) {
    let mut views = room.cluster.subscribe();
    loop {
        tokio::select! {
            _ = room.background_stop.cancelled() => return,
            changed = views.changed() => if changed.is_err() { return },
        }
        let view = views.borrow_and_update().clone();
        let (limits, errors) = admission::Limits::resolve(&room.config, Some(&view));
        for error in errors {
            tracing::warn!(%error, "room limit ignored");
        }
        let summary = format!("{limits:?}");
        if room.admission.update(limits) {
            tracing::info!(limits = %summary, "room limits changed");
        }
    }
}

/// Re-sends every session of this room when the set of register instances
/// changes: a register that restarted (new epoch) has lost its table, and a
/// register that joined or left moves users between instances. Sessions go in
/// batches through the same Online batchers as new logins.
pub(crate) async fn reflush_sessions_on_register_change(room: Arc<Room>) {
    let signature = |view: &pushgrid_common::cluster::ClusterView| -> Vec<(String, u64)> {
        view.nodes_of(Role::Register)
            .map(|node| (node.id.clone(), node.started_ms))
            .collect()
    };
    let mut views = room.cluster.subscribe();
    let mut known = signature(&views.borrow_and_update());
    loop {
        tokio::select! {
            _ = room.background_stop.cancelled() => return,
            changed = views.changed() => if changed.is_err() { return },
        }
        let current = signature(&views.borrow_and_update());
        if current == known || current.is_empty() {
            continue;
        }
        known = current;
        let sessions: Vec<pushgrid_proto::cluster::Session> = room
            .conns
            .iter()
            .map(|entry| conn::session_of(&room, entry.value()))
            .collect();
        let started = tokio::time::Instant::now();
        let total = sessions.len();
        let failed = std::sync::atomic::AtomicUsize::new(0);
        futures::stream::iter(sessions)
            .for_each_concurrent(1024, |session| {
                let (room, failed) = (&room, &failed);
                async move {
                    // A connection that closed meanwhile must not come back.
                    if !room.conns.contains_key(&session.conn_id) {
                        return;
                    }
                    if room.peers.online(session).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        let failed = failed.into_inner();
        ::metrics::counter!("pushgrid_room_sessions_reflushed_total").increment(total as u64);
        tracing::info!(
            sessions = total,
            failed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sessions re-sent to register"
        );
    }
}
