//! The fault plan of `loadtest cluster-faults`, one step at a time (the
//! `under-faults` scenario runs the load around it): kill -9 of every role
//! instance, each waited for until the launcher started it again; Redis
//! killed and started empty; the cluster's tables locked in MySQL.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::launcher::Launcher;

/// The tables the MySQL step locks (every table a push, an ACK or a lease
/// writes), as `tests/tests/cluster_faults.rs` does.
const LOCKED_TABLES: &str = "LOCK TABLES messages WRITE, message_deliveries WRITE, idempotency WRITE, \
     push_records WRITE, leases WRITE, worker_ids WRITE";
/// How long a killed instance may take to be started again and ready.
const RESTART_LIMIT: Duration = Duration::from_secs(120);

/// The instances to kill, in this order: keepers, register, savers,
/// centers, coordinator, dispatcher, rooms.
pub(super) fn kill_order(names: &[String]) -> Vec<String> {
    let rank = |name: &str| {
        [
            "keeper",
            "register",
            "saver",
            "center",
            "coordinator",
            "dispatcher",
            "room",
        ]
        .iter()
        .position(|role| name.starts_with(role))
        .unwrap_or(usize::MAX)
    };
    let mut names: Vec<String> = names.to_vec();
    names.sort_by_key(|name| (rank(name), name.clone()));
    names
}

/// A `redis-server` of the run's own on a unix socket, keeping nothing on
/// disk, so that the plan can kill it and start it empty.
pub(super) struct OwnRedis {
    child: Child,
    dir: PathBuf,
}

impl OwnRedis {
    pub async fn start(dir: &Path) -> anyhow::Result<OwnRedis> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("redis.sock");
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--maxclients", "10000"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start redis-server (is it installed?)")?;
        let redis = format!("redis+unix://{}", socket.display());
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if child.try_wait()?.is_some() {
                bail!("redis-server exited at start ({})", dir.display());
            }
            if answers(&redis).await {
                return Ok(OwnRedis {
                    child,
                    dir: dir.to_path_buf(),
                });
            }
            // redis-server is another process: poll until it answers.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill().await;
        bail!(
            "redis-server did not answer within 10 s on {}",
            socket.display()
        )
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.dir.join("redis.sock").display())
    }

    /// kill -9, then started again on the same socket, empty.
    async fn restart_empty(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill().await;
        *self = OwnRedis::start(&self.dir.clone()).await?;
        Ok(())
    }
}

async fn answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut connection)
        .await
        .is_ok()
}

pub(super) struct Plan<'a> {
    launcher: &'a Launcher,
    kills: Vec<String>,
    redis: OwnRedis,
    database_url: String,
    lock_secs: u64,
}

impl<'a> Plan<'a> {
    pub fn new(
        launcher: &'a Launcher,
        kills: &[String],
        redis: OwnRedis,
        database_url: &str,
        lock_secs: u64,
    ) -> Plan<'a> {
        Plan {
            launcher,
            kills: kills.to_vec(),
            redis,
            database_url: database_url.to_owned(),
            lock_secs,
        }
    }

    pub fn launcher(&self) -> &Launcher {
        self.launcher
    }

    /// `pushgrid_launcher_restarts_total` from the launcher's metrics.
    pub async fn restarts_metric(&self) -> Option<f64> {
        let admin = self.launcher.own("admin")?;
        let text = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let mut total = None;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("pushgrid_launcher_restarts_total") else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
            total = Some(total.unwrap_or(0.0) + value);
        }
        total
    }

    /// Every instance's `pushgrid_*broadcast*` samples at the end, by
    /// instance (how the rooms ordered and fetched, how centers fanned out).
    pub async fn broadcast_metrics(&self) -> Value {
        let mut all = serde_json::Map::new();
        for name in self.launcher.names() {
            let Ok(admin) = self.launcher.addr(&name, "admin") else {
                continue;
            };
            let Ok(answer) = reqwest::get(format!("http://{admin}/metrics")).await else {
                continue;
            };
            let text = answer.text().await.unwrap_or_default();
            let samples: Vec<Value> = text
                .lines()
                .filter(|line| {
                    !line.starts_with('#')
                        && line.contains("broadcast")
                        && !line.contains("_bucket")
                })
                .map(|line| Value::String(line.to_owned()))
                .collect();
            all.insert(name, Value::Array(samples));
        }
        Value::Object(all)
    }

    async fn kill(&self, name: &str) -> anyhow::Result<Value> {
        let started = Instant::now();
        let back = self
            .launcher
            .kill_and_await_restart(name, RESTART_LIMIT)
            .await?;
        if !back {
            bail!("the launcher did not bring {name} back within {RESTART_LIMIT:?}");
        }
        Ok(json!({
            "fault": format!("kill -9 of {name}"),
            "back_after_secs": started.elapsed().as_secs_f64(),
            // A call refused around a saver kill may have been stored.
            "in_doubt": name.starts_with("saver"),
        }))
    }

    async fn restart_redis(&mut self) -> anyhow::Result<Value> {
        let started = Instant::now();
        self.redis.restart_empty().await?;
        Ok(json!({
            "fault": "Redis killed and started empty",
            "back_after_secs": started.elapsed().as_secs_f64(),
        }))
    }

    async fn lock_mysql(&self) -> anyhow::Result<Value> {
        let pool = pushgrid_common::db::connect(&self.database_url, 1).await?;
        let mut connection = pool.acquire().await?;
        sqlx::raw_sql(LOCKED_TABLES)
            .execute(&mut *connection)
            .await?;
        let locked = Instant::now();
        // The fault is the lock held for this long.
        tokio::time::sleep(Duration::from_secs(self.lock_secs)).await;
        sqlx::raw_sql("UNLOCK TABLES")
            .execute(&mut *connection)
            .await?;
        drop(connection);
        pool.close().await;
        Ok(json!({
            "fault": format!("MySQL tables locked for {} s", self.lock_secs),
            "back_after_secs": locked.elapsed().as_secs_f64(),
        }))
    }

    async fn step(&mut self, step: usize) -> anyhow::Result<Value> {
        match step.checked_sub(self.kills.len()) {
            None => {
                let name = self.kills[step].clone();
                self.kill(&name).await
            }
            Some(0) => self.restart_redis().await,
            Some(_) => self.lock_mysql().await,
        }
    }
}

impl crate::run::Fault for Plan<'_> {
    fn count(&self) -> usize {
        self.kills.len() + 2
    }

    fn inject(&mut self, step: usize) -> futures::future::BoxFuture<'_, anyhow::Result<Value>> {
        Box::pin(self.step(step))
    }

    fn sessions(&mut self) -> futures::future::BoxFuture<'_, anyhow::Result<u64>> {
        // The under-faults scenario does not wait on register's sessions.
        Box::pin(async { Ok(0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_instance_is_killed_keepers_first_rooms_last() {
        let names: Vec<String> = [
            "room-1",
            "center-0",
            "dispatcher",
            "keeper-1",
            "saver-0",
            "room-0",
            "coordinator",
            "register-0",
            "keeper-0",
            "center-1",
            "saver-1",
        ]
        .iter()
        .map(|name| name.to_string())
        .collect();
        assert_eq!(
            kill_order(&names),
            [
                "keeper-0",
                "keeper-1",
                "register-0",
                "saver-0",
                "saver-1",
                "center-0",
                "center-1",
                "coordinator",
                "dispatcher",
                "room-0",
                "room-1"
            ]
        );
    }
}
