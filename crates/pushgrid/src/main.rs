//! `pushgrid`: the all-in-one launcher.
//!
//! * `pushgrid dev`: all seven roles in this one process, on an embedded
//!   SQLite store, with a demo app. The quick start on a fresh machine.
//! * `pushgrid cluster`: the seven roles as separate processes against Redis
//!   and MySQL, the topology of `docker compose up`.
//! * `pushgrid token`: a device token (JWT HS256) for an app.
//! * `pushgrid credentials`: create or rotate the cluster credentials (a key
//!   per role, the verifiers, the admin token) of a deployment.

mod cluster;
mod demo;
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
    /// Create or rotate cluster credentials (docs/security.md).
    #[command(subcommand)]
    Credentials(CredentialsCommand),
}

#[derive(Debug, Subcommand)]
enum CredentialsCommand {
    /// Create what is missing in DIR: `<role>.key` for each of the seven
    /// roles, `verifiers` and `admin-token` (mode 0600); existing keys are kept.
    Init {
        /// The credentials directory (created with mode 0700).
        dir: std::path::PathBuf,
    },
    /// One step of rotating a role's key: `begin` (a new key whose verifier
    /// is added: both are accepted), `switch` (the role sends the new key),
    /// `end` (the old key is refused). Wait until every process has read the
    /// files again (5 s) between steps.
    Rotate {
        dir: std::path::PathBuf,
        /// keeper, register, saver, coordinator, center, dispatcher or room.
        role: String,
        #[arg(value_enum)]
        step: Step,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Step {
    Begin,
    Switch,
    End,
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
    /// Seconds until the token expires (rooms refuse tokens that live longer
    /// than their token_max_lifetime_secs, 30 days by default).
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    ttl_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Cluster(args) => cluster::run(args).await,
        Command::Credentials(CredentialsCommand::Init { dir }) => {
            let created = pushgrid_common::auth::init_dir(&dir)?;
            println!(
                "{}: {} role keys created, admin token {}; point every role at it with credentials_dir={}",
                dir.display(),
                created.created_keys.len(),
                if created.created_admin_token {
                    "created"
                } else {
                    "kept"
                },
                dir.display()
            );
            Ok(())
        }
        Command::Credentials(CredentialsCommand::Rotate { dir, role, step }) => {
            let role = pushgrid_common::auth::role_by_name(&role)
                .ok_or_else(|| anyhow::anyhow!("unknown role {role:?}"))?;
            let step = match step {
                Step::Begin => pushgrid_common::auth::RotationStep::Begin,
                Step::Switch => pushgrid_common::auth::RotationStep::Switch,
                Step::End => pushgrid_common::auth::RotationStep::End,
            };
            println!("{}", pushgrid_common::auth::rotate(&dir, role, step)?);
            Ok(())
        }
        Command::Token(args) => {
            let now = pushgrid_common::now_ms() / 1000;
            let claims = pushgrid_common::jwt::Claims {
                sub: args.user,
                app: args.app,
                exp: now + args.ttl_secs,
                dev: args.device,
            };
            let times = pushgrid_common::jwt::TimeClaims {
                iat: Some(now),
                nbf: None,
            };
            println!(
                "{}",
                pushgrid_common::jwt::sign_with_times(&claims, times, &args.secret)
            );
            Ok(())
        }
    }
}
