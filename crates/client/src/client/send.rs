//! Writing to the room: every write under [`WRITE_TIMEOUT`], acks in
//! chunks, upstreams numbered and remembered until answered, the push token.

use std::collections::HashMap;

use pushgrid_wire::{Op, encode, msg};
use tracing::debug;

use super::worker::{InFlight, Worker};
use super::{ACK_CHUNK, MAX_IN_FLIGHT_UPSTREAMS, UpstreamRequest, WRITE_TIMEOUT};
use crate::connection::Connection;
use crate::error::ClientError;
use crate::event::bump;

impl Worker {
    pub(super) fn next_seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        if self.next_seq == 0 {
            self.next_seq = 1;
        }
        self.next_seq
    }

    pub(super) async fn send_acks(
        &self,
        connection: &mut Connection,
        msg_ids: &[u64],
    ) -> Result<(), String> {
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
    pub(super) async fn send_upstream(
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

    /// Sends the device's push token, if one is set, with a fresh seq.
    pub(super) async fn send_push_token(
        &mut self,
        connection: &mut Connection,
    ) -> Result<(), String> {
        let seq = self.next_seq();
        let Some((push_token, sent_seq)) = self.push_token.as_mut() else {
            return Ok(());
        };
        *sent_seq = seq;
        write(connection, &encode(Op::PushToken, seq, push_token)).await
    }
}

/// Writes a frame under [`WRITE_TIMEOUT`]; the error is a disconnect reason.
pub(super) async fn write(connection: &mut Connection, bytes: &[u8]) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, connection.send_raw(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("write failed: {error}")),
        Err(_) => Err(format!("write blocked for {WRITE_TIMEOUT:?}")),
    }
}

/// Sends SUB (offset 0, epoch 0: a first subscription).
pub(super) async fn send_sub(connection: &mut Connection, sub: msg::Sub) -> Result<(), String> {
    write(connection, &pushgrid_wire::encode(Op::Sub, 0, &sub)).await
}
