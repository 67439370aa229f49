//! The pushgrid device SDK.
//!
//! * [`Client`]: the long-lived, reconnecting client an application uses: room
//!   discovery through the dispatcher, AUTH, heartbeats, reconnect with jittered
//!   backoff, KICK handling, duplicate filtering, acks and upstream messages.
//! * [`Connection`]: one raw TCP connection speaking the frame protocol, for tests
//!   and tools that need to control every frame.
//!
//! The frame codec is [`pushgrid_wire`]; the frame bodies are re-exported as [`msg`].

mod backoff;
mod client;
mod connection;
mod dedup;
mod dispatch;
mod error;

pub use backoff::Backoff;
pub use client::{Client, ClientConfig, ClientStats, Event};
pub use connection::{ConnectOptions, Connection};
pub use dedup::{DedupFilter, Seen};
pub use dispatch::{Dispatch, DispatchedRoom, dispatch, parse_dispatch, user_from_token};
pub use error::ClientError;
pub use pushgrid_wire::{Frame, Op, msg};
