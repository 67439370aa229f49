//! Logging, metrics and the admin HTTP server (`/metrics`, `/healthz`) that
//! every role serves on its own port, apart from the hot path.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global tracing subscriber (once per process). `RUST_LOG`
/// overrides the default `info` filter.
pub fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide Prometheus recorder, installed on first use. Several roles
/// in one process (`pushgrid dev`) share it.
pub fn metrics() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let handle = PrometheusBuilder::new()
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

/// Serves `/metrics` and an always-healthy `/healthz` until `shutdown`.
pub async fn serve_admin(listener: TcpListener, role: &'static str, shutdown: CancellationToken) {
    serve_admin_with(listener, role, Arc::new(|| Ok(())), shutdown).await
}

/// Serves `/metrics` and `/healthz` (503 with the reason while `health` fails)
/// until `shutdown`.
pub async fn serve_admin_with(
    listener: TcpListener,
    role: &'static str,
    health: HealthCheck,
    shutdown: CancellationToken,
) {
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
        );
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(%error, role, "admin server failed");
    }
}
