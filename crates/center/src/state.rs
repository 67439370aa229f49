//! The push API's shared state and the checks every method uses: the
//! parameters of a call, payloads, user ids, the app's rate and the 503
//! answers. Below every method module (`push`, `groups`, `broadcast`,
//! `tokens`, `methods`, `batch`) and `api`, the router above them all.

use std::sync::Arc;

use axum::body::Bytes;
use base64::Engine;
use pushgrid_common::cluster::Cluster;
use pushgrid_proto::cluster::App;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::CenterConfig;
use crate::error::ApiError;
use crate::fanout::GroupFanout;
use crate::limits::OverLimit;
use crate::route::WorkerPool;
use crate::store::StoreBatcher;

/// What every API call may use: configuration, the cluster view, the
/// routing workers, channels to the other roles, the apps' rate limits and
/// the bounded queues of broadcasts, stores and group fan-outs.
pub(crate) struct ApiState {
    pub config: CenterConfig,
    pub cluster: Cluster,
    pub workers: WorkerPool,
    pub channels: pushgrid_common::rpc::ChannelPool,
    pub limits: crate::limits::AppLimits,
    /// Broadcast fan-outs in flight; none free answers 503.
    pub broadcasts: Arc<tokio::sync::Semaphore>,
    /// Single-user pushes coalesced into StoreMany calls, per saver.
    pub stores: StoreBatcher,
    /// Group push fan-outs waiting for a worker (issue 12, groups.rs).
    pub groups: GroupFanout,
    /// The node's admin token: `stats` and `info` with it see the cluster.
    pub admin_token: Option<String>,
    /// Notifications through APNs, FCM and HMS (issue 25, notify.rs).
    pub notifier: crate::notify::Notifier,
}

/// A user id named in a request (field `field`): the wire's id rules, a bad
/// one answered 400.
pub(crate) fn check_user(field: &str, user: &str) -> Result<(), ApiError> {
    pushgrid_wire::check_id("a user id", user)
        .map_err(|problem| ApiError::bad_request(format!("{field}: {problem}")))
}

/// A method's parameters: the body of `POST /api/<method>`, or one command's
/// `params` inside a batch.
pub(crate) enum Params {
    Body(Bytes),
    Value(serde_json::Value),
}

impl Params {
    /// Parses strictly: unknown fields, missing fields and wrong types are
    /// 400 errors that name the field (and, for a body, the position). An
    /// empty body or absent params read as `{}`.
    pub(crate) fn parse<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        match self {
            Params::Body(body) => {
                let json: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
                    b"{}"
                } else {
                    &body
                };
                serde_json::from_slice(json)
                    .map_err(|error| ApiError::bad_request(format!("invalid JSON body: {error}")))
            }
            Params::Value(value) => {
                let value = if value.is_null() { json!({}) } else { value };
                serde_json::from_value(value)
                    .map_err(|error| ApiError::bad_request(format!("invalid params: {error}")))
            }
        }
    }
}

/// A payload given as text or as base64, within the size limit.
pub(crate) fn decode_payload(
    state: &ApiState,
    text: Option<String>,
    base64_text: Option<String>,
) -> Result<Bytes, ApiError> {
    let payload = match (text, base64_text) {
        (Some(text), None) => Bytes::from(text),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .map(Bytes::from)
            .map_err(|error| {
                ApiError::bad_request(format!("payload_b64: not valid base64: {error}"))
            })?,
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give payload or payload_b64, not both",
            ));
        }
        (None, None) => return Err(ApiError::bad_request("payload or payload_b64 is required")),
    };
    if payload.len() > state.config.max_payload_bytes {
        return Err(ApiError::TooLarge(format!(
            "payload of {} bytes exceeds {} bytes",
            payload.len(),
            state.config.max_payload_bytes
        )));
    }
    Ok(payload)
}

/// 503 with Retry-After: a bounded queue is full and nothing was stored.
pub(crate) fn overloaded(state: &ApiState, message: &str) -> ApiError {
    metrics::counter!("pushgrid_center_overload_rejections_total").increment(1);
    ApiError::Overloaded {
        message: message.to_string(),
        retry_after_secs: state.config.retry_after_secs,
    }
}

/// 503 for a missing peer role.
pub(crate) fn unavailable(message: &str) -> ApiError {
    ApiError::Unavailable(message.to_string())
}

/// 429 with Retry-After when the app is over its rate.
pub(crate) fn rate_limit(state: &ApiState, app: &App) -> Result<(), ApiError> {
    state.limits.check(app).map_err(|wait| over_rate(app, wait))
}

/// Charges a batch of `commands` against the app's rate: the call took one
/// token, the further commands take one each. 429 when they are not free now;
/// 400 when the batch is larger than the app's burst and never can be.
pub(crate) fn rate_limit_batch(state: &ApiState, app: &App, commands: u32) -> Result<(), ApiError> {
    let burst = if app.rate_burst > 0 {
        app.rate_burst
    } else {
        app.rate_per_sec
    };
    let over_burst = |burst: u32| {
        ApiError::bad_request(format!(
            "commands: {commands} commands exceed app {}'s burst of {burst} requests; send smaller batches",
            app.id
        ))
    };
    if app.rate_per_sec > 0 && commands > burst {
        return Err(over_burst(burst));
    }
    match state.limits.check_n(app, commands.saturating_sub(1)) {
        Ok(()) => Ok(()),
        Err(OverLimit::Wait(wait)) => Err(over_rate(app, wait)),
        Err(OverLimit::OverBurst(burst)) => Err(over_burst(burst)),
    }
}

fn over_rate(app: &App, wait: std::time::Duration) -> ApiError {
    ApiError::RateLimited {
        message: format!(
            "app {} is over its rate of {} requests per second",
            app.id, app.rate_per_sec
        ),
        retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u32,
    }
}
