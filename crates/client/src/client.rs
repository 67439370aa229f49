//! The high-level, long-lived, reconnecting client.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use pushgrid_wire::{Frame, Op, encode, msg};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::address::{AddressError, RoomAddress, Transport};
use crate::backoff::Backoff;
use crate::connection::{ConnectOptions, Connection, TlsOptions, TlsSettings};
use crate::dedup::{DedupFilter, Seen};
use crate::dispatch::{DispatchedRoom, dispatch, user_from_token};
use crate::error::ClientError;
use crate::event::{ClientStats, Counters, Event, bump};
use crate::topics::{Delivery, Outcome, TopicStreams};

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

/// Why the task stopped waiting for something.
enum Interrupt {
    /// `close()` was called (with its completion sender) or every handle dropped.
    Close(Option<oneshot::Sender<()>>),
    Reconnect,
}

/// How one connection ended.
enum SessionEnd {
    Close(Option<oneshot::Sender<()>>),
    Reconnect,
    Lost(String),
    Kicked(msg::Kick),
    /// The event receiver was dropped: nobody listens, stop.
    EventsGone,
}

enum ConnectOutcome {
    /// Boxed: a connection is large next to the other outcomes.
    Connected {
        connection: Box<Connection>,
        auth_ok: msg::AuthOk,
    },
    AllFailed(String),
    AuthFailed {
        code: msg::ErrorCode,
        message: String,
    },
    Close(Option<oneshot::Sender<()>>),
}

/// The server's topic rule, checked before sending (a refused SUB would end
/// the connection).
fn normalize_topic(topic: String) -> Result<String, ClientError> {
    pushgrid_wire::normalize_topic(&topic)
        .map(str::to_string)
        .map_err(ClientError::Protocol)
}

struct InFlight {
    client_msg_id: String,
    reply: oneshot::Sender<Result<(), ClientError>>,
}

struct Worker {
    config: ClientConfig,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    dedup: DedupFilter,
    backoff: Backoff,
    pending_acks: VecDeque<u64>,
    queued_upstreams: VecDeque<UpstreamRequest>,
    next_seq: u32,
    http: Option<reqwest::Client>,
    /// `config.addrs`, parsed at start.
    configured: Vec<RoomAddress>,
    /// `config.tls` made ready, the first time a TLS room is tried.
    tls: Option<TlsSettings>,
    /// Room addresses from the dispatcher (one per room, on the preferred
    /// transport) and when they expire.
    dispatched: Option<(Vec<RoomAddress>, Instant)>,
    /// The rooms of the last dispatcher answer, to tell the transport of a
    /// KICK's bare `reconnect_to`.
    known_rooms: Vec<DispatchedRoom>,
    /// Where a KICK told us to go next, in the order to try.
    redirect: Vec<RoomAddress>,
    /// Topics as ordered streams: positions (resent in SUB after every
    /// connect), held messages, duplicates by offset.
    topics: TopicStreams,
    /// The device's push token and the seq it was last sent with, resent
    /// after every connect.
    push_token: Option<(msg::PushToken, u32)>,
}

impl Worker {
    fn new(
        config: ClientConfig,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        counters: Arc<Counters>,
    ) -> Worker {
        let http = match &config.dispatcher {
            None => None,
            Some(_) => match reqwest::Client::builder()
                .connect_timeout(config.connect_timeout)
                .timeout(config.connect_timeout * 2)
                .build()
            {
                Ok(http) => Some(http),
                Err(error) => {
                    warn!(%error, "cannot build the HTTP client for the dispatcher");
                    None
                }
            },
        };
        Worker {
            dedup: DedupFilter::new(config.dedup_capacity),
            backoff: Backoff::new(config.reconnect_backoff_min, config.reconnect_backoff_max),
            config,
            commands,
            events,
            counters,
            pending_acks: VecDeque::new(),
            queued_upstreams: VecDeque::new(),
            next_seq: 0,
            http,
            configured: Vec::new(),
            tls: None,
            dispatched: None,
            known_rooms: Vec::new(),
            redirect: Vec::new(),
            topics: TopicStreams::default(),
            push_token: None,
        }
    }

    async fn run(mut self) {
        let done = self.run_loop().await;
        self.counters.connected.store(false, Ordering::Relaxed);
        for request in self.queued_upstreams.drain(..) {
            let _ = request.reply.send(Err(ClientError::ClientClosed));
        }
        // Close the command channel before answering close(), so is_closed() holds.
        self.commands.close();
        if let Some(done) = done {
            let _ = done.send(());
        }
        debug!("client task finished");
    }

    /// Returns the `close()` completion sender, if a close caused the stop.
    async fn run_loop(&mut self) -> Option<oneshot::Sender<()>> {
        if self.config.dispatcher.is_none() && self.config.addrs.is_empty() {
            let reason = "no dispatcher and no room address configured".to_owned();
            warn!("{reason}");
            let _ = self.events.send(Event::Disconnected { reason }).await;
            return None;
        }
        // Parsed once; a typo in a fallback address is reported now, not in
        // the outage that would have needed it.
        let parsed: Result<Vec<RoomAddress>, AddressError> = self
            .config
            .addrs
            .iter()
            .map(|addr| RoomAddress::parse(addr))
            .collect();
        match parsed {
            Ok(addresses) => self.configured = addresses,
            Err(error) => {
                let reason = error.to_string();
                warn!("{reason}; stopping");
                let _ = self.events.send(Event::Disconnected { reason }).await;
                return None;
            }
        }
        let mut wait = Duration::ZERO;
        loop {
            if !wait.is_zero() {
                debug!(?wait, "waiting before reconnecting");
                if let Err(Interrupt::Close(done)) = self.idle(tokio::time::sleep(wait), true).await
                {
                    return done;
                }
            }
            match self.connect_any().await {
                ConnectOutcome::Close(done) => return done,
                ConnectOutcome::AuthFailed { code, message } => {
                    warn!(code = code.as_str_name(), %message, "authentication refused; stopping");
                    let _ = self.events.send(Event::AuthFailed { code, message }).await;
                    return None;
                }
                ConnectOutcome::AllFailed(reason) => {
                    self.dispatched = None;
                    wait = self.backoff.next_delay();
                    warn!(%reason, ?wait, "no room reachable");
                    // Informational: never block the task on a slow reader here.
                    let _ = self.events.try_send(Event::ConnectFailed {
                        reason,
                        retry_in: wait,
                    });
                }
                ConnectOutcome::Connected {
                    connection,
                    auth_ok,
                } => {
                    let started = Instant::now();
                    let current = connection.address().clone();
                    let end = self.session(*connection, auth_ok).await;
                    self.counters.connected.store(false, Ordering::Relaxed);
                    if started.elapsed() >= STABLE_SESSION {
                        self.backoff.reset();
                    }
                    match end {
                        SessionEnd::Close(done) => return done,
                        SessionEnd::EventsGone => {
                            info!("event receiver dropped; stopping");
                            return None;
                        }
                        SessionEnd::Reconnect => {
                            info!("reconnect requested");
                            if !self
                                .emit(Event::Disconnected {
                                    reason: "reconnect requested".into(),
                                })
                                .await
                            {
                                return None;
                            }
                            wait = Duration::ZERO;
                        }
                        SessionEnd::Lost(reason) => {
                            wait = self.backoff.next_delay();
                            info!(%reason, ?wait, "disconnected");
                            if !self.emit(Event::Disconnected { reason }).await {
                                return None;
                            }
                        }
                        SessionEnd::Kicked(kick) => {
                            let code = kick.code();
                            let reason =
                                format!("kicked ({}): {}", code.as_str_name(), kick.reason);
                            info!(code = code.as_str_name(), reason = %kick.reason, after_ms = kick.reconnect_after_ms, to = %kick.reconnect_to, "kicked");
                            if !kick.reconnect_to.is_empty() {
                                match redirect_targets(
                                    &kick.reconnect_to,
                                    &current,
                                    &self.known_rooms,
                                ) {
                                    Ok(targets) => self.redirect = targets,
                                    Err(error) => {
                                        warn!(%error, "ignoring the KICK's reconnect target");
                                    }
                                }
                            }
                            wait = if kick.reconnect_after_ms > 0 {
                                Duration::from_millis(u64::from(kick.reconnect_after_ms))
                            } else {
                                self.backoff.next_delay()
                            };
                            if !self.emit(Event::Kicked(kick)).await
                                || !self.emit(Event::Disconnected { reason }).await
                            {
                                return None;
                            }
                            if code == msg::KickCode::SingleLogin
                                && self.config.stop_on_single_login
                            {
                                info!("another login of this device took over; stopping");
                                return None;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sends an event; false when the receiver is gone.
    async fn emit(&self, event: Event) -> bool {
        self.events.send(event).await.is_ok()
    }

    /// Runs `future` while serving commands: acks and upstreams are queued for the
    /// next connection; `reconnect()` interrupts only when `reconnect_interrupts`.
    async fn idle<T>(
        &mut self,
        future: impl Future<Output = T>,
        reconnect_interrupts: bool,
    ) -> Result<T, Interrupt> {
        tokio::pin!(future);
        loop {
            tokio::select! {
                output = &mut future => return Ok(output),
                command = self.commands.recv() => match command {
                    None => return Err(Interrupt::Close(None)),
                    Some(Command::Close(done)) => return Err(Interrupt::Close(Some(done))),
                    Some(Command::Reconnect) => {
                        if reconnect_interrupts {
                            return Err(Interrupt::Reconnect);
                        }
                    }
                    Some(Command::Ack(msg_ids)) => self.queue_acks(msg_ids),
                    Some(Command::Upstream(request)) => self.queue_upstream(request),
                    Some(Command::PushToken(push_token)) => self.push_token = Some((push_token, 0)),
                    // Sent when the next connection is up.
                    Some(Command::Subscribe(topic)) => {
                        self.topics.subscribe(&topic);
                    }
                    Some(Command::Unsubscribe(topic)) => {
                        self.topics.unsubscribe(&topic);
                    }
                },
            }
        }
    }

    fn queue_acks(&mut self, msg_ids: Vec<u64>) {
        for msg_id in msg_ids {
            self.dedup.mark_acked(msg_id);
            if self.pending_acks.len() >= MAX_PENDING_ACKS {
                self.pending_acks.pop_front();
            }
            self.pending_acks.push_back(msg_id);
        }
    }

    fn queue_upstream(&mut self, request: UpstreamRequest) {
        self.queued_upstreams
            .retain(|queued| !queued.reply.is_closed());
        if self.queued_upstreams.len() >= MAX_QUEUED_UPSTREAMS {
            let _ = request.reply.send(Err(ClientError::QueueFull));
            return;
        }
        self.queued_upstreams.push_back(request);
    }

    /// Room addresses to try, in order: a KICK redirect, then the dispatcher's
    /// rooms (or the configured addresses when there is no dispatcher or it fails).
    async fn targets(&mut self) -> Result<Result<Vec<RoomAddress>, String>, Interrupt> {
        let mut addrs: Vec<RoomAddress> = std::mem::take(&mut self.redirect);
        let mut failure = None;
        if let Some(base) = self.config.dispatcher.clone() {
            match self.dispatched_addrs(&base).await? {
                Ok(dispatched) => addrs.extend(dispatched),
                Err(reason) => {
                    warn!(%reason, "dispatcher failed; falling back to configured addresses");
                    addrs.extend(self.configured.iter().cloned());
                    failure = Some(reason);
                }
            }
        } else {
            addrs.extend(self.configured.iter().cloned());
        }
        let mut unique = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if !unique.contains(&addr) {
                unique.push(addr);
            }
        }
        if unique.is_empty() {
            return Ok(Err(failure.unwrap_or_else(|| "no room address".into())));
        }
        Ok(Ok(unique))
    }

    async fn dispatched_addrs(
        &mut self,
        base: &str,
    ) -> Result<Result<Vec<RoomAddress>, String>, Interrupt> {
        if let Some((addrs, expires)) = &self.dispatched
            && Instant::now() < *expires
        {
            return Ok(Ok(addrs.clone()));
        }
        let Some(http) = self.http.clone() else {
            return Ok(Err("no HTTP client for the dispatcher".into()));
        };
        let Some(user) = self
            .config
            .user
            .clone()
            .or_else(|| user_from_token(&self.config.token))
        else {
            return Ok(Err("cannot tell the user id for the dispatcher: set ClientConfig::user or use a JWT with a sub claim".into()));
        };
        let base = base.to_owned();
        let answer = self
            .idle(async move { dispatch(&http, &base, &user).await }, false)
            .await?;
        match answer {
            Ok(dispatch) => {
                let preferred = self.config.transport;
                let addrs: Vec<RoomAddress> = dispatch
                    .rooms
                    .iter()
                    .filter_map(|room| room.preferred_address(preferred))
                    .collect();
                debug!(?addrs, "dispatcher answered");
                self.known_rooms = dispatch.rooms;
                if addrs.is_empty() {
                    return Ok(Err(format!(
                        "the dispatcher offered no room reachable over {preferred} \
                         (a tls or wss preference never falls back to plain tcp or ws)"
                    )));
                }
                if !dispatch.ttl.is_zero() {
                    self.dispatched = Some((addrs.clone(), Instant::now() + dispatch.ttl));
                }
                Ok(Ok(addrs))
            }
            Err(error) => Ok(Err(error.to_string())),
        }
    }

    async fn connect_any(&mut self) -> ConnectOutcome {
        let addrs = match self.targets().await {
            Err(Interrupt::Close(done)) => return ConnectOutcome::Close(done),
            Err(Interrupt::Reconnect) => return ConnectOutcome::AllFailed("interrupted".into()),
            Ok(Err(reason)) => return ConnectOutcome::AllFailed(reason),
            Ok(Ok(addrs)) => addrs,
        };
        let options = ConnectOptions {
            connect_timeout: self.config.connect_timeout,
            auth_timeout: self.config.auth_timeout,
            max_body: self.config.max_body,
            tls: self.config.tls.clone(),
        };
        let mut failures = Vec::new();
        for addr in addrs {
            let tls = if addr.transport().is_secure() {
                match self.tls_settings() {
                    Ok(tls) => Some(tls),
                    Err(error) => {
                        warn!(%addr, %error, "cannot connect over TLS");
                        failures.push(format!("{addr}: {error}"));
                        continue;
                    }
                }
            } else {
                None
            };
            let auth = msg::Auth {
                token: self.config.token.clone(),
                device_id: self.config.device_id.clone(),
                platform: self.config.platform.clone(),
            };
            let attempt = {
                let addr = addr.clone();
                let options = options.clone();
                async move { Connection::connect_prepared(&addr, auth, &options, tls.as_ref()).await }
            };
            match self.idle(attempt, false).await {
                Err(Interrupt::Close(done)) => return ConnectOutcome::Close(done),
                Err(Interrupt::Reconnect) => {}
                Ok(Ok((connection, auth_ok))) => {
                    return ConnectOutcome::Connected {
                        connection: Box::new(connection),
                        auth_ok,
                    };
                }
                Ok(Err(error)) if error.is_permanent_auth_failure() => {
                    if let ClientError::AuthRefused { code, message } = error {
                        return ConnectOutcome::AuthFailed { code, message };
                    }
                }
                Ok(Err(error)) => {
                    debug!(%addr, %error, "room attempt failed");
                    failures.push(format!("{addr}: {error}"));
                }
            }
        }
        ConnectOutcome::AllFailed(failures.join("; "))
    }

    /// The TLS settings, prepared on first use (a failure, such as an
    /// unreadable root file, is tried again next time).
    fn tls_settings(&mut self) -> Result<TlsSettings, ClientError> {
        if let Some(tls) = &self.tls {
            return Ok(tls.clone());
        }
        let tls = self.config.tls.prepare()?;
        self.tls = Some(tls.clone());
        Ok(tls)
    }

    fn next_seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        if self.next_seq == 0 {
            self.next_seq = 1;
        }
        self.next_seq
    }

    async fn session(&mut self, mut connection: Connection, auth_ok: msg::AuthOk) -> SessionEnd {
        let addr = connection.address().to_string();
        let first = self.counters.connects.fetch_add(1, Ordering::Relaxed) == 0;
        if !first {
            bump(&self.counters.reconnects, 1);
        }
        self.counters.connected.store(true, Ordering::Relaxed);
        let heartbeat = self
            .config
            .heartbeat
            .unwrap_or_else(|| Duration::from_secs(u64::from(auth_ok.heartbeat_secs.max(1))));
        debug!(conn_id = auth_ok.conn_id, room = %addr, ?heartbeat, "connected");
        if !self
            .emit(Event::Connected {
                conn_id: auth_ok.conn_id,
                room_addr: addr,
                heartbeat,
            })
            .await
        {
            return SessionEnd::EventsGone;
        }
        let mut in_flight: HashMap<u32, InFlight> = HashMap::new();
        let end = self.serve(&mut connection, heartbeat, &mut in_flight).await;
        self.topics.session_ended();
        let _ = tokio::time::timeout(Duration::from_millis(200), connection.shutdown()).await;
        let mut answered: Vec<(u32, InFlight)> = in_flight.drain().collect();
        answered.sort_by_key(|(seq, _)| *seq);
        for (seq, pending) in answered {
            let _ = pending.reply.send(Err(ClientError::Disconnected));
            let event = Event::UpstreamAck {
                seq,
                client_msg_id: pending.client_msg_id,
                ok: false,
                error: Some(ClientError::Disconnected.to_string()),
            };
            if !self.emit(event).await {
                return SessionEnd::EventsGone;
            }
        }
        end
    }

    async fn serve(
        &mut self,
        connection: &mut Connection,
        heartbeat: Duration,
        in_flight: &mut HashMap<u32, InFlight>,
    ) -> SessionEnd {
        // What was queued while disconnected goes first.
        let acks: Vec<u64> = self.pending_acks.drain(..).collect();
        if let Err(reason) = self.send_acks(connection, &acks).await {
            self.queue_acks(acks);
            return SessionEnd::Lost(reason);
        }
        while let Some(request) = self.queued_upstreams.pop_front() {
            if let Err(reason) = self.send_upstream(connection, request, in_flight).await {
                return SessionEnd::Lost(reason);
            }
        }
        for sub in self.topics.resubscriptions() {
            if let Err(reason) = send_sub(connection, sub).await {
                return SessionEnd::Lost(reason);
            }
        }
        if let Err(reason) = self.send_push_token(connection).await {
            return SessionEnd::Lost(reason);
        }

        // The server closes after 2.5 heartbeats of silence; so do we, with slack.
        let silence_limit = heartbeat * 3;
        let mut last_heard = Instant::now();
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    None => return SessionEnd::Close(None),
                    Some(Command::Close(done)) => return SessionEnd::Close(Some(done)),
                    Some(Command::Reconnect) => return SessionEnd::Reconnect,
                    Some(Command::Ack(msg_ids)) => {
                        for msg_id in &msg_ids {
                            self.dedup.mark_acked(*msg_id);
                        }
                        if let Err(reason) = self.send_acks(connection, &msg_ids).await {
                            self.queue_acks(msg_ids);
                            return SessionEnd::Lost(reason);
                        }
                    }
                    Some(Command::Upstream(request)) => {
                        if let Err(reason) = self.send_upstream(connection, request, in_flight).await {
                            return SessionEnd::Lost(reason);
                        }
                    }
                    Some(Command::PushToken(push_token)) => {
                        self.push_token = Some((push_token, 0));
                        if let Err(reason) = self.send_push_token(connection).await {
                            return SessionEnd::Lost(reason);
                        }
                    }
                    Some(Command::Subscribe(topic)) => {
                        if self.topics.subscribe(&topic)
                            && let Err(reason) = send_sub(connection, self.topics.sub(&topic)).await
                        {
                            return SessionEnd::Lost(reason);
                        }
                    }
                    Some(Command::Unsubscribe(topic)) => {
                        if self.topics.unsubscribe(&topic) {
                            let unsub = pushgrid_wire::encode(Op::Unsub, 0, &msg::Unsub { topic });
                            if let Err(reason) = write(connection, &unsub).await {
                                return SessionEnd::Lost(reason);
                            }
                        }
                    }
                },
                frame = connection.next_frame() => {
                    last_heard = Instant::now();
                    match frame {
                        Ok(Some(frame)) => {
                            if let Some(end) = self.handle_frame(connection, frame, in_flight).await {
                                return end;
                            }
                        }
                        Ok(None) => return SessionEnd::Lost("connection closed by server".into()),
                        Err(error) => return SessionEnd::Lost(error.to_string()),
                    }
                }
                _ = ticker.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        return SessionEnd::Lost(format!("no frame from the server for {silence_limit:?}"));
                    }
                    in_flight.retain(|_, pending| !pending.reply.is_closed());
                    if let Err(reason) = write(connection, &pushgrid_wire::encode_empty(Op::Ping, 0)).await {
                        return SessionEnd::Lost(reason);
                    }
                }
            }
        }
    }

    /// Handles one frame from the server; `Some` ends the session.
    async fn handle_frame(
        &mut self,
        connection: &mut Connection,
        frame: Frame,
        in_flight: &mut HashMap<u32, InFlight>,
    ) -> Option<SessionEnd> {
        match frame.op {
            Op::Pong => None,
            Op::Ping => write(
                connection,
                &pushgrid_wire::encode_empty(Op::Pong, frame.seq),
            )
            .await
            .err()
            .map(SessionEnd::Lost),
            Op::Push => {
                let push: msg::Push = match frame.decode() {
                    Ok(push) => push,
                    Err(error) => {
                        return Some(SessionEnd::Lost(format!("undecodable PUSH: {error}")));
                    }
                };
                self.handle_push(connection, push).await
            }
            Op::SubOk => {
                let ok: msg::SubOk = match frame.decode() {
                    Ok(ok) => ok,
                    Err(error) => {
                        return Some(SessionEnd::Lost(format!("undecodable SUB_OK: {error}")));
                    }
                };
                let outcome = self.topics.on_sub_ok(&ok);
                let missed = outcome.missed;
                if missed {
                    warn!(topic = %ok.topic, to = ok.offset, "topic history lost for this device");
                }
                if let Some(end) = self.hand_over(connection, outcome).await {
                    return Some(end);
                }
                let event = Event::Subscribed {
                    topic: ok.topic,
                    recovered: ok.recovered,
                    missed,
                    offset: ok.offset,
                    epoch: ok.epoch,
                };
                if self.emit(event).await {
                    None
                } else {
                    Some(SessionEnd::EventsGone)
                }
            }
            Op::UpstreamOk => {
                let Some(pending) = in_flight.remove(&frame.seq) else {
                    debug!(seq = frame.seq, "UPSTREAM_OK for an unknown seq");
                    return None;
                };
                let _ = pending.reply.send(Ok(()));
                let event = Event::UpstreamAck {
                    seq: frame.seq,
                    client_msg_id: pending.client_msg_id,
                    ok: true,
                    error: None,
                };
                if self.emit(event).await {
                    None
                } else {
                    Some(SessionEnd::EventsGone)
                }
            }
            Op::Error => {
                let (code, message) = match frame.decode::<msg::Error>() {
                    Ok(error) => (error.code(), error.message),
                    Err(error) => (
                        msg::ErrorCode::Unspecified,
                        format!("undecodable ERROR: {error}"),
                    ),
                };
                if let Some(pending) = in_flight.remove(&frame.seq).filter(|_| frame.seq != 0) {
                    let failure = ClientError::UpstreamRefused { code, message };
                    let event = Event::UpstreamAck {
                        seq: frame.seq,
                        client_msg_id: pending.client_msg_id,
                        ok: false,
                        error: Some(failure.to_string()),
                    };
                    let _ = pending.reply.send(Err(failure));
                    return if self.emit(event).await {
                        None
                    } else {
                        Some(SessionEnd::EventsGone)
                    };
                }
                if frame.seq != 0
                    && self
                        .push_token
                        .as_ref()
                        .is_some_and(|(_, seq)| *seq == frame.seq)
                {
                    warn!(code = code.as_str_name(), %message, "push token not stored; resent after the next connect");
                    return None;
                }
                Some(SessionEnd::Lost(format!(
                    "server error ({}): {message}",
                    code.as_str_name()
                )))
            }
            Op::Kick => match frame.decode::<msg::Kick>() {
                Ok(kick) => Some(SessionEnd::Kicked(kick)),
                Err(error) => Some(SessionEnd::Lost(format!("undecodable KICK: {error}"))),
            },
            other => {
                debug!(op = ?other, "ignoring frame");
                None
            }
        }
    }

    /// A unicast or multicast PUSH: dropped when its id was seen (an acked
    /// one is acked again), else handed over (and acked with `auto_ack`).
    /// Broadcasts go through the topic streams ([`Self::hand_over`]).
    async fn handle_push(
        &mut self,
        connection: &mut Connection,
        push: msg::Push,
    ) -> Option<SessionEnd> {
        if push.kind() == msg::PushKind::Broadcast {
            let outcome = self.topics.on_push(push);
            return self.hand_over(connection, outcome).await;
        }
        let msg_id = push.msg_id;
        let seen = if msg_id == 0 {
            Seen::New
        } else {
            self.dedup.check(msg_id)
        };
        match seen {
            Seen::DuplicateUnacked => {
                bump(&self.counters.duplicates_dropped, 1);
                debug!(msg_id, "duplicate push dropped (not acked yet)");
                None
            }
            Seen::DuplicateAcked => {
                bump(&self.counters.duplicates_dropped, 1);
                debug!(msg_id, "duplicate push of an acked message; acking again");
                self.send_acks(connection, &[msg_id])
                    .await
                    .err()
                    .map(SessionEnd::Lost)
            }
            Seen::New => {
                if !self.emit(Event::Push(push)).await {
                    return Some(SessionEnd::EventsGone);
                }
                bump(&self.counters.pushes_received, 1);
                if msg_id == 0 {
                    return None;
                }
                self.dedup.insert(msg_id);
                if !self.config.auto_ack {
                    return None;
                }
                self.dedup.mark_acked(msg_id);
                if let Err(reason) = self.send_acks(connection, &[msg_id]).await {
                    self.queue_acks(vec![msg_id]);
                    return Some(SessionEnd::Lost(reason));
                }
                None
            }
        }
    }

    /// What the topic streams released: the SUB asking for missing offsets,
    /// then the broadcasts (each message id once) and gaps, in order.
    async fn hand_over(
        &mut self,
        connection: &mut Connection,
        outcome: Outcome,
    ) -> Option<SessionEnd> {
        let counters = &self.counters;
        bump(&counters.duplicates_dropped, outcome.duplicates);
        bump(&counters.broadcasts_held, outcome.held);
        bump(&counters.broadcast_offsets_skipped, outcome.skipped());
        if let Some(sub) = outcome.resubscribe
            && let Err(reason) = send_sub(connection, sub).await
        {
            return Some(SessionEnd::Lost(reason));
        }
        for delivery in outcome.deliveries {
            let event = match delivery {
                Delivery::Gap {
                    topic,
                    epoch,
                    first,
                    last,
                } => {
                    warn!(%topic, epoch, first, last, "broadcast offsets will not arrive");
                    Event::BroadcastGap {
                        topic,
                        epoch,
                        first,
                        last,
                    }
                }
                Delivery::Push(push)
                    if push.msg_id != 0 && self.dedup.check(push.msg_id) != Seen::New =>
                {
                    bump(&self.counters.duplicates_dropped, 1);
                    continue;
                }
                Delivery::Push(push) => {
                    if push.msg_id != 0 {
                        self.dedup.insert(push.msg_id);
                    }
                    bump(&self.counters.pushes_received, 1);
                    Event::Push(push)
                }
            };
            if !self.emit(event).await {
                return Some(SessionEnd::EventsGone);
            }
        }
        None
    }

    async fn send_acks(&self, connection: &mut Connection, msg_ids: &[u64]) -> Result<(), String> {
        for chunk in msg_ids.chunks(ACK_CHUNK) {
            write(
                connection,
                &encode(
                    Op::Ack,
                    0,
                    &msg::Ack {
                        msg_ids: chunk.to_vec(),
                    },
                ),
            )
            .await?;
            bump(&self.counters.acks_sent, chunk.len() as u64);
        }
        Ok(())
    }

    /// Sends one UPSTREAM frame; `Err` is a dead connection (the request then gets
    /// [`ClientError::Disconnected`]).
    async fn send_upstream(
        &mut self,
        connection: &mut Connection,
        request: UpstreamRequest,
        in_flight: &mut HashMap<u32, InFlight>,
    ) -> Result<(), String> {
        if request.reply.is_closed() {
            return Ok(()); // the caller gave up waiting
        }
        if in_flight.len() >= MAX_IN_FLIGHT_UPSTREAMS {
            let _ = request.reply.send(Err(ClientError::QueueFull));
            return Ok(());
        }
        let seq = self.next_seq();
        let frame = encode(Op::Upstream, seq, &request.upstream);
        if let Err(reason) = write(connection, &frame).await {
            let _ = request.reply.send(Err(ClientError::Disconnected));
            return Err(reason);
        }
        debug!(seq, client_msg_id = %request.upstream.client_msg_id, "upstream sent");
        in_flight.insert(
            seq,
            InFlight {
                client_msg_id: request.upstream.client_msg_id,
                reply: request.reply,
            },
        );
        Ok(())
    }
}

/// Writes a frame under [`WRITE_TIMEOUT`]; the error is a disconnect reason.
impl Worker {
    /// Sends the device's push token, if one is set, with a fresh seq.
    async fn send_push_token(&mut self, connection: &mut Connection) -> Result<(), String> {
        let seq = self.next_seq();
        let Some((push_token, sent_seq)) = self.push_token.as_mut() else {
            return Ok(());
        };
        *sent_seq = seq;
        write(connection, &encode(Op::PushToken, seq, push_token)).await
    }
}

async fn write(connection: &mut Connection, bytes: &[u8]) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, connection.send_raw(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("write failed: {error}")),
        Err(_) => Err(format!("write blocked for {WRITE_TIMEOUT:?}")),
    }
}

/// Sends SUB (offset 0, epoch 0: a first subscription).
async fn send_sub(connection: &mut Connection, sub: msg::Sub) -> Result<(), String> {
    write(connection, &pushgrid_wire::encode(Op::Sub, 0, &sub)).await
}

/// Where a KICK's `reconnect_to` sends the device, in the order to try. An
/// address with a scheme names its transport. A bare `host:port` is, by the
/// room's rule, the target room's listener for the device's own transport when
/// that room has one, else its TCP listener: the last dispatcher answer tells
/// which when it lists the address, otherwise both are tried, the device's
/// transport first.
fn redirect_targets(
    reconnect_to: &str,
    current: &RoomAddress,
    known_rooms: &[DispatchedRoom],
) -> Result<Vec<RoomAddress>, AddressError> {
    let reconnect_to = reconnect_to.trim();
    if reconnect_to.contains("://") {
        return Ok(vec![RoomAddress::parse(reconnect_to)?]);
    }
    let bare = RoomAddress::parse(reconnect_to)?;
    if current.transport() == Transport::Tcp {
        return Ok(vec![bare]);
    }
    let listed = |transport: Transport| {
        known_rooms
            .iter()
            .filter_map(|room| room.address(transport))
            .find(|address| address.host() == bare.host() && address.port() == bare.port())
    };
    if let Some(address) = listed(current.transport()) {
        return Ok(vec![address]);
    }
    if let Some(address) = listed(Transport::Tcp) {
        return Ok(vec![address]);
    }
    Ok(vec![current.with_endpoint(bare.host(), bare.port()), bare])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn room(tcp: &str, ws: Option<&str>, wss: Option<&str>) -> DispatchedRoom {
        DispatchedRoom {
            node: "room".into(),
            tcp: Some(tcp.into()),
            ws: ws.map(Into::into),
            tls: None,
            wss: wss.map(Into::into),
        }
    }

    fn targets(reconnect_to: &str, current: &str, known: &[DispatchedRoom]) -> Vec<String> {
        let current = RoomAddress::parse(current).unwrap();
        redirect_targets(reconnect_to, &current, known)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_kick_target_keeps_the_transport_of_the_connection() {
        // Plain TCP: a bare address is the TCP listener.
        assert_eq!(
            targets("10.0.0.2:8090", "10.0.0.1:8090", &[]),
            ["10.0.0.2:8090"]
        );
        // An explicit scheme wins.
        assert_eq!(
            targets("wss://push.example/d", "10.0.0.1:8090", &[]),
            ["wss://push.example:443/d"]
        );
        // Unknown bare address from a WebSocket connection: the same
        // transport (and path) first, then TCP.
        assert_eq!(
            targets("10.0.0.2:8091", "ws://10.0.0.1:8091/push", &[]),
            ["ws://10.0.0.2:8091/push", "10.0.0.2:8091"]
        );
        assert_eq!(
            targets("10.0.0.2:8443", "tls://10.0.0.1:8443", &[]),
            ["tls://10.0.0.2:8443", "10.0.0.2:8443"]
        );
        // The dispatcher listed it: no guessing.
        let known = [room(
            "10.0.0.2:8090",
            Some("10.0.0.2:8091"),
            Some("10.0.0.2:8444"),
        )];
        assert_eq!(
            targets("10.0.0.2:8444", "wss://10.0.0.1:8444/", &known),
            ["wss://10.0.0.2:8444/"]
        );
        assert_eq!(
            targets("10.0.0.2:8090", "wss://10.0.0.1:8444/", &known),
            ["10.0.0.2:8090"]
        );
    }

    #[test]
    fn a_bad_kick_target_is_an_error() {
        let current = RoomAddress::parse("ws://10.0.0.1:8091/").unwrap();
        assert!(redirect_targets("not an address", &current, &[]).is_err());
        assert!(redirect_targets("gopher://x:1", &current, &[]).is_err());
    }
}
