//! Store calls with an idempotency key: who was first (SQL under durability
//! `mysql`, a Redis claim under `redis`), the first answer remembered in Redis
//! for a day and given again to retries.

use prost::Message as _;
use pushgrid_proto::cluster::StoreResponse;

use super::RedisSqlStore;
use super::connection::{RedisConnection, command};
use crate::error::StoreError;
use crate::store::{IDEMPOTENCY_WINDOW_MS, MessageStore, Stored, Withdrawal};

/// What `pg:idem:{..}` holds while the first call with the key is storing
/// (durability `redis`).
const IDEMPOTENCY_CLAIM: &str = "storing";

pub(super) fn idempotency_key(app: &str, key: &str) -> String {
    format!("pg:idem:{{{app}:{key}}}")
}

impl RedisSqlStore {
    /// Answers a retry with the first call's messages (durability `mysql`):
    /// the live ones go back into Redis, then the key is confirmed so a
    /// withdrawal of the first call keeps them. When the first call was
    /// withdrawn meanwhile, the retry fails and the caller tries again.
    pub(super) async fn replay(
        &self,
        app: &str,
        key: &str,
        first: Stored,
    ) -> Result<Stored, StoreError> {
        let ids: Vec<u64> = first.messages.iter().map(|message| message.id).collect();
        let live = self.sql.unacked_by_ids(&ids).await?;
        self.recache(&live).await?;
        if !self.sql.confirm_key(app, key).await? {
            self.withdraw(Withdrawal::of(&live, None)).await;
            return Err(StoreError::Commit(
                "the first call with this idempotency key failed and was withdrawn; retry".into(),
            ));
        }
        self.remember_answer(app, key, &first).await;
        Ok(first)
    }

    /// Stores the new messages of a keyed call under durability `mysql`: SQL
    /// decides who was first (its primary key), also after Redis lost its
    /// data. `Some`: an earlier call with the key was first, its answer.
    pub(super) async fn store_keyed_in_sql(
        &self,
        app: &str,
        idempotency_key: &str,
        stored: &Stored,
    ) -> Result<Option<Stored>, StoreError> {
        let withdrawal = || Withdrawal::of(&stored.messages, Some((app, idempotency_key)));
        if let Some(first) = self.sql.idempotent_answer(app, idempotency_key).await? {
            return self.replay(app, idempotency_key, first).await.map(Some);
        }
        // A deadlock victim applied nothing: it may simply try again.
        match crate::store::sql::retry_lock_conflicts(|| {
            self.sql
                .insert_with_key(app, idempotency_key, &stored.messages)
        })
        .await
        {
            Ok(Some(first)) => return self.replay(app, idempotency_key, first).await.map(Some),
            Ok(None) => {}
            Err(error) => {
                self.withdraw(withdrawal()).await;
                return Err(error);
            }
        }
        if let Err(error) = self
            .cache_again_on_a_broken_connection(&stored.messages)
            .await
        {
            self.withdraw(withdrawal()).await;
            return Err(error);
        }
        self.remember_answer(app, idempotency_key, stored).await;
        Ok(None)
    }

    /// Stores the new messages of a keyed call under durability `redis`: the
    /// key is claimed first and answered once stored, so a retry meanwhile is
    /// told to try again rather than given ids not stored yet. `Some`: an
    /// earlier call with the key was first, its answer.
    pub(super) async fn store_keyed_in_redis(
        &self,
        redis: &mut RedisConnection,
        redis_key: &str,
        app: &str,
        idempotency_key: &str,
        stored: &Stored,
    ) -> Result<Option<Stored>, StoreError> {
        let withdrawal = || Withdrawal::of(&stored.messages, Some((app, idempotency_key)));
        let claimed: Option<String> = command("SET")
            .arg(redis_key)
            .arg(IDEMPOTENCY_CLAIM)
            .arg("NX")
            .arg("PX")
            .arg(IDEMPOTENCY_WINDOW_MS)
            .query_async(&mut *redis)
            .await?;
        if claimed.is_none() {
            let first: Option<Vec<u8>> = command("GET")
                .arg(redis_key)
                .query_async(&mut *redis)
                .await?;
            return match first {
                Some(answer) if answer != IDEMPOTENCY_CLAIM.as_bytes() => {
                    replayed(&answer).map(Some)
                }
                _ => Err(StoreError::Commit(
                    "a call with this idempotency key is in progress; retry".into(),
                )),
            };
        }
        if let Err(error) = self
            .cache_again_on_a_broken_connection(&stored.messages)
            .await
        {
            self.withdraw(withdrawal()).await;
            return Err(error);
        }
        self.sql.insert_in_background(stored.messages.clone());
        self.remember_answer(app, idempotency_key, stored).await;
        Ok(None)
    }

    async fn remember_answer(&self, app: &str, key: &str, stored: &Stored) {
        let answer = StoreResponse {
            messages: stored.messages.clone(),
            replayed: false,
        }
        .encode_to_vec();
        let mut redis = self.redis.clone();
        let remembered = command("SET")
            .arg(idempotency_key(app, key))
            .arg(answer)
            .arg("PX")
            .arg(IDEMPOTENCY_WINDOW_MS)
            .exec_async(&mut redis)
            .await;
        if let Err(error) = remembered {
            tracing::warn!(%error, "cannot remember an idempotent answer in redis");
        }
    }
}

pub(super) fn replayed(answer: &[u8]) -> Result<Stored, StoreError> {
    let response = StoreResponse::decode(answer)
        .map_err(|error| StoreError::Corrupt(format!("idempotency answer: {error}")))?;
    Ok(Stored {
        messages: response.messages,
        replayed: true,
    })
}
