//! `push`: stores one message per user in saver, answers their ids, then
//! routes them in the worker pool.
//!
//! Concurrent single-user pushes (the common unicast case) share StoreMany
//! calls through the state's store batcher (`store.rs`). Multi-user pushes
//! and pushes with an idempotency key keep their own Store call.

use std::sync::Arc;

use axum::body::Bytes;
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::{App, Message, Role, StoreItem, StoreManyRequest, StoreRequest};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::{ApiState, decode_payload, overloaded, unavailable};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PushParams {
    users: Vec<String>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    payload_b64: Option<String>,
    #[serde(default)]
    ttl_secs: Option<u64>,
    /// The same key within 24 h answers the first push's ids, storing nothing new.
    #[serde(default)]
    idempotency_key: Option<String>,
    /// A notification through APNs, FCM or HMS as well (issue 25, notify.rs).
    #[serde(default)]
    notification: Option<crate::notify::NotificationParams>,
}

/// A push whose parameters passed every check.
pub(crate) struct ValidPush {
    users: Vec<String>,
    payload: Bytes,
    ttl_secs: u32,
    idempotency_key: String,
    notice: Option<crate::notify::Notice>,
}

impl ValidPush {
    /// The push as one StoreMany item, when it can share a call with others:
    /// one user, no idempotency key and no notification.
    pub(crate) fn single_item(&self, app: &App) -> Option<StoreItem> {
        if self.users.len() != 1 || !self.idempotency_key.is_empty() || self.notice.is_some() {
            return None;
        }
        Some(StoreItem {
            app: app.id.clone(),
            user: self.users[0].clone(),
            payload: self.payload.clone(),
            ttl_secs: self.ttl_secs,
        })
    }
}

pub(crate) fn validate(state: &ApiState, params: PushParams) -> Result<ValidPush, ApiError> {
    if params.users.is_empty() {
        return Err(ApiError::bad_request(
            "users: at least one user is required",
        ));
    }
    if params.users.len() > state.config.max_users_per_push {
        return Err(ApiError::bad_request(format!(
            "users: {} users exceed the limit of {} per call",
            params.users.len(),
            state.config.max_users_per_push
        )));
    }
    check_users(&params.users)?;
    let idempotency_key = params.idempotency_key.unwrap_or_default();
    if idempotency_key.len() > 255 {
        return Err(ApiError::bad_request(format!(
            "idempotency_key: {} bytes, at most 255 allowed",
            idempotency_key.len()
        )));
    }
    pushgrid_wire::check_text("idempotency_key", &idempotency_key)
        .map_err(ApiError::bad_request)?;
    let ttl_secs = check_ttl(state, params.ttl_secs)?;
    let payload = decode_payload(state, params.payload, params.payload_b64)?;
    let notice = params
        .notification
        .map(crate::notify::validate)
        .transpose()?;
    Ok(ValidPush {
        users: params.users,
        payload,
        ttl_secs,
        idempotency_key,
        notice,
    })
}

/// Every user id of a call is a valid id; the message names the first bad one.
pub(crate) fn check_users(users: &[String]) -> Result<(), ApiError> {
    for (index, user) in users.iter().enumerate() {
        pushgrid_wire::check_id("a user id", user)
            .map_err(|problem| ApiError::bad_request(format!("users[{index}]: {problem}")))?;
    }
    Ok(())
}

/// A push's `ttl_secs`: absent is 0 (saver's default, 7 days); present, it
/// must be 1 to `max_ttl_secs`, and is refused, never changed, otherwise.
pub(crate) fn check_ttl(state: &ApiState, ttl_secs: Option<u64>) -> Result<u32, ApiError> {
    let max = state.config.max_ttl_secs;
    match ttl_secs {
        None => Ok(0),
        Some(ttl) if ttl >= 1 && ttl <= u64::from(max) => Ok(ttl as u32),
        Some(ttl) => Err(ApiError::bad_request(format!(
            "ttl_secs: must be 1 to {max} seconds ({} days), not {ttl}; leave it out for the default",
            max / 86_400
        ))),
    }
}

/// `{"messages": [{"user", "id"}], "replayed"}`; ids are strings so
/// JavaScript keeps every digit of a 64-bit id.
pub(crate) fn answer(messages: &[Message], replayed: bool) -> Value {
    let messages: Vec<Value> = messages
        .iter()
        .map(|message| json!({ "user": message.user, "id": message.id.to_string() }))
        .collect();
    json!({ "messages": messages, "replayed": replayed })
}

pub(crate) async fn push(
    state: &Arc<ApiState>,
    app: &App,
    params: PushParams,
) -> Result<Value, ApiError> {
    let push = validate(state, params)?;
    push_valid(state, app, push).await
}

/// Stores a checked push, answers its ids and queues it for routing.
pub(crate) async fn push_valid(
    state: &Arc<ApiState>,
    app: &App,
    push: ValidPush,
) -> Result<Value, ApiError> {
    // A place in the routing queue first: when it is full nothing is stored.
    let Some(slot) = state.workers.reserve() else {
        return Err(overloaded(state, "routing queue is full; retry later"));
    };
    let started = tokio::time::Instant::now();
    if let Some(item) = push.single_item(app)
        && state.stores.enabled()
    {
        let message = state.stores.store(&saver_address(state)?, item).await?;
        record_stored(started, 1);
        let answer = answer(std::slice::from_ref(&message), false);
        crate::route::routed(submit(state, slot, vec![message])).await;
        return Ok(answer);
    }
    let channel = saver_channel(state)?;
    let notice = push.notice;
    let store = StoreRequest {
        app: app.id.clone(),
        users: push.users,
        payload: push.payload,
        ttl_secs: push.ttl_secs,
        idempotency_key: push.idempotency_key,
    };
    let stored = SaverClient::new(channel)
        .store(store)
        .await
        .map_err(ApiError::from_status)?
        .into_inner();
    let answer = answer(&stored.messages, stored.replayed);
    if stored.replayed {
        // Routed again: the first call with this key may have died between
        // its store and its routing (that is why the backend retried), and a
        // connected device would then see the message only at its next
        // connect. A device that has it drops the copy by id.
        metrics::counter!("pushgrid_center_replayed_total").increment(1);
    } else {
        record_stored(started, stored.messages.len());
    }
    let messages = stored.messages;
    // A replayed push was notified by its first call.
    let notify = notice.filter(|_| !stored.replayed);
    crate::route::routed(submit(state, slot, messages.clone())).await;
    // After the first routing attempt: the sessions it found are the ones the
    // offline policy looks at.
    if let Some(notice) = notify {
        state.notifier.submit(&messages, &notice);
    }
    Ok(answer)
}

/// Stores checked single-user pushes with one StoreMany call (a run of them
/// in a batch) and queues them for routing as one job.
pub(crate) async fn push_items(
    state: &Arc<ApiState>,
    items: Vec<StoreItem>,
) -> Result<Vec<Message>, ApiError> {
    let Some(slot) = state.workers.reserve() else {
        return Err(overloaded(state, "routing queue is full; retry later"));
    };
    let started = tokio::time::Instant::now();
    let channel = saver_channel(state)?;
    metrics::histogram!("pushgrid_center_store_batch_items").record(items.len() as f64);
    let messages = SaverClient::new(channel)
        .store_many(StoreManyRequest { items })
        .await
        .map_err(ApiError::from_status)?
        .into_inner()
        .messages;
    record_stored(started, messages.len());
    crate::route::routed(submit(state, slot, messages.clone())).await;
    Ok(messages)
}

/// Hands stored messages to the routing workers, counted.
fn submit(
    state: &ApiState,
    slot: crate::route::Slot,
    messages: Vec<Message>,
) -> crate::route::Routing {
    metrics::counter!("pushgrid_center_route_submitted_total").increment(messages.len() as u64);
    state.workers.submit(slot, messages)
}

fn record_stored(started: tokio::time::Instant, count: usize) {
    metrics::histogram!("pushgrid_center_store_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("pushgrid_center_pushed_total").increment(count as u64);
}

/// Any live saver: every saver serves every user (they share Redis and SQL).
fn saver_address(state: &ApiState) -> Result<String, ApiError> {
    state
        .cluster
        .view()
        .pick(Role::Saver, rand::random::<u64>())
        .map(|node| node.grpc_addr.clone())
        .ok_or_else(|| unavailable("no saver is live"))
}

fn saver_channel(state: &ApiState) -> Result<pushgrid_common::rpc::Channel, ApiError> {
    let saver = saver_address(state)?;
    state.channels.get(&saver).map_err(ApiError::from_status)
}
