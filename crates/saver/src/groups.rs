//! The saver's RPCs for groups and delivery status (issue 12); the storage
//! is [`crate::store::GroupStore`], which every message store implements.

use std::future::Future;

use pushgrid_proto::cluster::{
    AckItem, BroadcastMessage, DeliveredRequest, DeliveredResponse, GroupMembersRequest,
    GroupMembersResponse, GroupPushProgressRequest, GroupPushProgressResponse, GroupUsersRequest,
    GroupUsersResponse, MessageStatusRequest, MessageStatusResponse, StartGroupPushRequest,
    StartGroupPushResponse, StoreChildrenRequest, StoreResponse, UserGroupsRequest,
    UserGroupsResponse,
};
use tonic::{Request, Response, Status};

use crate::error::StoreError;
use crate::{SaverService, metrics, to_status};

/// The shape every storage RPC here shares: the request's message goes to
/// `call` (one store method), and a storage error becomes a status named
/// after `operation`.
async fn call_store<Req, Out, Fut>(
    operation: &'static str,
    request: Request<Req>,
    call: impl FnOnce(Req) -> Fut,
) -> Result<Out, Status>
where
    Fut: Future<Output = Result<Out, StoreError>>,
{
    call(request.into_inner())
        .await
        .map_err(|error| to_status(operation, error))
}

impl SaverService {
    pub(crate) async fn bind_rpc(
        &self,
        request: Request<GroupUsersRequest>,
    ) -> Result<Response<GroupUsersResponse>, Status> {
        let changed = call_store("bind", request, |request| async move {
            self.store
                .bind(&request.app, &request.group, &request.users)
                .await
        })
        .await?;
        ::metrics::counter!("pushgrid_saver_group_binds_total").increment(changed);
        Ok(Response::new(GroupUsersResponse { changed }))
    }

    pub(crate) async fn unbind_rpc(
        &self,
        request: Request<GroupUsersRequest>,
    ) -> Result<Response<GroupUsersResponse>, Status> {
        let changed = call_store("unbind", request, |request| async move {
            self.store
                .unbind(&request.app, &request.group, &request.users)
                .await
        })
        .await?;
        ::metrics::counter!("pushgrid_saver_group_unbinds_total").increment(changed);
        Ok(Response::new(GroupUsersResponse { changed }))
    }

    pub(crate) async fn group_members_rpc(
        &self,
        request: Request<GroupMembersRequest>,
    ) -> Result<Response<GroupMembersResponse>, Status> {
        let page = call_store("group_members", request, |request| async move {
            self.store
                .group_members(&request.app, &request.group, &request.after, request.limit)
                .await
        })
        .await?;
        Ok(Response::new(GroupMembersResponse {
            users: page.users,
            next: page.next,
        }))
    }

    pub(crate) async fn user_groups_rpc(
        &self,
        request: Request<UserGroupsRequest>,
    ) -> Result<Response<UserGroupsResponse>, Status> {
        let groups = call_store("user_groups", request, |request| async move {
            self.store.user_groups(&request.app, &request.user).await
        })
        .await?;
        Ok(Response::new(UserGroupsResponse { groups }))
    }

    pub(crate) async fn start_group_push_rpc(
        &self,
        request: Request<StartGroupPushRequest>,
    ) -> Result<Response<StartGroupPushResponse>, Status> {
        let (id, created_ms) = call_store("start_group_push", request, |request| async move {
            self.store
                .start_group_push(&request.app, &request.group, request.ttl_secs)
                .await
        })
        .await?;
        Ok(Response::new(StartGroupPushResponse { id, created_ms }))
    }

    pub(crate) async fn store_children_rpc(
        &self,
        request: Request<StoreChildrenRequest>,
    ) -> Result<Response<StoreResponse>, Status> {
        if request.get_ref().parent_id == 0 {
            return Err(Status::invalid_argument("parent_id must be set"));
        }
        let request = request.into_inner();
        let store = self.store.clone();
        let messages = crate::answer_or_withdraw(
            &self.store,
            async move {
                store
                    .store_children(
                        &request.app,
                        &request.users,
                        request.payload,
                        request.ttl_secs,
                        request.parent_id,
                    )
                    .await
            },
            |messages: &Vec<pushgrid_proto::cluster::Message>| {
                Some(crate::store::Withdrawal::of(messages, None))
            },
        )
        .await
        .map_err(|error| to_status("store_children", error))?;
        metrics::stored(messages.len());
        Ok(Response::new(StoreResponse {
            messages,
            replayed: false,
        }))
    }

    pub(crate) async fn group_push_progress_rpc(
        &self,
        request: Request<GroupPushProgressRequest>,
    ) -> Result<Response<GroupPushProgressResponse>, Status> {
        call_store("group_push_progress", request, |request| async move {
            self.store
                .group_push_progress(
                    &request.app,
                    request.id,
                    request.members_added,
                    request.done,
                )
                .await
        })
        .await?;
        Ok(Response::new(GroupPushProgressResponse {}))
    }

    pub(crate) async fn delivered_rpc(
        &self,
        request: Request<DeliveredRequest>,
    ) -> Result<Response<DeliveredResponse>, Status> {
        let recorded = call_store("delivered", request, |request| async move {
            self.store.record_deliveries(&request.reports).await?;
            Ok(request.reports.len() as u64)
        })
        .await?;
        ::metrics::counter!("pushgrid_saver_delivery_reports_total").increment(recorded);
        Ok(Response::new(DeliveredResponse {}))
    }

    pub(crate) async fn message_status_rpc(
        &self,
        request: Request<MessageStatusRequest>,
    ) -> Result<Response<MessageStatusResponse>, Status> {
        let status = call_store("message_status", request, |request| async move {
            self.store.message_status(&request.app, request.id).await
        })
        .await?;
        Ok(Response::new(status))
    }

    /// Records which device acknowledged what: a failure costs only status
    /// detail (the ACK itself is done), so it is logged; a slow database
    /// holds the ACK's answer for at most [`STATUS_WAIT`].
    pub(crate) async fn record_acks(&self, items: Vec<AckItem>) {
        if items.is_empty() {
            return;
        }
        let store = self.store.clone();
        self.status_write("acks", async move {
            if let Err(error) = store.record_acks(&items).await {
                tracing::warn!(%error, "cannot record acks for message status");
            }
        })
        .await;
    }

    /// Opens a broadcast's status record; logged on failure like acks. The
    /// broadcast is stored already: it is answered after at most
    /// [`STATUS_WAIT`] even when the record is not written yet, since an
    /// error answer would say it was not stored.
    pub(crate) async fn record_broadcast(&self, message: BroadcastMessage) {
        let store = self.store.clone();
        self.status_write("broadcast", async move {
            if let Err(error) = store.record_broadcast(&message).await {
                tracing::warn!(%error, "cannot record a broadcast for message status");
            }
        })
        .await;
    }

    /// Runs a status write as a task (at most [`crate::MAX_STATUS_WRITES`] at
    /// once; beyond that it is skipped and counted) and waits for it up to
    /// [`STATUS_WAIT`]; a write still running then finishes in the background.
    async fn status_write(
        &self,
        kind: &'static str,
        write: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let Ok(permit) = self.status_writes.clone().try_acquire_owned() else {
            ::metrics::counter!("pushgrid_saver_status_writes_skipped_total", "kind" => kind)
                .increment(1);
            return;
        };
        let task = tokio::spawn(async move {
            write.await;
            drop(permit);
        });
        if tokio::time::timeout(STATUS_WAIT, task).await.is_err() {
            ::metrics::counter!("pushgrid_saver_status_writes_late_total", "kind" => kind)
                .increment(1);
        }
    }
}

/// How long an answer waits for its status record before it goes out anyway.
pub(crate) const STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
