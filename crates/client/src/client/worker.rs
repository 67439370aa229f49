//! The connection task behind every [`Client`](super::Client) handle: its
//! state ([`Worker`]), the reconnect loop with its backoff, and what it does
//! between connections (queueing acks and upstreams, obeying `close()`).
//! Connecting is in `connect`, a live connection in `session` and `frames`.

use std::collections::VecDeque;
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pushgrid_wire::msg;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::connect::redirect_targets;
use super::{
    ClientConfig, Command, MAX_PENDING_ACKS, MAX_QUEUED_UPSTREAMS, STABLE_SESSION, UpstreamRequest,
};
use crate::address::{AddressError, RoomAddress};
use crate::backoff::Backoff;
use crate::connection::{Connection, TlsSettings};
use crate::dedup::DedupFilter;
use crate::dispatch::DispatchedRoom;
use crate::error::ClientError;
use crate::event::{Counters, Event};
use crate::topics::TopicStreams;

/// Why the task stopped waiting for something.
pub(super) enum Interrupt {
    /// `close()` was called (with its completion sender) or every handle dropped.
    Close(Option<oneshot::Sender<()>>),
    Reconnect,
}

/// How one connection ended.
pub(super) enum SessionEnd {
    Close(Option<oneshot::Sender<()>>),
    Reconnect,
    Lost(String),
    Kicked(msg::Kick),
    /// The event receiver was dropped: nobody listens, stop.
    EventsGone,
}

pub(super) enum ConnectOutcome {
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

pub(super) struct InFlight {
    pub(super) client_msg_id: String,
    pub(super) reply: oneshot::Sender<Result<(), ClientError>>,
}

pub(super) struct Worker {
    pub(super) config: ClientConfig,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) counters: Arc<Counters>,
    pub(super) dedup: DedupFilter,
    pub(super) backoff: Backoff,
    pub(super) pending_acks: VecDeque<u64>,
    pub(super) queued_upstreams: VecDeque<UpstreamRequest>,
    pub(super) next_seq: u32,
    pub(super) http: Option<reqwest::Client>,
    /// `config.addrs`, parsed at start.
    pub(super) configured: Vec<RoomAddress>,
    /// `config.tls` made ready, the first time a TLS room is tried.
    pub(super) tls: Option<TlsSettings>,
    /// Room addresses from the dispatcher (one per room, on the preferred
    /// transport) and when they expire.
    pub(super) dispatched: Option<(Vec<RoomAddress>, Instant)>,
    /// The rooms of the last dispatcher answer, to tell the transport of a
    /// KICK's bare `reconnect_to`.
    pub(super) known_rooms: Vec<DispatchedRoom>,
    /// Where a KICK told us to go next, in the order to try.
    pub(super) redirect: Vec<RoomAddress>,
    /// Topics as ordered streams: positions (resent in SUB after every
    /// connect), held messages, duplicates by offset.
    pub(super) topics: TopicStreams,
    /// The device's push token and the seq it was last sent with, resent
    /// after every connect.
    pub(super) push_token: Option<(msg::PushToken, u32)>,
}

impl Worker {
    pub(super) fn new(
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

    pub(super) async fn run(mut self) {
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
        if !self.parse_configured_addresses().await {
            return None;
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
            let next = match self.connect_any().await {
                ConnectOutcome::Close(done) => ControlFlow::Break(done),
                ConnectOutcome::AuthFailed { code, message } => {
                    warn!(code = code.as_str_name(), %message, "authentication refused; stopping");
                    let _ = self.events.send(Event::AuthFailed { code, message }).await;
                    ControlFlow::Break(None)
                }
                ConnectOutcome::AllFailed(reason) => {
                    ControlFlow::Continue(self.connect_failed(reason))
                }
                ConnectOutcome::Connected {
                    connection,
                    auth_ok,
                } => self.run_session(*connection, auth_ok).await,
            };
            match next {
                ControlFlow::Continue(next_wait) => wait = next_wait,
                ControlFlow::Break(done) => return done,
            }
        }
    }

    /// Parses `config.addrs` once, so a typo in a fallback address is reported
    /// now, not in the outage that would have needed it. False: stop.
    async fn parse_configured_addresses(&mut self) -> bool {
        if self.config.dispatcher.is_none() && self.config.addrs.is_empty() {
            let reason = "no dispatcher and no room address configured".to_owned();
            warn!("{reason}");
            let _ = self.events.send(Event::Disconnected { reason }).await;
            return false;
        }
        let parsed: Result<Vec<RoomAddress>, AddressError> = self
            .config
            .addrs
            .iter()
            .map(|addr| RoomAddress::parse(addr))
            .collect();
        match parsed {
            Ok(addresses) => {
                self.configured = addresses;
                true
            }
            Err(error) => {
                let reason = error.to_string();
                warn!("{reason}; stopping");
                let _ = self.events.send(Event::Disconnected { reason }).await;
                false
            }
        }
    }

    /// No room answered: forget the dispatcher's answer and back off.
    /// Returns the wait before the next attempt.
    fn connect_failed(&mut self, reason: String) -> Duration {
        self.dispatched = None;
        let wait = self.backoff.next_delay();
        warn!(%reason, ?wait, "no room reachable");
        // Informational: never block the task on a slow reader here.
        let _ = self.events.try_send(Event::ConnectFailed {
            reason,
            retry_in: wait,
        });
        wait
    }

    /// Serves one connection to its end. `Continue` holds the wait before
    /// the next connect, `Break` stops the task (with the `close()` sender).
    async fn run_session(
        &mut self,
        connection: Connection,
        auth_ok: msg::AuthOk,
    ) -> ControlFlow<Option<oneshot::Sender<()>>, Duration> {
        let started = Instant::now();
        let current = connection.address().clone();
        let end = self.session(connection, auth_ok).await;
        self.counters.connected.store(false, Ordering::Relaxed);
        if started.elapsed() >= STABLE_SESSION {
            self.backoff.reset();
        }
        match end {
            SessionEnd::Close(done) => ControlFlow::Break(done),
            SessionEnd::EventsGone => {
                info!("event receiver dropped; stopping");
                ControlFlow::Break(None)
            }
            SessionEnd::Reconnect => {
                info!("reconnect requested");
                let event = Event::Disconnected {
                    reason: "reconnect requested".into(),
                };
                if !self.emit(event).await {
                    return ControlFlow::Break(None);
                }
                ControlFlow::Continue(Duration::ZERO)
            }
            SessionEnd::Lost(reason) => {
                let wait = self.backoff.next_delay();
                info!(%reason, ?wait, "disconnected");
                if !self.emit(Event::Disconnected { reason }).await {
                    return ControlFlow::Break(None);
                }
                ControlFlow::Continue(wait)
            }
            SessionEnd::Kicked(kick) => self.after_kick(kick, &current).await,
        }
    }

    /// A KICK ended the session: follow its `reconnect_to` and
    /// `reconnect_after_ms`, or stop when another login of this device took
    /// over and `stop_on_single_login` is set.
    async fn after_kick(
        &mut self,
        kick: msg::Kick,
        current: &RoomAddress,
    ) -> ControlFlow<Option<oneshot::Sender<()>>, Duration> {
        let code = kick.code();
        let reason = format!("kicked ({}): {}", code.as_str_name(), kick.reason);
        info!(code = code.as_str_name(), reason = %kick.reason, after_ms = kick.reconnect_after_ms, to = %kick.reconnect_to, "kicked");
        if !kick.reconnect_to.is_empty() {
            match redirect_targets(&kick.reconnect_to, current, &self.known_rooms) {
                Ok(targets) => self.redirect = targets,
                Err(error) => {
                    warn!(%error, "ignoring the KICK's reconnect target");
                }
            }
        }
        let wait = if kick.reconnect_after_ms > 0 {
            Duration::from_millis(u64::from(kick.reconnect_after_ms))
        } else {
            self.backoff.next_delay()
        };
        if !self.emit(Event::Kicked(kick)).await || !self.emit(Event::Disconnected { reason }).await
        {
            return ControlFlow::Break(None);
        }
        if code == msg::KickCode::SingleLogin && self.config.stop_on_single_login {
            info!("another login of this device took over; stopping");
            return ControlFlow::Break(None);
        }
        ControlFlow::Continue(wait)
    }

    /// Sends an event; false when the receiver is gone.
    pub(super) async fn emit(&self, event: Event) -> bool {
        self.events.send(event).await.is_ok()
    }

    /// Runs `future` while serving commands: acks and upstreams are queued for the
    /// next connection; `reconnect()` interrupts only when `reconnect_interrupts`.
    pub(super) async fn idle<T>(
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

    pub(super) fn queue_acks(&mut self, msg_ids: Vec<u64>) {
        for msg_id in msg_ids {
            self.dedup.mark_acked(msg_id);
            if self.pending_acks.len() >= MAX_PENDING_ACKS {
                self.pending_acks.pop_front();
            }
            self.pending_acks.push_back(msg_id);
        }
    }

    pub(super) fn queue_upstream(&mut self, request: UpstreamRequest) {
        self.queued_upstreams
            .retain(|queued| !queued.reply.is_closed());
        if self.queued_upstreams.len() >= MAX_QUEUED_UPSTREAMS {
            let _ = request.reply.send(Err(ClientError::QueueFull));
            return;
        }
        self.queued_upstreams.push_back(request);
    }
}
