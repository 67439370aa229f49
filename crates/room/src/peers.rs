//! The room's clients of register, saver and coordinator. Small, frequent
//! calls (sessions, acks, state events) go through per-peer batchers.

use std::sync::Arc;
use std::time::Duration;

use pushgrid_common::batch::{BatchConfig, BatcherMap, SinkMap};
use pushgrid_common::cluster::Cluster;
use pushgrid_common::ring;
use pushgrid_common::rpc::ChannelPool;
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
    acks: SinkMap<AckItem>,
    /// Hand-offs to devices, for message status (issue 12).
    deliveries: SinkMap<DeliveryReport>,
    states: SinkMap<StateEvent>,
    background: TaskTracker,
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
        let acks = SinkMap::per_peer_sink(
            pool.clone(),
            sink_config(),
            |channel, items: Vec<AckItem>| async move {
                let count = items.len() as u64;
                let sent = match channel {
                    Ok(channel) => SaverClient::new(channel)
                        .ack(AckRequest { items })
                        .await
                        .map(drop),
                    Err(status) => Err(status),
                };
                match sent {
                    Ok(()) => {
                        metrics::counter!("pushgrid_room_acks_forwarded_total").increment(count)
                    }
                    // The messages stay in the inbox and are delivered again.
                    Err(status) => {
                        tracing::warn!(error = %status.message(), count, "ack forward failed")
                    }
                }
            },
        );
        let deliveries = SinkMap::per_peer_sink(
            pool.clone(),
            sink_config(),
            |channel, reports: Vec<DeliveryReport>| async move {
                let sent = match channel {
                    Ok(channel) => SaverClient::new(channel)
                        .delivered(DeliveredRequest { reports })
                        .await
                        .map(drop),
                    Err(status) => Err(status),
                };
                if let Err(status) = sent {
                    tracing::debug!(error = %status.message(), "delivery reports not recorded");
                }
            },
        );
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
            acks,
            deliveries,
            states,
            background: TaskTracker::new(),
        }
    }

    fn register_addr(&self, app: &str, user: &str) -> Result<String, Status> {
        let view = self.cluster.view();
        view.register_for(app, user)
            .map(|node| node.grpc_addr.clone())
            .ok_or_else(|| Status::unavailable("no register is live"))
    }

    fn addr_of(&self, role: Role, app: &str, user: &str) -> Result<String, Status> {
        let view = self.cluster.view();
        view.pick(role, ring::user_key(app, user))
            .map(|node| node.grpc_addr.clone())
            .ok_or_else(|| Status::unavailable(format!("no {} is live", role.as_str_name())))
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
            return Err(Status::unavailable(answer.error));
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
        if !self.deliveries.get(&addr).send(report) {
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
        };
        if !self.acks.get(&addr).send(item) {
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
            while self.acks.pending()
                + self.offline.pending()
                + self.states.pending()
                + self.deliveries.pending()
                > 0
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), sent).await;
    }
}
