//! A small pool of HTTP/2 channels per peer. One channel is one TCP connection;
//! calls to a peer round-robin over its channels.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

pub struct ChannelPool {
    per_peer: usize,
    peers: DashMap<String, Arc<PeerChannels>>,
}

struct PeerChannels {
    channels: Vec<Channel>,
    next: AtomicUsize,
}

impl ChannelPool {
    pub fn new(per_peer: usize) -> ChannelPool {
        ChannelPool {
            per_peer: per_peer.max(1),
            peers: DashMap::new(),
        }
    }

    /// A channel to `addr` (`host:port`). Channels connect lazily and reconnect
    /// by themselves after the peer restarts.
    pub fn get(&self, addr: &str) -> Result<Channel, Status> {
        if let Some(peer) = self.peers.get(addr) {
            return Ok(peer.pick());
        }
        let mut channels = Vec::with_capacity(self.per_peer);
        for _ in 0..self.per_peer {
            channels.push(lazy_channel(addr)?);
        }
        let peer = self
            .peers
            .entry(addr.to_string())
            .or_insert_with(|| {
                Arc::new(PeerChannels {
                    channels,
                    next: AtomicUsize::new(0),
                })
            })
            .clone();
        Ok(peer.pick())
    }

    /// Forgets peers that are no longer in the cluster.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.peers.retain(|addr, _| live(addr));
    }
}

impl PeerChannels {
    fn pick(&self) -> Channel {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[index].clone()
    }
}

/// One lazily connecting channel with pushgrid's transport settings.
pub fn lazy_channel(addr: &str) -> Result<Channel, Status> {
    let endpoint = Endpoint::from_shared(crate::net::grpc_uri(addr))
        .map_err(|error| Status::invalid_argument(format!("bad peer address {addr:?}: {error}")))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}
