//! Topic subscriptions of this room's connections, for broadcast fan-out.
//! The topic `all` needs no subscription: it reaches every connection of the
//! app (a device may still SUB to it, to recover what it missed). Also the
//! PUSH frame body of a broadcast message, which both the live fan-out and
//! the history replay after SUB send.

use std::collections::HashSet;

use dashmap::DashMap;
use pushgrid_proto::client::{Push, PushKind};

pub(crate) use pushgrid_wire::{ALL_TOPIC as ALL, normalize_topic as normalize};

/// Most topics one connection may hold.
pub(crate) const MAX_TOPICS_PER_CONNECTION: usize = 64;

fn key(app: &str, topic: &str) -> String {
    let mut key = String::with_capacity(app.len() + topic.len() + 1);
    key.push_str(app);
    key.push('\0');
    key.push_str(topic);
    key
}

#[derive(Default)]
pub(crate) struct Topics {
    /// `app \0 topic` -> subscribed connection ids.
    subscribers: DashMap<String, HashSet<u64>>,
    /// connection id -> its keys, to clean up when it closes.
    by_conn: DashMap<u64, Vec<String>>,
}

impl Topics {
    /// Subscribes; Err when the connection holds too many topics.
    pub fn subscribe(&self, conn_id: u64, app: &str, topic: &str) -> Result<(), String> {
        let key = key(app, topic);
        let mut keys = self.by_conn.entry(conn_id).or_default();
        if keys.contains(&key) {
            return Ok(());
        }
        if keys.len() >= MAX_TOPICS_PER_CONNECTION {
            return Err(format!(
                "at most {MAX_TOPICS_PER_CONNECTION} topics per connection"
            ));
        }
        keys.push(key.clone());
        self.subscribers.entry(key).or_default().insert(conn_id);
        Ok(())
    }

    pub fn unsubscribe(&self, conn_id: u64, app: &str, topic: &str) {
        let key = key(app, topic);
        if let Some(mut keys) = self.by_conn.get_mut(&conn_id) {
            keys.retain(|held| held != &key);
        }
        self.by_conn.remove_if(&conn_id, |_, keys| keys.is_empty());
        self.remove_subscriber(&key, conn_id);
    }

    /// Forgets a closed connection's subscriptions.
    pub fn remove_conn(&self, conn_id: u64) {
        if let Some((_, keys)) = self.by_conn.remove(&conn_id) {
            for key in keys {
                self.remove_subscriber(&key, conn_id);
            }
        }
    }

    fn remove_subscriber(&self, key: &str, conn_id: u64) {
        if let Some(mut set) = self.subscribers.get_mut(key) {
            set.remove(&conn_id);
        }
        self.subscribers.remove_if(key, |_, set| set.is_empty());
    }

    /// Some connection of this room is subscribed to the app's topic.
    pub fn has_subscribers(&self, app: &str, topic: &str) -> bool {
        self.subscribers.contains_key(&key(app, topic))
    }

    pub fn subscribers(&self, app: &str, topic: &str) -> Vec<u64> {
        self.subscribers
            .get(&key(app, topic))
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// The PUSH frame body of a broadcast message.
pub(crate) fn broadcast_push(message: pushgrid_proto::cluster::BroadcastMessage) -> Push {
    Push {
        msg_id: message.id,
        kind: PushKind::Broadcast as i32,
        topic: message.topic,
        offset: message.offset,
        epoch: message.epoch,
        payload: message.payload,
        created_ms: message.created_ms,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn subscribe_unsubscribe_and_close() {
        let topics = Topics::default();
        topics.subscribe(1, "a", "news").unwrap();
        topics.subscribe(2, "a", "news").unwrap();
        topics.subscribe(2, "a", "news").unwrap();
        topics.subscribe(2, "b", "news").unwrap();
        let mut news = topics.subscribers("a", "news");
        news.sort();
        assert_eq!(news, vec![1, 2]);
        assert_eq!(topics.subscribers("b", "news"), vec![2], "apps are apart");
        assert!(topics.has_subscribers("a", "news") && !topics.has_subscribers("a", "sport"));
        topics.unsubscribe(1, "a", "news");
        assert_eq!(topics.subscribers("a", "news"), vec![2]);
        topics.remove_conn(2);
        assert!(topics.subscribers("a", "news").is_empty());
        assert!(
            topics.subscribers.is_empty() && topics.by_conn.is_empty(),
            "nothing left behind"
        );
    }

    #[test]
    fn limits_and_names() {
        let topics = Topics::default();
        for index in 0..MAX_TOPICS_PER_CONNECTION {
            topics.subscribe(1, "a", &format!("t{index}")).unwrap();
        }
        assert!(topics.subscribe(1, "a", "one-too-many").is_err());
    }
}
