//! Groups and delivery status (issue 12): `bind`, `unbind`, `group_members`,
//! `user_groups`, `push_group` and `message_status`. Same envelope,
//! authentication and error codes as every other method (see `api.rs`); they
//! are in `Method::ALL`, so they are routed, batched and documented (OpenAPI)
//! like the others.
//!
//! Membership lives in saver (SQL durable, Redis hot). `push_group` opens a
//! record in saver (the push's id), queues the fan-out in a bounded pool and
//! answers; a full pool answers 503 with Retry-After before anything is
//! stored. A fan-out reads the group a page at a time (`group_page_size`
//! members), stores one message per member of the page with the push's id
//! as parent, and hands the page to the routing workers, like a multi-user
//! push. At most [`PAGES_IN_FLIGHT`] pages per fan-out are held at once, so a
//! group of a million members is never in one process's memory.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use pushgrid_common::rpc::Channel;
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::{
    App, GroupMembersRequest, GroupMembersResponse, GroupPushProgressRequest, GroupUsersRequest,
    GroupUsersResponse, MessageStatusRequest, MessageStatusResponse, Role, StartGroupPushRequest,
    StoreChildrenRequest, UserGroupsRequest,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::fanout::FanoutJob;
use crate::state::{ApiState, decode_payload, overloaded, unavailable};

/// The longest group name, as saver stores it.
pub(crate) const MAX_GROUP_BYTES: usize = 128;
/// The most users one `bind` or `unbind` call may name.
pub(crate) const MAX_USERS_PER_BIND: usize = 10_000;
/// The most members one `group_members` page may hold.
const MAX_MEMBERS_PAGE: u32 = 10_000;
/// Pages of one fan-out being stored and routed at once.
const PAGES_IN_FLIGHT: usize = 4;
/// Attempts of one saver call of a fan-out before it gives up.
const FANOUT_ATTEMPTS: u32 = 6;
/// How long a fan-out page waits for room in the routing queue before its
/// messages are left to the inboxes (devices get them on their next connect).
const ROUTE_QUEUE_WAIT: Duration = Duration::from_secs(60);

/// Starts `workers` fan-out workers on the state's queue (once). They hold
/// the state weakly and end when it is dropped (its queue closes).
pub(crate) fn start_fanout_workers(state: &Arc<ApiState>, workers: usize) {
    let receiver = state
        .groups
        .receiver
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    let Some(receiver) = receiver else {
        return;
    };
    let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
    for _ in 0..workers.max(1) {
        let (state, receiver) = (Arc::downgrade(state), receiver.clone());
        tokio::spawn(async move {
            loop {
                let job = receiver.lock().await.recv().await;
                let Some(job) = job else { return };
                metrics::gauge!("pushgrid_center_group_fanout_queue_depth").decrement(1.0);
                let Some(state) = state.upgrade() else { return };
                fan_out(&state, job).await;
            }
        });
    }
}

fn check_group(group: &str) -> Result<(), ApiError> {
    if group.is_empty() {
        return Err(ApiError::bad_request("group: must not be empty"));
    }
    if group.len() > MAX_GROUP_BYTES {
        return Err(ApiError::bad_request(format!(
            "group: {} bytes, at most {MAX_GROUP_BYTES} allowed",
            group.len()
        )));
    }
    pushgrid_wire::check_text("group", group).map_err(ApiError::bad_request)
}

fn check_users(users: &[String]) -> Result<(), ApiError> {
    if users.is_empty() {
        return Err(ApiError::bad_request(
            "users: at least one user is required",
        ));
    }
    if users.len() > MAX_USERS_PER_BIND {
        return Err(ApiError::bad_request(format!(
            "users: {} users exceed the limit of {MAX_USERS_PER_BIND} per call",
            users.len()
        )));
    }
    crate::push::check_users(users)
}

/// A live saver's channel; any saver serves any group (they share storage).
fn saver(state: &ApiState) -> Result<Channel, ApiError> {
    let view = state.cluster.view();
    let node = view
        .pick(Role::Saver, rand::random::<u64>())
        .ok_or_else(|| unavailable("no saver is live"))?;
    state
        .channels
        .get(&node.grpc_addr)
        .map_err(ApiError::from_status)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupUsersParams {
    group: String,
    users: Vec<String>,
}

/// Adds users to a group; answers how many were not members yet.
pub(crate) async fn bind(
    state: &ApiState,
    app: &App,
    params: GroupUsersParams,
) -> Result<Value, ApiError> {
    change_members(
        state,
        app,
        params,
        "added",
        |mut saver, request| async move { saver.bind(request).await },
    )
    .await
}

/// Removes users from a group; answers how many were members.
pub(crate) async fn unbind(
    state: &ApiState,
    app: &App,
    params: GroupUsersParams,
) -> Result<Value, ApiError> {
    change_members(
        state,
        app,
        params,
        "removed",
        |mut saver, request| async move { saver.unbind(request).await },
    )
    .await
}

/// The shared body of `bind` and `unbind`: checks the group and users, sends
/// the membership change to a saver with `rpc`, and answers how many users
/// it changed under `answer_key`.
async fn change_members<F, Fut>(
    state: &ApiState,
    app: &App,
    params: GroupUsersParams,
    answer_key: &str,
    rpc: F,
) -> Result<Value, ApiError>
where
    F: FnOnce(SaverClient<Channel>, GroupUsersRequest) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<GroupUsersResponse>, tonic::Status>>,
{
    check_group(&params.group)?;
    check_users(&params.users)?;
    let request = GroupUsersRequest {
        app: app.id.clone(),
        group: params.group.clone(),
        users: params.users,
    };
    let changed = rpc(SaverClient::new(saver(state)?), request)
        .await
        .map_err(ApiError::from_status)?
        .into_inner()
        .changed;
    Ok(json!({ "group": params.group, answer_key: changed }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupMembersParams {
    group: String,
    /// The `next_cursor` of the previous page; absent for the first.
    #[serde(default)]
    cursor: Option<String>,
    /// Members per page: 1 to 10,000 (default 1,000).
    #[serde(default)]
    limit: Option<u32>,
}

/// One page of a group's members, in byte order of user id.
pub(crate) async fn group_members(
    state: &ApiState,
    app: &App,
    params: GroupMembersParams,
) -> Result<Value, ApiError> {
    check_group(&params.group)?;
    let limit = params.limit.unwrap_or(1000);
    if limit == 0 || limit > MAX_MEMBERS_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit: must be 1 to {MAX_MEMBERS_PAGE}"
        )));
    }
    let page = members_page(
        saver(state)?,
        &app.id,
        &params.group,
        params.cursor.unwrap_or_default(),
        limit,
    )
    .await
    .map_err(ApiError::from_status)?;
    let next_cursor = (!page.next.is_empty()).then_some(page.next);
    Ok(json!({ "group": params.group, "users": page.users, "next_cursor": next_cursor }))
}

async fn members_page(
    channel: Channel,
    app: &str,
    group: &str,
    after: String,
    limit: u32,
) -> Result<GroupMembersResponse, tonic::Status> {
    let request = GroupMembersRequest {
        app: app.to_string(),
        group: group.to_string(),
        after,
        limit,
    };
    Ok(SaverClient::new(channel)
        .group_members(request)
        .await?
        .into_inner())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserGroupsParams {
    user: String,
}

/// The groups a user belongs to.
pub(crate) async fn user_groups(
    state: &ApiState,
    app: &App,
    params: UserGroupsParams,
) -> Result<Value, ApiError> {
    crate::state::check_user("user", &params.user)?;
    let request = UserGroupsRequest {
        app: app.id.clone(),
        user: params.user.clone(),
    };
    let groups = SaverClient::new(saver(state)?)
        .user_groups(request)
        .await
        .map_err(ApiError::from_status)?
        .into_inner()
        .groups;
    Ok(json!({ "user": params.user, "groups": groups }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PushGroupParams {
    group: String,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    payload_b64: Option<String>,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// Opens the push's record (its id), queues the fan-out and answers.
pub(crate) async fn push_group(
    state: &ApiState,
    app: &App,
    params: PushGroupParams,
) -> Result<Value, ApiError> {
    check_group(&params.group)?;
    let payload = decode_payload(state, params.payload, params.payload_b64)?;
    let ttl_secs = crate::push::check_ttl(state, params.ttl_secs)?;
    // A place in the fan-out queue first: when it is full nothing is stored.
    let Ok(slot) = state.groups.queue.clone().try_reserve_owned() else {
        return Err(overloaded(
            state,
            "group fan-out queue is full; retry later",
        ));
    };
    let request = StartGroupPushRequest {
        app: app.id.clone(),
        group: params.group.clone(),
        ttl_secs,
    };
    let id = SaverClient::new(saver(state)?)
        .start_group_push(request)
        .await
        .map_err(ApiError::from_status)?
        .into_inner()
        .id;
    slot.send(FanoutJob {
        app: app.id.clone(),
        group: params.group.clone(),
        id,
        payload,
        ttl_secs,
    });
    metrics::gauge!("pushgrid_center_group_fanout_queue_depth").increment(1.0);
    metrics::counter!("pushgrid_center_group_pushes_total").increment(1);
    Ok(json!({ "id": id.to_string(), "group": params.group, "accepted": true }))
}

/// Runs a saver call of a fan-out on a live saver, retrying with backoff
/// (on another saver, if there is one) while it is unavailable.
async fn with_retries<T, F, Fut>(state: &ApiState, what: &str, mut call: F) -> Option<T>
where
    F: FnMut(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=FANOUT_ATTEMPTS {
        let outcome = match saver(state) {
            Ok(channel) => call(channel).await.map_err(|status| status.to_string()),
            Err(error) => Err(format!("{error:?}")),
        };
        match outcome {
            Ok(value) => return Some(value),
            Err(error) if attempt == FANOUT_ATTEMPTS => {
                tracing::warn!(what, %error, "group fan-out step failed, giving up");
            }
            Err(error) => {
                tracing::debug!(what, %error, attempt, "group fan-out step failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(3));
            }
        }
    }
    None
}

/// Pages through the group: stores each page's messages and routes them,
/// [`PAGES_IN_FLIGHT`] pages at a time.
async fn fan_out(state: &ApiState, job: FanoutJob) {
    let started = tokio::time::Instant::now();
    let page_size = u32::try_from(state.config.group_page_size.clamp(1, 10_000)).unwrap_or(1000);
    let mut after = String::new();
    let mut in_flight = FuturesUnordered::new();
    let mut members = 0u64;
    let mut complete = true;
    loop {
        let page = with_retries(state, "group members", |channel| {
            members_page(channel, &job.app, &job.group, after.clone(), page_size)
        })
        .await;
        let Some(page) = page else {
            complete = false;
            break;
        };
        if page.users.is_empty() {
            break;
        }
        while in_flight.len() >= PAGES_IN_FLIGHT {
            complete &= in_flight.next().await.unwrap_or(true);
        }
        let last_page = page.next.is_empty();
        after = page.next;
        members += page.users.len() as u64;
        in_flight.push(store_and_route(state, &job, page.users));
        if last_page {
            break;
        }
    }
    while let Some(stored) = in_flight.next().await {
        complete &= stored;
    }
    let progress = GroupPushProgressRequest {
        app: job.app.clone(),
        id: job.id,
        members_added: 0,
        done: complete,
    };
    if complete {
        with_retries(state, "group push progress", |channel| {
            let progress = progress.clone();
            async move {
                SaverClient::new(channel)
                    .group_push_progress(progress)
                    .await
            }
        })
        .await;
    } else {
        metrics::counter!("pushgrid_center_group_fanout_failures_total").increment(1);
    }
    metrics::histogram!("pushgrid_center_group_fanout_seconds")
        .record(started.elapsed().as_secs_f64());
    tracing::info!(app = %job.app, id = job.id, members, complete, elapsed_ms = started.elapsed().as_millis() as u64, "group fan-out finished");
}

/// Stores one page (a message per member, parent = the push) and hands the
/// messages to the routing workers. False when the page could not be stored.
async fn store_and_route(state: &ApiState, job: &FanoutJob, users: Vec<String>) -> bool {
    let count = users.len() as u64;
    let request = StoreChildrenRequest {
        app: job.app.clone(),
        users,
        payload: job.payload.clone(),
        ttl_secs: job.ttl_secs,
        parent_id: job.id,
    };
    let stored = with_retries(state, "store group page", |channel| {
        let request = request.clone();
        async move { SaverClient::new(channel).store_children(request).await }
    })
    .await;
    let Some(stored) = stored else {
        return false;
    };
    let messages = stored.into_inner().messages;
    metrics::counter!("pushgrid_center_pushed_total").increment(messages.len() as u64);
    let progress = GroupPushProgressRequest {
        app: job.app.clone(),
        id: job.id,
        members_added: count,
        done: false,
    };
    with_retries(state, "group push progress", |channel| {
        let progress = progress.clone();
        async move {
            SaverClient::new(channel)
                .group_push_progress(progress)
                .await
        }
    })
    .await;
    // Wait for room in the routing queue rather than fail: the page is
    // stored, and a full queue only slows the fan-out down.
    let deadline = tokio::time::Instant::now() + ROUTE_QUEUE_WAIT;
    loop {
        if let Some(slot) = state.workers.reserve() {
            let _routing = state.workers.submit(slot, messages);
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            metrics::counter!("pushgrid_center_group_pages_unrouted_total").increment(1);
            tracing::warn!(
                id = job.id,
                "routing queue stayed full; a group page waits in the inboxes"
            );
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A message id as a JSON string (64-bit ids lose digits as JSON numbers in
/// JavaScript) or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum MessageId {
    Text(String),
    Number(u64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MessageStatusParams {
    id: MessageId,
}

/// What became of a message, a group push or a broadcast.
pub(crate) async fn message_status(
    state: &ApiState,
    app: &App,
    params: MessageStatusParams,
) -> Result<Value, ApiError> {
    let id = match params.id {
        MessageId::Number(id) => id,
        MessageId::Text(text) => text.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("id: {text:?} is not a message id (digits)"))
        })?,
    };
    let request = MessageStatusRequest {
        app: app.id.clone(),
        id,
    };
    let status = SaverClient::new(saver(state)?)
        .message_status(request)
        .await
        .map_err(ApiError::from_status)?
        .into_inner();
    if !status.found {
        return Err(ApiError::NotFound(format!(
            "id: no message {id} in this app (unknown, or past its TTL plus a day)"
        )));
    }
    Ok(status_json(id, status))
}

fn optional_ms(ms: u64) -> Value {
    if ms == 0 { Value::Null } else { json!(ms) }
}

fn status_json(id: u64, status: MessageStatusResponse) -> Value {
    let counts = status.counts.unwrap_or_default();
    let counts = json!({
        "stored": counts.stored,
        "delivered": counts.delivered,
        "acked": counts.acked,
        "expired": counts.expired,
        "dead_lettered": counts.dead_lettered,
    });
    match status.kind.as_str() {
        "group" => json!({
            "id": id.to_string(),
            "kind": "group",
            "group": status.target,
            "created_ms": status.created_ms,
            "expires_ms": status.expires_ms,
            "members": status.members,
            "fanout_done": status.fanout_done,
            "counts": counts,
        }),
        "broadcast" => json!({
            "id": id.to_string(),
            "kind": "broadcast",
            "topic": status.target,
            "created_ms": status.created_ms,
            "counts": counts,
        }),
        _ => {
            let devices: Vec<Value> = status
                .devices
                .iter()
                .map(|device| {
                    json!({
                        "device": device.device,
                        "state": device.state,
                        "delivered_ms": optional_ms(device.delivered_ms),
                        "acked_ms": optional_ms(device.acked_ms),
                    })
                })
                .collect();
            json!({
                "id": id.to_string(),
                "kind": "unicast",
                "user": status.user,
                "state": status.state,
                "created_ms": status.created_ms,
                "expires_ms": status.expires_ms,
                "acked_ms": optional_ms(status.acked_ms),
                "group_push": (status.parent_id != 0).then(|| status.parent_id.to_string()),
                "devices": devices,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_groups_and_user_lists_name_the_field() {
        let message = |error: ApiError| format!("{error:?}");
        let empty_group = check_group("").expect_err("an empty group is refused");
        assert!(message(empty_group).contains("group: must not be empty"));
        let long_group = check_group(&"g".repeat(129)).expect_err("a 129-byte group is refused");
        assert!(message(long_group).contains("group:"));
        let too_many: Vec<String> = (0..10_001).map(|n| format!("u{n}")).collect();
        let too_many = check_users(&too_many).expect_err("10,001 users are refused");
        assert!(message(too_many).contains("users: 10001 users"));
        let no_users = check_users(&[]).expect_err("an empty user list is refused");
        assert!(message(no_users).contains("users:"));
        let with_empty = vec!["a".to_string(), String::new()];
        let with_empty = check_users(&with_empty).expect_err("an empty user id is refused");
        assert!(message(with_empty).contains("users[1]"));
        assert!(check_users(&["a".to_string()]).is_ok());
    }
}
