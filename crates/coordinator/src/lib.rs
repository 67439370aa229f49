//! coordinator: carries device traffic to application backends.
//!
//! * UPSTREAM frames: POSTed as JSON to the app's webhook; the device gets
//!   UPSTREAM_OK once the webhook answered 2xx, else an ERROR frame.
//! * Online/offline events: collected per app and POSTed in batches, so a
//!   reconnect storm becomes a few requests, not one per device.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use pushgrid_common::cli::RoleConfig;
use pushgrid_common::cluster::Cluster;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::node;
use pushgrid_common::{CancellationToken, net, now_ms};
use pushgrid_proto::cluster::coordinator_server::{Coordinator, CoordinatorServer};
use pushgrid_proto::cluster::{
    Role, StateBatch, StateBatchResponse, StateEvent, UpstreamRequest, UpstreamResponse,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

pub const ROLE: &str = "coordinator";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatorConfig {
    #[serde(flatten)]
    pub node: NodeConfig,
    /// Time limit of one webhook request.
    pub webhook_timeout_ms: u64,
    /// State events held for sending before new ones are dropped (and counted).
    pub state_queue: usize,
    /// Most state events in one webhook request.
    pub state_batch_max: usize,
    /// How long state events are collected before a batch is sent.
    pub state_flush_ms: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            node: NodeConfig::with_ports(7003, 9003),
            webhook_timeout_ms: 5000,
            state_queue: 100_000,
            state_batch_max: 1000,
            state_flush_ms: 200,
        }
    }
}

impl RoleConfig for CoordinatorConfig {
    fn node(&self) -> &NodeConfig {
        &self.node
    }
}

pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &CoordinatorConfig) -> anyhow::Result<Listeners> {
        Ok(Listeners {
            grpc: net::bind(&config.node.listen).await?,
            admin: net::bind(&config.node.admin_listen).await?,
        })
    }
}

struct CoordinatorService {
    cluster: Cluster,
    http: reqwest::Client,
    states: mpsc::Sender<StateEvent>,
}

fn payload_fields(payload: &[u8]) -> serde_json::Value {
    let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
    match std::str::from_utf8(payload) {
        Ok(text) => json!({ "payload": text, "payload_b64": encoded }),
        Err(_) => json!({ "payload": null, "payload_b64": encoded }),
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn state_changes(
        &self,
        request: Request<StateBatch>,
    ) -> Result<Response<StateBatchResponse>, Status> {
        for event in request.into_inner().events {
            if self.states.try_send(event).is_err() {
                metrics::counter!("pushgrid_coordinator_state_events_dropped_total").increment(1);
            }
        }
        Ok(Response::new(StateBatchResponse {}))
    }

    async fn upstream(
        &self,
        request: Request<UpstreamRequest>,
    ) -> Result<Response<UpstreamResponse>, Status> {
        let upstream = request.into_inner();
        let view = self.cluster.view();
        let app = view
            .app(&upstream.app)
            .ok_or_else(|| Status::not_found(format!("unknown app {:?}", upstream.app)))?;
        if app.webhook_url.is_empty() {
            metrics::counter!("pushgrid_coordinator_upstream_total", "result" => "no_webhook")
                .increment(1);
            return Err(Status::failed_precondition(
                "the app has no webhook for upstream messages",
            ));
        }
        let mut body = json!({
            "event": "upstream",
            "app": upstream.app,
            "user": upstream.user,
            "device": upstream.device,
            "product": upstream.product,
            "type": upstream.r#type,
            "client_msg_id": upstream.client_msg_id,
            "at_ms": now_ms(),
        });
        if let (Some(body), serde_json::Value::Object(fields)) =
            (body.as_object_mut(), payload_fields(&upstream.payload))
        {
            body.extend(fields);
        }
        let started = tokio::time::Instant::now();
        let result = self.http.post(&app.webhook_url).json(&body).send().await;
        metrics::histogram!("pushgrid_coordinator_webhook_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(response) if response.status().is_success() => {
                metrics::counter!("pushgrid_coordinator_upstream_total", "result" => "ok")
                    .increment(1);
                Ok(Response::new(UpstreamResponse {}))
            }
            Ok(response) => {
                metrics::counter!("pushgrid_coordinator_upstream_total", "result" => "rejected")
                    .increment(1);
                Err(Status::unavailable(format!(
                    "the app's webhook answered {}",
                    response.status()
                )))
            }
            Err(error) => {
                metrics::counter!("pushgrid_coordinator_upstream_total", "result" => "error")
                    .increment(1);
                let reason = if error.is_timeout() {
                    "timed out".to_string()
                } else {
                    error.to_string()
                };
                Err(Status::unavailable(format!(
                    "the app's webhook failed: {reason}"
                )))
            }
        }
    }
}

/// Collects state events and POSTs them per app in batches.
async fn send_state_events(
    cluster: Cluster,
    http: reqwest::Client,
    mut events: mpsc::Receiver<StateEvent>,
    config: CoordinatorConfig,
) {
    let flush_every = Duration::from_millis(config.state_flush_ms.max(1));
    let mut batch: Vec<StateEvent> = Vec::new();
    loop {
        let Some(first) = events.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + flush_every;
        while batch.len() < config.state_batch_max {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(event)) => batch.push(event),
                _ => break,
            }
        }
        let mut by_app: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
        for event in batch.drain(..) {
            let Some(session) = event.session else {
                continue;
            };
            by_app.entry(session.app.clone()).or_default().push(json!({
                "user": session.user,
                "device": session.device,
                "platform": session.platform,
                "online": event.online,
                "at_ms": event.at_ms,
                "room": session.room,
                "conn_id": session.conn_id.to_string(),
            }));
        }
        let view = cluster.view();
        for (app_id, app_events) in by_app {
            let Some(app) = view.app(&app_id) else {
                continue;
            };
            if app.webhook_url.is_empty() {
                continue;
            }
            let count = app_events.len() as u64;
            let body = json!({ "event": "state", "app": app_id, "events": app_events });
            match http.post(&app.webhook_url).json(&body).send().await {
                Ok(response) if response.status().is_success() => {
                    metrics::counter!("pushgrid_coordinator_state_events_sent_total")
                        .increment(count);
                }
                Ok(response) => {
                    metrics::counter!("pushgrid_coordinator_state_events_failed_total")
                        .increment(count);
                    tracing::warn!(app = %app_id, status = %response.status(), "state webhook refused events");
                }
                Err(error) => {
                    metrics::counter!("pushgrid_coordinator_state_events_failed_total")
                        .increment(count);
                    tracing::warn!(app = %app_id, %error, "state webhook failed");
                }
            }
        }
    }
}

/// Runs coordinator until `shutdown`.
pub async fn run(
    config: CoordinatorConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let grpc_addr = listeners.grpc.local_addr()?;
    let endpoints = node::Endpoints {
        grpc: Some(grpc_addr),
        ..Default::default()
    };
    let cluster = node::start(
        ROLE,
        Role::Coordinator,
        &config.node,
        listeners.admin,
        endpoints,
        &[],
        &shutdown,
    )
    .await?;
    let node_id = cluster.node_id().to_string();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(config.webhook_timeout_ms.max(1)))
        .build()?;
    let (states, state_receiver) = mpsc::channel(config.state_queue.max(1));
    tokio::spawn(send_state_events(
        cluster.clone(),
        http.clone(),
        state_receiver,
        config.clone(),
    ));

    tracing::info!(node = %node_id, %grpc_addr, "coordinator serving");
    net::announce(ROLE, "ready", grpc_addr);
    let service = CoordinatorService {
        cluster: cluster.clone(),
        http,
        states,
    };
    let router = Server::builder().add_service(CoordinatorServer::new(service));
    let served = node::serve_grpc(router, listeners.grpc, &shutdown).await;
    cluster.leave().await;
    tracing::info!(node = %node_id, "coordinator stopped");
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_text_when_utf8_and_always_base64() {
        let text = payload_fields(b"hi");
        assert_eq!(text["payload"], "hi");
        assert_eq!(text["payload_b64"], "aGk=");
        let binary = payload_fields(&[0xff, 0x00]);
        assert!(binary["payload"].is_null());
        assert_eq!(binary["payload_b64"], "/wA=");
    }
}
