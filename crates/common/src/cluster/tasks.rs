//! The two tasks that keep a node in the cluster: the heartbeat (renew the
//! lease, register again when it was lost) and the watch stream (follow the
//! view through whichever keeper answers).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pushgrid_proto::cluster::{ClusterState, HeartbeatRequest, NodeInfo, WatchRequest};
use tokio::sync::watch;

use super::Inner;
use super::keepers::KEEPER_RETRY;
use super::view::ClusterView;

/// Renews the lease every third of its TTL through any keeper that answers;
/// registers again when it was lost; renews or revokes the worker id.
pub(super) async fn heartbeat_loop(inner: Arc<Inner>) {
    let period = Duration::from_millis(u64::from(inner.ttl_secs) * 1000 / 3);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        inner.worker.note_lapse();
        let request = HeartbeatRequest {
            lease_id: inner.lease_id.load(Ordering::Relaxed),
            load: inner.load.load(Ordering::Relaxed),
        };
        let sent_at = tokio::time::Instant::now();
        let answer = inner
            .keepers
            .call(|mut keeper| async move { keeper.heartbeat(request).await })
            .await;
        let register_again = match answer {
            Ok(renewed) => {
                if failing {
                    tracing::info!("a keeper answers again");
                    failing = false;
                }
                if !inner.mints_ids {
                    false
                } else if renewed.worker_renewed {
                    inner
                        .worker
                        .extend(sent_at + Duration::from_millis(u64::from(renewed.worker_ttl_ms)));
                    false
                } else {
                    // The lease lives but holds no worker id (any more).
                    inner.worker.revoke();
                    tracing::warn!("keeper says this node holds no worker id; registering again");
                    true
                }
            }
            Err(status) if status.code() == tonic::Code::NotFound => true,
            Err(status) => {
                if !failing {
                    tracing::warn!(keepers = ?inner.keepers.known(), error = %status.message(), "heartbeat: no keeper answered; keeping the last view");
                    failing = true;
                }
                false
            }
        };
        if register_again {
            match inner.register().await {
                Ok(response) => {
                    tracing::info!(
                        lease = response.lease_id,
                        "lease expired at keeper; registered again"
                    );
                }
                Err(status) => tracing::warn!(error = %status.message(), "re-register failed"),
            }
        }
    }
}

/// Follows a keeper's watch stream, moving to another keeper when it breaks.
/// After a break, the nodes of the last view are kept for two lease TTLs
/// even when the new stream does not list them yet: they may be
/// re-registering (after every keeper was away), and routing around live
/// peers for a moment would fail requests for nothing.
pub(super) async fn watch_loop(inner: Arc<Inner>, sender: watch::Sender<Arc<ClusterView>>) {
    let grace = Duration::from_secs(u64::from(inner.ttl_secs) * 2);
    let mut last_nodes: Vec<NodeInfo> = Vec::new();
    let mut merge_until: Option<tokio::time::Instant> = None;
    let mut failures = 0usize;
    loop {
        let (addr, client) = inner.keepers.current();
        let stream = match client {
            Ok(mut keeper) => tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                result = keeper.watch(WatchRequest {}) => result,
            },
            Err(status) => Err(status),
        };
        match stream {
            Ok(response) => {
                failures = 0;
                let mut stream = response.into_inner();
                let mut latest: Option<ClusterState> = None;
                if !last_nodes.is_empty() {
                    // A stream after a break: the grace starts now that a keeper answers.
                    merge_until = Some(tokio::time::Instant::now() + grace);
                }
                loop {
                    let grace_end = merge_until;
                    let message = tokio::select! {
                        _ = inner.shutdown.cancelled() => return,
                        message = stream.message() => message,
                        _ = sleep_until_or_forever(grace_end) => {
                            // The grace ended: the keeper's own list is the truth now.
                            merge_until = None;
                            match latest.clone() {
                                Some(state) => Ok(Some(state)),
                                None => continue,
                            }
                        }
                    };
                    match message {
                        Ok(Some(state)) => {
                            latest = Some(state.clone());
                            let mut state = state;
                            if merge_until.is_some_and(|until| tokio::time::Instant::now() < until)
                            {
                                for node in &last_nodes {
                                    if !state.nodes.iter().any(|listed| listed.id == node.id) {
                                        state.nodes.push(node.clone());
                                    }
                                }
                            } else {
                                last_nodes = state.nodes.clone();
                            }
                            let view = ClusterView::from_state(state);
                            inner.keepers.learn(&view);
                            sender.send_replace(Arc::new(view));
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::warn!(keeper = %addr, error = %status.message(), "keeper watch stream broke");
                            break;
                        }
                    }
                }
                inner.keepers.advance(&addr);
            }
            Err(status) => {
                tracing::debug!(keeper = %addr, error = %status.message(), "keeper watch failed");
                inner.keepers.advance(&addr);
                failures += 1;
            }
        }
        // Straight to the next keeper; a pause once every keeper was tried.
        if failures >= inner.keepers.known().len() || failures == 0 {
            failures = 0;
            tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(KEEPER_RETRY) => {}
            }
        }
    }
}

async fn sleep_until_or_forever(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
