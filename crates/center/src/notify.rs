//! Notification fallback (issue 25): a push with a `notification` object
//! also reaches its users' devices through APNs, FCM or HMS, by policy:
//! `offline` (the default) only when the user had no live session just after
//! the message was routed, `always` whatever the sessions, `unacked_after`
//! when no device acknowledged the message within `unacked_after_secs`. The message
//! still goes to the inbox and to every live connection; a notification
//! never replaces that guarantee.
//!
//! After a push is stored and answered, each of its users is one job on a
//! bounded queue (an `unacked_after` job once its time has passed; a full
//! queue drops the notification, counted; the message is stored all the
//! same). A job checks its policy (`offline`: the user's sessions, through
//! the routing lookups batched per register; `unacked_after`: the message's
//! state in saver), reads the user's device tokens from saver (batched per
//! saver), and sends one notification per token with the app's credentials
//! for that token's provider, at most `notify_concurrency` provider requests
//! at once. A token the provider calls dead is removed from saver. The
//! `notification` object's checks are in `params`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pushgrid_common::batch::{BatchConfig, BatcherMap};
use pushgrid_common::rpc::ChannelPool;
use pushgrid_notify::{Device, Outcome, Sender};
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::{
    DevicePushToken, ListTokensRequest, Message, MessageStatusRequest, RemoveTokensRequest, Role,
    TokenKey, UserKey,
};
use tokio::sync::{Semaphore, mpsc};

use crate::CenterConfig;
use crate::route::Router;

mod params;

pub(crate) use self::params::{Notice, NotificationParams, Policy, validate};

/// One user of a push to notify.
struct Job {
    app: String,
    user: String,
    msg_id: u64,
    notice: Notice,
}

/// The queue of notifications and what sends them.
pub(crate) struct Notifier {
    queue: mpsc::Sender<Job>,
    /// Places for `unacked_after` jobs waiting out their time (as many as
    /// the queue holds); none free drops the notification, counted.
    waiting: Arc<Semaphore>,
}

/// Why a user of a push was not notified, for the metric's `reason`.
fn skipped(reason: &'static str) {
    metrics::counter!("pushgrid_center_notify_skipped_total", "reason" => reason).increment(1);
}

impl Notifier {
    /// The HTTP client of the providers, trusting `notify_ca_file` too;
    /// built before the center joins the cluster, so that an unreadable
    /// file stops it at start with the file named.
    pub(crate) fn sender(config: &CenterConfig) -> Result<Sender, String> {
        let mut roots = Vec::new();
        if !config.notify_ca_file.is_empty() {
            let pem = std::fs::read(&config.notify_ca_file)
                .map_err(|error| format!("notify_ca_file {}: {error}", config.notify_ca_file))?;
            roots.push(pem);
        }
        let timeout = Duration::from_millis(config.notify_timeout_ms.max(1));
        Sender::new(&roots, timeout)
            .map_err(|error| format!("notify_ca_file {}: {error}", config.notify_ca_file))
    }

    /// Starts the notifier's task.
    pub(crate) fn start(
        config: &CenterConfig,
        sender: Sender,
        router: Arc<Router>,
        channels: ChannelPool,
        cluster: pushgrid_common::cluster::Cluster,
    ) -> Notifier {
        let (queue, jobs) = mpsc::channel(config.notify_queue.max(1));
        let channels = Arc::new(channels);
        let worker = Worker {
            sender: Arc::new(sender),
            router,
            token_lists: token_lists(channels.clone()),
            channels,
            cluster,
            permits: Arc::new(Semaphore::new(config.notify_concurrency.max(1))),
        };
        tokio::spawn(worker.run(jobs));
        Notifier {
            queue,
            waiting: Arc::new(Semaphore::new(config.notify_queue.max(1))),
        }
    }

    /// Queues a notification for each stored message of a push (one per
    /// user); a full queue drops them, counted, with one log line per push.
    pub(crate) fn submit(&self, messages: &[Message], notice: &Notice) {
        let mut dropped = 0u64;
        for message in messages {
            let job = Job {
                app: message.app.clone(),
                user: message.user.clone(),
                msg_id: message.id,
                notice: notice.clone(),
            };
            let queued = match notice.policy {
                Policy::UnackedAfter(wait) => self.after(wait, job),
                Policy::Offline | Policy::Always => self.queue.try_send(job).is_ok(),
            };
            if !queued {
                dropped += 1;
            }
        }
        if dropped > 0 {
            metrics::counter!("pushgrid_center_notify_skipped_total", "reason" => "queue_full")
                .increment(dropped);
            tracing::warn!(
                app = %messages[0].app,
                dropped,
                "notification queue full (notify_queue): these users' messages wait in the inbox without a notification"
            );
        }
    }
}

impl Notifier {
    /// Queues `job` once `wait` has passed, holding one of the waiting
    /// places until then; false when none is free.
    fn after(&self, wait: Duration, job: Job) -> bool {
        let Ok(place) = self.waiting.clone().try_acquire_owned() else {
            return false;
        };
        let queue = self.queue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            // Waits for room on the bounded queue rather than dropping a
            // notification that already waited its time.
            let _ = queue.send(job).await;
            drop(place);
        });
        true
    }
}

struct Worker {
    sender: Arc<Sender>,
    router: Arc<Router>,
    /// Users' tokens, read from saver many users per call.
    token_lists: BatcherMap<UserKey, Vec<DevicePushToken>>,
    channels: Arc<ChannelPool>,
    cluster: pushgrid_common::cluster::Cluster,
    permits: Arc<Semaphore>,
}

/// Token lists per saver: one ListTokens call per app for as many users as
/// are waiting (at most 512; saver takes 1000), two calls in flight per
/// saver, so a burst of notifications costs saver and its database one
/// query per batch rather than one per user.
fn token_lists(pool: Arc<ChannelPool>) -> BatcherMap<UserKey, Vec<DevicePushToken>> {
    let config = BatchConfig {
        max_items: 512,
        queue: 16_384,
        in_flight: 2,
        linger: Duration::ZERO,
    };
    BatcherMap::per_peer(pool, config, |channel, keys: Vec<UserKey>| async move {
        let mut apps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for key in &keys {
            let users = apps.entry(key.app.clone()).or_default();
            if !users.contains(&key.user) {
                users.push(key.user.clone());
            }
        }
        let mut by_user: std::collections::HashMap<(String, String), Vec<DevicePushToken>> =
            std::collections::HashMap::new();
        for (app, users) in apps {
            let request = ListTokensRequest {
                app: app.clone(),
                user: String::new(),
                users,
            };
            let tokens = SaverClient::new(channel.clone())
                .list_tokens(request)
                .await?
                .into_inner()
                .tokens;
            for token in tokens {
                by_user
                    .entry((app.clone(), token.user.clone()))
                    .or_default()
                    .push(token);
            }
        }
        Ok(keys
            .iter()
            .map(|key| {
                by_user
                    .remove(&(key.app.clone(), key.user.clone()))
                    .unwrap_or_default()
            })
            .collect())
    })
}

impl Worker {
    /// Takes jobs off the queue, at most as many at once as provider
    /// requests may be in flight: the rest wait on the bounded queue, so
    /// memory stays bounded and a full queue is seen (and counted) at once.
    async fn run(self, mut jobs: mpsc::Receiver<Job>) {
        let running = Arc::new(Semaphore::new(self.permits.available_permits()));
        let worker = Arc::new(self);
        while let Some(job) = jobs.recv().await {
            let Ok(place) = running.clone().acquire_owned().await else {
                return;
            };
            let worker = worker.clone();
            tokio::spawn(async move {
                worker.notify(job).await;
                drop(place);
            });
        }
    }

    /// Notifies one user of a push, by its policy.
    async fn notify(&self, job: Job) {
        match job.notice.policy {
            Policy::Offline => match self.router.sessions(&job.app, &job.user).await {
                Ok((0, false)) => {}
                Ok((0, true)) => return skipped("register_warming"),
                Ok(_) => return skipped("online"),
                Err(status) => {
                    tracing::warn!(app = %job.app, id = job.msg_id, error = %status.message(), "notification skipped: session lookup failed");
                    return skipped("lookup_failed");
                }
            },
            Policy::UnackedAfter(_) => match self.message_state(&job).await {
                Ok(state) if state == "stored" || state == "delivered" => {}
                Ok(state) if state == "acked" => return skipped("acked"),
                Ok(_) => return skipped("expired"),
                Err(status) => {
                    tracing::warn!(app = %job.app, id = job.msg_id, error = %status.message(), "notification skipped: message status not readable");
                    return skipped("status_failed");
                }
            },
            Policy::Always => {}
        }
        let tokens = match self.tokens(&job.app, &job.user).await {
            Ok(tokens) if tokens.is_empty() => return skipped("no_tokens"),
            Ok(tokens) => tokens,
            Err(status) => {
                tracing::warn!(app = %job.app, id = job.msg_id, error = %status.message(), "notification skipped: tokens not readable");
                return skipped("tokens_failed");
            }
        };
        let sends = tokens.iter().map(|token| self.send_one(&job, token));
        futures::future::join_all(sends).await;
    }

    /// One notification to one device token, counted by provider and outcome.
    async fn send_one(&self, job: &Job, token: &DevicePushToken) {
        let provider = token.provider.as_str();
        let Some(credentials) = self
            .cluster
            .view()
            .notify_provider(&job.app, provider)
            .cloned()
        else {
            count(provider, "no_credentials", job.notice.policy);
            return;
        };
        let Ok(_permit) = self.permits.acquire().await else {
            return;
        };
        let started = tokio::time::Instant::now();
        let device = Device {
            token: &token.token,
            bundle: &token.bundle,
        };
        let outcome = self
            .sender
            .send(&credentials, device, &job.notice.notification)
            .await;
        metrics::histogram!("pushgrid_center_notify_seconds", "provider" => provider.to_string())
            .record(started.elapsed().as_secs_f64());
        count(provider, outcome.label(), job.notice.policy);
        match outcome {
            Outcome::Sent => {}
            Outcome::DeadToken(reason) => {
                tracing::info!(app = %job.app, provider, %reason, "device token is dead; removing it");
                self.remove(&job.app, token).await;
            }
            Outcome::Failed(reason) => {
                tracing::warn!(app = %job.app, id = job.msg_id, provider, %reason, "notification failed");
            }
        }
    }

    /// Any live saver: every saver serves every app.
    fn saver_address(&self) -> Result<String, tonic::Status> {
        self.cluster
            .view()
            .pick(Role::Saver, rand::random::<u64>())
            .map(|node| node.grpc_addr.clone())
            .ok_or_else(|| tonic::Status::unavailable("no saver is live"))
    }

    /// The message's state in saver: stored, delivered, acked, expired,
    /// dead_lettered, or gone (past its TTL) when saver no longer has it.
    async fn message_state(&self, job: &Job) -> Result<String, tonic::Status> {
        let channel = self.channels.get(&self.saver_address()?)?;
        let request = MessageStatusRequest {
            app: job.app.clone(),
            id: job.msg_id,
        };
        let status = SaverClient::new(channel)
            .message_status(request)
            .await?
            .into_inner();
        Ok(if status.found {
            status.state
        } else {
            "gone".to_string()
        })
    }

    async fn tokens(&self, app: &str, user: &str) -> Result<Vec<DevicePushToken>, tonic::Status> {
        let key = UserKey {
            app: app.to_string(),
            user: user.to_string(),
        };
        self.token_lists.get(&self.saver_address()?).call(key).await
    }

    async fn remove(&self, app: &str, token: &DevicePushToken) {
        let request = RemoveTokensRequest {
            app: app.to_string(),
            tokens: vec![TokenKey {
                provider: token.provider.clone(),
                token: token.token.clone(),
            }],
            user: String::new(),
        };
        let removed = async {
            let channel = self.channels.get(&self.saver_address()?)?;
            SaverClient::new(channel)
                .remove_tokens(request)
                .await
                .map(drop)
        }
        .await;
        if let Err(status) = removed {
            tracing::warn!(app, error = %status.message(), "dead device token not removed");
        }
    }
}

fn count(provider: &str, outcome: &'static str, policy: Policy) {
    metrics::counter!(
        "pushgrid_center_notifications_total",
        "provider" => provider.to_string(),
        "outcome" => outcome,
        "policy" => policy.label()
    )
    .increment(1);
}
