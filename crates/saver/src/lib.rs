//! saver: stores messages before anything is sent, and keeps them until the
//! device acknowledges them or their TTL ends.
//!
//! Storage is a [`store::MessageStore`]: SQL alone ([`store::SqlStore`], MySQL
//! or SQLite) when no Redis URL is configured, else a Redis hot inbox with SQL
//! as the durable copy ([`store::RedisSqlStore`]). Message ids come from the
//! worker id keeper assigns this node, so they are unique across savers.

mod config;
pub mod error;
mod groups;
mod metrics;
pub mod store;
mod tokens;

use std::sync::Arc;
use std::time::Duration;

use pushgrid_common::node;
use pushgrid_common::{CancellationToken, db, net, now_ms};
use pushgrid_proto::cluster::saver_server::{Saver, SaverServer};
use pushgrid_proto::cluster::{
    AckRequest, AckResponse, HistoryRequest, HistoryResponse, Message, PendingAnswer,
    PendingManyRequest, PendingManyResponse, PendingRequest, PendingResponse, PublishRequest,
    PublishResponse, Role, StoreManyRequest, StoreManyResponse, StoreRequest, StoreResponse,
};
// Groups and message status (issue 12).
use pushgrid_proto::cluster::{
    AckItem, DeliveredRequest, DeliveredResponse, GroupMembersRequest, GroupMembersResponse,
    GroupPushProgressRequest, GroupPushProgressResponse, GroupUsersRequest, GroupUsersResponse,
    MessageStatusRequest, MessageStatusResponse, StartGroupPushRequest, StartGroupPushResponse,
    StoreChildrenRequest, UserGroupsRequest, UserGroupsResponse,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

pub use crate::config::SaverConfig;
use crate::error::StoreError;
use crate::store::{
    HistoryQuery, MessageIds, MessageStore, RedisSqlStore, SqlStore, StoreLimits, Withdrawal,
};

pub const ROLE: &str = "saver";

/// How often expired rows are deleted from SQL, and how long after expiry:
/// a message's status is answered for its TTL plus a day (issue 12).
const PURGE_EVERY: Duration = Duration::from_secs(600);
const PURGE_GRACE_MS: u64 = store::STATUS_KEEP_AFTER_TTL_MS;
const PURGE_BATCH_ROWS: u32 = 5000;

/// The sockets saver serves on, bound by the caller.
pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &SaverConfig) -> pushgrid_common::StartResult<Listeners> {
        Ok(Listeners {
            grpc: net::bind(&config.node.listen).await?,
            admin: net::bind(&config.node.admin_listen).await?,
        })
    }
}

/// The tonic service over any store.
pub struct SaverService {
    store: Arc<dyn MessageStore>,
    /// Status records written in the background (delivery reports of ACKs,
    /// broadcast records), bounded.
    status_writes: Arc<tokio::sync::Semaphore>,
    /// The store's limits: a replayed idempotent call is held to its TTL.
    limits: StoreLimits,
}

/// Status writes in flight at most; beyond, they are skipped and counted.
pub const MAX_STATUS_WRITES: usize = 256;

impl SaverService {
    pub fn new(store: Arc<dyn MessageStore>, limits: StoreLimits) -> SaverService {
        SaverService {
            store,
            status_writes: Arc::new(tokio::sync::Semaphore::new(MAX_STATUS_WRITES)),
            limits,
        }
    }

    /// A TTL above the maximum is refused, never shortened (0: the default).
    fn check_ttl(&self, ttl_secs: u32) -> Result<(), Status> {
        if ttl_secs > self.limits.max_ttl_secs {
            return Err(Status::invalid_argument(format!(
                "ttl_secs: must be 1 to {} seconds, not {ttl_secs}",
                self.limits.max_ttl_secs
            )));
        }
        Ok(())
    }
}

/// Runs a Store call to its end in a task of its own, so a caller that gives
/// up (its deadline passed, its connection broke: tonic then drops this
/// handler) cannot cut it between its writes. When the caller is gone by the
/// time the call is done, nobody was told the messages were accepted: they
/// are withdrawn (`withdrawal_of` names them; None keeps them).
pub(crate) async fn answer_or_withdraw<T, Work, Of>(
    store: &Arc<dyn MessageStore>,
    work: Work,
    withdrawal_of: Of,
) -> Result<T, StoreError>
where
    T: Send + 'static,
    Work: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    Of: FnOnce(&T) -> Option<Withdrawal> + Send + 'static,
{
    let (reply, answer) = tokio::sync::oneshot::channel();
    let store = store.clone();
    tokio::spawn(async move {
        let result = work.await;
        if let Err(Ok(unheard)) = reply.send(result)
            && let Some(withdrawal) = withdrawal_of(&unheard)
        {
            metrics::abandoned();
            tracing::warn!(
                count = withdrawal.messages.len(),
                "the caller gave up before the store call was answered; withdrawing its messages"
            );
            store.withdraw(withdrawal).await;
        }
    });
    answer
        .await
        .map_err(|_| StoreError::Commit("the store call ended without an answer".into()))?
}

fn to_status(operation: &'static str, error: StoreError) -> Status {
    if !matches!(error, StoreError::InvalidArgument(_)) {
        tracing::warn!(operation, %error, "storage failed");
    }
    error.into()
}

/// PendingMany answers, one per read, whose messages stay under `max_bytes`
/// together past the first read that has any (a caller's decoding limit):
/// the reads that do not fit are answered with an error, and their room
/// reads them again. Returns the answers and how many failed.
fn pending_answers(
    results: Vec<Result<Vec<Message>, StoreError>>,
    max_bytes: usize,
) -> (Vec<PendingAnswer>, usize) {
    let mut failures = 0;
    let mut budget = max_bytes;
    let answers = results
        .into_iter()
        .map(|result| {
            let error = match result {
                Ok(messages) => {
                    let bytes: usize = messages.iter().map(prost::Message::encoded_len).sum();
                    if bytes <= budget || budget == max_bytes {
                        budget = budget.saturating_sub(bytes);
                        metrics::pending_served(messages.len());
                        return PendingAnswer {
                            messages,
                            error: String::new(),
                        };
                    }
                    budget = 0;
                    format!("this call's inbox reads exceed {max_bytes} bytes; read again")
                }
                Err(error) => Status::from(error).message().to_string(),
            };
            failures += 1;
            PendingAnswer {
                messages: Vec::new(),
                error,
            }
        })
        .collect();
    (answers, failures)
}

#[tonic::async_trait]
impl Saver for SaverService {
    async fn store(
        &self,
        request: Request<StoreRequest>,
    ) -> Result<Response<StoreResponse>, Status> {
        let request = request.into_inner();
        self.check_ttl(request.ttl_secs)?;
        // A replay (only with a key) is held to this call's body.
        let body = (!request.idempotency_key.is_empty()).then(|| {
            (
                request.users.clone(),
                request.payload.clone(),
                request.ttl_secs,
                request.idempotency_key.clone(),
            )
        });
        let store = self.store.clone();
        let key = request.idempotency_key.clone();
        let app = request.app.clone();
        let stored = answer_or_withdraw(
            &self.store,
            async move {
                store
                    .store_once(
                        &request.app,
                        &request.users,
                        request.payload,
                        request.ttl_secs,
                        &request.idempotency_key,
                    )
                    .await
            },
            move |stored: &store::Stored| {
                // A replay answers an earlier call: never withdrawn here.
                (!stored.replayed).then(|| {
                    let key = (!key.is_empty()).then_some((app.as_str(), key.as_str()));
                    Withdrawal::of(&stored.messages, key)
                })
            },
        )
        .await
        .map_err(|error| to_status("store", error))?;
        if stored.replayed {
            if let Some((users, payload, ttl_secs, key)) = &body
                && let Some(field) = store::replay_mismatch(
                    &stored.messages,
                    users,
                    payload,
                    *ttl_secs,
                    &self.limits,
                )
            {
                ::metrics::counter!("pushgrid_saver_idempotency_conflicts_total").increment(1);
                return Err(Status::already_exists(format!(
                    "idempotency key {key:?} was used within 24 h for a push with other {field}; \
                     nothing was stored and the first push's messages are unchanged: \
                     use a new key for a new push"
                )));
            }
            metrics::idempotent_replay();
        } else {
            metrics::stored(stored.messages.len());
        }
        Ok(Response::new(StoreResponse {
            messages: stored.messages,
            replayed: stored.replayed,
        }))
    }

    async fn store_many(
        &self,
        request: Request<StoreManyRequest>,
    ) -> Result<Response<StoreManyResponse>, Status> {
        let request = request.into_inner();
        for item in &request.items {
            self.check_ttl(item.ttl_secs)?;
        }
        let store = self.store.clone();
        let messages = answer_or_withdraw(
            &self.store,
            async move { store.store_many(&request.items).await },
            |messages: &Vec<Message>| Some(Withdrawal::of(messages, None)),
        )
        .await
        .map_err(|error| to_status("store_many", error))?;
        metrics::stored(messages.len());
        Ok(Response::new(StoreManyResponse { messages }))
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let request = request.into_inner();
        let message = self
            .store
            .publish(&request.app, &request.topic, request.payload)
            .await
            .map_err(|error| to_status("publish", error))?;
        self.record_broadcast(message.clone()).await;
        metrics::published();
        Ok(Response::new(PublishResponse {
            message: Some(message),
        }))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let request = request.into_inner();
        let history = self
            .store
            .history(HistoryQuery {
                app: request.app,
                topic: request.topic,
                since_offset: request.since_offset,
                epoch: request.epoch,
                limit: request.limit,
            })
            .await
            .map_err(|error| to_status("history", error))?;
        metrics::history(history.recovered);
        Ok(Response::new(HistoryResponse {
            messages: history.messages,
            recovered: history.recovered,
            offset: history.offset,
            epoch: history.epoch,
        }))
    }

    async fn pending(
        &self,
        request: Request<PendingRequest>,
    ) -> Result<Response<PendingResponse>, Status> {
        let request = request.into_inner();
        let messages = self
            .store
            .pending(&request.app, &request.user, request.limit)
            .await
            .map_err(|error| to_status("pending", error))?;
        metrics::pending_served(messages.len());
        Ok(Response::new(PendingResponse { messages }))
    }

    async fn pending_many(
        &self,
        request: Request<PendingManyRequest>,
    ) -> Result<Response<PendingManyResponse>, Status> {
        let requests = request.into_inner().requests;
        if requests.len() > store::MAX_PENDING_MANY {
            return Err(Status::invalid_argument(format!(
                "{} inbox reads in one call; at most {}",
                requests.len(),
                store::MAX_PENDING_MANY
            )));
        }
        let reads: Vec<store::PendingRead> = requests
            .into_iter()
            .map(|request| store::PendingRead {
                app: request.app,
                user: request.user,
                limit: request.limit,
            })
            .collect();
        let results = self.store.pending_many(&reads).await;
        let (answers, failures) = pending_answers(results, store::PENDING_MANY_MAX_BYTES);
        if failures > 0 {
            tracing::warn!(failures, reads = reads.len(), "inbox reads failed");
        }
        Ok(Response::new(PendingManyResponse { answers }))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let items = request.into_inner().items;
        let by_device: Vec<AckItem> = items
            .iter()
            .filter(|item| !item.device.is_empty())
            .cloned()
            .collect();
        let acked = self
            .store
            .ack(items)
            .await
            .map_err(|error| to_status("ack", error))?;
        self.record_acks(by_device).await;
        metrics::acked(acked);
        Ok(Response::new(AckResponse { acked }))
    }

    // Groups and message status (issue 12): see groups.rs.
    async fn bind(
        &self,
        request: Request<GroupUsersRequest>,
    ) -> Result<Response<GroupUsersResponse>, Status> {
        self.bind_rpc(request).await
    }

    async fn unbind(
        &self,
        request: Request<GroupUsersRequest>,
    ) -> Result<Response<GroupUsersResponse>, Status> {
        self.unbind_rpc(request).await
    }

    async fn group_members(
        &self,
        request: Request<GroupMembersRequest>,
    ) -> Result<Response<GroupMembersResponse>, Status> {
        self.group_members_rpc(request).await
    }

    async fn user_groups(
        &self,
        request: Request<UserGroupsRequest>,
    ) -> Result<Response<UserGroupsResponse>, Status> {
        self.user_groups_rpc(request).await
    }

    async fn start_group_push(
        &self,
        request: Request<StartGroupPushRequest>,
    ) -> Result<Response<StartGroupPushResponse>, Status> {
        self.start_group_push_rpc(request).await
    }

    async fn store_children(
        &self,
        request: Request<StoreChildrenRequest>,
    ) -> Result<Response<StoreResponse>, Status> {
        self.store_children_rpc(request).await
    }

    async fn group_push_progress(
        &self,
        request: Request<GroupPushProgressRequest>,
    ) -> Result<Response<GroupPushProgressResponse>, Status> {
        self.group_push_progress_rpc(request).await
    }

    async fn delivered(
        &self,
        request: Request<DeliveredRequest>,
    ) -> Result<Response<DeliveredResponse>, Status> {
        self.delivered_rpc(request).await
    }

    async fn message_status(
        &self,
        request: Request<MessageStatusRequest>,
    ) -> Result<Response<MessageStatusResponse>, Status> {
        self.message_status_rpc(request).await
    }

    // Device push tokens (issue 25): see tokens.rs.
    async fn register_tokens(
        &self,
        request: Request<pushgrid_proto::cluster::RegisterTokensRequest>,
    ) -> Result<Response<pushgrid_proto::cluster::RegisterTokensResponse>, Status> {
        self.register_tokens_rpc(request).await
    }

    async fn list_tokens(
        &self,
        request: Request<pushgrid_proto::cluster::ListTokensRequest>,
    ) -> Result<Response<pushgrid_proto::cluster::ListTokensResponse>, Status> {
        self.list_tokens_rpc(request).await
    }

    async fn remove_tokens(
        &self,
        request: Request<pushgrid_proto::cluster::RemoveTokensRequest>,
    ) -> Result<Response<pushgrid_proto::cluster::RemoveTokensResponse>, Status> {
        self.remove_tokens_rpc(request).await
    }
}

/// Runs saver until `shutdown`.
pub async fn run(
    config: SaverConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> pushgrid_common::StartResult<()> {
    // Storage first: a saver that cannot store must not join the cluster.
    let sql = SqlStore::connect_with(&config.database_url, config.database_max_connections)
        .await?
        .with_group_commit(config.group_commit());
    // Shares the store's connections: the purge and the close at the end.
    let sql_handle = sql.clone();
    tracing::info!(database = %db::redact(&config.database_url), "sql store ready");
    let redis = if config.redis_url.is_empty() {
        None
    } else {
        let store = RedisSqlStore::connect(&config.redis_url, sql.clone()).await?;
        tracing::info!(redis = %db::redact(&config.redis_url), durability = ?config.durability, "redis inbox ready");
        Some(store)
    };

    let grpc_addr = listeners.grpc.local_addr()?;
    let endpoints = node::Endpoints {
        grpc: Some(grpc_addr),
        ..Default::default()
    };
    let cluster = node::start(
        ROLE,
        Role::Saver,
        &config.node,
        listeners.admin,
        endpoints,
        &[],
        &shutdown,
    )
    .await?;
    let node_id = cluster.node_id().to_string();

    // Ids follow the fenced worker id keeper granted: it can change after a
    // lost lease, and none is minted while the lease may have lapsed.
    let ids = || MessageIds::from_lease(cluster.worker_lease());
    let mut watcher = None;
    let store: Arc<dyn MessageStore> = match redis {
        Some(redis) => {
            let redis = Arc::new(
                redis
                    .with_ids(ids())
                    .with_limits(config.limits())
                    .with_durability(config.durability),
            );
            let watched = redis.clone();
            let stop = shutdown.clone();
            watcher = Some(tokio::spawn(async move {
                watched.watch_for_data_loss(stop).await;
            }));
            redis
        }
        None => Arc::new(sql.with_ids(ids()).with_limits(config.limits())),
    };
    let settle = tokio::spawn(store::settle_owed_until(store.clone(), shutdown.clone()));
    let purge = tokio::spawn(purge_expired(sql_handle.clone(), shutdown.clone()));

    tracing::info!(node = %node_id, %grpc_addr, "saver serving");
    net::announce(ROLE, "ready", grpc_addr);
    let router =
        tonic::service::Routes::new(SaverServer::new(SaverService::new(store, config.limits())));
    let served = node::serve_grpc(router, cluster.credentials(), listeners.grpc, &shutdown).await;
    cluster.leave().await;
    let _ = purge.await;
    let _ = settle.await;
    if let Some(watcher) = watcher {
        let _ = watcher.await;
    }
    sql_handle.close().await;
    tracing::info!(node = %node_id, "saver stopped");
    served
}

/// Deletes rows a day after they expired (`PURGE_GRACE_MS`, so message
/// status still answers for a day past the TTL), in batches, every ten
/// minutes.
async fn purge_expired(sql: SqlStore, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PURGE_EVERY) => {}
        }
        let before_ms = now_ms().saturating_sub(PURGE_GRACE_MS);
        loop {
            match sql.purge_expired(before_ms, PURGE_BATCH_ROWS).await {
                Ok(deleted) => {
                    metrics::purged(deleted);
                    if deleted < u64::from(PURGE_BATCH_ROWS) || shutdown.is_cancelled() {
                        if let Err(error) =
                            store::GroupStore::purge_push_records(&sql, now_ms()).await
                        {
                            tracing::warn!(%error, "cannot purge push records");
                        }
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot purge expired messages");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(count: usize, size: usize) -> Vec<Message> {
        (0..count)
            .map(|id| Message {
                id: id as u64 + 1,
                payload: vec![7u8; size].into(),
                ..Default::default()
            })
            .collect()
    }

    /// Answers stay under the byte budget past the first read with messages;
    /// what does not fit fails (and is read again), empty reads always fit.
    #[test]
    fn pending_many_answers_stay_within_the_byte_budget() {
        let size = |answer: &PendingAnswer| -> usize {
            answer
                .messages
                .iter()
                .map(prost::Message::encoded_len)
                .sum()
        };
        let results = vec![
            Ok(Vec::new()),
            Ok(messages(10, 100)), // the first with messages: fits anyway
            Ok(messages(3, 100)),
            Ok(messages(20, 100)), // over what is left
            Ok(messages(1, 10)),   // after an overflow nothing more is served
            Ok(Vec::new()),
            Err(StoreError::InvalidArgument("user is empty".into())),
        ];
        let budget = 1_500;
        let (answers, failures) = pending_answers(results, budget);
        assert_eq!(answers.len(), 7);
        assert_eq!(
            answers.iter().map(|a| a.messages.len()).collect::<Vec<_>>(),
            [0, 10, 3, 0, 0, 0, 0]
        );
        assert!(answers[..3].iter().all(|a| a.error.is_empty()));
        assert!(answers[3].error.contains("read again"), "{:?}", answers[3]);
        assert!(answers[4].error.contains("read again"));
        assert!(answers[5].error.is_empty());
        assert_eq!(answers[6].error, "user is empty");
        assert_eq!(failures, 3);
        assert!(answers.iter().map(size).sum::<usize>() <= budget);

        // One inbox bigger than the whole budget is still served when first.
        let (answers, failures) = pending_answers(vec![Ok(messages(50, 100))], budget);
        assert_eq!((answers[0].messages.len(), failures), (50, 0));
    }
}
