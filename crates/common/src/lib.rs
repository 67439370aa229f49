//! Plumbing shared by every pushgrid role: configuration, cluster credentials,
//! the keeper client and cluster view, RPC channel pools and batching, consistent hashing, tokens,
//! telemetry and shutdown.

pub mod auth;
pub mod batch;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod db;
pub mod error;
pub mod http_stats;
pub mod ids;
pub mod jwt;
pub mod net;
pub mod node;
pub mod ring;
pub mod rpc;
pub mod telemetry;

pub use error::{StartError, StartResult};
pub use tokio_util::sync::CancellationToken;

/// Every binary with a pushgrid role in it allocates with jemalloc: under load
/// glibc's malloc spent ~15 % of `pushgrid dev`'s CPU locking and
/// consolidating its arenas across the runtime's threads.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Milliseconds since the Unix epoch, from the wall clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}
