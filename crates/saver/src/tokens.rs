//! The saver's RPCs for device push tokens (issue 25); the storage is
//! [`crate::store::SqlStore`]'s token methods, reached through every store's
//! durable copy.

use pushgrid_proto::cluster::{
    ListTokensRequest, ListTokensResponse, RegisterTokensRequest, RegisterTokensResponse,
    RemoveTokensRequest, RemoveTokensResponse,
};
use tonic::{Request, Response, Status};

use crate::{SaverService, to_status};

impl SaverService {
    pub(crate) async fn register_tokens_rpc(
        &self,
        request: Request<RegisterTokensRequest>,
    ) -> Result<Response<RegisterTokensResponse>, Status> {
        let request = request.into_inner();
        let registered = self
            .store
            .durable()
            .register_tokens(&request.app, &request.tokens)
            .await
            .map_err(|error| to_status("register_tokens", error))?;
        ::metrics::counter!("pushgrid_saver_push_tokens_registered_total").increment(registered);
        Ok(Response::new(RegisterTokensResponse { registered }))
    }

    pub(crate) async fn list_tokens_rpc(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let request = request.into_inner();
        let durable = self.store.durable();
        let tokens = if request.users.is_empty() {
            durable.list_tokens(&request.app, &request.user).await
        } else if request.user.is_empty() {
            durable
                .list_tokens_of_users(&request.app, &request.users)
                .await
        } else {
            return Err(Status::invalid_argument("give user or users, not both"));
        }
        .map_err(|error| to_status("list_tokens", error))?;
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    pub(crate) async fn remove_tokens_rpc(
        &self,
        request: Request<RemoveTokensRequest>,
    ) -> Result<Response<RemoveTokensResponse>, Status> {
        let request = request.into_inner();
        let durable = self.store.durable();
        let removed = if request.user.is_empty() {
            durable.remove_tokens(&request.app, &request.tokens).await
        } else if request.tokens.is_empty() {
            durable
                .remove_user_tokens(&request.app, &request.user)
                .await
        } else {
            return Err(Status::invalid_argument(
                "name either tokens or a user, not both",
            ));
        }
        .map_err(|error| to_status("remove_tokens", error))?;
        ::metrics::counter!("pushgrid_saver_push_tokens_removed_total").increment(removed);
        Ok(Response::new(RemoveTokensResponse { removed }))
    }
}
