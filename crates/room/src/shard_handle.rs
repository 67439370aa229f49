//! The side of the shards that other threads use: the commands a shard
//! takes (adoptions, flushes, broadcasts, closes, stop), each shard's handle,
//! and the set of shards with their threads. The shard thread itself is
//! `shard.rs`, above this module: connections and outboxes reach their shard
//! through here without depending on the thread's code.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use mio::{Poll, Token, Waker};

use crate::ConnHandle;
use crate::admission::Lease;

/// The token of a shard's waker in its epoll instance.
pub(crate) const WAKE_TOKEN: Token = Token(usize::MAX);

/// A connection handed to a shard after AUTH.
pub(crate) struct Adoption {
    pub conn: Arc<ConnHandle>,
    pub stream: std::net::TcpStream,
    /// Bytes the device sent right behind AUTH.
    pub buffered: BytesMut,
    pub lease: Lease,
}

/// Slots to flush: (token, connection id).
pub(crate) type Flushes = Vec<(u32, u64)>;

/// One broadcast for some of a shard's connections.
pub(crate) struct Broadcast {
    pub frame: Bytes,
    pub msg_id: u64,
    pub app: Arc<str>,
    pub targets: Flushes,
}

pub(crate) enum Command {
    Adopt(Box<Adoption>),
    Broadcast(Box<Broadcast>),
    Flush(Flushes),
    Close { token: u32, conn_id: u64 },
    Stop,
}

/// The side of a shard that other threads talk to.
pub(crate) struct ShardHandle {
    pub(crate) commands: Mutex<Vec<Command>>,
    waker: Waker,
    /// A wake-up is on its way: later commands need none of their own.
    pub(crate) notified: AtomicBool,
}

impl ShardHandle {
    fn push(&self, command: Command) {
        self.commands
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(command);
        if !self.notified.swap(true, Ordering::AcqRel)
            && let Err(error) = self.waker.wake()
        {
            tracing::error!(%error, "cannot wake a shard");
        }
    }

    pub fn adopt(&self, adoption: Adoption) {
        self.push(Command::Adopt(Box::new(adoption)));
    }

    /// The connections in these slots (token, connection id) have frames
    /// to write.
    pub fn flush_many(&self, flushes: Flushes) {
        self.push(Command::Flush(flushes));
    }

    /// Queues a broadcast frame for these connections and writes it: the
    /// shard does the fan-out itself, so the frame's reference count and the
    /// queues' locks stay on one thread, and broadcasts that arrive together
    /// leave in one write per connection.
    pub fn broadcast(&self, broadcast: Broadcast) {
        self.push(Command::Broadcast(Box::new(broadcast)));
    }

    /// The connection in slot `token` has a kick pending.
    pub fn close(&self, token: u32, conn_id: u64) {
        self.push(Command::Close { token, conn_id });
    }
}

/// Every shard of a room.
pub(crate) struct Shards {
    handles: Vec<Arc<ShardHandle>>,
    polls: Mutex<Vec<Poll>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Shards {
    /// `count` shards, not yet running (`shard::start` starts them).
    pub fn new(count: usize) -> io::Result<Shards> {
        let mut handles = Vec::new();
        let mut polls = Vec::new();
        for _ in 0..count.max(1) {
            let poll = Poll::new()?;
            let waker = Waker::new(poll.registry(), WAKE_TOKEN)?;
            handles.push(Arc::new(ShardHandle {
                commands: Mutex::new(Vec::new()),
                waker,
                notified: AtomicBool::new(false),
            }));
            polls.push(poll);
        }
        Ok(Shards {
            handles,
            polls: Mutex::new(polls),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// The shard of a new connection.
    pub fn pick(&self, conn_id: u64) -> &Arc<ShardHandle> {
        &self.handles[(conn_id % self.handles.len() as u64) as usize]
    }

    /// The shards' epoll instances, for their threads (once).
    pub fn take_polls(&self) -> Vec<Poll> {
        std::mem::take(
            &mut *self
                .polls
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    pub fn handle(&self, index: usize) -> &Arc<ShardHandle> {
        &self.handles[index]
    }

    /// The threads [`Shards::stop`] waits for.
    pub fn set_threads(&self, threads: Vec<std::thread::JoinHandle<()>>) {
        *self
            .threads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = threads;
    }

    /// Stops every shard, closing the connections left, and waits for the
    /// threads.
    pub async fn stop(&self) {
        for handle in &self.handles {
            handle.push(Command::Stop);
        }
        let threads = std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// How a flush of a shard connection ended.
pub(crate) enum Flushed {
    /// Nothing is left to write (or the queue is held).
    Done {
        bytes: usize,
        frames: usize,
        writes: usize,
    },
    /// The socket is full; the writable event continues.
    Blocked {
        bytes: usize,
        frames: usize,
        writes: usize,
    },
    Failed,
}
