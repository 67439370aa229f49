//! What a run is asked to do: the scenario and the options every scenario
//! shares (the `loadtest <scenario>` flags), and the server processes it
//! measures. The shared types below `run`, `report`, `push_rate` and `million`.

use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Connect,
    Unicast,
    Broadcast,
    Churn,
    Slow,
    PushRate,
    /// Unicasts and broadcasts while faults are injected (`loadtest cluster-faults`).
    UnderFaults,
}

/// Options shared by every scenario.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct RunArgs {
    /// Room TCP addresses (127.0.0.0/8 only); worker i connects to room i mod n.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8090")]
    pub rooms: Vec<String>,
    /// Base URL of the push API (center).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// More push API base URLs (other centers): the under-faults load
    /// spreads its calls over --api and these.
    #[arg(long, value_delimiter = ',')]
    pub more_apis: Vec<String>,
    #[arg(long, default_value = "demo-key")]
    pub api_key: String,
    #[arg(long, default_value = "demo")]
    pub app: String,
    #[arg(long, default_value = "demo-secret")]
    pub jwt_secret: String,
    /// Device connections in total.
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,
    /// Connections per worker process (at most 18,000: each process may hold 20,000 files).
    #[arg(long, default_value_t = 18_000)]
    pub per_worker: u32,
    /// New connections per second per worker (0 = unpaced).
    #[arg(long, default_value_t = 2000)]
    pub connect_rate: u32,
    /// Handshakes in flight per worker.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: u32,
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    #[arg(long, default_value_t = 20_000)]
    pub auth_timeout_ms: u64,
    /// First loopback source address; worker i binds to this + i.
    #[arg(long, default_value = "127.0.0.2")]
    pub source_base: Ipv4Addr,
    /// User ids are `<prefix><n>`; default: a fresh prefix per run, so inboxes of
    /// earlier runs never mix in.
    #[arg(long)]
    pub user_prefix: Option<String>,
    /// Seconds to hold every connection open after the ramp.
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
    /// The ramp is abandoned after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub ramp_timeout_secs: u64,
    /// Unicast/slow/churn: messages per online user.
    #[arg(long, default_value_t = 1)]
    pub messages_per_user: u32,
    /// Users per push API call (1 to 10,000).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Push API calls in flight.
    #[arg(long, default_value_t = 8)]
    pub push_concurrency: usize,
    /// Messages per second through the push API (0 = unpaced).
    #[arg(long, default_value_t = 0)]
    pub push_rate: u64,
    /// Payload size in bytes (the send timestamp plus padding).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Waiting for deliveries ends after this long...
    #[arg(long, default_value_t = 120)]
    pub drain_secs: u64,
    /// ... or after this long without a new delivery.
    #[arg(long, default_value_t = 10)]
    pub quiet_secs: u64,
    /// Broadcast: topic and number of broadcasts.
    #[arg(long, default_value = "loadtest")]
    pub topic: String,
    #[arg(long, default_value_t = 5)]
    pub broadcasts: u32,
    /// Broadcast: API calls in flight at once.
    #[arg(long, default_value_t = 1)]
    pub broadcast_concurrency: usize,
    /// Broadcast: least time between the starts of two calls, in ms.
    #[arg(long, default_value_t = 200)]
    pub broadcast_interval_ms: u64,
    /// Churn: reconnect storms, reconnect attempts per device, spread of a storm.
    #[arg(long, default_value_t = 3)]
    pub storms: u32,
    #[arg(long, default_value_t = 5)]
    pub reconnect_attempts: u32,
    #[arg(long, default_value_t = 1000)]
    pub storm_jitter_ms: u64,
    /// Slow: every n-th device stops reading after AUTH.
    #[arg(long, default_value_t = 10)]
    pub slow_every: u32,
    /// pushgrid process ids to measure (CPU, RSS).
    #[arg(long, value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// Also measure every running process named like a pushgrid binary.
    #[arg(long)]
    pub discover_servers: bool,
    /// Where the JSON report goes.
    #[arg(long, default_value = "loadtest-report.json")]
    pub json: String,
    /// No progress bar (CI, logs).
    #[arg(long)]
    pub quiet: bool,
    /// Ping interval when the room does not say.
    #[arg(long, default_value_t = 60)]
    pub ping_secs: u32,
    /// push-rate: seconds of pushing at `push_rate` (set by its own flags).
    #[arg(skip)]
    pub push_secs: u64,
}

/// A server process to measure, with what it is.
#[derive(Debug, Clone)]
pub struct ServerProc {
    pub pid: u32,
    pub role: String,
    /// Index into `RunArgs::rooms` when this process is that room.
    pub room_index: Option<usize>,
}
