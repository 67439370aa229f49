//! The connection to Redis, one server or a Cluster, and commands grouped
//! by hash tag (one cluster slot) so a batch is one pipeline per slot.

use futures::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, RedisFuture, Value};

use super::RedisSqlStore;
use crate::error::StoreError;

/// One Redis server, or a Redis Cluster.
#[derive(Clone)]
pub(in crate::store) enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(connection) => connection.req_packed_command(cmd),
            RedisConnection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            RedisConnection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(connection) => connection.get_db(),
            RedisConnection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// Commands that touch one hash tag (one cluster slot), in order; `true`
/// marks the commands whose replies the caller wants.
#[derive(Default)]
pub(super) struct SlotCommands {
    commands: Vec<(Cmd, bool)>,
}

impl SlotCommands {
    /// A command whose reply is not needed.
    pub(super) fn run(&mut self, command: Cmd) {
        self.commands.push((command, false));
    }

    /// A command whose reply is returned.
    pub(super) fn query(&mut self, command: Cmd) {
        self.commands.push((command, true));
    }

    fn wanted(&self) -> usize {
        self.commands.iter().filter(|(_, wanted)| *wanted).count()
    }

    pub(super) fn pipeline(&self, pipe: &mut redis::Pipeline) {
        for (command, wanted) in &self.commands {
            pipe.add_command(command.clone());
            if !wanted {
                pipe.ignore();
            }
        }
    }
}

pub(super) fn command(name: &str) -> Cmd {
    redis::cmd(name)
}

impl RedisSqlStore {
    /// Runs per-slot command groups: one pipeline on a single Redis, one
    /// pipeline per group (concurrently) on a cluster. Returns the wanted
    /// replies of each group.
    pub(super) async fn run_groups(
        &self,
        groups: &[SlotCommands],
    ) -> Result<Vec<Vec<Value>>, StoreError> {
        let mut redis = self.redis.clone();
        match &self.redis {
            RedisConnection::Single(_) => {
                let mut pipe = redis::pipe();
                for group in groups {
                    group.pipeline(&mut pipe);
                }
                if pipe.is_empty() {
                    return Ok(groups.iter().map(|_| Vec::new()).collect());
                }
                let replies: Vec<Value> = pipe.query_async(&mut redis).await?;
                let mut replies = replies.into_iter();
                Ok(groups
                    .iter()
                    .map(|group| replies.by_ref().take(group.wanted()).collect())
                    .collect())
            }
            RedisConnection::Cluster(_) => {
                let calls = groups.iter().map(|group| {
                    let mut redis = redis.clone();
                    async move {
                        let mut pipe = redis::pipe();
                        group.pipeline(&mut pipe);
                        if pipe.is_empty() {
                            return Ok(Vec::new());
                        }
                        pipe.query_async::<Vec<Value>>(&mut redis).await
                    }
                });
                Ok(try_join_all(calls).await?)
            }
        }
    }
}
