//! Routing stored messages to live connections: register lookups and room
//! deliveries, each batched per peer, run by a resident worker pool.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pushgrid_common::batch::{BatchConfig, BatcherMap};
use pushgrid_common::cluster::Cluster;
use pushgrid_common::rpc::ChannelPool;
use pushgrid_proto::cluster::register_client::RegisterClient;
use pushgrid_proto::cluster::room_client::RoomClient;
use pushgrid_proto::cluster::{DeliverRequest, Delivery, LookupRequest, Message, Session, UserKey};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tonic::Status;

/// Messages of one job routed at once.
const ROUTE_CONCURRENCY: usize = 256;

fn batch_config() -> BatchConfig {
    BatchConfig {
        max_items: 512,
        max_wait: Duration::from_micros(300),
        queue: 16_384,
        in_flight: 8,
    }
}

pub(crate) struct Router {
    cluster: Cluster,
    lookups: BatcherMap<UserKey, Vec<Session>>,
    deliveries: BatcherMap<Delivery, ()>,
}

impl Router {
    pub fn new(cluster: Cluster) -> Router {
        let pool = Arc::new(ChannelPool::new(2));
        let lookups = BatcherMap::per_peer(
            pool.clone(),
            batch_config(),
            |channel, users: Vec<UserKey>| async move {
                let keys: Vec<(String, String)> = users
                    .iter()
                    .map(|key| (key.app.clone(), key.user.clone()))
                    .collect();
                let response = RegisterClient::new(channel)
                    .lookup(LookupRequest { users })
                    .await?;
                let mut by_user: HashMap<(String, String), Vec<Session>> = HashMap::new();
                for session in response.into_inner().sessions {
                    by_user
                        .entry((session.app.clone(), session.user.clone()))
                        .or_default()
                        .push(session);
                }
                // A user asked twice in one batch gets its sessions both times.
                Ok(keys
                    .iter()
                    .map(|key| by_user.get(key).cloned().unwrap_or_default())
                    .collect())
            },
        );
        let deliveries = BatcherMap::per_peer(
            pool,
            batch_config(),
            |channel, deliveries: Vec<Delivery>| async move {
                // A connection that closed meanwhile is no failure: the message
                // waits in its inbox for the next connect.
                let count = deliveries.len();
                RoomClient::new(channel)
                    .deliver(DeliverRequest { deliveries })
                    .await?;
                Ok(vec![(); count])
            },
        );
        Router {
            cluster,
            lookups,
            deliveries,
        }
    }

    /// Finds the user's live sessions and hands the message to their rooms.
    /// Returns how many connections it was handed to.
    pub async fn route(&self, message: Message) -> Result<usize, Status> {
        let view = self.cluster.view();
        let register = view
            .register_for(&message.app, &message.user)
            .ok_or_else(|| Status::unavailable("no register is live"))?
            .grpc_addr
            .clone();
        let key = UserKey {
            app: message.app.clone(),
            user: message.user.clone(),
        };
        let sessions = self.lookups.get(&register).call(key).await?;
        let mut handed = 0;
        for session in sessions {
            let Some(room) = view.node(&session.room) else {
                continue; // the room is gone; the message waits in the inbox
            };
            let delivery = Delivery {
                conn_id: session.conn_id,
                message: Some(message.clone()),
            };
            match self.deliveries.get(&room.grpc_addr).call(delivery).await {
                Ok(_) => handed += 1,
                Err(status) => {
                    tracing::warn!(room = %session.room, error = %status.message(), "delivery failed")
                }
            }
        }
        Ok(handed)
    }
}

struct Job {
    messages: Vec<Message>,
    queued_at: Instant,
}

/// A bounded queue served by resident workers.
#[derive(Clone)]
pub(crate) struct WorkerPool {
    queue: mpsc::Sender<Job>,
    tracker: TaskTracker,
    capacity: usize,
}

/// A reserved place in the queue: take it before storing, so a full queue is
/// answered before anything is written.
pub(crate) struct Slot(mpsc::OwnedPermit<Job>);

impl WorkerPool {
    pub fn start(router: Arc<Router>, workers: usize, capacity: usize) -> WorkerPool {
        let (queue, receiver) = mpsc::channel::<Job>(capacity.max(1));
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let tracker = TaskTracker::new();
        for _ in 0..workers.max(1) {
            let (router, receiver) = (router.clone(), receiver.clone());
            tracker.spawn(async move {
                loop {
                    let (job, depth) = {
                        let mut receiver = receiver.lock().await;
                        let job = receiver.recv().await;
                        (job, receiver.len())
                    };
                    let Some(job) = job else { return };
                    metrics::gauge!("pushgrid_center_route_queue_depth").set(depth as f64);
                    metrics::histogram!("pushgrid_center_route_wait_seconds").record(job.queued_at.elapsed().as_secs_f64());
                    // The messages of one job (a multicast) are routed together,
                    // so their lookups and deliveries share batches.
                    futures::stream::iter(job.messages)
                        .for_each_concurrent(ROUTE_CONCURRENCY, |message| {
                            let router = router.clone();
                            async move {
                                match router.route(message).await {
                                    Ok(handed) => metrics::counter!("pushgrid_center_routed_total").increment(handed as u64),
                                    Err(status) => {
                                        metrics::counter!("pushgrid_center_route_failures_total").increment(1);
                                        tracing::warn!(error = %status.message(), "routing failed; message waits in the inbox");
                                    }
                                }
                            }
                        })
                        .await;
                }
            });
        }
        WorkerPool {
            queue,
            tracker,
            capacity: capacity.max(1),
        }
    }

    /// A place in the queue, or None when it is full.
    pub fn reserve(&self) -> Option<Slot> {
        let slot = self.queue.clone().try_reserve_owned().ok().map(Slot);
        metrics::gauge!("pushgrid_center_route_queue_depth")
            .set((self.capacity - self.queue.capacity()) as f64);
        slot
    }

    /// Jobs waiting for a worker.
    pub fn depth(&self) -> usize {
        self.capacity - self.queue.capacity()
    }

    pub fn submit(&self, slot: Slot, messages: Vec<Message>) {
        slot.0.send(Job {
            messages,
            queued_at: Instant::now(),
        });
    }

    /// Lets the workers finish what is queued (bounded), at shutdown.
    pub async fn drain(self) {
        let WorkerPool { queue, tracker, .. } = self;
        drop(queue);
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
}
