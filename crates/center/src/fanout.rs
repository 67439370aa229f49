//! The bounded queue of group fan-outs (`push_group`, see `groups.rs`): its
//! type lives here, below the API state that holds it, and its workers in
//! `groups.rs`.

use axum::body::Bytes;
use tokio::sync::mpsc;

/// The bounded queue of group fan-outs; its resident workers start with
/// `groups::start_fanout_workers` once the API state exists.
pub(crate) struct GroupFanout {
    pub(crate) queue: mpsc::Sender<FanoutJob>,
    pub(crate) receiver: std::sync::Mutex<Option<mpsc::Receiver<FanoutJob>>>,
}

/// One group push to fan out: the push's id is the parent of every
/// member's message.
pub(crate) struct FanoutJob {
    pub(crate) app: String,
    pub(crate) group: String,
    pub(crate) id: u64,
    pub(crate) payload: Bytes,
    pub(crate) ttl_secs: u32,
}

impl GroupFanout {
    /// A queue of `capacity` fan-outs; a full one answers 503.
    pub(crate) fn new(capacity: usize) -> GroupFanout {
        let (queue, receiver) = mpsc::channel::<FanoutJob>(capacity.max(1));
        GroupFanout {
            queue,
            receiver: std::sync::Mutex::new(Some(receiver)),
        }
    }
}
