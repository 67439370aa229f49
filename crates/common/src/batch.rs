//! Call batching: many small requests from many tasks become one RPC.
//!
//! A [`Batcher`] owns a task that takes the first waiting item, then collects
//! more for up to `max_items` items or `max_wait`, and sends them in one call.
//! Up to `in_flight` calls run at once, so collection continues while earlier
//! batches are on the wire (the pipelining of the original system). The queue
//! in front of it is bounded: a caller waits for room, it never grows memory.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tonic::Status;
use tonic::transport::Channel;

use crate::rpc::ChannelPool;

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_items: usize,
    pub max_wait: Duration,
    pub queue: usize,
    pub in_flight: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_items: 256,
            max_wait: Duration::from_micros(500),
            queue: 4096,
            in_flight: 4,
        }
    }
}

type Reply<R> = oneshot::Sender<Result<R, Status>>;

/// The collecting loop shared by [`Batcher`] and [`BatchSink`]: takes the
/// first waiting item, gathers more for up to `max_items` or `max_wait`, and
/// hands the batch to `dispatch` with one of `in_flight` permits (dispatch
/// spawns the call and keeps the permit until it is done).
fn spawn_collector<I, D>(config: BatchConfig, mut receiver: mpsc::Receiver<I>, dispatch: D)
where
    I: Send + 'static,
    D: Fn(Vec<I>, OwnedSemaphorePermit) + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(config.in_flight.max(1)));
    tokio::spawn(async move {
        while let Some(first) = receiver.recv().await {
            let mut items = Vec::with_capacity(config.max_items.min(64));
            items.push(first);
            let deadline = tokio::time::Instant::now() + config.max_wait;
            while items.len() < config.max_items {
                match receiver.try_recv() {
                    Ok(item) => items.push(item),
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        match tokio::time::timeout_at(deadline, receiver.recv()).await {
                            Ok(Some(item)) => items.push(item),
                            _ => break,
                        }
                    }
                }
            }
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            dispatch(items, permit);
        }
    });
}

/// Batched calls with one answer per item.
pub struct Batcher<T, R> {
    queue: mpsc::Sender<(T, Reply<R>)>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher {
            queue: self.queue.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the collecting task. `call` gets a batch and must answer one
    /// result per item, in order. The task ends when every handle is dropped.
    pub fn spawn<F, Fut>(config: BatchConfig, call: F) -> Batcher<T, R>
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>, Status>> + Send + 'static,
    {
        let (queue, receiver) = mpsc::channel::<(T, Reply<R>)>(config.queue.max(1));
        let call = Arc::new(call);
        spawn_collector(config, receiver, move |items, permit| {
            let call = call.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let (inputs, replies): (Vec<T>, Vec<Reply<R>>) = items.into_iter().unzip();
                let expected = inputs.len();
                match call(inputs).await {
                    Ok(results) if results.len() == expected => {
                        for (reply, result) in replies.into_iter().zip(results) {
                            let _ = reply.send(Ok(result));
                        }
                    }
                    Ok(results) => {
                        let status = Status::internal(format!(
                            "batch answered {} results for {expected} items",
                            results.len()
                        ));
                        for reply in replies {
                            let _ = reply.send(Err(status.clone()));
                        }
                    }
                    Err(status) => {
                        for reply in replies {
                            let _ = reply.send(Err(status.clone()));
                        }
                    }
                }
            });
        });
        Batcher { queue }
    }

    /// Queues one item and waits for its result.
    pub async fn call(&self, item: T) -> Result<R, Status> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((item, reply))
            .await
            .map_err(|_| Status::unavailable("batcher stopped"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("batch dropped"))?
    }
}

/// Batched calls nobody waits for (reports, acknowledgements): an item costs
/// a place in the queue and nothing else, no task and no answer channel.
/// `call` handles a failed batch itself (log, count).
pub struct BatchSink<T> {
    queue: mpsc::Sender<T>,
    /// Items queued or in a call not yet finished.
    pending: Arc<AtomicUsize>,
}

impl<T> Clone for BatchSink<T> {
    fn clone(&self) -> Self {
        BatchSink {
            queue: self.queue.clone(),
            pending: self.pending.clone(),
        }
    }
}

impl<T: Send + 'static> BatchSink<T> {
    pub fn spawn<F, Fut>(config: BatchConfig, call: F) -> BatchSink<T>
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (queue, receiver) = mpsc::channel::<T>(config.queue.max(1));
        let call = Arc::new(call);
        let pending = Arc::new(AtomicUsize::new(0));
        let done = pending.clone();
        spawn_collector(config, receiver, move |items, permit| {
            let (call, done) = (call.clone(), done.clone());
            tokio::spawn(async move {
                let count = items.len();
                call(items).await;
                done.fetch_sub(count, Ordering::AcqRel);
                drop(permit);
            });
        });
        BatchSink { queue, pending }
    }

    /// Items queued or being sent.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Queues one item without waiting. A full queue does not drop it: a
    /// task waits for room (only then does an item cost a task).
    pub fn send(&self, item: T) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        match self.queue.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(item)) => {
                let (queue, pending) = (self.queue.clone(), self.pending.clone());
                tokio::spawn(async move {
                    if queue.send(item).await.is_err() {
                        pending.fetch_sub(1, Ordering::AcqRel);
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

type Make<H> = Box<dyn Fn(&str) -> H + Send + Sync>;

/// One handle (a [`Batcher`] or a [`BatchSink`]) per destination (a peer's
/// address), made on first use.
pub struct PeerMap<H> {
    handles: DashMap<String, H>,
    make: Make<H>,
}

/// Batched calls with answers, per peer.
pub type BatcherMap<T, R> = PeerMap<Batcher<T, R>>;
/// Batched calls without answers, per peer.
pub type SinkMap<T> = PeerMap<BatchSink<T>>;

impl<H: Clone> PeerMap<H> {
    pub fn new(make: impl Fn(&str) -> H + Send + Sync + 'static) -> PeerMap<H> {
        PeerMap {
            handles: DashMap::new(),
            make: Box::new(make),
        }
    }

    pub fn get(&self, destination: &str) -> H {
        if let Some(handle) = self.handles.get(destination) {
            return handle.clone();
        }
        self.handles
            .entry(destination.to_string())
            .or_insert_with(|| (self.make)(destination))
            .clone()
    }

    /// Drops the handles of destinations not in `live`.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.handles.retain(|destination, _| live(destination));
    }
}

impl<T: Send + 'static, R: Send + 'static> PeerMap<Batcher<T, R>> {
    /// One batcher per peer address, each calling `call` with a channel from
    /// `pool` to that peer and a batch of items.
    pub fn per_peer<F, Fut>(
        pool: Arc<ChannelPool>,
        config: BatchConfig,
        call: F,
    ) -> BatcherMap<T, R>
    where
        F: Fn(Channel, Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>, Status>> + Send + 'static,
    {
        let call = Arc::new(call);
        PeerMap::new(move |addr: &str| {
            let (pool, addr, call) = (pool.clone(), addr.to_string(), call.clone());
            Batcher::spawn(config, move |items: Vec<T>| {
                let channel = pool.get(&addr);
                let call = call.clone();
                async move { call(channel?, items).await }
            })
        })
    }
}

impl<T: Send + 'static> PeerMap<BatchSink<T>> {
    /// Items queued or being sent, over every peer.
    pub fn pending(&self) -> usize {
        self.handles.iter().map(|sink| sink.pending()).sum()
    }

    /// One sink per peer address, each calling `call` with a channel from
    /// `pool` to that peer (or the error of getting one) and a batch.
    pub fn per_peer_sink<F, Fut>(pool: Arc<ChannelPool>, config: BatchConfig, call: F) -> SinkMap<T>
    where
        F: Fn(Result<Channel, Status>, Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let call = Arc::new(call);
        PeerMap::new(move |addr: &str| {
            let (pool, addr, call) = (pool.clone(), addr.to_string(), call.clone());
            BatchSink::spawn(config, move |items: Vec<T>| call(pool.get(&addr), items))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_get_their_own_answers() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let config = BatchConfig {
            max_items: 100,
            max_wait: Duration::from_millis(20),
            queue: 1000,
            in_flight: 2,
        };
        let batcher = Batcher::spawn(config, move |items: Vec<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(items.into_iter().map(|item| item * 2).collect()) }
        });
        let mut tasks = Vec::new();
        for item in 0..500u32 {
            let batcher = batcher.clone();
            tasks.push(tokio::spawn(async move {
                (item, batcher.call(item).await.unwrap())
            }));
        }
        for task in tasks {
            let (item, doubled) = task.await.unwrap();
            assert_eq!(doubled, item * 2);
        }
        let batches = calls.load(Ordering::SeqCst);
        assert!((5..500).contains(&batches), "500 items in {batches} calls");
    }

    #[tokio::test]
    async fn a_sink_delivers_every_item_in_batches_even_past_its_queue() {
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let (into, counter) = (received.clone(), calls.clone());
        let config = BatchConfig {
            max_items: 50,
            max_wait: Duration::from_millis(5),
            queue: 10,
            in_flight: 1,
        };
        let sink = BatchSink::spawn(config, move |items: Vec<u32>| {
            let (into, counter) = (into.clone(), counter.clone());
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                into.lock().unwrap().extend(items);
            }
        });
        // Far more than the queue holds, sent without waiting.
        for item in 0..1000u32 {
            sink.send(item);
        }
        for _ in 0..200 {
            if received.lock().unwrap().len() == 1000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut got = received.lock().unwrap().clone();
        got.sort_unstable();
        assert_eq!(got, (0..1000).collect::<Vec<_>>(), "every item, once");
        let batches = calls.load(Ordering::SeqCst);
        assert!(batches < 1000, "1000 items in {batches} calls");
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_item() {
        let batcher = Batcher::spawn(BatchConfig::default(), |_items: Vec<u32>| async {
            Err::<Vec<u32>, _>(Status::unavailable("peer down"))
        });
        let error = batcher.call(1).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unavailable);
    }
}
