//! The saver's RPCs for groups and delivery status (issue 12); the storage
//! is [`crate::store::GroupStore`], which every message store implements.

use pushgrid_proto::cluster::{
    AckItem, BroadcastMessage, DeliveredRequest, DeliveredResponse, GroupMembersRequest,
    GroupMembersResponse, GroupPushProgressRequest, GroupPushProgressResponse, GroupUsersRequest,
    GroupUsersResponse, MessageStatusRequest, MessageStatusResponse, StartGroupPushRequest,
    StartGroupPushResponse, StoreChildrenRequest, StoreResponse, UserGroupsRequest,
    UserGroupsResponse,
};
use tonic::{Request, Response, Status};

use crate::{SaverService, metrics, to_status};

impl SaverService {
    pub(crate) async fn bind_rpc(
        &self,
        request: Request<GroupUsersRequest>,
    ) -> Result<Response<GroupUsersResponse>, Status> {
        let request = request.into_inner();
        let changed = self
            .store
            .bind(&request.app, &request.group, &request.users)
            .await
            .map_err(|error| to_status("bind", error))?;
        ::metrics::counter!("pushgrid_saver_group_binds_total").increment(changed);
        Ok(Response::new(GroupUsersResponse { changed }))
    }

    pub(crate) async fn unbind_rpc(
        &self,
        request: Request<GroupUsersRequest>,
    ) -> Result<Response<GroupUsersResponse>, Status> {
        let request = request.into_inner();
        let changed = self
            .store
            .unbind(&request.app, &request.group, &request.users)
            .await
            .map_err(|error| to_status("unbind", error))?;
        ::metrics::counter!("pushgrid_saver_group_unbinds_total").increment(changed);
        Ok(Response::new(GroupUsersResponse { changed }))
    }

    pub(crate) async fn group_members_rpc(
        &self,
        request: Request<GroupMembersRequest>,
    ) -> Result<Response<GroupMembersResponse>, Status> {
        let request = request.into_inner();
        let page = self
            .store
            .group_members(&request.app, &request.group, &request.after, request.limit)
            .await
            .map_err(|error| to_status("group_members", error))?;
        Ok(Response::new(GroupMembersResponse {
            users: page.users,
            next: page.next,
        }))
    }

    pub(crate) async fn user_groups_rpc(
        &self,
        request: Request<UserGroupsRequest>,
    ) -> Result<Response<UserGroupsResponse>, Status> {
        let request = request.into_inner();
        let groups = self
            .store
            .user_groups(&request.app, &request.user)
            .await
            .map_err(|error| to_status("user_groups", error))?;
        Ok(Response::new(UserGroupsResponse { groups }))
    }

    pub(crate) async fn start_group_push_rpc(
        &self,
        request: Request<StartGroupPushRequest>,
    ) -> Result<Response<StartGroupPushResponse>, Status> {
        let request = request.into_inner();
        let (id, created_ms) = self
            .store
            .start_group_push(&request.app, &request.group, request.ttl_secs)
            .await
            .map_err(|error| to_status("start_group_push", error))?;
        Ok(Response::new(StartGroupPushResponse { id, created_ms }))
    }

    pub(crate) async fn store_children_rpc(
        &self,
        request: Request<StoreChildrenRequest>,
    ) -> Result<Response<StoreResponse>, Status> {
        let request = request.into_inner();
        if request.parent_id == 0 {
            return Err(Status::invalid_argument("parent_id must be set"));
        }
        let messages = self
            .store
            .store_children(
                &request.app,
                &request.users,
                request.payload,
                request.ttl_secs,
                request.parent_id,
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
        let request = request.into_inner();
        self.store
            .group_push_progress(
                &request.app,
                request.id,
                request.members_added,
                request.done,
            )
            .await
            .map_err(|error| to_status("group_push_progress", error))?;
        Ok(Response::new(GroupPushProgressResponse {}))
    }

    pub(crate) async fn delivered_rpc(
        &self,
        request: Request<DeliveredRequest>,
    ) -> Result<Response<DeliveredResponse>, Status> {
        let reports = request.into_inner().reports;
        self.store
            .record_deliveries(&reports)
            .await
            .map_err(|error| to_status("delivered", error))?;
        ::metrics::counter!("pushgrid_saver_delivery_reports_total")
            .increment(reports.len() as u64);
        Ok(Response::new(DeliveredResponse {}))
    }

    pub(crate) async fn message_status_rpc(
        &self,
        request: Request<MessageStatusRequest>,
    ) -> Result<Response<MessageStatusResponse>, Status> {
        let request = request.into_inner();
        let status = self
            .store
            .message_status(&request.app, request.id)
            .await
            .map_err(|error| to_status("message_status", error))?;
        Ok(Response::new(status))
    }

    /// Records which device acknowledged what; a failure costs only status
    /// detail (the ACK itself is done), so it is logged, not returned.
    pub(crate) async fn record_acks(&self, items: &[AckItem]) {
        if let Err(error) = self.store.record_acks(items).await {
            tracing::warn!(%error, "cannot record acks for message status");
        }
    }

    /// Opens a broadcast's status record; logged on failure like acks.
    pub(crate) async fn record_broadcast(&self, message: &BroadcastMessage) {
        if let Err(error) = self.store.record_broadcast(message).await {
            tracing::warn!(%error, "cannot record a broadcast for message status");
        }
    }
}
