//! Call batching: many small requests from many tasks become one RPC.
//!
//! A [`Batcher`] owns a task that takes the first waiting item, then collects
//! more for up to `max_items` items or `max_wait`, and sends them in one call.
//! Up to `in_flight` calls run at once, so collection continues while earlier
//! batches are on the wire (the pipelining of the original system). The queue
//! in front of it is bounded: a caller waits for room, it never grows memory.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{Semaphore, mpsc, oneshot};
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
        let (queue, mut receiver) = mpsc::channel::<(T, Reply<R>)>(config.queue.max(1));
        let call = Arc::new(call);
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
            }
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

type MakeBatcher<T, R> = Box<dyn Fn(&str) -> Batcher<T, R> + Send + Sync>;

/// One batcher per destination (a peer's address), made on first use.
pub struct BatcherMap<T, R> {
    batchers: DashMap<String, Batcher<T, R>>,
    make: MakeBatcher<T, R>,
}

impl<T: Send + 'static, R: Send + 'static> BatcherMap<T, R> {
    pub fn new(make: impl Fn(&str) -> Batcher<T, R> + Send + Sync + 'static) -> BatcherMap<T, R> {
        BatcherMap {
            batchers: DashMap::new(),
            make: Box::new(make),
        }
    }

    pub fn get(&self, destination: &str) -> Batcher<T, R> {
        if let Some(batcher) = self.batchers.get(destination) {
            return batcher.clone();
        }
        self.batchers
            .entry(destination.to_string())
            .or_insert_with(|| (self.make)(destination))
            .clone()
    }

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
        BatcherMap::new(move |addr: &str| {
            let (pool, addr, call) = (pool.clone(), addr.to_string(), call.clone());
            Batcher::spawn(config, move |items: Vec<T>| {
                let channel = pool.get(&addr);
                let call = call.clone();
                async move { call(channel?, items).await }
            })
        })
    }

    /// Drops the batchers of destinations not in `live`.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.batchers.retain(|destination, _| live(destination));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
    async fn a_failed_batch_fails_every_item() {
        let batcher = Batcher::spawn(BatchConfig::default(), |_items: Vec<u32>| async {
            Err::<Vec<u32>, _>(Status::unavailable("peer down"))
        });
        let error = batcher.call(1).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unavailable);
    }
}
