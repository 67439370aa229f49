//! Sending one notification to one device token through its provider.
//!
//! One [`Sender`] per process: one HTTP client (connections pooled per
//! provider host, HTTP/2 negotiated by ALPN, so concurrent requests to APNs
//! or FCM share a connection), the APNs provider tokens and the OAuth access
//! tokens cached per app and credentials version. [`Sender::send`] makes at
//! most [`MAX_ATTEMPTS`] attempts: a 429 or 5xx is tried again after the
//! provider's `Retry-After` (capped at [`MAX_RETRY_WAIT`]) or a doubling
//! back-off, and a refused provider or access token is signed or fetched
//! again once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pushgrid_proto::cluster::NotifyProvider;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::fields::Provider;
use crate::{apns, fcm, hms};

/// Attempts per notification, the first one included.
pub const MAX_ATTEMPTS: u32 = 3;
/// The longest wait before trying again, whatever `Retry-After` says.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
/// The first back-off when the provider gave no `Retry-After`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// What a notification shows (the push API's `notification` object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notification {
    pub title: String,
    pub body: String,
    /// The app icon's badge (APNs); None leaves it as it is.
    pub badge: Option<u32>,
    /// A sound name; empty for none.
    pub sound: String,
    /// Notifications with the same collapse id replace each other on the
    /// device (APNs `apns-collapse-id`, FCM and HMS `collapse_key`).
    pub collapse_id: String,
    /// Key-value pairs handed to the app with the notification.
    pub data: BTreeMap<String, String>,
}

/// The device a notification goes to.
#[derive(Debug, Clone, Copy)]
pub struct Device<'a> {
    pub token: &'a str,
    /// The APNs bundle id (`apns-topic`) or Android package name; empty uses
    /// the credentials' `topic`.
    pub bundle: &'a str,
}

/// How a notification ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted it.
    Sent,
    /// The provider says the token is no longer valid: remove it.
    DeadToken(String),
    /// Refused for good (a bad request, credentials the provider rejects),
    /// or still failing after the last attempt.
    Failed(String),
}

impl Outcome {
    /// The metric label: `sent`, `dead_token` or `failed`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::DeadToken(_) => "dead_token",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// One attempt's result, as a provider module reads the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    Done(Outcome),
    /// Worth trying again (429, 5xx, a transport error), after the
    /// provider's `Retry-After` when it gave one.
    Retry(Option<Duration>, String),
    /// The provider or access token was refused: get a new one, try again.
    Reauthorize(String),
}

/// Why a sender could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error("notification HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// A cached token and until when it may be used.
struct Cached {
    token: String,
    until: Instant,
}

/// Sends notifications; see the module documentation.
pub struct Sender {
    pub(crate) http: reqwest::Client,
    /// By (app, provider, credentials' updated_ms): new credentials start
    /// with a new token.
    tokens: Mutex<HashMap<(String, Provider, u64), Cached>>,
    /// Held while a token is signed or fetched, so that a burst of sends
    /// with no token cached makes one token request, not one each.
    fetching: tokio::sync::Mutex<()>,
}

impl Sender {
    /// A sender trusting the public roots plus `extra_roots` (PEM; a test
    /// stand-in's or a private relay's certificate authority).
    pub fn new(extra_roots: &[Vec<u8>], timeout: Duration) -> Result<Sender, SenderError> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(600))
            .user_agent(concat!("pushgrid/", env!("CARGO_PKG_VERSION")));
        for pem in extra_roots {
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem)?);
        }
        Ok(Sender {
            http: builder.build()?,
            tokens: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// Sends `notification` to `device` with the app's `credentials`.
    pub async fn send(
        &self,
        credentials: &NotifyProvider,
        device: Device<'_>,
        notification: &Notification,
    ) -> Outcome {
        let Some(provider) = Provider::parse(&credentials.provider) else {
            return Outcome::Failed(format!("unknown provider {:?}", credentials.provider));
        };
        let mut backoff = FIRST_BACKOFF;
        let mut reauthorized = false;
        let mut last = String::new();
        for attempt in 1..=MAX_ATTEMPTS {
            let result = match self.token(credentials, provider).await {
                Ok(token) => {
                    self.attempt(provider, credentials, &token, device, notification)
                        .await
                }
                Err(attempt) => attempt,
            };
            match result {
                Attempt::Done(outcome) => return outcome,
                Attempt::Reauthorize(reason) => {
                    self.forget_token(credentials, provider);
                    if reauthorized {
                        return Outcome::Failed(reason);
                    }
                    reauthorized = true;
                    last = reason;
                }
                Attempt::Retry(after, reason) => {
                    last = reason;
                    if attempt < MAX_ATTEMPTS {
                        tokio::time::sleep(after.unwrap_or(backoff).min(MAX_RETRY_WAIT)).await;
                        backoff *= 2;
                    }
                }
            }
        }
        Outcome::Failed(format!("gave up after {MAX_ATTEMPTS} attempts: {last}"))
    }

    async fn attempt(
        &self,
        provider: Provider,
        credentials: &NotifyProvider,
        token: &str,
        device: Device<'_>,
        notification: &Notification,
    ) -> Attempt {
        match provider {
            Provider::Apns => apns::send(self, credentials, token, device, notification).await,
            Provider::Fcm => fcm::send(self, credentials, token, device, notification).await,
            Provider::Hms => hms::send(self, credentials, token, device, notification).await,
        }
    }

    /// The provider token (APNs) or access token (FCM, HMS) to send with:
    /// the cached one while it lasts, else a new one.
    async fn token(
        &self,
        credentials: &NotifyProvider,
        provider: Provider,
    ) -> Result<String, Attempt> {
        let key = (credentials.app.clone(), provider, credentials.updated_ms);
        if let Some(token) = self.cached(&key) {
            return Ok(token);
        }
        let _fetching = self.fetching.lock().await;
        // Another send may have fetched it while this one waited.
        if let Some(token) = self.cached(&key) {
            return Ok(token);
        }
        let (token, valid_for) = match provider {
            Provider::Apns => apns::provider_token(credentials, unix_now())?,
            Provider::Fcm => fcm::access_token(self, credentials, unix_now()).await?,
            Provider::Hms => hms::access_token(self, credentials).await?,
        };
        let mut tokens = self.lock_tokens();
        // Credentials replaced since: their tokens are of no further use.
        tokens.retain(|(app, kind, updated), _| {
            !(app == &credentials.app && *kind == provider && *updated != credentials.updated_ms)
        });
        tokens.insert(
            key,
            Cached {
                token: token.clone(),
                until: Instant::now() + valid_for,
            },
        );
        Ok(token)
    }

    fn cached(&self, key: &(String, Provider, u64)) -> Option<String> {
        self.lock_tokens()
            .get(key)
            .filter(|cached| cached.until > Instant::now())
            .map(|cached| cached.token.clone())
    }

    fn forget_token(&self, credentials: &NotifyProvider, provider: Provider) {
        self.lock_tokens()
            .remove(&(credentials.app.clone(), provider, credentials.updated_ms));
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Provider, u64), Cached>> {
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// `Retry-After` in seconds, when the answer has one.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// How an HTTP status that the provider module did not recognise ends:
/// 429 and 5xx are tried again, the rest fail.
pub(crate) fn by_status(
    status: reqwest::StatusCode,
    headers: &HeaderMap,
    reason: String,
) -> Attempt {
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        Attempt::Retry(retry_after(headers), reason)
    } else {
        Attempt::Done(Outcome::Failed(reason))
    }
}

/// A transport error (connect, TLS, time-out) is tried again.
pub(crate) fn transport(error: &reqwest::Error) -> Attempt {
    Attempt::Retry(None, format!("transport: {error}"))
}

/// A configured address, or the provider's `default` when it is empty.
pub(crate) fn or_default<'a>(configured: &'a str, default: &'a str) -> &'a str {
    if configured.is_empty() {
        default
    } else {
        configured
    }
}

/// The address of `path` under `base`, or under `default` when `base` is empty.
pub(crate) fn url(base: &str, default: &str, path: &str) -> String {
    format!("{}{path}", or_default(base, default).trim_end_matches('/'))
}

/// A provider's answer, read whole.
pub(crate) struct Answer {
    pub status: reqwest::StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

/// Sends `request` and reads its answer; a transport error (connect, TLS,
/// time-out) is an attempt to make again.
pub(crate) async fn exchange(request: reqwest::RequestBuilder) -> Result<Answer, Attempt> {
    let response = request.send().await.map_err(|error| transport(&error))?;
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap_or_default();
    Ok(Answer {
        status,
        headers,
        text,
    })
}

/// An OAuth2 token endpoint's answer (RFC 6749 section 5.1).
#[derive(serde::Deserialize)]
pub(crate) struct AccessToken {
    pub access_token: String,
    #[serde(default = "default_expiry")]
    pub expires_in: u64,
}

fn default_expiry() -> u64 {
    3600
}

impl AccessToken {
    /// The token and how long to use it: a minute less than it lives.
    pub(crate) fn cached(self) -> (String, Duration) {
        let secs = self.expires_in.saturating_sub(60).max(1);
        (self.access_token, Duration::from_secs(secs))
    }
}

/// Posts a token request form and reads the access token.
pub(crate) async fn fetch_access_token(
    sender: &Sender,
    token_url: &str,
    form: &[(&str, &str)],
) -> Result<(String, Duration), Attempt> {
    let Answer {
        status,
        headers,
        text,
    } = exchange(sender.http.post(token_url).form(form)).await?;
    if !status.is_success() {
        // 429 and 5xx are tried again; credentials the token endpoint
        // refuses fail the notification.
        let reason = format!("token endpoint answered {status}: {}", excerpt(&text));
        return Err(by_status(status, &headers, reason));
    }
    serde_json::from_str::<AccessToken>(&text)
        .map(AccessToken::cached)
        .map_err(|error| Attempt::Retry(None, format!("token endpoint answer unreadable: {error}")))
}

/// The first 200 bytes of a provider's answer, for a reason string.
pub(crate) fn excerpt(text: &str) -> String {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim().to_string()
}
