//! What the task does with each frame the server sends: PINGs answered,
//! PUSHes filtered for duplicates and acked, SUB_OKs and broadcasts put in
//! topic order, upstream answers and errors matched to their requests.

use std::collections::HashMap;

use pushgrid_wire::{Frame, Op, msg};
use tracing::{debug, warn};

use super::send::{send_sub, write};
use super::worker::{InFlight, SessionEnd, Worker};
use crate::connection::Connection;
use crate::dedup::Seen;
use crate::error::ClientError;
use crate::event::{Event, bump};
use crate::topics::{Delivery, Outcome};

impl Worker {
    /// Handles one frame from the server; `Some` ends the session.
    pub(super) async fn handle_frame(
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
            Op::SubOk => self.on_sub_ok(connection, frame).await,
            Op::UpstreamOk => self.on_upstream_ok(frame, in_flight).await,
            Op::Error => self.on_error(frame, in_flight).await,
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

    /// SUB_OK: the topic streams learn the server's position, then the
    /// device hears it was subscribed.
    async fn on_sub_ok(&mut self, connection: &mut Connection, frame: Frame) -> Option<SessionEnd> {
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

    /// UPSTREAM_OK: the upstream of that seq was accepted.
    async fn on_upstream_ok(
        &mut self,
        frame: Frame,
        in_flight: &mut HashMap<u32, InFlight>,
    ) -> Option<SessionEnd> {
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

    /// ERROR: the refusal of one upstream or of the push token (the session
    /// goes on), or of the connection (it ends).
    async fn on_error(
        &mut self,
        frame: Frame,
        in_flight: &mut HashMap<u32, InFlight>,
    ) -> Option<SessionEnd> {
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
}
