//! The two tasks that keep a keeper's view of the leases current: the store
//! probe that starts a recovery when the lease store stalls, and the upkeep
//! tick that deletes expired leases, keeps this keeper's own lease and
//! publishes the live nodes.

use std::sync::Arc;
use std::time::Duration;

use pushgrid_common::CancellationToken;
use pushgrid_proto::cluster::NodeInfo;

use super::KeeperState;
use crate::leases::WorkerRequest;

/// A store read slower than this means the lease store stalled.
const STALL: Duration = Duration::from_secs(1);

/// Watches the lease store: a cheap read every `every` that fails or takes
/// longer than [`STALL`] starts (or extends) a recovery, while the store is
/// still stalled, so no keeper publishes a list that lost live nodes when
/// the store answers again.
pub(crate) async fn probe_store(
    state: Arc<KeeperState>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match tokio::time::timeout(STALL, state.leases.probe()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => state.store_trouble(),
        }
    }
}

/// Keeps this keeper's view of the leases current: every `every`, deletes
/// expired leases, renews this keeper's own lease (registering it again when
/// it was lost) and publishes the live nodes. A store that does not answer
/// is logged and tried again at the next tick; the last snapshot stays.
pub(crate) async fn maintain_leases(
    state: Arc<KeeperState>,
    own: NodeInfo,
    own_ttl_secs: u32,
    every: Duration,
    shutdown: CancellationToken,
) {
    let own_ttl_ms = u64::from(own_ttl_secs.max(2)) * 1000;
    let mut own = OwnLease {
        node: own,
        ttl_ms: own_ttl_ms,
        renew_every: Duration::from_millis(own_ttl_ms / 3),
        lease_id: None,
        renewed_at: None,
    };
    let mut failing = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let started = tokio::time::Instant::now();
        let mut healthy = reap_expired(&state, failing).await;
        healthy &= own.keep(&state, failing).await;
        if state.refresh_nodes().await.is_err() {
            healthy = false;
        }
        // A tick that took far longer than it should waited on the store:
        // nodes' renewals waited too.
        if !healthy || started.elapsed() > every + STALL {
            state.store_trouble();
        }
        if healthy && failing {
            tracing::info!("lease store answers again");
        }
        failing = !healthy;
    }
    if let Some(lease_id) = own.lease_id {
        let _ = state.leases.deregister(lease_id).await;
    }
}

/// Deletes expired leases (not while recovering after a store outage).
/// False: the store did not answer (logged unless it was `failing` already).
async fn reap_expired(state: &KeeperState, failing: bool) -> bool {
    let reaped = if state.recovering() {
        Ok(Vec::new())
    } else {
        state.leases.reap().await
    };
    match reaped {
        Ok(ended) => {
            for node in &ended {
                tracing::warn!(%node, "lease expired");
            }
            if !ended.is_empty() {
                metrics::counter!("pushgrid_keeper_leases_expired_total")
                    .increment(ended.len() as u64);
            }
            true
        }
        Err(error) => {
            if !failing {
                tracing::warn!(%error, "cannot reap expired leases; keeping the last view");
            }
            false
        }
    }
}

/// This keeper's own lease: it lists itself as a node like any other.
struct OwnLease {
    node: NodeInfo,
    ttl_ms: u64,
    renew_every: Duration,
    lease_id: Option<u64>,
    renewed_at: Option<tokio::time::Instant>,
}

impl OwnLease {
    /// Renews the lease once a third of its TTL passed, and registers this
    /// keeper again when the lease was lost. False: the store did not answer
    /// (logged unless it was `failing` already).
    async fn keep(&mut self, state: &KeeperState, failing: bool) -> bool {
        if self
            .renewed_at
            .is_some_and(|at| at.elapsed() < self.renew_every)
        {
            return true;
        }
        let renewed = match self.lease_id {
            Some(lease_id) => state
                .leases
                .heartbeat(lease_id, 0)
                .await
                .map(|renewed| renewed.is_some()),
            None => Ok(false),
        };
        match renewed {
            Ok(true) => {
                self.renewed_at = Some(tokio::time::Instant::now());
                true
            }
            Ok(false) => match state
                .leases
                .register(&self.node, self.ttl_ms, WorkerRequest::default())
                .await
            {
                Ok(registered) => {
                    tracing::info!(lease_id = registered.lease_id, "keeper listed itself");
                    self.lease_id = Some(registered.lease_id);
                    self.renewed_at = Some(tokio::time::Instant::now());
                    true
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, "cannot list this keeper");
                    }
                    false
                }
            },
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "cannot renew this keeper's lease");
                }
                false
            }
        }
    }
}
