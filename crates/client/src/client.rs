//! The high-level, long-lived, reconnecting client: its configuration
//! ([`ClientConfig`]) and the cheap handle ([`Client`]) that sends commands to
//! one background task. The task lives in the submodules: `worker` (state and
//! the reconnect loop), `connect` (finding and reaching a room), `session` (a
//! live connection), `frames` (what the server sends) and `send` (writes).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use pushgrid_wire::msg;
use tokio::sync::{mpsc, oneshot};

use crate::address::Transport;
use crate::connection::TlsOptions;
use crate::error::ClientError;
use crate::event::{ClientStats, Counters, Event};

mod connect;
mod frames;
mod send;
mod session;
mod worker;

use self::worker::Worker;

/// How a [`Client`] finds rooms, authenticates and behaves. Build it with
/// [`ClientConfig::new`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL of a dispatcher (`http://127.0.0.1:8070`). When set, rooms come
    /// from `GET {dispatcher}/v1/dispatch?user=..`, tried in the order given.
    pub dispatcher: Option<String>,
    /// Direct room addresses, tried in order when there is no dispatcher, or
    /// when the dispatcher cannot be reached: `host:port` or `tcp://host:port`,
    /// `tls://host:port`, `ws://host:port/path`, `wss://host:port/path` (see
    /// [`RoomAddress`]). A bad one stops the client at start.
    pub addrs: Vec<String>,
    /// The transport to use when the dispatcher offers several for a room
    /// (default plain TCP). A room without it is reached on the closest one it
    /// serves; a secure preference (`Tls`, `Wss`) never falls back to a plain
    /// transport.
    pub transport: Transport,
    /// Certificate checks for `tls://` and `wss://` rooms: extra trusted roots
    /// (PEM files, DER bytes) and the server name (by default the address's host).
    pub tls: TlsOptions,
    /// The user id sent to the dispatcher; by default the token's `sub` claim.
    pub user: Option<String>,
    /// The JWT sent in AUTH.
    pub token: String,
    pub device_id: String,
    pub platform: String,
    /// Acknowledge each unicast/multicast push right after it was handed to the
    /// application (the event was queued).
    pub auto_ack: bool,
    /// Ping interval; by default the `heartbeat_secs` the server sent in AUTH_OK.
    pub heartbeat: Option<Duration>,
    /// First reconnect delay (jittered, doubled after each failure).
    pub reconnect_backoff_min: Duration,
    /// Largest reconnect delay.
    pub reconnect_backoff_max: Duration,
    /// Limit on opening the connection to one room (TCP, TLS and WebSocket
    /// handshakes together).
    pub connect_timeout: Duration,
    /// Limit on the wait for AUTH_OK.
    pub auth_timeout: Duration,
    /// How long [`Client::upstream`] waits for UPSTREAM_OK or ERROR (including
    /// time spent waiting for a connection).
    pub upstream_timeout: Duration,
    /// How many recent message ids the duplicate filter remembers.
    pub dedup_capacity: usize,
    /// Capacity of the event channel. When the application stops reading events
    /// the SDK stops reading the socket (TCP back-pressure, nothing is dropped).
    pub event_capacity: usize,
    /// Largest frame body accepted or sent.
    pub max_body: u32,
    /// Stop for good (no reconnect) after a `KICK_CODE_SINGLE_LOGIN`: a newer login
    /// of this device took over, and reconnecting would kick it in turn.
    pub stop_on_single_login: bool,
}

impl ClientConfig {
    /// Defaults: platform `"rust"`, manual acks, server heartbeat, backoff from
    /// 500 ms to 30 s, 10 s upstream timeout, 10,000 remembered ids.
    pub fn new(token: impl Into<String>, device_id: impl Into<String>) -> ClientConfig {
        ClientConfig {
            dispatcher: None,
            addrs: Vec::new(),
            transport: Transport::Tcp,
            tls: TlsOptions::default(),
            user: None,
            token: token.into(),
            device_id: device_id.into(),
            platform: "rust".into(),
            auto_ack: false,
            heartbeat: None,
            reconnect_backoff_min: Duration::from_millis(500),
            reconnect_backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            auth_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(10),
            dedup_capacity: 10_000,
            event_capacity: 1024,
            max_body: pushgrid_wire::DEFAULT_MAX_BODY,
            stop_on_single_login: true,
        }
    }
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig::new("", "")
    }
}

enum Command {
    Ack(Vec<u64>),
    Subscribe(String),
    Unsubscribe(String),
    Upstream(UpstreamRequest),
    PushToken(msg::PushToken),
    Reconnect,
    Close(oneshot::Sender<()>),
}

struct UpstreamRequest {
    upstream: msg::Upstream,
    reply: oneshot::Sender<Result<(), ClientError>>,
}

/// Capacity of the command channel from [`Client`] handles to the task.
const COMMAND_CAPACITY: usize = 256;
/// Acks kept while disconnected (oldest dropped first; the server redelivers
/// those and the duplicate filter re-acks them).
const MAX_PENDING_ACKS: usize = 10_000;
/// Upstream messages waiting for a connection.
const MAX_QUEUED_UPSTREAMS: usize = 256;
/// Upstream messages sent and not answered yet, per connection.
const MAX_IN_FLIGHT_UPSTREAMS: usize = 1024;
/// Ids per ACK frame (10 bytes per varint at most: well under 64 KiB).
const ACK_CHUNK: usize = 4096;
/// A write that does not finish in this time means the connection is dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that lived this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// A long-lived device connection: resolves rooms (dispatcher or direct
/// addresses), authenticates, pings, reconnects with jittered exponential backoff,
/// obeys KICK, filters duplicate pushes and tracks acks. Cheap to clone; every
/// clone drives the same background task.
///
/// ```no_run
/// use pushgrid_client::{Client, ClientConfig, Event};
///
/// # async fn example() -> Result<(), pushgrid_client::ClientError> {
/// let mut config = ClientConfig::new("<jwt>", "phone-1");
/// config.dispatcher = Some("http://127.0.0.1:8070".into());
/// let (client, mut events) = Client::start(config);
/// while let Some(event) = events.recv().await {
///     match event {
///         Event::Push(push) => {
///             println!("{}", String::from_utf8_lossy(&push.payload));
///             client.ack(vec![push.msg_id]).await?;
///         }
///         Event::AuthFailed { message, .. } => eprintln!("refused: {message}"),
///         other => println!("{other:?}"),
///     }
/// }
/// client.upstream("chat", "text", "m-1", b"hello".to_vec()).await?;
/// client.close().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    counters: Arc<Counters>,
    upstream_timeout: Duration,
    max_body: u32,
}

impl Client {
    /// Spawns the connection task on the current tokio runtime and returns the
    /// handle and the event channel. Never fails: problems arrive as events.
    pub fn start(config: ClientConfig) -> (Client, mpsc::Receiver<Event>) {
        let (command_sender, command_receiver) = mpsc::channel(COMMAND_CAPACITY);
        let (event_sender, event_receiver) = mpsc::channel(config.event_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let client = Client {
            commands: command_sender,
            counters: counters.clone(),
            upstream_timeout: config.upstream_timeout,
            max_body: config.max_body,
        };
        let worker = Worker::new(config, command_receiver, event_sender, counters);
        tokio::spawn(worker.run());
        (client, event_receiver)
    }

    /// Acknowledges messages: sent on the current connection, or queued and sent
    /// after the next AUTH_OK when disconnected. Acked ids that come again are
    /// re-acked automatically and not shown again.
    pub async fn ack(&self, msg_ids: Vec<u64>) -> Result<(), ClientError> {
        if msg_ids.is_empty() {
            return Ok(());
        }
        self.commands
            .send(Command::Ack(msg_ids))
            .await
            .map_err(|_| ClientError::ClientClosed)
    }

    /// Sends an UPSTREAM message (waiting for a connection if there is none) and
    /// waits for the server's UPSTREAM_OK (`Ok`) or ERROR
    /// ([`ClientError::UpstreamRefused`]), at most `upstream_timeout`.
    pub async fn upstream(
        &self,
        product: impl Into<String>,
        kind: impl Into<String>,
        client_msg_id: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        let upstream = msg::Upstream {
            product: product.into(),
            r#type: kind.into(),
            client_msg_id: client_msg_id.into(),
            payload: payload.into(),
        };
        let len = prost::Message::encoded_len(&upstream);
        if len > self.max_body as usize {
            return Err(ClientError::TooLarge {
                len,
                limit: self.max_body,
            });
        }
        let (reply, answer) = oneshot::channel();
        let deadline = tokio::time::sleep(self.upstream_timeout);
        tokio::pin!(deadline);
        tokio::select! {
            sent = self.commands.send(Command::Upstream(UpstreamRequest { upstream, reply })) => {
                sent.map_err(|_| ClientError::ClientClosed)?;
            }
            () = &mut deadline => return Err(ClientError::UpstreamTimeout(self.upstream_timeout)),
        }
        tokio::select! {
            result = answer => result.unwrap_or(Err(ClientError::ClientClosed)),
            () = &mut deadline => Err(ClientError::UpstreamTimeout(self.upstream_timeout)),
        }
    }

    /// Subscribes to a topic (`"all"` or `""`: the app-wide topic). The client
    /// remembers the last offset and epoch it received and, after every
    /// reconnect, subscribes again from there, so the server replays what was
    /// missed or says it cannot ([`Event::Subscribed`]).
    pub async fn subscribe(&self, topic: impl Into<String>) -> Result<(), ClientError> {
        let topic = normalize_topic(topic.into())?;
        self.commands
            .send(Command::Subscribe(topic))
            .await
            .map_err(|_| ClientError::ClientClosed)
    }

    /// Registers this device's platform notification token (issue 25):
    /// `provider` is `apns`, `fcm` or `hms`, `bundle` the app's bundle id or
    /// package name. Sent now if connected and again after every connect
    /// (the server answers PUSH_TOKEN_OK once it is stored); a later call
    /// replaces the token. A bad token is refused here, naming the field.
    pub async fn register_push_token(
        &self,
        provider: impl Into<String>,
        token: impl Into<String>,
        bundle: impl Into<String>,
    ) -> Result<(), ClientError> {
        let push_token = msg::PushToken {
            provider: provider.into(),
            token: token.into(),
            bundle: bundle.into(),
        };
        pushgrid_wire::check_push_token(
            &push_token.provider,
            &push_token.token,
            &push_token.bundle,
        )
        .map_err(ClientError::Protocol)?;
        self.commands
            .send(Command::PushToken(push_token))
            .await
            .map_err(|_| ClientError::ClientClosed)
    }

    /// Stops a subscription.
    pub async fn unsubscribe(&self, topic: impl Into<String>) -> Result<(), ClientError> {
        let topic = normalize_topic(topic.into())?;
        self.commands
            .send(Command::Unsubscribe(topic))
            .await
            .map_err(|_| ClientError::ClientClosed)
    }

    /// Drops the current connection and reconnects at once (no backoff), as after
    /// a network change. Does nothing while no connection is up.
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        self.commands
            .send(Command::Reconnect)
            .await
            .map_err(|_| ClientError::ClientClosed)
    }

    /// Stops the client: closes the connection, ends the task (the event channel
    /// then closes) and returns when it is done. Idempotent.
    pub async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.commands.send(Command::Close(done)).await.is_ok() {
            // An error means the task ended anyway.
            let _ = finished.await;
        }
    }

    /// True while a connection is authenticated.
    pub fn is_connected(&self) -> bool {
        self.counters.connected.load(Ordering::Relaxed)
    }

    /// True once the background task ended (closed, auth failure...).
    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    pub fn stats(&self) -> ClientStats {
        self.counters.snapshot()
    }
}

/// The server's topic rule, checked before sending (a refused SUB would end
/// the connection).
fn normalize_topic(topic: String) -> Result<String, ClientError> {
    pushgrid_wire::normalize_topic(&topic)
        .map(str::to_string)
        .map_err(ClientError::Protocol)
}
