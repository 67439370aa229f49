//! The shared `main` of every role binary: flags, config, logging, signals.

use std::future::Future;
use std::path::PathBuf;

use clap::Parser;
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::sync::CancellationToken;

use crate::config::{self, NodeConfig};

/// Flags every role binary accepts.
#[derive(Debug, Parser)]
pub struct RoleArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "PUSHGRID_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set listen=0.0.0.0:7000` (repeatable; applied last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// A role's configuration exposes the settings every node has.
pub trait RoleConfig: Serialize + DeserializeOwned + Default + Send + 'static {
    fn node(&self) -> &NodeConfig;
}

/// Parses flags, loads the config, starts logging, turns SIGINT/SIGTERM into a
/// cancellation and runs `body` to completion.
pub async fn role_main<C, F, Fut>(role: &'static str, body: F) -> crate::StartResult<()>
where
    C: RoleConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = crate::StartResult<()>>,
{
    let args = RoleArgs::parse();
    let config: C = config::load(role, args.config.as_deref(), &args.overrides)?;
    if args.print_config {
        print!("{}", config::render(&config));
        return Ok(());
    }
    crate::telemetry::init_tracing(config.node().log_json);
    // A role without cluster credentials does not start (nothing is bound yet).
    if let Some(role) = crate::auth::role_by_name(role) {
        crate::auth::Credentials::for_node(role, &config.node().credentials_dir)?;
    }
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    body(config, shutdown).await
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM.
pub fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(error) => {
                        tracing::error!(%error, "cannot install SIGTERM handler");
                        let _ = ctrl_c.await;
                        shutdown.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        shutdown.cancel();
    });
}
