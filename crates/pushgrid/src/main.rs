//! `pushgrid`: the all-in-one launcher.
//!
//! * `pushgrid dev`: all seven roles in this one process, on an embedded
//!   SQLite store, with a demo app. The quick start on a fresh machine.
//! * `pushgrid cluster`: the seven roles as separate processes against Redis
//!   and MySQL, the topology of `docker compose up`.
//! * `pushgrid token`: a device token (JWT HS256) for an app.

mod cluster;
mod dev;
mod supervise;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "pushgrid",
    version,
    about = "pushgrid: a long-connection push messaging cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every role in one process on an embedded store (no Redis, no MySQL).
    Dev(dev::DevArgs),
    /// Run every role as its own process against Redis and MySQL.
    Cluster(cluster::ClusterArgs),
    /// Print a device token for an app.
    Token(TokenArgs),
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// The app id (the `app` claim).
    #[arg(long, default_value = "demo")]
    app: String,
    /// The user id (the `sub` claim).
    #[arg(long)]
    user: String,
    /// The app's JWT secret; defaults to the demo app's secret.
    #[arg(long, default_value = dev::DEMO_SECRET)]
    secret: String,
    /// Device id (the `dev` claim), optional.
    #[arg(long, default_value = "")]
    device: String,
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    ttl_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Cluster(args) => cluster::run(args).await,
        Command::Token(args) => {
            let claims = pushgrid_common::jwt::Claims {
                sub: args.user,
                app: args.app,
                exp: pushgrid_common::now_ms() / 1000 + args.ttl_secs,
                dev: args.device,
            };
            println!("{}", pushgrid_common::jwt::sign(&claims, &args.secret));
            Ok(())
        }
    }
}
