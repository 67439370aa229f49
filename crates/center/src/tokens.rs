//! Device push tokens (issue 25): `register_token`, `list_tokens` and
//! `remove_token`, for backends that hold their devices' platform tokens
//! themselves (devices can also register theirs with a PUSH_TOKEN frame).
//! Same envelope, authentication and errors as every other method; every
//! call is scoped to the API key's app. Tokens are stored by saver (SQL).

use pushgrid_common::rpc::Channel;
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::{
    App, DevicePushToken, ListTokensRequest, RegisterTokensRequest, RemoveTokensRequest, Role,
    TokenKey,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::{ApiState, check_user, unavailable};

/// A live saver's channel (any saver serves any app: they share storage).
fn saver(state: &ApiState, app: &str, user: &str) -> Result<Channel, ApiError> {
    let view = state.cluster.view();
    let node = view
        .pick(Role::Saver, pushgrid_common::ring::user_key(app, user))
        .ok_or_else(|| unavailable("no saver is live"))?;
    state
        .channels
        .get(&node.grpc_addr)
        .map_err(ApiError::from_status)
}

fn check_token(provider: &str, token: &str, bundle: &str) -> Result<(), ApiError> {
    pushgrid_wire::check_push_token(provider, token, bundle).map_err(ApiError::bad_request)
}

fn check_device(field: &str, device: &str) -> Result<(), ApiError> {
    pushgrid_wire::check_id("a device id", device)
        .map_err(|problem| ApiError::bad_request(format!("{field}: {problem}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterTokenParams {
    user: String,
    provider: String,
    token: String,
    bundle: String,
    /// The device the token belongs to; when given, it replaces the
    /// device's previous token of the same provider.
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    platform: Option<String>,
}

/// Stores a token for a user (moving it from whoever held it before).
pub(crate) async fn register_token(
    state: &ApiState,
    app: &App,
    params: RegisterTokenParams,
) -> Result<Value, ApiError> {
    check_user("user", &params.user)?;
    check_token(&params.provider, &params.token, &params.bundle)?;
    if let Some(device) = &params.device {
        check_device("device", device)?;
    }
    let platform = params.platform.unwrap_or_default();
    if !platform.is_empty() {
        pushgrid_wire::check_id("a platform", &platform)
            .map_err(|problem| ApiError::bad_request(format!("platform: {problem}")))?;
    }
    let request = RegisterTokensRequest {
        app: app.id.clone(),
        tokens: vec![DevicePushToken {
            user: params.user.clone(),
            device: params.device.unwrap_or_default(),
            platform,
            provider: params.provider.clone(),
            token: params.token,
            bundle: params.bundle,
            ..DevicePushToken::default()
        }],
    };
    SaverClient::new(saver(state, &app.id, &params.user)?)
        .register_tokens(request)
        .await
        .map_err(ApiError::from_status)?;
    Ok(json!({ "user": params.user, "provider": params.provider, "registered": true }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListTokensParams {
    user: String,
}

/// A user's tokens, most recently registered first.
pub(crate) async fn list_tokens(
    state: &ApiState,
    app: &App,
    params: ListTokensParams,
) -> Result<Value, ApiError> {
    check_user("user", &params.user)?;
    let request = ListTokensRequest {
        app: app.id.clone(),
        user: params.user.clone(),
        users: Vec::new(),
    };
    let tokens = SaverClient::new(saver(state, &app.id, &params.user)?)
        .list_tokens(request)
        .await
        .map_err(ApiError::from_status)?
        .into_inner()
        .tokens;
    let tokens: Vec<Value> = tokens
        .iter()
        .map(|token| {
            json!({
                "provider": token.provider,
                "token": token.token,
                "bundle": token.bundle,
                "device": (!token.device.is_empty()).then_some(&token.device),
                "platform": (!token.platform.is_empty()).then_some(&token.platform),
                "created_ms": token.created_ms,
                "updated_ms": token.updated_ms,
            })
        })
        .collect();
    Ok(json!({ "user": params.user, "tokens": tokens }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RemoveTokenParams {
    /// Removes one token (with `token`)...
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    token: Option<String>,
    /// ...or every token of a user.
    #[serde(default)]
    user: Option<String>,
}

/// Removes one token, or all of a user's; answers how many were stored.
pub(crate) async fn remove_token(
    state: &ApiState,
    app: &App,
    params: RemoveTokenParams,
) -> Result<Value, ApiError> {
    let request = match (params.provider, params.token, params.user) {
        (Some(provider), Some(token), None) => {
            pushgrid_wire::check_provider(&provider).map_err(ApiError::bad_request)?;
            if token.is_empty() || token.len() > pushgrid_wire::MAX_TOKEN_BYTES {
                return Err(ApiError::bad_request(format!(
                    "token: must be 1 to {} bytes, not {}",
                    pushgrid_wire::MAX_TOKEN_BYTES,
                    token.len()
                )));
            }
            RemoveTokensRequest {
                app: app.id.clone(),
                tokens: vec![TokenKey { provider, token }],
                user: String::new(),
            }
        }
        (None, None, Some(user)) => {
            check_user("user", &user)?;
            RemoveTokensRequest {
                app: app.id.clone(),
                tokens: Vec::new(),
                user,
            }
        }
        _ => {
            return Err(ApiError::bad_request(
                "provider, token, user: name either provider and token (one token) or user \
                 (every token of the user)",
            ));
        }
    };
    let channel = saver(state, &app.id, &request.user)?;
    let removed = SaverClient::new(channel)
        .remove_tokens(request)
        .await
        .map_err(ApiError::from_status)?
        .into_inner()
        .removed;
    Ok(json!({ "removed": removed }))
}
