//! Notification fallback (issue 25): reaching a device whose app is not
//! connected through its platform's notification service (APNs, FCM, HMS).
//!
//! This crate holds what keeper and center share about the providers:
//! - [`ProviderFields`]: one app's credentials for one provider as the admin
//!   API takes them, checked by [`ProviderFields::problems`] (a key that
//!   cannot sign is refused when it is set, not when the first notification
//!   goes out) and turned into the `NotifyProvider` keeper publishes to
//!   centers;
//! - [`redacted`]: what the admin API shows of stored credentials: the
//!   secrets only as a fingerprint;
//! - [`token`]: the tokens signed with the credentials (APNs' ES256 provider
//!   token, FCM's RS256 OAuth assertion);
//! - [`Sender`]: one notification to one device token through APNs, FCM or
//!   HMS, with the provider's documented requests, retries after 429 and 5xx
//!   (honouring `Retry-After`), and dead tokens told apart.

mod apns;
mod fcm;
mod fields;
mod hms;
mod send;
pub mod token;

pub use fields::{Provider, ProviderFields, redacted};
pub use send::{Device, MAX_ATTEMPTS, MAX_RETRY_WAIT, Notification, Outcome, Sender, SenderError};
