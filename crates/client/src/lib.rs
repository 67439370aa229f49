//! The pushgrid device SDK.
//!
//! * [`Client`]: the long-lived, reconnecting client an application uses: room
//!   discovery through the dispatcher, AUTH, heartbeats, reconnect with jittered
//!   backoff, KICK handling, duplicate filtering, acks and upstream messages.
//!   Broadcasts reach the application in offset order per topic, each offset
//!   once: the client holds a message that comes ahead of a missing offset,
//!   asks the room for the missing ones (SUB from its position) and says
//!   which offsets it gave up on ([`Event::BroadcastGap`]).
//! * [`Connection`]: one raw connection speaking the frame protocol, for tests
//!   and tools that need to control every frame.
//!
//! The frame codec is [`pushgrid_wire`]; the frame bodies are re-exported as [`msg`].
//!
//! # Transports
//!
//! A room serves the same frames over up to four transports, and a room
//! address names the one to use ([`RoomAddress`], [`Transport`]):
//!
//! | address | transport |
//! |---|---|
//! | `host:port`, `tcp://host:port` | plain TCP |
//! | `tls://host:port` | the frames inside TLS |
//! | `ws://host:port/path` | WebSocket: frames in binary messages (the room writes one frame per message; any split is accepted) |
//! | `wss://host:port/path` | WebSocket over TLS |
//!
//! TLS (rustls with the ring provider) trusts the public web roots plus any
//! roots in [`TlsOptions`] (PEM files or DER bytes), and checks the certificate
//! against the address's host unless [`TlsOptions::server_name`] says
//! otherwise. The dispatcher lists every transport a room serves;
//! [`ClientConfig::transport`] picks the one to use (plain TCP by default; a
//! room without it is reached on the closest one it has, and `tls`/`wss` never
//! fall back to a plain transport). A KICK's `reconnect_to` with a scheme is
//! followed as it is; a bare `host:port` means the target room's listener for
//! the device's own transport, or its TCP listener when it has none, so the
//! client tries it the way the last dispatcher answer lists it, else on its own
//! transport first and TCP second. When no address works, [`Event::ConnectFailed`]
//! says why (a refused connection, an untrusted certificate...).
//!
//! ```no_run
//! use pushgrid_client::{Client, ClientConfig, Event, Transport};
//!
//! # async fn example() -> Result<(), pushgrid_client::ClientError> {
//! let mut config = ClientConfig::new("<jwt>", "phone-1");
//! // Rooms from the dispatcher, over WebSocket-over-TLS where a room serves it...
//! config.dispatcher = Some("https://dispatch.example.com".into());
//! config.transport = Transport::Wss;
//! // ...or a room named directly, signed by a private CA.
//! config.addrs = vec!["tls://room-1.internal:8443".into()];
//! config.tls.root_pem_files.push("/etc/pushgrid/ca.pem".into());
//! let (client, mut events) = Client::start(config);
//! while let Some(event) = events.recv().await {
//!     match event {
//!         // Every address failed this round, e.g. an untrusted certificate.
//!         Event::ConnectFailed { reason, .. } => eprintln!("{reason}"),
//!         Event::Push(push) => client.ack(vec![push.msg_id]).await?,
//!         _ => {}
//!     }
//! }
//! # Ok::<(), pushgrid_client::ClientError>(())
//! # }
//! ```

mod address;
mod backoff;
mod client;
mod connection;
mod dedup;
mod dispatch;
mod error;
mod event;
mod topics;

pub use address::{AddressError, RoomAddress, Transport};
pub use backoff::Backoff;
pub use client::{Client, ClientConfig};
pub use connection::{ConnectOptions, Connection, TlsOptions};
pub use dedup::{DedupFilter, Seen};
pub use dispatch::{Dispatch, DispatchedRoom, dispatch, parse_dispatch, user_from_token};
pub use error::ClientError;
pub use event::{ClientStats, Event};
pub use pushgrid_wire::{Frame, Op, msg};
