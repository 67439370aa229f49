//! Logging, metrics and the admin HTTP server that every role serves on its
//! own port, apart from the hot path:
//!
//! | route | what |
//! |---|---|
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 `ok <role>`, or 503 with the reason |
//! | `GET /debug/pprof/profile?seconds=N` | a CPU profile of the process as a flamegraph SVG (1 to 60 s, default 10) |
//! | `GET /debug/log-level` | the log filter in force |
//! | `PUT /debug/log-level` | replace the log filter; the body is an `EnvFilter` directive, e.g. `info,pushgrid_room=debug` |
//!
//! The `/debug/` routes need `Authorization: Bearer <admin token>` from every
//! peer, loopback included (the node's `admin_token`, see
//! [`crate::config::NodeConfig::admin_token`]); with no token configured they
//! answer 403. `/metrics` and `/healthz` stay open: they hold no secrets.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Query};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();
static LOG_FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The environment variable holding the admin token when a node's config
/// has none (`/debug/` routes, keeper's admin API, center's dashboard, a
/// room's drain).
pub const ADMIN_TOKEN_ENV: &str = "PUSHGRID_ADMIN_TOKEN";

/// Longest CPU profile one request may ask for.
pub const MAX_PROFILE_SECS: u64 = 60;
const DEFAULT_PROFILE_SECS: u64 = 10;
const PROFILE_FREQUENCY_HZ: i32 = 99;

/// Installs the global tracing subscriber (once per process). `RUST_LOG`
/// overrides the default `info` filter; the filter can be replaced at run
/// time through [`set_log_filter`] (`PUT /debug/log-level`).
pub fn init_tracing(json: bool) {
    init_tracing_to(json, None);
}

/// Like [`init_tracing`], with a log file: when `file` is given, every line
/// the filter lets through goes to the file and only warnings and errors to
/// stderr (what `pushgrid dev` does in a terminal, so its banner stays
/// readable).
pub fn init_tracing_to(json: bool, file: Option<std::fs::File>) {
    use tracing_subscriber::filter::LevelFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter_layer, filter_handle) = reload::Layer::new(filter);
    use std::io::IsTerminal;
    let text = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let stderr_layer = match (json, file.is_some()) {
        (true, false) => text.json().boxed(),
        (false, false) => text.boxed(),
        (true, true) => text.json().with_filter(LevelFilter::WARN).boxed(),
        (false, true) => text.with_filter(LevelFilter::WARN).boxed(),
    };
    let file_layer = file.map(|file| {
        let lines = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file));
        if json {
            lines.json().boxed()
        } else {
            lines.boxed()
        }
    });
    let installed = tracing_subscriber::registry()
        .with(filter_layer)
        .with(stderr_layer)
        .with(file_layer)
        .try_init();
    if installed.is_ok() {
        let _ = LOG_FILTER.set(filter_handle);
    }
}

/// Replaces the log filter of the subscriber [`init_tracing`] installed.
/// Returns the filter now in force; `Err` says why the directive was refused.
pub fn set_log_filter(directive: &str) -> Result<String, String> {
    let handle = LOG_FILTER
        .get()
        .ok_or_else(|| "logging was not initialised by pushgrid".to_string())?;
    let filter = EnvFilter::builder()
        .parse(directive.trim())
        .map_err(|error| format!("invalid log filter {directive:?}: {error}"))?;
    handle
        .reload(filter)
        .map_err(|error| format!("cannot change the log filter: {error}"))?;
    tracing::info!(filter = directive.trim(), "log filter changed");
    current_log_filter()
}

/// The log filter in force, as a directive string.
pub fn current_log_filter() -> Result<String, String> {
    let handle = LOG_FILTER
        .get()
        .ok_or_else(|| "logging was not initialised by pushgrid".to_string())?;
    handle
        .with_current(|filter| filter.to_string())
        .map_err(|error| format!("cannot read the log filter: {error}"))
}

/// The process's `PUSHGRID_ADMIN_TOKEN`, when set and not empty.
pub fn admin_token_from_env() -> Option<&'static str> {
    static TOKEN: OnceLock<Option<String>> = OnceLock::new();
    TOKEN
        .get_or_init(|| {
            std::env::var(ADMIN_TOKEN_ENV)
                .ok()
                .map(|token| token.trim().to_string())
                .filter(|token| !token.is_empty())
        })
        .as_deref()
}

/// Compares two secrets in time independent of where they differ.
pub fn token_matches(given: &str, expected: &str) -> bool {
    let given = given.as_bytes();
    let expected = expected.as_bytes();
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The process-wide Prometheus recorder, installed on first use. Several roles
/// in one process (`pushgrid dev`) share it.
pub fn metrics() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        // HTTP latency is a real histogram (aggregatable across nodes); other
        // `*_seconds` metrics render as summaries with quantiles.
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    crate::http_stats::REQUEST_DURATION_SECONDS.into(),
                ),
                crate::http_stats::DURATION_BUCKETS,
            )
            .expect("latency buckets are not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed in a pushgrid process");
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })
            .expect("spawn metrics upkeep thread");
        handle
    })
}

/// Says whether a role can do its work: `Err` names what is missing.
pub type HealthCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves the admin routes with an always-healthy `/healthz` until `shutdown`;
/// `/debug/` needs `admin_token`.
pub async fn serve_admin(
    listener: TcpListener,
    role: &'static str,
    admin_token: Option<String>,
    shutdown: CancellationToken,
) {
    serve_admin_with_routes(
        listener,
        role,
        Arc::new(|| Ok(())),
        Router::new(),
        admin_token,
        shutdown,
    )
    .await
}

/// Serves the admin routes (see the module doc) until `shutdown`; `/healthz`
/// answers 503 with the reason while `health` fails; `/debug/` needs
/// `admin_token`.
pub async fn serve_admin_with(
    listener: TcpListener,
    role: &'static str,
    health: HealthCheck,
    admin_token: Option<String>,
    shutdown: CancellationToken,
) {
    serve_admin_with_routes(listener, role, health, Router::new(), admin_token, shutdown).await
}

/// Serves the admin routes (see the module doc) and a role's own until
/// `shutdown`; `/healthz` answers 503 with the reason while `health` fails;
/// `/debug/` needs `admin_token`.
pub async fn serve_admin_with_routes(
    listener: TcpListener,
    role: &'static str,
    health: HealthCheck,
    extra_routes: Router,
    admin_token: Option<String>,
    shutdown: CancellationToken,
) {
    let debug_token = DebugToken(admin_token.map(Arc::from));
    let handle = metrics();
    let app = Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route(
            "/healthz",
            get(move || {
                let health = health.clone();
                async move {
                    match health() {
                        Ok(()) => (StatusCode::OK, format!("ok {role}\n")),
                        Err(reason) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready {role}: {reason}\n"),
                        ),
                    }
                }
            }),
        )
        .route("/debug/pprof/profile", get(cpu_profile))
        .route("/debug/log-level", get(get_log_level).put(put_log_level))
        .layer(axum::Extension(debug_token))
        .merge(extra_routes);
    if let Err(error) = axum::serve(
        crate::net::http_listener(listener),
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
    {
        tracing::error!(%error, role, "admin server failed");
    }
}

/// The admin token `/debug/` routes check (none: they are off).
#[derive(Clone)]
struct DebugToken(Option<Arc<str>>);

/// Every peer, loopback or not, needs the admin token for `/debug/`.
fn authorize_debug(
    token: &DebugToken,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), (StatusCode, String)> {
    let refused = |status: StatusCode, message: String| {
        metrics::counter!("pushgrid_admin_refused_total", "endpoint" => "debug").increment(1);
        tracing::warn!(%peer, status = status.as_u16(), "admin request refused");
        Err((status, message))
    };
    let Some(expected) = token.0.as_deref() else {
        return refused(
            StatusCode::FORBIDDEN,
            format!(
                "/debug/ is off: no admin token is configured (admin_token, {ADMIN_TOKEN_ENV} or \
                 the admin-token file of credentials_dir)\n"
            ),
        );
    };
    match bearer_token(headers) {
        Some(given) if token_matches(given, expected) => Ok(()),
        _ => refused(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer <admin token>)\n".to_string(),
        ),
    }
}

#[derive(Debug, serde::Deserialize)]
struct ProfileQuery {
    seconds: Option<String>,
}

/// `GET /debug/pprof/profile?seconds=N`: samples every thread's stack at
/// 99 Hz for N seconds and answers a flamegraph SVG. One profile at a time.
async fn cpu_profile(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    axum::Extension(token): axum::Extension<DebugToken>,
    headers: HeaderMap,
    Query(query): Query<ProfileQuery>,
) -> Response {
    if let Err(refused) = authorize_debug(&token, peer, &headers) {
        return refused.into_response();
    }
    let seconds = match query.seconds.as_deref().map(str::parse::<u64>) {
        None => DEFAULT_PROFILE_SECS,
        Some(Ok(seconds)) if (1..=MAX_PROFILE_SECS).contains(&seconds) => seconds,
        Some(_) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("seconds must be an integer from 1 to {MAX_PROFILE_SECS}\n"),
            )
                .into_response();
        }
    };
    static PROFILING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let Ok(_running) = PROFILING.try_lock() else {
        return (
            StatusCode::CONFLICT,
            "a profile is already being taken; try again when it is done\n",
        )
            .into_response();
    };
    tracing::info!(seconds, %peer, "cpu profile started");
    // Sampling sleeps and symbolising is CPU-heavy: both stay off the runtime.
    let profiled = tokio::task::spawn_blocking(move || take_flamegraph(seconds)).await;
    match profiled {
        Ok(Ok(svg)) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile.svg\"",
                ),
            ],
            svg,
        )
            .into_response(),
        Ok(Err(error)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("profiling failed: {error}\n"),
        )
            .into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("profiling task failed: {error}\n"),
        )
            .into_response(),
    }
}

fn take_flamegraph(seconds: u64) -> Result<Vec<u8>, String> {
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(PROFILE_FREQUENCY_HZ)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .map_err(|error| error.to_string())?;
    std::thread::sleep(Duration::from_secs(seconds));
    let report = guard.report().build().map_err(|error| error.to_string())?;
    drop(guard);
    if report.data.is_empty() {
        // An idle process takes no CPU samples; inferno would draw nothing.
        return Ok(idle_svg(seconds).into_bytes());
    }
    let mut svg = Vec::new();
    report
        .flamegraph(&mut svg)
        .map_err(|error| error.to_string())?;
    Ok(svg)
}

fn idle_svg(seconds: u64) -> String {
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"60\">\
         <text x=\"10\" y=\"35\" font-family=\"sans-serif\" font-size=\"16\">\
         no CPU samples in {seconds} s: the process was idle</text></svg>\n"
    )
}

async fn get_log_level(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    axum::Extension(token): axum::Extension<DebugToken>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = authorize_debug(&token, peer, &headers) {
        return refused.into_response();
    }
    match current_log_filter() {
        Ok(filter) => (StatusCode::OK, format!("{filter}\n")).into_response(),
        Err(error) => (StatusCode::CONFLICT, format!("{error}\n")).into_response(),
    }
}

async fn put_log_level(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    axum::Extension(token): axum::Extension<DebugToken>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Err(refused) = authorize_debug(&token, peer, &headers) {
        return refused.into_response();
    }
    if body.trim().is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            "the body must be a log filter, e.g. info,pushgrid_room=debug\n",
        )
            .into_response();
    }
    match set_log_filter(&body) {
        Ok(filter) => (StatusCode::OK, format!("{filter}\n")).into_response(),
        Err(error) if error.starts_with("invalid") => {
            (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response()
        }
        Err(error) => (StatusCode::CONFLICT, format!("{error}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_compare_by_content() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cret", "s3cres"));
        assert!(!token_matches("s3cret", "s3cret-longer"));
        assert!(!token_matches("", "x"));
    }

    #[test]
    fn every_peer_needs_the_token_and_without_one_debug_is_off() {
        let loopback: SocketAddr = ([127, 0, 0, 1], 4000).into();
        let remote: SocketAddr = ([10, 1, 2, 3], 4000).into();
        let token = DebugToken(Some(Arc::from("s3cret")));
        let mut headers = HeaderMap::new();
        for peer in [loopback, remote] {
            assert!(matches!(
                authorize_debug(&token, peer, &headers),
                Err((StatusCode::UNAUTHORIZED, _))
            ));
        }
        headers.insert(header::AUTHORIZATION, "Bearer s3cres".parse().unwrap());
        assert!(authorize_debug(&token, loopback, &headers).is_err());
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(authorize_debug(&token, loopback, &headers).is_ok());
        assert!(authorize_debug(&token, remote, &headers).is_ok());
        let off = DebugToken(None);
        assert!(matches!(
            authorize_debug(&off, loopback, &headers),
            Err((StatusCode::FORBIDDEN, _))
        ));
    }
}
