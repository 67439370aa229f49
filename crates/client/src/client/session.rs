//! One live connection: announce it, send what was queued, then serve
//! commands, frames and heartbeats until it ends; afterwards fail the
//! upstreams it left unanswered. Frames themselves are handled in `frames`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pushgrid_wire::{Op, msg};
use tokio::time::Instant;
use tracing::debug;

use super::Command;
use super::send::{send_sub, write};
use super::worker::{InFlight, SessionEnd, Worker};
use crate::connection::Connection;
use crate::error::ClientError;
use crate::event::{Event, bump};

impl Worker {
    pub(super) async fn session(
        &mut self,
        mut connection: Connection,
        auth_ok: msg::AuthOk,
    ) -> SessionEnd {
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
        if let Err(reason) = self.send_queued(connection, in_flight).await {
            return SessionEnd::Lost(reason);
        }

        // The server closes after 2.5 heartbeats of silence; so do we, with slack.
        let silence_limit = heartbeat * 3;
        let mut last_heard = Instant::now();
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = self.commands.recv() => {
                    if let Some(end) = self.on_command(command, connection, in_flight).await {
                        return end;
                    }
                }
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

    /// What was queued while disconnected goes first: acks, upstreams, the
    /// topic subscriptions and the push token. `Err` is a dead connection.
    async fn send_queued(
        &mut self,
        connection: &mut Connection,
        in_flight: &mut HashMap<u32, InFlight>,
    ) -> Result<(), String> {
        let acks: Vec<u64> = self.pending_acks.drain(..).collect();
        if let Err(reason) = self.send_acks(connection, &acks).await {
            self.queue_acks(acks);
            return Err(reason);
        }
        while let Some(request) = self.queued_upstreams.pop_front() {
            self.send_upstream(connection, request, in_flight).await?;
        }
        for sub in self.topics.resubscriptions() {
            send_sub(connection, sub).await?;
        }
        self.send_push_token(connection).await
    }

    /// One command from a [`Client`](super::Client) handle while connected;
    /// `Some` ends the session.
    async fn on_command(
        &mut self,
        command: Option<Command>,
        connection: &mut Connection,
        in_flight: &mut HashMap<u32, InFlight>,
    ) -> Option<SessionEnd> {
        match command {
            None => return Some(SessionEnd::Close(None)),
            Some(Command::Close(done)) => return Some(SessionEnd::Close(Some(done))),
            Some(Command::Reconnect) => return Some(SessionEnd::Reconnect),
            Some(Command::Ack(msg_ids)) => {
                for msg_id in &msg_ids {
                    self.dedup.mark_acked(*msg_id);
                }
                if let Err(reason) = self.send_acks(connection, &msg_ids).await {
                    self.queue_acks(msg_ids);
                    return Some(SessionEnd::Lost(reason));
                }
            }
            Some(Command::Upstream(request)) => {
                if let Err(reason) = self.send_upstream(connection, request, in_flight).await {
                    return Some(SessionEnd::Lost(reason));
                }
            }
            Some(Command::PushToken(push_token)) => {
                self.push_token = Some((push_token, 0));
                if let Err(reason) = self.send_push_token(connection).await {
                    return Some(SessionEnd::Lost(reason));
                }
            }
            Some(Command::Subscribe(topic)) => {
                if self.topics.subscribe(&topic)
                    && let Err(reason) = send_sub(connection, self.topics.sub(&topic)).await
                {
                    return Some(SessionEnd::Lost(reason));
                }
            }
            Some(Command::Unsubscribe(topic)) => {
                if self.topics.unsubscribe(&topic) {
                    let unsub = pushgrid_wire::encode(Op::Unsub, 0, &msg::Unsub { topic });
                    if let Err(reason) = write(connection, &unsub).await {
                        return Some(SessionEnd::Lost(reason));
                    }
                }
            }
        }
        None
    }
}
