//! `pushgrid-client`: connects as one device, prints each push's payload on its
//! own line of stdout and acknowledges it. Logs go to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pushgrid_client::{Client, ClientConfig, Event, RoomAddress, Transport};
use tokio::sync::mpsc;
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "pushgrid-client",
    version,
    about = "Connect to pushgrid as one device and print the pushes it receives"
)]
struct Args {
    /// Dispatcher base URL, e.g. http://127.0.0.1:8070.
    #[arg(long, env = "PUSHGRID_DISPATCHER")]
    dispatcher: Option<String>,
    /// Room address; repeat for fallbacks. Used when there is no dispatcher or
    /// it cannot be reached. Forms: host:port or tcp://host:port (plain TCP),
    /// tls://host:port, ws://host:port/path, wss://host:port/path.
    #[arg(long = "addr", value_parser = parse_address)]
    addrs: Vec<RoomAddress>,
    /// Transport to use for the dispatcher's rooms: tcp, tls, ws or wss (a
    /// secure one never falls back to a plain one).
    #[arg(long, default_value = "tcp")]
    transport: Transport,
    /// PEM file of extra trusted root certificates for tls:// and wss:// rooms
    /// (repeatable; the public web roots are trusted too).
    #[arg(long = "ca", value_name = "PEM")]
    cas: Vec<PathBuf>,
    /// Name the room's TLS certificate must carry (default: the address's host).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// The device's JWT.
    #[arg(long, env = "PUSHGRID_TOKEN")]
    token: String,
    /// User id sent to the dispatcher (default: the token's `sub` claim).
    #[arg(long)]
    user: Option<String>,
    #[arg(long, default_value = "cli")]
    device_id: String,
    #[arg(long, default_value = "cli")]
    platform: String,
    /// Exit (status 0) after printing this many pushes.
    #[arg(long)]
    count: Option<u64>,
    /// Subscribe to a broadcast topic (repeatable; `all` is the app-wide one).
    #[arg(long = "topic", value_name = "TOPIC")]
    topics: Vec<String>,
    /// Ping interval in seconds (default: what the server says).
    #[arg(long)]
    heartbeat_secs: Option<u64>,
}

fn parse_address(text: &str) -> Result<RoomAddress, String> {
    RoomAddress::parse(text).map_err(|error| error.reason)
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    let args = Args::parse();
    if args.dispatcher.is_none() && args.addrs.is_empty() {
        eprintln!("error: give --dispatcher <url> or at least one --addr <address>");
        return ExitCode::from(2);
    }
    if args.count == Some(0) {
        return ExitCode::SUCCESS;
    }

    let (client, mut events) = Client::start(client_config(&args));
    for topic in &args.topics {
        if let Err(error) = client.subscribe(topic.clone()).await {
            eprintln!("error: cannot subscribe to {topic:?}: {error}");
            return ExitCode::from(2);
        }
    }
    print_pushes(&client, &mut events, args.count).await
}

/// Logs to stderr, at `RUST_LOG` or else `info`.
fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

/// The SDK's configuration from the command line; pushes are auto-acked.
fn client_config(args: &Args) -> ClientConfig {
    let mut config = ClientConfig::new(args.token.clone(), args.device_id.clone());
    config.dispatcher = args.dispatcher.clone();
    config.addrs = args.addrs.iter().map(ToString::to_string).collect();
    config.transport = args.transport;
    config.tls.root_pem_files = args.cas.clone();
    config.tls.server_name = args.tls_server_name.clone();
    config.user = args.user.clone();
    config.platform = args.platform.clone();
    config.auto_ack = true;
    config.heartbeat = args.heartbeat_secs.map(Duration::from_secs);
    config
}

/// Prints each push's payload on its own line until `count` pushes were
/// printed, stdout closes, ctrl-c, or the server refuses the token.
async fn print_pushes(
    client: &Client,
    events: &mut mpsc::Receiver<Event>,
    count: Option<u64>,
) -> ExitCode {
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = tokio::signal::ctrl_c() => {
                info!("interrupted");
                client.close().await;
                return ExitCode::from(130);
            }
        };
        let Some(event) = event else {
            eprintln!("error: the client stopped");
            return ExitCode::FAILURE;
        };
        let Event::Push(push) = event else {
            if let Some(exit) = log_event(event) {
                return exit;
            }
            continue;
        };
        let line = String::from_utf8_lossy(&push.payload);
        let written = {
            let mut out = stdout.lock();
            writeln!(out, "{line}").and_then(|()| out.flush())
        };
        if written.is_err() {
            // stdout closed (e.g. `| head`): nothing left to do.
            client.close().await;
            return ExitCode::SUCCESS;
        }
        printed += 1;
        if count.is_some_and(|count| printed >= count) {
            // Let the auto-ack of the last push reach the server.
            client.close().await;
            return ExitCode::SUCCESS;
        }
    }
}

/// Logs an event other than a push; `Some` is the exit code when the event
/// ends the program (the server refused the token).
fn log_event(event: Event) -> Option<ExitCode> {
    match event {
        // Printed by the caller; answers to upstreams are not asked for here.
        Event::Push(_) | Event::UpstreamAck { .. } => {}
        Event::Connected {
            conn_id,
            room_addr,
            heartbeat,
        } => {
            info!(conn_id, room = %room_addr, ?heartbeat, "connected");
        }
        Event::Disconnected { reason } => warn!(%reason, "disconnected"),
        // The SDK logs the reason itself ("no room reachable").
        Event::ConnectFailed { .. } => {}
        Event::Kicked(kick) => {
            warn!(code = kick.code().as_str_name(), reason = %kick.reason, "kicked");
        }
        Event::AuthFailed { code, message } => {
            eprintln!(
                "error: authentication refused by the server ({}): {message}",
                code.as_str_name()
            );
            return Some(ExitCode::from(3));
        }
        Event::Subscribed {
            topic,
            recovered,
            missed,
            offset,
            epoch,
        } => {
            if missed {
                warn!(%topic, offset, epoch, "resubscribed, but broadcasts were missed and cannot be replayed");
            } else {
                info!(%topic, recovered, offset, epoch, "subscribed");
            }
        }
        Event::BroadcastGap {
            topic,
            epoch,
            first,
            last,
        } => warn!(%topic, epoch, first, last, "broadcasts missed and not recoverable"),
    }
    None
}
