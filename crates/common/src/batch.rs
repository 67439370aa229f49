//! Call batching: many small requests from many tasks become one RPC.
//!
//! A [`Batcher`] owns a task that sends what is queued as soon as one of its
//! `in_flight` call slots is free, and collects while every slot is busy: a
//! lone request goes out at once (no batching window to wait out), and under
//! load the batches grow by themselves to what arrived during the calls on
//! the wire, up to `max_items` (the group commit of databases, and the
//! pipelining of the original system). The queue in front of it is bounded:
//! a caller waits for room, it never grows memory.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tonic::Status;

use crate::rpc::{Channel, ChannelPool};

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most items in one call.
    pub max_items: usize,
    /// Items waiting for a call; a full queue makes [`Batcher::call`] wait
    /// and [`BatchSink::send`] refuse.
    pub queue: usize,
    /// Calls on the wire at once. The fewer, the larger the batches under
    /// load (each call takes what arrived while the others were out).
    pub in_flight: usize,
    /// How long a batch may wait for more items (until `max_items`) even
    /// with a call slot free. Zero for calls someone waits on; reports
    /// nobody waits for (acknowledgements, delivery records) linger so that
    /// a quiet cluster sends them a few at a time, not each on its own.
    pub linger: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_items: 256,
            queue: 4096,
            in_flight: 2,
            linger: Duration::ZERO,
        }
    }
}

type Reply<R> = oneshot::Sender<Result<R, Status>>;

/// Moves what is queued now into `items`, up to `max` in all.
fn take_ready<I>(receiver: &mut mpsc::Receiver<I>, items: &mut Vec<I>, max: usize) {
    while items.len() < max {
        match receiver.try_recv() {
            Ok(item) => items.push(item),
            Err(_) => return,
        }
    }
}

/// The collecting loop shared by [`Batcher`] and [`BatchSink`]: takes the
/// first waiting item and what is queued behind it; sends them at once when
/// one of `in_flight` call slots is free, else keeps collecting (up to
/// `max_items`) until one is. `dispatch` spawns the call and keeps the
/// permit until it is done.
fn spawn_collector<I, D>(config: BatchConfig, mut receiver: mpsc::Receiver<I>, dispatch: D)
where
    I: Send + 'static,
    D: Fn(Vec<I>, OwnedSemaphorePermit) + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(config.in_flight.max(1)));
    let max_items = config.max_items.max(1);
    tokio::spawn(async move {
        while let Some(first) = receiver.recv().await {
            let mut items = Vec::with_capacity(max_items.min(64));
            items.push(first);
            take_ready(&mut receiver, &mut items, max_items);
            if !config.linger.is_zero() && items.len() < max_items {
                let until = tokio::time::Instant::now() + config.linger;
                while items.len() < max_items {
                    match tokio::time::timeout_at(until, receiver.recv()).await {
                        Ok(Some(item)) => {
                            items.push(item);
                            take_ready(&mut receiver, &mut items, max_items);
                        }
                        _ => break,
                    }
                }
            }
            let permit = match in_flight.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let mut open = true;
                    loop {
                        tokio::select! {
                            biased;
                            permit = in_flight.clone().acquire_owned() => match permit {
                                Ok(permit) => break permit,
                                Err(_) => return,
                            },
                            item = receiver.recv(), if open && items.len() < max_items => match item {
                                Some(item) => items.push(item),
                                None => open = false,
                            },
                        }
                    }
                }
            };
            take_ready(&mut receiver, &mut items, max_items);
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

    /// Queues one item without waiting. False when the queue is full (the
    /// peer is slow or down) or the sink has stopped: the item is not sent,
    /// and the caller counts it. Memory stays bounded by the queue; nothing
    /// piles up in tasks.
    pub fn send(&self, item: T) -> bool {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.queue.try_send(item).is_ok() {
            return true;
        }
        self.pending.fetch_sub(1, Ordering::AcqRel);
        false
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
            queue: 1000,
            in_flight: 2,
            linger: Duration::ZERO,
        };
        let batcher = Batcher::spawn(config, move |items: Vec<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                // A call on the wire: the next batch collects meanwhile.
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok(items.into_iter().map(|item| item * 2).collect())
            }
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
        assert!((5..100).contains(&batches), "500 items in {batches} calls");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_item_goes_out_at_once() {
        let batcher = Batcher::spawn(BatchConfig::default(), |items: Vec<u32>| async move {
            Ok(items)
        });
        let started = tokio::time::Instant::now();
        assert_eq!(batcher.call(7).await.unwrap(), 7);
        // The clock is paused and moves only when a timer is awaited: a
        // batching window would have moved it.
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_sink_refuses_past_its_queue_while_the_peer_is_stuck_and_sends_what_it_took() {
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (into, gate) = (received.clone(), release.clone());
        let config = BatchConfig {
            max_items: 50,
            queue: 10,
            in_flight: 1,
            linger: Duration::ZERO,
        };
        let sink = BatchSink::spawn(config, move |items: Vec<u32>| {
            let (into, gate) = (into.clone(), gate.clone());
            async move {
                // The peer answers only when the test lets it.
                gate.acquire().await.unwrap().forget();
                into.lock().unwrap().extend(items);
            }
        });
        let mut taken = Vec::new();
        let mut refused = 0;
        for item in 0..1000u32 {
            if sink.send(item) {
                taken.push(item);
            } else {
                refused += 1;
            }
            // Let the collector move what it can into the stuck call.
            tokio::task::yield_now().await;
        }
        assert!(
            refused > 900,
            "a stuck peer holds at most the queue and one batch: {refused} refused"
        );
        assert_eq!(sink.pending(), taken.len());
        release.add_permits(1000);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sink.pending() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut got = received.lock().unwrap().clone();
        got.sort_unstable();
        assert_eq!(got, taken, "every item taken, once");
        assert_eq!(sink.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_sink_sends_a_quiet_trickle_in_one_call() {
        let batches = Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = batches.clone();
        let config = BatchConfig {
            linger: Duration::from_millis(20),
            ..BatchConfig::default()
        };
        let sink = BatchSink::spawn(config, move |items: Vec<u32>| {
            let into = into.clone();
            async move { into.lock().unwrap().push(items) }
        });
        for item in 0..5u32 {
            assert!(sink.send(item));
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        while sink.pending() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(*batches.lock().unwrap(), vec![vec![0, 1, 2, 3, 4]]);
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
