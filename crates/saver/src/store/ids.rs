//! Message ids minted under the worker id keeper granted (or none while the
//! lease may have lapsed), and the new messages of a Store call built on them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pushgrid_common::ids::{IdGenerator, MAX_WORKER_ID};
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{Message, StoreItem};

use super::limits::StoreLimits;
use crate::error::StoreError;

/// Where a saver's worker id comes from: the fenced lease keeper granted
/// (`Cluster::worker_lease`), read at every call; None while the lease may
/// have lapsed.
pub type WorkerIdSource = Arc<dyn Fn() -> Option<u32> + Send + Sync>;

/// Message ids for the worker id keeper granted this node, which may change
/// while the node runs (after a lost lease), and which may be missing: then
/// no id is minted ([`StoreError::NoWorkerId`]), since another saver may
/// hold the id by now.
///
/// One generator is kept per worker id ever used, never rebuilt: a fresh
/// generator forgets the sequence state, and could repeat an id its
/// predecessor made in the same millisecond.
pub struct MessageIds {
    worker_id: WorkerIdSource,
    generators: Mutex<HashMap<u32, Arc<IdGenerator>>>,
}

impl MessageIds {
    /// Follows `worker_id`, read at every call.
    pub fn new(worker_id: WorkerIdSource) -> MessageIds {
        MessageIds {
            worker_id,
            generators: Mutex::new(HashMap::new()),
        }
    }

    /// Follows a node's fenced worker id lease.
    pub fn from_lease(lease: pushgrid_common::cluster::WorkerLease) -> MessageIds {
        MessageIds::new(Arc::new(move || lease.current()))
    }

    /// A fixed worker id, for tests and single-node use.
    pub fn fixed(worker_id: u32) -> MessageIds {
        MessageIds::new(Arc::new(move || Some(worker_id)))
    }

    /// `count` new ids, increasing; an error while no worker id is held.
    pub fn next_ids(&self, count: usize) -> Result<Vec<u64>, StoreError> {
        let Some(worker_id) = (self.worker_id)() else {
            crate::metrics::no_worker_id();
            return Err(StoreError::NoWorkerId);
        };
        let worker_id = worker_id & MAX_WORKER_ID;
        let generator = {
            // Held only for the map lookup; never across an await.
            let mut generators = self
                .generators
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            generators
                .entry(worker_id)
                .or_insert_with(|| Arc::new(IdGenerator::new(worker_id)))
                .clone()
        };
        Ok(generator.next_ids(count))
    }
}

/// The messages a Store call creates, one per user in order, with fresh ids.
pub(super) fn new_messages(
    ids: &MessageIds,
    limits: &StoreLimits,
    app: &str,
    users: &[String],
    payload: &Bytes,
    ttl_secs: u32,
    parent_id: u64,
) -> Result<Vec<Message>, StoreError> {
    let created_ms = now_ms();
    let expires_ms = created_ms + u64::from(limits.effective_ttl_secs(ttl_secs)) * 1000;
    Ok(ids
        .next_ids(users.len())?
        .into_iter()
        .zip(users)
        .map(|(id, user)| Message {
            id,
            app: app.to_string(),
            user: user.clone(),
            payload: payload.clone(),
            created_ms,
            expires_ms,
            attempts: 0,
            parent_id,
        })
        .collect())
}

/// One new message per item, ids increasing in item order.
pub(super) fn new_messages_of_items(
    ids: &MessageIds,
    limits: &StoreLimits,
    items: &[StoreItem],
) -> Result<Vec<Message>, StoreError> {
    let created_ms = now_ms();
    Ok(ids
        .next_ids(items.len())?
        .into_iter()
        .zip(items)
        .map(|(id, item)| Message {
            id,
            app: item.app.clone(),
            user: item.user.clone(),
            payload: item.payload.clone(),
            created_ms,
            expires_ms: created_ms + u64::from(limits.effective_ttl_secs(item.ttl_secs)) * 1000,
            attempts: 0,
            ..Message::default()
        })
        .collect())
}
