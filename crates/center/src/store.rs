//! Single-user pushes coalesced into StoreMany calls: a [`StoreBatcher`] per
//! saver sends a push at once when one of its `store_batch_in_flight` calls
//! is free, and while all are busy gathers the pushes that arrive (up to
//! `store_batch_max`) into the next call, each caller getting its own
//! message back.

use std::sync::Arc;

use pushgrid_common::batch::{BatchConfig, BatcherMap};
use pushgrid_common::rpc::ChannelPool;
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::{Message, StoreItem, StoreManyRequest};

use crate::CenterConfig;
use crate::error::ApiError;

/// Single-user pushes waiting to share a StoreMany call, per saver.
pub(crate) struct StoreBatcher {
    batchers: Option<BatcherMap<StoreItem, Message>>,
}

impl StoreBatcher {
    /// Off when `store_batch_max` is 0 or 1: every push is its own Store call.
    pub(crate) fn new(
        config: &CenterConfig,
        credentials: &pushgrid_common::auth::Credentials,
    ) -> StoreBatcher {
        if config.store_batch_max <= 1 {
            return StoreBatcher { batchers: None };
        }
        let batch = BatchConfig {
            // saver refuses StoreMany calls of more than 10,000 items.
            max_items: config.store_batch_max.min(10_000),
            queue: config.store_batch_max.max(4096),
            in_flight: config.store_batch_in_flight.max(1),
            linger: std::time::Duration::ZERO,
        };
        let pool = Arc::new(ChannelPool::new(2, credentials));
        let batchers =
            BatcherMap::per_peer(pool, batch, |channel, items: Vec<StoreItem>| async move {
                let count = items.len();
                metrics::histogram!("pushgrid_center_store_batch_items").record(count as f64);
                let messages = SaverClient::new(channel)
                    .store_many(StoreManyRequest { items })
                    .await?
                    .into_inner()
                    .messages;
                if messages.len() != count {
                    return Err(tonic::Status::internal(format!(
                        "saver answered {} messages for {count} items",
                        messages.len()
                    )));
                }
                Ok(messages)
            });
        StoreBatcher {
            batchers: Some(batchers),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.batchers.is_some()
    }

    /// Stores one item in the next StoreMany call to `saver`.
    pub(crate) async fn store(&self, saver: &str, item: StoreItem) -> Result<Message, ApiError> {
        let Some(batchers) = &self.batchers else {
            return Err(ApiError::Internal("store batching is off".into()));
        };
        batchers
            .get(saver)
            .call(item)
            .await
            .map_err(ApiError::from_status)
    }
}
