//! Node leases and fenced worker ids in keeper's database (MySQL, or SQLite
//! for the embedded default), so any number of keepers serve one cluster:
//! every keeper reads and writes the same rows, and a keeper that dies or
//! restarts loses nothing. Every time is the database server's clock, so
//! keepers on hosts whose clocks differ agree on what has expired.
//!
//! Worker ids (saver message ids embed one) are fenced:
//!
//! * a grant writes the row `worker_ids(worker_id)` with the holder's lease,
//!   a new `generation` and an expiry; two keepers granting the same id race
//!   on that row (a primary key, or an update conditioned on the generation
//!   read) and one of them loses: the store refuses two holders;
//! * an id is granted again only `margin` after its expiry, and its holder
//!   stops minting at its own deadline, which comes before the expiry (it is
//!   counted from when the holder *sent* the request that renewed it);
//! * every heartbeat renews the worker id with the lease; a holder whose
//!   lease ended re-registers with its generation and gets the same id back
//!   at once, as long as nobody was granted it since.

use std::collections::{HashMap, HashSet};

use prost::Message as _;
use pushgrid_common::ids::MAX_WORKER_ID;
use pushgrid_proto::cluster::NodeInfo;
use sqlx::{AnyConnection, AnyPool, Row};

/// How long worker ids live and when they may be granted again.
#[derive(Debug, Clone, Copy)]
pub struct WorkerPolicy {
    /// A worker id lives this long after each renewal.
    pub ttl_ms: u64,
    /// An expired worker id waits this long more before it is granted again.
    pub margin_ms: u64,
}

/// What a registering node asks for besides its lease.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerRequest {
    pub wanted: bool,
    pub preferred: Option<u32>,
    /// The generation of `preferred` the caller holds (0: none).
    pub generation: u64,
}

/// A worker id granted with a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerGrant {
    pub id: u32,
    pub generation: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Registered {
    pub lease_id: u64,
    pub worker: Option<WorkerGrant>,
}

/// A renewed lease.
#[derive(Debug, Clone, Copy)]
pub struct Renewed {
    /// The lease's worker id was renewed too.
    pub worker_renewed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease store: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("all {} worker ids are held", MAX_WORKER_ID + 1)]
    NoWorkerId,
    #[error("corrupt lease row: {0}")]
    Corrupt(String),
    /// Another keeper changed the same rows meanwhile; try again.
    #[error("a concurrent change won; try again")]
    Conflict,
}

impl From<LeaseError> for tonic::Status {
    fn from(error: LeaseError) -> tonic::Status {
        match error {
            LeaseError::NoWorkerId => tonic::Status::resource_exhausted(error.to_string()),
            other => tonic::Status::unavailable(other.to_string()),
        }
    }
}

/// Attempts of a write that lost a race with another keeper.
const ATTEMPTS: usize = 8;
/// After a lost race, a worker id is picked among this many free ones.
const RETRY_SPREAD: usize = 16;

pub struct LeaseStore {
    pool: AnyPool,
    /// The database's clock, in Unix milliseconds, as one SELECT.
    now_query: &'static str,
    policy: WorkerPolicy,
}

fn is_race(error: &LeaseError) -> bool {
    match error {
        LeaseError::Conflict => true,
        LeaseError::Sql(sqlx::Error::Database(database)) => {
            database.is_unique_violation()
                || matches!(
                    database.code().as_deref(),
                    Some("40001" | "5" | "6" | "517")
                )
                || database.message().contains("Lock wait timeout exceeded")
        }
        _ => false,
    }
}

impl LeaseStore {
    pub fn new(pool: AnyPool, sqlite: bool, policy: WorkerPolicy) -> LeaseStore {
        let now_query = if sqlite {
            "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) AS now_ms"
        } else {
            "SELECT CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED) AS now_ms"
        };
        LeaseStore {
            pool,
            now_query,
            policy,
        }
    }

    pub fn policy(&self) -> WorkerPolicy {
        self.policy
    }

    async fn now_ms(&self, connection: &mut AnyConnection) -> Result<i64, LeaseError> {
        let row = sqlx::query(self.now_query)
            .fetch_one(&mut *connection)
            .await?;
        Ok(row.try_get::<i64, _>("now_ms")?)
    }

    /// A cheap read of the leases table: answers at once unless the store
    /// is stalled (a lock, a failover) or down.
    pub async fn probe(&self) -> Result<(), LeaseError> {
        sqlx::query("SELECT COUNT(*) AS n FROM leases WHERE lease_id = 0")
            .fetch_one(&self.pool)
            .await?;
        Ok(())
    }

    /// The database's clock now.
    pub async fn db_now_ms(&self) -> Result<u64, LeaseError> {
        let mut connection = self.pool.acquire().await?;
        Ok(self.now_ms(&mut connection).await?.max(0) as u64)
    }

    /// Registers `node` under a new lease of `ttl_ms`, replacing the leases
    /// the same node id held, with a worker id when asked.
    pub async fn register(
        &self,
        node: &NodeInfo,
        ttl_ms: u64,
        worker: WorkerRequest,
    ) -> Result<Registered, LeaseError> {
        let mut attempt = 1;
        loop {
            match self.try_register(node, ttl_ms, worker, attempt).await {
                Err(error) if attempt < ATTEMPTS && is_race(&error) => {
                    metrics::counter!("pushgrid_keeper_lease_races_total").increment(1);
                    tokio::time::sleep(std::time::Duration::from_millis(
                        rand::random_range(5..25u64) * attempt as u64,
                    ))
                    .await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn try_register(
        &self,
        node: &NodeInfo,
        ttl_ms: u64,
        worker: WorkerRequest,
        attempt: usize,
    ) -> Result<Registered, LeaseError> {
        let mut transaction = self.pool.begin().await?;
        let now = self.now_ms(&mut transaction).await?;
        sqlx::query("DELETE FROM leases WHERE node_id = ?")
            .bind(node.id.clone())
            .execute(&mut *transaction)
            .await?;
        // Random ids: unique across keepers without a shared counter (the
        // primary key catches the unlikely repeat, and the call is retried).
        let lease_id = rand::random_range(1..i64::MAX);
        let mut node = node.clone();
        let grant = if worker.wanted {
            let grant = self
                .grant_worker_id(&mut transaction, &node.id, lease_id, now, worker, attempt)
                .await?;
            node.worker_id = grant.id;
            Some(grant)
        } else {
            node.worker_id = 0;
            None
        };
        let load = i64::try_from(node.load).unwrap_or(i64::MAX);
        node.load = 0;
        sqlx::query(
            "INSERT INTO leases (lease_id, node_id, role, node, node_load, ttl_ms, expires_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(lease_id)
        .bind(node.id.clone())
        .bind(i64::from(node.role))
        .bind(node.encode_to_vec())
        .bind(load)
        .bind(ms(ttl_ms))
        .bind(now + ms(ttl_ms))
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(Registered {
            lease_id: lease_id as u64,
            worker: grant,
        })
    }

    /// Grants a worker id to `lease_id` inside the caller's transaction: the
    /// one the caller proves it holds (same generation), else `preferred`
    /// when free, else the smallest free one. Free: never granted, or
    /// expired more than `margin` ago.
    async fn grant_worker_id(
        &self,
        transaction: &mut AnyConnection,
        holder: &str,
        lease_id: i64,
        now: i64,
        request: WorkerRequest,
        attempt: usize,
    ) -> Result<WorkerGrant, LeaseError> {
        let expires = now + ms(self.policy.ttl_ms);
        if let Some(preferred) = request.preferred
            && request.generation > 0
        {
            // The same holder, back under a new lease: nobody was granted
            // this id since (its generation is unchanged), so it continues.
            let lease = HolderLease {
                holder,
                lease_id,
                expires,
            };
            if keep_worker_id(transaction, &lease, preferred, request.generation).await? {
                return Ok(WorkerGrant {
                    id: preferred,
                    generation: request.generation,
                });
            }
        }
        let known = known_worker_ids(transaction).await?;
        let free_after = now - ms(self.policy.margin_ms);
        let is_free = |id: u32| match known.get(&id) {
            None => true,
            Some((_, expires_ms)) => *expires_ms < free_after,
        };
        // The smallest free id; after a lost race, one of the first few free
        // ones at random, so keepers granting at once spread out.
        let spread = if attempt > 1 { RETRY_SPREAD } else { 1 };
        let free: Vec<u32> = (0..=MAX_WORKER_ID)
            .filter(|id| is_free(*id))
            .take(spread)
            .collect();
        let candidate = request
            .preferred
            .filter(|id| *id <= MAX_WORKER_ID && is_free(*id))
            .or_else(|| (!free.is_empty()).then(|| free[rand::random_range(0..free.len())]))
            .ok_or(LeaseError::NoWorkerId)?;
        let lease = HolderLease {
            holder,
            lease_id,
            expires,
        };
        let previous_generation = known.get(&candidate).map(|(generation, _)| *generation);
        let claimed = claim_worker_id(
            transaction,
            &lease,
            candidate,
            previous_generation,
            free_after,
        )
        .await?;
        match claimed {
            (1, generation) => {
                metrics::counter!("pushgrid_keeper_worker_grants_total").increment(1);
                tracing::info!(
                    worker_id = candidate,
                    generation,
                    holder,
                    "worker id granted"
                );
                Ok(WorkerGrant {
                    id: candidate,
                    generation: generation as u64,
                })
            }
            _ => Err(LeaseError::Conflict),
        }
    }

    /// Renews a lease (and the worker id it still holds) and records its
    /// load; None when the lease is unknown (it ended and was deleted).
    pub async fn heartbeat(&self, lease_id: u64, load: u64) -> Result<Option<Renewed>, LeaseError> {
        let mut transaction = self.pool.begin().await?;
        let now = self.now_ms(&mut transaction).await?;
        // A lease past its expiry that no keeper has deleted yet is renewed:
        // it ended only because no keeper could renew it (the database was
        // stalled), and the worker id is fenced on its own row below.
        let renewed = sqlx::query(
            "UPDATE leases SET expires_ms = ? + ttl_ms, node_load = ? WHERE lease_id = ?",
        )
        .bind(now)
        .bind(i64::try_from(load).unwrap_or(i64::MAX))
        .bind(ms(lease_id))
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        if renewed == 0 {
            transaction.commit().await?;
            return Ok(None);
        }
        let worker_renewed = sqlx::query("UPDATE worker_ids SET expires_ms = ? WHERE lease_id = ?")
            .bind(now + ms(self.policy.ttl_ms))
            .bind(ms(lease_id))
            .execute(&mut *transaction)
            .await?
            .rows_affected()
            > 0;
        transaction.commit().await?;
        Ok(Some(Renewed { worker_renewed }))
    }

    /// Ends a lease now; its worker id becomes free after the margin.
    /// Returns the node id when there was such a lease.
    pub async fn deregister(&self, lease_id: u64) -> Result<Option<String>, LeaseError> {
        let mut transaction = self.pool.begin().await?;
        let now = self.now_ms(&mut transaction).await?;
        let node = sqlx::query("SELECT node_id FROM leases WHERE lease_id = ?")
            .bind(ms(lease_id))
            .fetch_optional(&mut *transaction)
            .await?
            .map(|row| row.try_get::<String, _>("node_id"))
            .transpose()?;
        sqlx::query("DELETE FROM leases WHERE lease_id = ?")
            .bind(ms(lease_id))
            .execute(&mut *transaction)
            .await?;
        sqlx::query("UPDATE worker_ids SET expires_ms = ? WHERE lease_id = ? AND expires_ms > ?")
            .bind(now)
            .bind(ms(lease_id))
            .bind(now)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(node)
    }

    /// Deletes expired leases; returns the node ids whose lease ended.
    pub async fn reap(&self) -> Result<Vec<String>, LeaseError> {
        let mut connection = self.pool.acquire().await?;
        let now = self.now_ms(&mut connection).await?;
        let rows = sqlx::query("SELECT lease_id, node_id FROM leases WHERE expires_ms <= ?")
            .bind(now)
            .fetch_all(&mut *connection)
            .await?;
        let mut ended = Vec::with_capacity(rows.len());
        for row in rows {
            let lease_id: i64 = row.try_get("lease_id")?;
            // Conditional: a lease renewed meanwhile by another keeper stays.
            let deleted = sqlx::query("DELETE FROM leases WHERE lease_id = ? AND expires_ms <= ?")
                .bind(lease_id)
                .bind(now)
                .execute(&mut *connection)
                .await?
                .rows_affected();
            if deleted > 0 {
                ended.push(row.try_get("node_id")?);
            }
        }
        Ok(ended)
    }

    /// The role of the node holding `lease_id` (expired or not), if any.
    pub async fn role_of_lease(
        &self,
        lease_id: u64,
    ) -> Result<Option<pushgrid_proto::cluster::Role>, LeaseError> {
        let row = sqlx::query("SELECT role FROM leases WHERE lease_id = ?")
            .bind(ms(lease_id))
            .fetch_optional(&self.pool)
            .await?;
        role_of_row(row)
    }

    /// The role of the node registered under `node_id` (a live lease), if any.
    pub async fn role_of_node(
        &self,
        node_id: &str,
    ) -> Result<Option<pushgrid_proto::cluster::Role>, LeaseError> {
        let mut connection = self.pool.acquire().await?;
        let now = self.now_ms(&mut connection).await?;
        let row =
            sqlx::query("SELECT role FROM leases WHERE node_id = ? AND expires_ms > ? LIMIT 1")
                .bind(node_id.to_string())
                .bind(now)
                .fetch_optional(&mut *connection)
                .await?;
        role_of_row(row)
    }

    /// Every node with a live lease, by node id (one per id: the lease that
    /// lives longest), and the longest lease TTL among them (ms).
    pub async fn live_nodes(&self) -> Result<(Vec<NodeInfo>, u64), LeaseError> {
        let mut connection = self.pool.acquire().await?;
        let now = self.now_ms(&mut connection).await?;
        let rows = sqlx::query(
            "SELECT node, node_load, ttl_ms FROM leases WHERE expires_ms > ? ORDER BY node_id, expires_ms DESC",
        )
        .bind(now)
        .fetch_all(&mut *connection)
        .await?;
        let mut seen = HashSet::with_capacity(rows.len());
        let mut nodes = Vec::with_capacity(rows.len());
        let mut longest_ttl_ms = 0;
        for row in rows {
            longest_ttl_ms =
                longest_ttl_ms.max(u64::try_from(row.try_get::<i64, _>("ttl_ms")?).unwrap_or(0));
            let bytes: Vec<u8> = row.try_get("node")?;
            let mut node = NodeInfo::decode(bytes.as_slice())
                .map_err(|error| LeaseError::Corrupt(error.to_string()))?;
            if !seen.insert(node.id.clone()) {
                continue;
            }
            node.load = u64::try_from(row.try_get::<i64, _>("node_load")?).unwrap_or(0);
            nodes.push(node);
        }
        Ok((nodes, longest_ttl_ms))
    }

    /// The worker id rows, for tests and inspection: (worker id, holder,
    /// generation, expires ms).
    pub async fn worker_ids(&self) -> Result<Vec<(u32, String, u64, u64)>, LeaseError> {
        let rows = sqlx::query(
            "SELECT worker_id, holder, generation, expires_ms FROM worker_ids ORDER BY worker_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get::<i64, _>("worker_id")?.max(0) as u32,
                    row.try_get("holder")?,
                    row.try_get::<i64, _>("generation")?.max(0) as u64,
                    row.try_get::<i64, _>("expires_ms")?.max(0) as u64,
                ))
            })
            .collect()
    }
}

fn role_of_row(
    row: Option<sqlx::any::AnyRow>,
) -> Result<Option<pushgrid_proto::cluster::Role>, LeaseError> {
    let Some(row) = row else {
        return Ok(None);
    };
    let role: i64 = row.try_get("role")?;
    let role = i32::try_from(role)
        .ok()
        .and_then(|role| pushgrid_proto::cluster::Role::try_from(role).ok())
        .ok_or_else(|| LeaseError::Corrupt(format!("role {role}")))?;
    Ok(Some(role))
}

/// Milliseconds and ids as the BIGINT columns hold them.
fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Who a worker id is granted to, and until when.
struct HolderLease<'a> {
    holder: &'a str,
    lease_id: i64,
    expires: i64,
}

/// Gives `worker_id` back to the holder under its new lease when its
/// generation is still `generation` (nobody was granted it since); true when
/// it did.
async fn keep_worker_id(
    transaction: &mut AnyConnection,
    lease: &HolderLease<'_>,
    worker_id: u32,
    generation: u64,
) -> Result<bool, LeaseError> {
    let kept = sqlx::query(
        "UPDATE worker_ids SET holder = ?, lease_id = ?, expires_ms = ? \
         WHERE worker_id = ? AND generation = ?",
    )
    .bind(lease.holder.to_string())
    .bind(lease.lease_id)
    .bind(lease.expires)
    .bind(i64::from(worker_id))
    .bind(ms(generation))
    .execute(&mut *transaction)
    .await?
    .rows_affected();
    Ok(kept == 1)
}

/// Every worker id ever granted: its generation and when it expires (ms).
async fn known_worker_ids(
    transaction: &mut AnyConnection,
) -> Result<HashMap<u32, (i64, i64)>, LeaseError> {
    let rows = sqlx::query("SELECT worker_id, generation, expires_ms FROM worker_ids")
        .fetch_all(&mut *transaction)
        .await?;
    let mut known: HashMap<u32, (i64, i64)> = HashMap::with_capacity(rows.len());
    for row in rows {
        let id = u32::try_from(row.try_get::<i64, _>("worker_id")?)
            .map_err(|_| LeaseError::Corrupt("negative worker id".into()))?;
        known.insert(id, (row.try_get("generation")?, row.try_get("expires_ms")?));
    }
    Ok(known)
}

/// Claims `candidate` for the lease: a new row when it was never granted
/// (`previous_generation` None), else the next generation when it is still
/// free (expired before `free_after`). Returns the rows changed (1: claimed,
/// 0: another keeper was faster) and the generation granted.
async fn claim_worker_id(
    transaction: &mut AnyConnection,
    lease: &HolderLease<'_>,
    candidate: u32,
    previous_generation: Option<i64>,
    free_after: i64,
) -> Result<(u64, i64), LeaseError> {
    let claimed = match previous_generation {
        None => sqlx::query(
            "INSERT INTO worker_ids (worker_id, holder, lease_id, generation, expires_ms) \
             VALUES (?, ?, ?, 1, ?)",
        )
        .bind(i64::from(candidate))
        .bind(lease.holder.to_string())
        .bind(lease.lease_id)
        .bind(lease.expires)
        .execute(&mut *transaction)
        .await
        .map(|done| (done.rows_affected(), 1))?,
        Some(generation) => sqlx::query(
            "UPDATE worker_ids SET holder = ?, lease_id = ?, generation = generation + 1, expires_ms = ? \
             WHERE worker_id = ? AND generation = ? AND expires_ms < ?",
        )
        .bind(lease.holder.to_string())
        .bind(lease.lease_id)
        .bind(lease.expires)
        .bind(i64::from(candidate))
        .bind(generation)
        .bind(free_after)
        .execute(&mut *transaction)
        .await
        .map(|done| (done.rows_affected(), generation + 1))?,
    };
    Ok(claimed)
}
