//! Channels to peer roles. A peer in another process is reached over a small
//! pool of HTTP/2 channels (one channel is one TCP connection; calls
//! round-robin over them). A peer in this same process (`pushgrid dev` runs
//! all seven roles in one) is called directly: its gRPC routes are
//! registered here when it starts serving, and a [`PeerChannel::Local`]
//! hands each request to them in the caller's task, with no socket, no
//! HTTP/2 framing and no task hand-offs, the same protobuf messages in and
//! out.
//!
//! Either way every call carries this process's role key ([`Channel`] adds
//! it) and passes the serving role's credential check (`crate::auth`): an
//! in-process peer is registered with its check layered in front of its
//! routes, so `pushgrid dev` keeps the permissions of the cluster.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use tonic::Status;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::Endpoint;
use tower::Service;

use crate::auth::{ClusterAuth, Credentials, WithCredential};

/// A channel to a peer that adds this process's role key to every request:
/// what every internal client (`SaverClient<Channel>`, ...) is built on.
pub type Channel = WithCredential<PeerChannel>;

/// A role's routes as callers in this process reach them: behind the same
/// credential check as its gRPC server.
pub type LocalRoutes = ClusterAuth<Routes>;

/// Per call, as the HTTP/2 channels have it.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The gRPC routes served in this process, by the address the serving role
/// advertises (what peers find in keeper's view).
static LOCAL_ROUTES: LazyLock<DashMap<String, LocalRoutes>> = LazyLock::new(DashMap::new);

/// Makes `routes` reachable in-process at `addr` until the guard is dropped.
pub fn serve_locally(addr: String, routes: LocalRoutes) -> LocalRoutesGuard {
    LOCAL_ROUTES.insert(addr.clone(), routes);
    LocalRoutesGuard { addr }
}

/// Removes a role's in-process routes when it stops serving.
pub struct LocalRoutesGuard {
    addr: String,
}

impl Drop for LocalRoutesGuard {
    fn drop(&mut self) {
        LOCAL_ROUTES.remove(&self.addr);
    }
}

/// A channel to a peer: HTTP/2 to another process, or the peer's own routes
/// when it serves in this process. Every generated client takes it
/// (`SaverClient::new(channel)`).
#[derive(Clone)]
pub enum PeerChannel {
    Remote(tonic::transport::Channel),
    Local(LocalRoutes),
}

impl std::fmt::Debug for PeerChannel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerChannel::Remote(_) => formatter.write_str("PeerChannel::Remote"),
            PeerChannel::Local(_) => formatter.write_str("PeerChannel::Local"),
        }
    }
}

impl Service<http::Request<Body>> for PeerChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            PeerChannel::Remote(channel) => channel.poll_ready(context).map_err(Into::into),
            PeerChannel::Local(routes) => {
                Service::<http::Request<Body>>::poll_ready(routes, context)
                    .map_err(|never: Infallible| match never {})
            }
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self {
            PeerChannel::Remote(channel) => {
                let call = channel.call(request);
                Box::pin(async move { call.await.map_err(Into::into) })
            }
            PeerChannel::Local(routes) => {
                let call = routes.call(request);
                Box::pin(async move {
                    match tokio::time::timeout(CALL_TIMEOUT, call).await {
                        Ok(Ok(response)) => Ok(response),
                        Ok(Err(never)) => match never {},
                        Err(_) => Err(Box::new(Status::deadline_exceeded(format!(
                            "in-process call not answered within {CALL_TIMEOUT:?}"
                        ))) as BoxError),
                    }
                })
            }
        }
    }
}

pub struct ChannelPool {
    per_peer: usize,
    peers: DashMap<String, Arc<PeerChannels>>,
    credentials: Credentials,
}

struct PeerChannels {
    channels: Vec<tonic::transport::Channel>,
    next: AtomicUsize,
}

impl ChannelPool {
    /// A pool whose channels send `credentials`' key on every call.
    pub fn new(per_peer: usize, credentials: &Credentials) -> ChannelPool {
        ChannelPool {
            per_peer: per_peer.max(1),
            peers: DashMap::new(),
            credentials: credentials.clone(),
        }
    }

    /// A channel to `addr` (`host:port`): the peer's own routes when it
    /// serves in this process, else one of the pool's HTTP/2 channels, which
    /// connect lazily and reconnect by themselves after the peer restarts.
    pub fn get(&self, addr: &str) -> Result<Channel, Status> {
        let attach = |channel| self.credentials.attach(channel);
        if let Some(routes) = LOCAL_ROUTES.get(addr) {
            return Ok(attach(PeerChannel::Local(routes.clone())));
        }
        if let Some(peer) = self.peers.get(addr) {
            return Ok(attach(PeerChannel::Remote(peer.pick())));
        }
        let mut channels = Vec::with_capacity(self.per_peer);
        for _ in 0..self.per_peer {
            channels.push(remote_channel(addr)?);
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
        Ok(attach(PeerChannel::Remote(peer.pick())))
    }

    /// Forgets peers that are no longer in the cluster.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.peers.retain(|addr, _| live(addr));
    }
}

impl PeerChannels {
    fn pick(&self) -> tonic::transport::Channel {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[index].clone()
    }
}

/// One lazily connecting channel to `addr` with pushgrid's transport
/// settings, sending `credentials`' key on every call.
pub fn lazy_channel(addr: &str, credentials: &Credentials) -> Result<Channel, Status> {
    Ok(credentials.attach(PeerChannel::Remote(remote_channel(addr)?)))
}

/// One lazily connecting HTTP/2 channel with pushgrid's transport settings.
fn remote_channel(addr: &str) -> Result<tonic::transport::Channel, Status> {
    let endpoint = Endpoint::from_shared(crate::net::grpc_uri(addr))
        .map_err(|error| Status::invalid_argument(format!("bad peer address {addr:?}: {error}")))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use pushgrid_proto::cluster::center_client::CenterClient;
    use pushgrid_proto::cluster::center_server::{Center, CenterServer};
    use pushgrid_proto::cluster::{BroadcastSubtasksRequest, BroadcastSubtasksResponse};
    use tonic::{Request, Response};

    use super::*;

    /// Answers how many rooms it was given, or refuses an empty list.
    struct CountRooms;

    #[tonic::async_trait]
    impl Center for CountRooms {
        async fn broadcast_subtasks(
            &self,
            request: Request<BroadcastSubtasksRequest>,
        ) -> Result<Response<BroadcastSubtasksResponse>, Status> {
            let rooms = request.into_inner().rooms.len() as u32;
            if rooms == 0 {
                return Err(Status::invalid_argument("no rooms"));
            }
            Ok(Response::new(BroadcastSubtasksResponse {
                delivered: rooms,
                failed_rooms: 0,
            }))
        }
    }

    fn request(rooms: usize) -> BroadcastSubtasksRequest {
        BroadcastSubtasksRequest {
            message: None,
            rooms: vec!["room".into(); rooms],
        }
    }

    #[tokio::test]
    async fn a_peer_in_this_process_is_called_directly_with_its_answers_and_errors() {
        use crate::auth::{RoleKey, Verifiers};
        use pushgrid_proto::cluster::Role;
        let center = RoleKey::generate(Role::Center);
        let room = RoleKey::generate(Role::Room);
        let verifiers = Verifiers::new(vec![center.verifier(), room.verifier()]);
        let center = Credentials::new(center, verifiers.clone());
        let room = Credentials::new(room, verifiers);
        let addr = "127.0.0.1:1"; // nothing listens there: only the local path answers
        let pool = ChannelPool::new(1, &center);
        let routes = Routes::new(CenterServer::new(CountRooms));
        let guard = serve_locally(
            addr.into(),
            tower::Layer::layer(&center.server_layer(Role::Center), routes),
        );
        let channel = pool.get(addr).unwrap();
        assert!(matches!(channel.get_ref(), PeerChannel::Local(_)));
        let mut client = CenterClient::new(channel);
        let answer = client.broadcast_subtasks(request(3)).await.unwrap();
        assert_eq!(answer.into_inner().delivered, 3);
        let refused = client.broadcast_subtasks(request(0)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert_eq!(refused.message(), "no rooms");

        // In-process calls pass the same credential check: a room may not
        // hand out broadcast subtasks.
        let as_room = ChannelPool::new(1, &room).get(addr).unwrap();
        let refused = CenterClient::new(as_room)
            .broadcast_subtasks(request(3))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);

        // Once the role stops serving, the address is a remote peer again.
        drop(guard);
        let channel = pool.get(addr).unwrap();
        assert!(matches!(channel.get_ref(), PeerChannel::Remote(_)));
        let unreachable = CenterClient::new(channel)
            .broadcast_subtasks(request(1))
            .await
            .unwrap_err();
        assert_eq!(unreachable.code(), tonic::Code::Unavailable);
    }
}
