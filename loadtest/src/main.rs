//! `loadtest`: the pushgrid load generator.
//!
//! ```text
//! loadtest connect   --rooms 127.0.0.1:8090 --connections 10000
//! loadtest unicast   --rooms 127.0.0.1:8090 --api http://127.0.0.1:8080 --connections 10000
//! loadtest push-rate --connections 5000 --rate 10000 --secs 10   # latency and CPU per message
//! loadtest broadcast | churn | slow ...
//! loadtest million   --connections 1000000     # starts and stops its own cluster
//! loadtest cluster-faults --connections 50000  # issue 21's fault plan under load
//! ```
//!
//! The coordinating process forks worker processes (`loadtest worker <spec>`) of
//! at most 18,000 connections each, every one bound to its own loopback source
//! address (127.0.0.2, 127.0.0.3, ...), drives the push API itself and matches
//! every accepted message id to a delivery.

mod args;
mod cluster_faults;
mod frames;
mod histogram;
mod ipc;
mod ledger;
mod million;
mod procstat;
mod push_rate;
mod receipts;
mod report;
mod run;
mod worker;

use args::{RunArgs, Scenario};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "loadtest", about = "pushgrid load generator")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Ramp to --connections, hold, report connect rate and memory.
    Connect(RunArgs),
    /// Connect, then push --messages-per-user to every device and account for each.
    Unicast(RunArgs),
    /// Connect with SUB{topic}, then POST /api/broadcast and count deliveries per offset.
    Broadcast(RunArgs),
    /// Connect, then reconnect storms (--storms) while pushing.
    Churn(RunArgs),
    /// Pushes at --rate messages/s for --secs, each ACKed; latency, loss and CPU per message.
    PushRate(push_rate::PushRateArgs),
    /// Every --slow-every-th device stops reading; push to all; then resume.
    Slow(RunArgs),
    /// Start a cluster sized for --connections, run --scenarios, clean up.
    Million(Box<million::MillionArgs>),
    /// Start `pushgrid cluster` (two keepers, savers, centers), connect the
    /// devices, and under unicast and broadcast load kill -9 every role
    /// instance in turn, restart Redis empty and lock MySQL; account for every call.
    ClusterFaults(Box<cluster_faults::ClusterFaultsArgs>),
    /// Internal: one worker process.
    #[command(hide = true)]
    Worker { spec: String },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (scenario, args) = match cli.command {
        Cmd::Worker { spec } => return worker::main(&spec),
        Cmd::Million(args) => return runtime()?.block_on(million::run(*args)),
        Cmd::ClusterFaults(args) => return runtime()?.block_on(cluster_faults::run(*args)),
        Cmd::Connect(args) => (Scenario::Connect, args),
        Cmd::Unicast(args) => (Scenario::Unicast, args),
        Cmd::Broadcast(args) => (Scenario::Broadcast, args),
        Cmd::Churn(args) => (Scenario::Churn, args),
        Cmd::Slow(args) => (Scenario::Slow, args),
        Cmd::PushRate(args) => (Scenario::PushRate, args.into_run()?),
    };
    runtime()?.block_on(async move {
        let json = args.json.clone();
        let report = run::run(scenario, args, Vec::new(), None).await?;
        println!("{}", report.table());
        std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("JSON report: {json}");
        Ok(())
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}
