//! The keepers a node talks to: the configured addresses plus every keeper
//! the view lists; a call moves on to the next keeper when one is away.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pushgrid_proto::cluster::Role;
use pushgrid_proto::cluster::keeper_client::KeeperClient;

use super::view::ClusterView;
use crate::auth::Credentials;
use crate::rpc::Channel;

/// How long a node waits before it tries the keepers again after none answered.
pub(super) const KEEPER_RETRY: Duration = Duration::from_millis(500);

/// The keepers a node talks to: the configured addresses plus every keeper
/// the view lists. Calls go to one of them and move on to the next when it
/// does not answer, so any keeper may be down.
pub(super) struct Keepers {
    configured: Vec<String>,
    known: std::sync::RwLock<Vec<String>>,
    current: AtomicUsize,
    clients: dashmap::DashMap<String, KeeperClient<Channel>>,
    /// This node's cluster credentials: every keeper call carries its key.
    pub(super) credentials: Credentials,
}

/// Whether a failed call says the keeper itself is away (so another keeper
/// should be asked), not that the request was refused.
fn keeper_failed(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Internal
            | tonic::Code::Aborted
    )
}

impl Keepers {
    /// `list`: one address, or several separated by commas.
    pub(super) fn parse(list: &str, credentials: Credentials) -> crate::StartResult<Keepers> {
        let configured: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|addr| !addr.is_empty())
            .map(str::to_string)
            .collect();
        if configured.is_empty() {
            return Err(crate::StartError::Keeper(
                "no keeper address configured (`keeper`: one address or a comma-separated list)"
                    .into(),
            ));
        }
        Ok(Keepers {
            known: std::sync::RwLock::new(configured.clone()),
            configured,
            current: AtomicUsize::new(0),
            clients: dashmap::DashMap::new(),
            credentials,
        })
    }

    pub(super) fn known(&self) -> Vec<String> {
        self.known
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn client(&self, addr: &str) -> Result<KeeperClient<Channel>, tonic::Status> {
        if let Some(client) = self.clients.get(addr) {
            return Ok(client.clone());
        }
        let client = KeeperClient::new(crate::rpc::lazy_channel(addr, &self.credentials)?);
        self.clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// The keeper calls go to first, and its client.
    pub(super) fn current(&self) -> (String, Result<KeeperClient<Channel>, tonic::Status>) {
        let known = self.known();
        let addr = known[self.current.load(Ordering::Relaxed) % known.len()].clone();
        let client = self.client(&addr);
        (addr, client)
    }

    /// Moves on to the next keeper.
    pub(super) fn advance(&self, from: &str) {
        let known = self.known();
        let next = known
            .iter()
            .position(|addr| addr == from)
            .map_or(0, |index| index + 1);
        self.current.store(next % known.len(), Ordering::Relaxed);
        metrics::counter!("pushgrid_cluster_keeper_failovers_total").increment(1);
    }

    /// Adds the keepers a view lists (configured addresses always stay).
    pub(super) fn learn(&self, view: &ClusterView) {
        let mut learned = self.configured.clone();
        for keeper in view.nodes_of(Role::Keeper) {
            if !keeper.grpc_addr.is_empty() && !learned.contains(&keeper.grpc_addr) {
                learned.push(keeper.grpc_addr.clone());
            }
        }
        let mut known = self
            .known
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *known != learned {
            let current = known
                .get(self.current.load(Ordering::Relaxed) % known.len().max(1))
                .cloned();
            tracing::info!(keepers = ?learned, "keepers known");
            *known = learned;
            let index = current
                .and_then(|current| known.iter().position(|addr| *addr == current))
                .unwrap_or(0);
            self.current.store(index, Ordering::Relaxed);
        }
    }

    /// Runs `call` against the current keeper, then against each other one
    /// in turn while the answer says the keeper is away; any other answer
    /// (success, NOT_FOUND, a refusal) returns at once.
    pub(super) async fn call<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(KeeperClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let tries = self.known().len().max(1);
        let mut last = tonic::Status::unavailable("no keeper configured");
        for _ in 0..tries {
            let (addr, client) = self.current();
            let answer = match client {
                Ok(client) => call(client).await,
                Err(status) => Err(status),
            };
            match answer {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if keeper_failed(&status) => {
                    tracing::debug!(keeper = %addr, error = %status.message(), "keeper did not answer; trying the next");
                    self.advance(&addr);
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(last)
    }
}
