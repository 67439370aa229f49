//! Routing stored messages to live connections: register lookups and room
//! deliveries, each batched per peer, run by a resident worker pool.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pushgrid_common::batch::{BatchConfig, BatcherMap};
use pushgrid_common::cluster::Cluster;
use pushgrid_common::rpc::ChannelPool;
use pushgrid_proto::cluster::register_client::RegisterClient;
use pushgrid_proto::cluster::room_client::RoomClient;
use pushgrid_proto::cluster::{DeliverRequest, Delivery, LookupRequest, Message, Session, UserKey};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tonic::Status;

/// Messages of one job routed at once.
const ROUTE_CONCURRENCY: usize = 256;

/// Lookups and deliveries per peer: sent at once when the call slot is free,
/// batched while it is busy. One call in flight per peer: a lone request
/// still leaves at once, and under load the batches grow with it, so each
/// peer handles fewer, larger calls (fewer wake-ups per message) instead of
/// two half-sized ones.
fn batch_config() -> BatchConfig {
    BatchConfig {
        max_items: 512,
        queue: 16_384,
        in_flight: 1,
        linger: Duration::ZERO,
    }
}

/// A user's sessions as one register answer gave them.
#[derive(Clone, Default)]
struct Found {
    sessions: Vec<Session>,
    /// The register restarted recently: no sessions may not mean offline.
    warming: bool,
}

/// Each user of a lookup batch once, in the order first asked. The register
/// answers a user's sessions once per time the request names the user, so a
/// user named twice would get every session twice, and each of its messages
/// would be handed to each of its connections twice.
fn distinct_users(users: Vec<UserKey>) -> Vec<UserKey> {
    let mut seen = std::collections::HashSet::with_capacity(users.len());
    users
        .into_iter()
        .filter(|key| seen.insert((key.app.clone(), key.user.clone())))
        .collect()
}

/// How a routing attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Routed {
    /// Handed to this many connections (0: the user is offline; the message
    /// waits in the inbox for the next AUTH).
    Handed(usize),
    /// Not sure the user was reached (register warming up, or a room did not
    /// take the delivery): worth another attempt.
    Uncertain { handed: usize, reason: String },
}

pub(crate) struct Router {
    cluster: Cluster,
    lookups: BatcherMap<UserKey, Found>,
    deliveries: BatcherMap<Delivery, ()>,
}

impl Router {
    pub fn new(cluster: Cluster) -> Router {
        let pool = Arc::new(ChannelPool::new(2, cluster.credentials()));
        let lookups = BatcherMap::per_peer(
            pool.clone(),
            batch_config(),
            |channel, users: Vec<UserKey>| async move {
                let keys: Vec<(String, String)> = users
                    .iter()
                    .map(|key| (key.app.clone(), key.user.clone()))
                    .collect();
                let response = RegisterClient::new(channel)
                    .lookup(LookupRequest {
                        users: distinct_users(users),
                    })
                    .await?
                    .into_inner();
                let warming = response.warming;
                let mut by_user: HashMap<(String, String), Vec<Session>> = HashMap::new();
                for session in response.sessions {
                    by_user
                        .entry((session.app.clone(), session.user.clone()))
                        .or_default()
                        .push(session);
                }
                // A user asked twice in one batch (two of its messages routed
                // at once) gets its sessions, once each, both times.
                Ok(keys
                    .iter()
                    .map(|key| Found {
                        sessions: by_user.get(key).cloned().unwrap_or_default(),
                        warming,
                    })
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

    /// How many live sessions the user has, as its register knows them, and
    /// whether that register is warming up (then none may not mean offline).
    pub async fn sessions(&self, app: &str, user: &str) -> Result<(usize, bool), Status> {
        let register = self
            .cluster
            .view()
            .register_for(app, user)
            .ok_or_else(|| Status::unavailable("no register is live"))?
            .grpc_addr
            .clone();
        let key = UserKey {
            app: app.to_string(),
            user: user.to_string(),
        };
        let found = self.lookups.get(&register).call(key).await?;
        Ok((found.sessions.len(), found.warming))
    }

    /// Finds the user's live sessions and hands the message to their rooms.
    /// An error or [`Routed::Uncertain`] is worth another attempt.
    pub async fn route(&self, message: Message) -> Result<Routed, Status> {
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
        let found = self.lookups.get(&register).call(key).await?;
        if found.sessions.is_empty() && found.warming {
            return Ok(Routed::Uncertain {
                handed: 0,
                reason: "register is warming up".into(),
            });
        }
        let mut handed = 0;
        let mut failed = None;
        for session in found.sessions {
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
                    tracing::warn!(room = %session.room, error = %status.message(), "delivery failed");
                    failed = Some(format!("room {}: {}", session.room, status.message()));
                }
            }
        }
        Ok(match failed {
            // Sessions already reached get the message again; the SDK drops it.
            Some(reason) => Routed::Uncertain { handed, reason },
            None => Routed::Handed(handed),
        })
    }
}

/// Attempts after the first, and the pause before each: 0.25 s doubling to
/// 8 s, about 40 s in all, long enough for a killed register or room to be
/// replaced. After the last the message stays in the inbox (the device gets it
/// at its next AUTH).
const RETRY_DELAYS_MS: [u64; 8] = [250, 500, 1000, 2000, 4000, 8000, 8000, 8000];
/// Most messages waiting for another attempt; beyond that they stay in the
/// inbox, counted in `pushgrid_center_route_retries_dropped_total`.
const RETRY_CAPACITY: usize = 100_000;

/// Messages waiting for another routing attempt: one FIFO per attempt number,
/// so each FIFO is in due order and one task serves them all.
#[derive(Default)]
struct Retries {
    levels: [VecDeque<(Instant, Message)>; RETRY_DELAYS_MS.len()],
    len: usize,
}

impl Retries {
    /// Queues attempt `attempt + 1` of `message`; false when it cannot.
    fn push(&mut self, attempt: usize, message: Message) -> bool {
        if attempt >= RETRY_DELAYS_MS.len() || self.len >= RETRY_CAPACITY {
            return false;
        }
        let due = Instant::now() + Duration::from_millis(RETRY_DELAYS_MS[attempt]);
        self.levels[attempt].push_back((due, message));
        self.len += 1;
        true
    }

    /// The earliest due time among the heads.
    fn next_due(&self) -> Option<Instant> {
        self.levels
            .iter()
            .filter_map(|level| level.front().map(|(due, _)| *due))
            .min()
    }

    /// Every message due by `now`, with the attempt it is for.
    fn take_due(&mut self, now: Instant) -> Vec<(usize, Message)> {
        let mut due = Vec::new();
        for (attempt, level) in self.levels.iter_mut().enumerate() {
            while level.front().is_some_and(|(at, _)| *at <= now) {
                let (_, message) = level.pop_front().expect("front exists");
                due.push((attempt + 1, message));
            }
        }
        self.len -= due.len();
        due
    }
}

/// [`Retries`] shared by the routing workers and the task that serves them.
#[derive(Default)]
struct RetryQueue {
    retries: std::sync::Mutex<Retries>,
    /// Woken when a message is queued (it may be due before the current head).
    wake: tokio::sync::Notify,
}

impl RetryQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Retries> {
        self.retries.lock().expect("retry queue lock")
    }

    fn push(&self, attempt: usize, message: Message) -> bool {
        let queued = self.lock().push(attempt, message);
        if queued {
            self.wake.notify_one();
        }
        queued
    }
}

/// Routes `message` (attempt number `attempt`, 0 first) and queues another
/// attempt when the outcome is not certain.
async fn route_once(router: &Router, queue: &RetryQueue, attempt: usize, message: Message) {
    let reason = match router.route(message.clone()).await {
        Ok(Routed::Handed(handed)) => {
            metrics::counter!("pushgrid_center_routed_total").increment(handed as u64);
            return;
        }
        Ok(Routed::Uncertain { handed, reason }) => {
            metrics::counter!("pushgrid_center_routed_total").increment(handed as u64);
            reason
        }
        Err(status) => status.message().to_string(),
    };
    metrics::counter!("pushgrid_center_route_failures_total").increment(1);
    let id = message.id;
    if queue.push(attempt, message) {
        metrics::counter!("pushgrid_center_route_retries_total").increment(1);
        tracing::debug!(id, attempt, %reason, "routing uncertain; will try again");
    } else {
        metrics::counter!("pushgrid_center_route_retries_dropped_total").increment(1);
        tracing::warn!(id, attempt, %reason, "routing failed; message waits in the inbox");
    }
}

/// Serves the retry queue; ends once the worker pool is drained and nothing
/// waits.
async fn serve_retries(router: Arc<Router>, queue: Arc<RetryQueue>, tracker: TaskTracker) {
    loop {
        let next = queue.lock().next_due();
        match next {
            Some(due) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = queue.wake.notified() => continue,
                }
            }
            None => {
                if tracker.is_closed() {
                    return;
                }
                tokio::select! {
                    _ = queue.wake.notified() => continue,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        }
        let (due, waiting) = {
            let mut retries = queue.lock();
            (retries.take_due(Instant::now()), retries.len)
        };
        metrics::gauge!("pushgrid_center_route_retry_queue").set(waiting as f64);
        futures::stream::iter(due)
            .for_each_concurrent(ROUTE_CONCURRENCY, |(attempt, message)| {
                route_once(&router, &queue, attempt, message)
            })
            .await;
    }
}

/// Resolves when a submitted job's messages had their first routing attempt
/// (handed to the rooms of every session found, or queued for another try).
pub(crate) type Routing = tokio::sync::oneshot::Receiver<()>;

/// How long an API call waits for its messages' first routing attempt before
/// it answers anyway (they are stored; routing goes on).
pub(crate) const ANSWER_AFTER_ROUTING_WITHIN: Duration = Duration::from_secs(2);

/// Waits (bounded) for a job's first routing attempt. Answering after it
/// means a center killed after its answer has already handed the messages
/// to the rooms: what the API acknowledged is in the inbox and on its way.
pub(crate) async fn routed(routing: Routing) {
    let _ = tokio::time::timeout(ANSWER_AFTER_ROUTING_WITHIN, routing).await;
}

/// Routing of stored pushes. Each push (a job: its messages) is routed by a
/// task of its own, so many are routed at once and their lookups and
/// deliveries share batches; the number of pushes being stored or routed is
/// bounded by `capacity` places, taken before anything is stored.
#[derive(Clone)]
pub(crate) struct WorkerPool {
    router: Arc<Router>,
    places: Arc<Semaphore>,
    retries: Arc<RetryQueue>,
    tracker: TaskTracker,
    capacity: usize,
}

/// A place taken before storing, so a full pool is answered before anything
/// is written. Given back when dropped (after routing, or when the store
/// failed), and `pushgrid_center_route_queue_depth` follows.
pub(crate) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    places: Arc<Semaphore>,
    capacity: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        set_depth(self.capacity - self.places.available_permits());
    }
}

fn set_depth(depth: usize) {
    metrics::gauge!("pushgrid_center_route_queue_depth").set(depth as f64);
}

impl WorkerPool {
    pub fn start(router: Arc<Router>, capacity: usize) -> WorkerPool {
        let capacity = capacity.max(1);
        let tracker = TaskTracker::new();
        let retries = Arc::new(RetryQueue::default());
        tokio::spawn(serve_retries(
            router.clone(),
            retries.clone(),
            tracker.clone(),
        ));
        WorkerPool {
            router,
            places: Arc::new(Semaphore::new(capacity)),
            retries,
            tracker,
            capacity,
        }
    }

    /// A place, or None when every place is taken.
    pub fn reserve(&self) -> Option<Slot> {
        let permit = self.places.clone().try_acquire_owned().ok();
        set_depth(self.depth());
        permit.map(|permit| Slot {
            permit: Some(permit),
            places: self.places.clone(),
            capacity: self.capacity,
        })
    }

    /// Pushes being stored or routed.
    pub fn depth(&self) -> usize {
        self.capacity - self.places.available_permits()
    }

    /// Routes `messages` in a task of their own that keeps the place until
    /// their first attempt is done; the returned [`Routing`] resolves then
    /// (see [`routed`]).
    pub fn submit(&self, slot: Slot, messages: Vec<Message>) -> Routing {
        let (done, routing) = tokio::sync::oneshot::channel();
        let (router, retries) = (self.router.clone(), self.retries.clone());
        self.tracker.spawn(async move {
            let _place = slot;
            let started = Instant::now();
            futures::stream::iter(messages)
                .for_each_concurrent(ROUTE_CONCURRENCY, |message| {
                    route_once(&router, &retries, 0, message)
                })
                .await;
            metrics::histogram!("pushgrid_center_route_seconds")
                .record(started.elapsed().as_secs_f64());
            let _ = done.send(());
        });
        routing
    }

    /// Lets the routing under way finish (bounded), at shutdown.
    pub async fn drain(self) {
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u64) -> Message {
        Message {
            id,
            ..Default::default()
        }
    }

    #[test]
    fn retries_come_due_in_order_of_their_delay_and_stop_after_the_last_attempt() {
        let start = Instant::now();
        let mut retries = Retries::default();
        assert!(retries.push(1, message(1))); // due 500 ms after start
        assert!(retries.push(0, message(2))); // due 250 ms after start
        assert_eq!(retries.len, 2);
        let first_due = retries.next_due().expect("two messages are queued");
        assert!(first_due >= start + Duration::from_millis(250));
        assert!(first_due < start + Duration::from_millis(500));
        assert!(retries.take_due(start).is_empty());

        let due = retries.take_due(first_due);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].0, due[0].1.id), (1, 2), "attempt 1 of message 2");
        let due = retries.take_due(start + Duration::from_secs(60));
        assert_eq!((due[0].0, due[0].1.id), (2, 1));
        assert_eq!(retries.len, 0);
        assert!(retries.next_due().is_none());

        assert!(
            !retries.push(RETRY_DELAYS_MS.len(), message(3)),
            "no attempt after the last"
        );
    }

    fn key(app: &str, user: &str) -> UserKey {
        UserKey {
            app: app.into(),
            user: user.into(),
        }
    }

    #[test]
    fn a_lookup_names_each_user_once_in_first_asked_order() {
        let asked = vec![
            key("a", "erin"),
            key("a", "finn"),
            key("a", "erin"),
            key("b", "erin"),
            key("a", "finn"),
        ];
        let sent = distinct_users(asked);
        assert_eq!(
            sent,
            vec![key("a", "erin"), key("a", "finn"), key("b", "erin")]
        );
    }

    #[test]
    fn a_full_retry_queue_refuses_more() {
        let mut retries = Retries {
            len: RETRY_CAPACITY,
            ..Retries::default()
        };
        assert!(!retries.push(0, message(1)));
    }
}
