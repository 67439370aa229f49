//! Stored messages per second through the saver's store with Redis + MySQL
//! (durability "mysql": every call answers after Redis and the group commit),
//! at several batch sizes (users per Store call). Needs the local Redis and
//! MariaDB. Run: `cargo bench -p pushgrid-saver --bench store_throughput`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pushgrid_saver::store::{
    Durability, GroupCommitConfig, MessageIds, MessageStore, RedisSqlStore, SqlStore,
};

const MYSQL: &str = "mysql://root@127.0.0.1:3306";
const REDIS: &str = "redis://127.0.0.1:6379";
/// Store calls in flight at once (center's worker pools send concurrently).
const CONCURRENCY: usize = 64;
const RUN_FOR: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database = format!("pg_bench_{:08x}", rand::random::<u32>());
    let sql = SqlStore::connect_with(&format!("{MYSQL}/{database}"), 16)
        .await?
        .with_ids(MessageIds::fixed(1))
        .with_group_commit(GroupCommitConfig::default());
    let pool = sql.pool().clone();
    println!(
        "| durability | users per Store call | calls in flight | messages/s | p50 call ms | p99 call ms |"
    );
    println!("|---|---|---|---|---|---|");
    for durability in [Durability::Mysql, Durability::Redis] {
        let store: Arc<dyn MessageStore> = Arc::new(
            RedisSqlStore::connect(REDIS, sql.clone())
                .await?
                .with_durability(durability),
        );
        for batch in [1usize, 10, 100, 1000] {
            let app = format!("bench{:08x}", rand::random::<u32>());
            let started = Instant::now();
            let mut tasks = Vec::new();
            for worker in 0..CONCURRENCY {
                let store = store.clone();
                let app = app.clone();
                tasks.push(tokio::spawn(async move {
                    let mut stored = 0usize;
                    let mut latencies = Vec::new();
                    let mut round = 0usize;
                    while started.elapsed() < RUN_FOR {
                        let users: Vec<String> = (0..batch)
                            .map(|index| {
                                format!("u{}", (worker * 7919 + round * 31 + index) % 100_000)
                            })
                            .collect();
                        let call = Instant::now();
                        let payload = Bytes::from_static(&[b'x'; 200]);
                        stored += store.store(&app, &users, payload, 600).await.unwrap().len();
                        latencies.push(call.elapsed());
                        round += 1;
                    }
                    (stored, latencies)
                }));
            }
            let mut stored = 0;
            let mut latencies = Vec::new();
            for task in tasks {
                let (count, mut times) = task.await?;
                stored += count;
                latencies.append(&mut times);
            }
            let elapsed = started.elapsed().as_secs_f64();
            latencies.sort();
            let at = |q: f64| {
                latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0
            };
            println!(
                "| {durability:?} | {batch} | {CONCURRENCY} | {:.0} | {:.1} | {:.1} |",
                stored as f64 / elapsed,
                at(0.5),
                at(0.99)
            );
            // Leave Redis as found.
            let client = redis::Client::open(REDIS)?;
            let mut redis = client.get_multiplexed_async_connection().await?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("pg:{{{app}:*"))
                .query_async(&mut redis)
                .await?;
            for chunk in keys.chunks(1000) {
                let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut redis).await?;
            }
        }
    }
    let drop = format!("DROP DATABASE IF EXISTS `{database}`");
    sqlx::query(sqlx::AssertSqlSafe(drop))
        .execute(&pool)
        .await?;
    Ok(())
}
