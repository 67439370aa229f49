//! The room's clients of register, saver and coordinator. Small, frequent
//! calls (sessions, acks, state events) go through per-peer batchers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use pushgrid_common::auth::role_name;
use pushgrid_common::batch::{BatchConfig, BatcherMap, SinkMap};
use pushgrid_common::cluster::Cluster;
use pushgrid_common::ring;
use pushgrid_common::rpc::{Channel, ChannelPool};
use pushgrid_proto::client::KickCode;
use pushgrid_proto::cluster::coordinator_client::CoordinatorClient;
use pushgrid_proto::cluster::register_client::RegisterClient;
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::{
    AckItem, AckRequest, DeliveredRequest, DeliveryReport, HistoryRequest, HistoryResponse,
    KickRequest, Message, PendingAnswer, PendingManyRequest, PendingRequest, Role, Session,
    SessionBatch, StateBatch, StateEvent, UpstreamRequest,
};
use tokio_util::task::TaskTracker;
use tonic::Status;

use crate::RoomError;

/// Most messages fetched from an inbox when a device connects.
const PENDING_LIMIT: u32 = 1000;

pub(crate) struct Peers {
    cluster: Cluster,
    pool: Arc<ChannelPool>,
    online: BatcherMap<Session, ()>,
    /// Inbox reads after AUTH, many per PendingMany call.
    inboxes: BatcherMap<PendingRequest, PendingAnswer>,
    /// Reports nobody waits for go through sinks: one queue slot per item,
    /// no task.
    offline: SinkMap<Session>,
    /// ACKs and hand-offs to devices (message status, issue 12), one sink
    /// per saver.
    reports: SinkMap<SaverReport>,
    states: SinkMap<StateEvent>,
    background: TaskTracker,
}

/// What a room tells saver in the background. ACKs and hand-off records
/// share one sink per saver, so an ACK that arrives within the linger of its
/// hand-off's report carries the hand-off time, and saver writes the device's
/// status row once instead of twice.
enum SaverReport {
    Delivered(DeliveryReport),
    Ack(AckItem),
}

/// (message, app, user, device) of a unicast hand-off or ACK.
type HandOffKey<'a> = (u64, &'a str, &'a str, &'a str);

/// Splits a batch of reports into hand-off records and ACKs, folding each
/// hand-off whose ACK is in the same batch into that ACK (`delivered_ms`,
/// the first hand-off's time); returns the hand-offs left to report.
fn fold_reports(batch: Vec<SaverReport>) -> (Vec<DeliveryReport>, Vec<AckItem>) {
    let (mut handoffs, mut acks) = (Vec::new(), Vec::new());
    for report in batch {
        match report {
            SaverReport::Delivered(report) => handoffs.push(report),
            SaverReport::Ack(item) => acks.push(item),
        }
    }
    if handoffs.is_empty() || acks.is_empty() {
        return (handoffs, acks);
    }
    let folded: Vec<bool> = {
        let mut first: HashMap<HandOffKey, u64> = HashMap::new();
        for report in handoffs.iter().filter(|report| !report.broadcast) {
            first
                .entry((report.msg_id, &report.app, &report.user, &report.device))
                .or_insert(report.at_ms);
        }
        let mut used: HashSet<HandOffKey> = HashSet::new();
        for item in acks.iter_mut().filter(|item| !item.device.is_empty()) {
            let times: Vec<u64> = item
                .msg_ids
                .iter()
                .map(|id| {
                    let at = (
                        *id,
                        item.app.as_str(),
                        item.user.as_str(),
                        item.device.as_str(),
                    );
                    match first.get_key_value(&at) {
                        Some((handed, at_ms)) => {
                            used.insert(*handed);
                            *at_ms
                        }
                        None => 0,
                    }
                })
                .collect();
            if times.iter().any(|at_ms| *at_ms != 0) {
                item.delivered_ms = times;
            }
        }
        handoffs
            .iter()
            .map(|report| {
                !report.broadcast
                    && used.contains(&(
                        report.msg_id,
                        report.app.as_str(),
                        report.user.as_str(),
                        report.device.as_str(),
                    ))
            })
            .collect()
    };
    let before = handoffs.len();
    let left: Vec<DeliveryReport> = handoffs
        .into_iter()
        .zip(folded)
        .filter_map(|(report, folded)| (!folded).then_some(report))
        .collect();
    metrics::counter!("pushgrid_room_handoffs_folded_total")
        .increment((before - left.len()) as u64);
    (left, acks)
}

/// Sends one batch of reports to a saver: its ACKs and the hand-offs left
/// after folding, the two calls at once.
async fn send_reports(channel: Result<Channel, Status>, batch: Vec<SaverReport>) {
    let (handoffs, acks) = fold_reports(batch);
    let channel = match channel {
        Ok(channel) => channel,
        Err(status) => {
            if !acks.is_empty() {
                // The messages stay in the inbox and are delivered again.
                tracing::warn!(error = %status.message(), count = acks.len(), "ack forward failed");
            }
            return;
        }
    };
    let ack_call = async {
        if acks.is_empty() {
            return;
        }
        let count = acks.len() as u64;
        match SaverClient::new(channel.clone())
            .ack(AckRequest { items: acks })
            .await
        {
            Ok(_) => metrics::counter!("pushgrid_room_acks_forwarded_total").increment(count),
            // The messages stay in the inbox and are delivered again.
            Err(status) => {
                tracing::warn!(error = %status.message(), count, "ack forward failed")
            }
        }
    };
    let handoff_call = async {
        if handoffs.is_empty() {
            return;
        }
        if let Err(status) = SaverClient::new(channel.clone())
            .delivered(DeliveredRequest { reports: handoffs })
            .await
        {
            tracing::debug!(error = %status.message(), "delivery reports not recorded");
        }
    };
    tokio::join!(ack_call, handoff_call);
}

fn batch_config() -> BatchConfig {
    BatchConfig {
        max_items: 512,
        queue: 8192,
        in_flight: 2,
        linger: Duration::ZERO,
    }
}

/// Reports nobody waits for: a deeper queue, since a full one drops, and a
/// linger, so that a quiet room sends its acknowledgements and delivery
/// records a few at a time (each call is a saver transaction).
fn sink_config() -> BatchConfig {
    BatchConfig {
        queue: 65_536,
        linger: Duration::from_millis(10),
        ..batch_config()
    }
}

/// Counts (and logs) a report a full sink refused: its peer is slow or down.
fn refused(kind: &'static str) {
    metrics::counter!("pushgrid_room_reports_dropped_total", "kind" => kind).increment(1);
    tracing::debug!(kind, "report queue full; report dropped");
}

impl Peers {
    pub fn new(cluster: Cluster) -> Peers {
        let pool = Arc::new(ChannelPool::new(2, cluster.credentials()));
        let online = BatcherMap::per_peer(
            pool.clone(),
            batch_config(),
            |channel, sessions: Vec<Session>| async move {
                let count = sessions.len();
                RegisterClient::new(channel)
                    .online(SessionBatch { sessions })
                    .await?;
                Ok(vec![(); count])
            },
        );
        let inboxes = BatcherMap::per_peer(
            pool.clone(),
            batch_config(),
            |channel, requests: Vec<PendingRequest>| async move {
                // Many users' inboxes in one answer: saver keeps it under
                // 32 MiB past the first read, which may hold up to 1,000
                // messages of 64 KiB.
                let response = SaverClient::new(channel)
                    .max_decoding_message_size(96 << 20)
                    .pending_many(PendingManyRequest { requests })
                    .await?;
                Ok(response.into_inner().answers)
            },
        );
        let offline = SinkMap::per_peer_sink(
            pool.clone(),
            sink_config(),
            |channel, sessions: Vec<Session>| async move {
                let count = sessions.len();
                let sent = match channel {
                    Ok(channel) => RegisterClient::new(channel)
                        .offline(SessionBatch { sessions })
                        .await
                        .map(drop),
                    Err(status) => Err(status),
                };
                if let Err(status) = sent {
                    // register drops a dead room's sessions by its lease, and a
                    // stale session only costs a missed delivery attempt.
                    tracing::warn!(error = %status.message(), count, "offline reports failed");
                }
            },
        );
        let reports = SinkMap::per_peer_sink(pool.clone(), sink_config(), send_reports);
        let states = SinkMap::per_peer_sink(
            pool.clone(),
            sink_config(),
            |channel, events: Vec<StateEvent>| async move {
                let sent = match channel {
                    Ok(channel) => CoordinatorClient::new(channel)
                        .state_changes(StateBatch { events })
                        .await
                        .map(drop),
                    Err(status) => Err(status),
                };
                if let Err(status) = sent {
                    tracing::debug!(error = %status.message(), "state events not delivered");
                }
            },
        );
        Peers {
            cluster,
            pool,
            online,
            inboxes,
            offline,
            reports,
            states,
            background: TaskTracker::new(),
        }
    }

    fn register_addr(&self, app: &str, user: &str) -> Result<String, Status> {
        let view = self.cluster.view();
        view.register_for(app, user)
            .map(|node| node.grpc_addr.clone())
            .ok_or_else(|| RoomError::NoPeer("register").into())
    }

    fn addr_of(&self, role: Role, app: &str, user: &str) -> Result<String, Status> {
        let view = self.cluster.view();
        view.pick(role, ring::user_key(app, user))
            .map(|node| node.grpc_addr.clone())
            .ok_or_else(|| RoomError::NoPeer(role_name(role)).into())
    }

    /// Reports a session; the device is routable once this returns Ok.
    pub async fn online(&self, session: Session) -> Result<(), Status> {
        let addr = self.register_addr(&session.app, &session.user)?;
        self.online.get(&addr).call(session).await
    }

    /// Reports a closed session, in the background.
    pub fn offline(&self, session: Session) {
        let Ok(addr) = self.register_addr(&session.app, &session.user) else {
            return;
        };
        if !self.offline.get(&addr).send(session) {
            // register drops the session with the room's lease, or at the
            // next delivery attempt that finds no connection.
            refused("offline");
        }
    }

    /// The user's unacked inbox (reads of many devices share a call).
    pub async fn pending(&self, app: &str, user: &str) -> Result<Vec<Message>, Status> {
        let addr = self.addr_of(Role::Saver, app, user)?;
        let request = PendingRequest {
            app: app.to_string(),
            user: user.to_string(),
            limit: PENDING_LIMIT,
        };
        let answer = self.inboxes.get(&addr).call(request).await?;
        if !answer.error.is_empty() {
            return Err(RoomError::PeerFailed(answer.error).into());
        }
        Ok(answer.messages)
    }

    /// A topic's stream after `since_offset` (saver pages it).
    pub async fn history(
        &self,
        app: &str,
        topic: &str,
        since_offset: u64,
        epoch: u64,
    ) -> Result<HistoryResponse, Status> {
        let addr = self.addr_of(Role::Saver, app, topic)?;
        let request = HistoryRequest {
            app: app.to_string(),
            topic: topic.to_string(),
            since_offset,
            epoch,
            limit: 1000,
        };
        Ok(SaverClient::new(self.pool.get(&addr)?)
            .history(request)
            .await?
            .into_inner())
    }

    /// Reports, in the background, that a unicast message was handed to a
    /// device's connection (message status; losing one costs only that detail).
    pub fn delivered(&self, app: &str, user: &str, device: &str, msg_id: u64) {
        self.report_delivery(DeliveryReport {
            app: app.to_string(),
            msg_id,
            device: device.to_string(),
            user: user.to_string(),
            at_ms: pushgrid_common::now_ms(),
            ..Default::default()
        });
    }

    /// Reports, in the background, that `count` connections of this room were
    /// handed broadcast `msg_id`.
    pub fn broadcast_delivered(&self, app: &str, msg_id: u64, count: u32) {
        if count == 0 {
            return;
        }
        self.report_delivery(DeliveryReport {
            app: app.to_string(),
            msg_id,
            broadcast: true,
            count,
            at_ms: pushgrid_common::now_ms(),
            ..Default::default()
        });
    }

    fn report_delivery(&self, report: DeliveryReport) {
        let key = if report.broadcast {
            report.msg_id.to_string()
        } else {
            report.user.clone()
        };
        let Ok(addr) = self.addr_of(Role::Saver, &report.app, &key) else {
            return;
        };
        if !self.reports.get(&addr).send(SaverReport::Delivered(report)) {
            refused("delivery");
        }
    }

    /// Forwards a device's ACK to saver, in the background.
    pub fn ack(&self, app: &str, user: &str, device: &str, msg_ids: Vec<u64>) {
        let addr = match self.addr_of(Role::Saver, app, user) {
            Ok(addr) => addr,
            Err(status) => {
                // The message stays in the inbox and is delivered again later.
                tracing::warn!(error = %status.message(), "ack dropped");
                return;
            }
        };
        let item = AckItem {
            app: app.to_string(),
            user: user.to_string(),
            msg_ids,
            device: device.to_string(),
            delivered_ms: Vec::new(),
        };
        if !self.reports.get(&addr).send(SaverReport::Ack(item)) {
            // The messages stay in the inbox: delivered again at the next
            // connect, and dropped by id in the SDK.
            refused("ack");
        }
    }

    /// Sends an online/offline event to coordinator, in the background.
    pub fn state(&self, event: StateEvent) {
        let Some(session) = event.session.as_ref() else {
            return;
        };
        let Ok(addr) = self.addr_of(Role::Coordinator, &session.app, &session.user) else {
            return;
        };
        if !self.states.get(&addr).send(event) {
            refused("state");
        }
    }

    /// Has coordinator kick the user's other connections of the same platform
    /// (the single-login policy), in the background.
    pub fn kick_older_logins(&self, session: &Session) {
        let Ok(addr) = self.addr_of(Role::Coordinator, &session.app, &session.user) else {
            return;
        };
        let request = KickRequest {
            app: session.app.clone(),
            user: session.user.clone(),
            device: String::new(),
            platform: session.platform.clone(),
            except_room: session.room.clone(),
            except_conn_id: session.conn_id,
            code: KickCode::SingleLogin as i32,
            reason: "logged in on another device".into(),
            since_ms: session.since_ms,
        };
        let Ok(channel) = self.pool.get(&addr) else {
            return;
        };
        self.background.spawn(async move {
            if let Err(status) = CoordinatorClient::new(channel).kick(request).await {
                tracing::warn!(error = %status.message(), "single-login kick failed");
            }
        });
    }

    /// Routes an UPSTREAM frame; Ok once the app's backend accepted it.
    pub async fn upstream(&self, request: UpstreamRequest) -> Result<(), Status> {
        let addr = self.addr_of(Role::Coordinator, &request.app, &request.user)?;
        CoordinatorClient::new(self.pool.get(&addr)?)
            .upstream(request)
            .await?;
        Ok(())
    }

    /// Stores a device's push token (issue 25) in saver.
    pub async fn register_push_token(
        &self,
        app: &str,
        token: pushgrid_proto::cluster::DevicePushToken,
    ) -> Result<(), Status> {
        let addr = self.addr_of(Role::Saver, app, &token.user)?;
        let request = pushgrid_proto::cluster::RegisterTokensRequest {
            app: app.to_string(),
            tokens: vec![token],
        };
        SaverClient::new(self.pool.get(&addr)?)
            .register_tokens(request)
            .await?;
        Ok(())
    }

    /// Waits (bounded) for background reports and acknowledgements to be
    /// sent, at shutdown.
    pub async fn flush(&self) {
        self.background.close();
        let sent = async {
            self.background.wait().await;
            while self.reports.pending() + self.offline.pending() + self.states.pending() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), sent).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handoff(msg_id: u64, device: &str, at_ms: u64) -> SaverReport {
        SaverReport::Delivered(DeliveryReport {
            app: "a".into(),
            msg_id,
            device: device.into(),
            user: "u".into(),
            at_ms,
            ..Default::default()
        })
    }

    fn ack(msg_ids: Vec<u64>, device: &str) -> SaverReport {
        SaverReport::Ack(AckItem {
            app: "a".into(),
            user: "u".into(),
            msg_ids,
            device: device.into(),
            delivered_ms: Vec::new(),
        })
    }

    #[test]
    fn a_hand_off_acked_in_the_same_batch_rides_on_its_ack() {
        let broadcast = SaverReport::Delivered(DeliveryReport {
            app: "a".into(),
            msg_id: 1,
            broadcast: true,
            count: 3,
            at_ms: 90,
            ..Default::default()
        });
        let batch = vec![
            broadcast,
            handoff(1, "d1", 100),
            handoff(2, "d1", 110),
            handoff(1, "d2", 120),
            // A second hand-off of message 1 to d1 (a redelivery): the first time counts.
            handoff(1, "d1", 130),
            ack(vec![1, 3], "d1"),
        ];
        let (left, acks) = fold_reports(batch);
        let left: Vec<(u64, &str, bool)> = left
            .iter()
            .map(|report| (report.msg_id, report.device.as_str(), report.broadcast))
            .collect();
        // Message 2 is not acked and d2 did not ack: their hand-offs stay.
        assert_eq!(
            left,
            vec![(1, "", true), (2, "d1", false), (1, "d2", false)]
        );
        assert_eq!(acks.len(), 1);
        assert_eq!(acks[0].msg_ids, vec![1, 3]);
        // Message 3 was handed off in an earlier batch: its time is unknown here.
        assert_eq!(acks[0].delivered_ms, vec![100, 0]);
    }

    #[test]
    fn acks_without_their_hand_offs_and_device_less_acks_are_left_alone() {
        let batch = vec![handoff(5, "d1", 100), ack(vec![6], "d1"), ack(vec![5], "")];
        let (left, acks) = fold_reports(batch);
        assert_eq!(
            left.len(),
            1,
            "the hand-off of 5 stays: no ACK of d1 names it"
        );
        assert_eq!(acks.len(), 2);
        assert!(acks.iter().all(|item| item.delivered_ms.is_empty()));
    }
}
