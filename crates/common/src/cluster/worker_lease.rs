//! [`WorkerLease`]: the fenced worker id a saver mints ids with, valid until
//! a deadline counted from when the node sent the request that granted it.

use std::sync::Arc;
use std::time::Duration;

/// The worker id this node may mint ids with. keeper grants it fenced
/// (`pushgrid_keeper::leases`): it is valid until a deadline counted from
/// when the node *sent* the request that granted or renewed it, which comes
/// before keeper could grant it to anyone else. From that deadline on,
/// [`WorkerLease::current`] says None and the node must not mint, until a
/// keeper renews it or grants another.
#[derive(Clone)]
pub struct WorkerLease {
    state: Arc<std::sync::Mutex<WorkerState>>,
}

#[derive(Debug, Clone, Copy)]
struct WorkerState {
    id: u32,
    generation: u64,
    /// None: none granted, or lapsed.
    valid_until: Option<tokio::time::Instant>,
    /// Lapsed since the last grant or renewal (logged once).
    lapsed: bool,
}

impl WorkerLease {
    pub(super) fn none() -> WorkerLease {
        WorkerLease {
            state: Arc::new(std::sync::Mutex::new(WorkerState {
                id: 0,
                generation: 0,
                valid_until: None,
                lapsed: false,
            })),
        }
    }

    /// A worker id that never lapses (tests, a store used on its own).
    pub fn fixed(id: u32) -> WorkerLease {
        let lease = WorkerLease::none();
        lease.grant(
            id,
            0,
            tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400),
        );
        lease
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WorkerState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The worker id, while its lease is alive; None from the moment it may
    /// have lapsed.
    pub fn current(&self) -> Option<u32> {
        let state = self.state();
        state
            .valid_until
            .filter(|until| tokio::time::Instant::now() < *until)
            .map(|_| state.id)
    }

    /// The id and generation last granted (also after a lapse), for asking
    /// for the same id again.
    pub(super) fn held(&self) -> (u32, u64) {
        let state = self.state();
        (state.id, state.generation)
    }

    pub(super) fn grant(&self, id: u32, generation: u64, valid_until: tokio::time::Instant) {
        let mut state = self.state();
        *state = WorkerState {
            id,
            generation,
            valid_until: Some(valid_until),
            lapsed: false,
        };
        metrics::gauge!("pushgrid_cluster_worker_id").set(f64::from(id));
    }

    pub(super) fn extend(&self, valid_until: tokio::time::Instant) {
        let mut state = self.state();
        if state.generation > 0 || state.valid_until.is_some() {
            state.valid_until = Some(valid_until);
            state.lapsed = false;
        }
    }

    /// Stops minting now (keeper says the id is no longer this node's).
    pub(super) fn revoke(&self) {
        self.state().valid_until = None;
    }

    /// Logs the moment the lease lapses, once.
    pub(super) fn note_lapse(&self) {
        let mut state = self.state();
        let lapsed = state
            .valid_until
            .is_none_or(|until| tokio::time::Instant::now() >= until);
        if lapsed && !state.lapsed && state.generation > 0 {
            state.lapsed = true;
            metrics::counter!("pushgrid_cluster_worker_lease_lapses_total").increment(1);
            tracing::error!(
                worker_id = state.id,
                "worker id lease lapsed (no keeper renewed it): not minting ids until one does"
            );
        }
    }
}
