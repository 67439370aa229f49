//! One app's credentials for one provider: the admin API's body, its checks,
//! the published form and what may be shown of it.

use std::fmt;

use pushgrid_proto::cluster::NotifyProvider;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::token;

/// A notification provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// Apple Push Notification service, token-based authentication.
    Apns,
    /// Firebase Cloud Messaging, HTTP v1 API.
    Fcm,
    /// Huawei Mobile Services Push Kit.
    Hms,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Apns, Provider::Fcm, Provider::Hms];

    /// `apns`, `fcm` or `hms`; None for anything else.
    pub fn parse(name: &str) -> Option<Provider> {
        Provider::ALL
            .into_iter()
            .find(|provider| provider.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Apns => "apns",
            Provider::Fcm => "fcm",
            Provider::Hms => "hms",
        }
    }

    /// The fields this provider reads; the others must stay empty.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Provider::Apns => &["key_id", "team_id", "private_key", "topic", "base_url"],
            Provider::Fcm => &[
                "project_id",
                "client_email",
                "private_key",
                "base_url",
                "token_url",
            ],
            Provider::Hms => &["client_id", "client_secret", "base_url", "token_url"],
        }
    }

    /// The fields this provider cannot work without.
    fn required(self) -> &'static [&'static str] {
        match self {
            Provider::Apns => &["key_id", "team_id", "private_key", "topic"],
            Provider::Fcm => &["project_id", "client_email", "private_key"],
            Provider::Hms => &["client_id", "client_secret"],
        }
    }
}

/// The fields that are secrets: never logged, shown only as a fingerprint.
const SECRETS: [&str; 2] = ["private_key", "client_secret"];

/// The longest value of any field but a private key (bytes).
const MAX_FIELD: usize = 1024;
/// The longest private key (bytes of PEM): a 4096-bit RSA key is about 3.3 KB.
const MAX_KEY: usize = 16 * 1024;

/// One provider's credentials as the admin API takes them (JSON object);
/// unknown fields are refused so that a misspelt one is not silently lost.
#[derive(Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderFields {
    pub key_id: String,
    pub team_id: String,
    pub private_key: String,
    pub topic: String,
    pub project_id: String,
    pub client_email: String,
    pub client_id: String,
    pub client_secret: String,
    pub base_url: String,
    pub token_url: String,
}

impl fmt::Debug for ProviderFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secrets stay out of every log line, even a debug one.
        f.write_str("ProviderFields { .. }")
    }
}

impl ProviderFields {
    /// The fields by name, in the order of [`Provider::fields`].
    fn get(&self, name: &str) -> &str {
        match name {
            "key_id" => &self.key_id,
            "team_id" => &self.team_id,
            "private_key" => &self.private_key,
            "topic" => &self.topic,
            "project_id" => &self.project_id,
            "client_email" => &self.client_email,
            "client_id" => &self.client_id,
            "client_secret" => &self.client_secret,
            "base_url" => &self.base_url,
            "token_url" => &self.token_url,
            _ => "",
        }
    }

    const NAMES: [&'static str; 10] = [
        "key_id",
        "team_id",
        "private_key",
        "topic",
        "project_id",
        "client_email",
        "client_id",
        "client_secret",
        "base_url",
        "token_url",
    ];

    /// What is wrong with these fields for `provider`, each problem naming
    /// its field; empty when they are usable. A private key is checked by
    /// signing a token with it.
    pub fn problems(&self, provider: Provider) -> Vec<String> {
        let mut problems = Vec::new();
        for name in Self::NAMES {
            let value = self.get(name);
            if !provider.fields().contains(&name) {
                if !value.is_empty() {
                    problems.push(format!("{name} is not a field of {}", provider.as_str()));
                }
                continue;
            }
            let limit = if name == "private_key" {
                MAX_KEY
            } else {
                MAX_FIELD
            };
            if value.is_empty() && provider.required().contains(&name) {
                problems.push(format!("{name} is required for {}", provider.as_str()));
            } else if value.len() > limit {
                problems.push(format!("{name} is longer than {limit} bytes"));
            } else if ["key_id", "team_id", "project_id", "client_id"].contains(&name)
                && !value
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte))
            {
                // They go into request paths and JWT headers as they are.
                problems.push(format!(
                    "{name} may hold only letters, digits, '.', '-' and '_'"
                ));
            } else if name.ends_with("_url")
                && !value.is_empty()
                && !value.starts_with("https://")
                && !value.starts_with("http://")
            {
                problems.push(format!("{name} must be an http(s) URL"));
            }
        }
        if problems.is_empty()
            && let Err(error) = self.sign_probe(provider)
        {
            problems.push(format!("private_key: {error}"));
        }
        problems
    }

    /// Signs the token the provider will get, to refuse a key that cannot.
    fn sign_probe(&self, provider: Provider) -> Result<(), token::TokenError> {
        match provider {
            Provider::Apns => {
                token::apns_provider_token(&self.key_id, &self.team_id, &self.private_key, 0)
                    .map(drop)
            }
            Provider::Fcm => token::fcm_assertion(
                &self.client_email,
                &self.private_key,
                token::FCM_TOKEN_URL,
                0,
            )
            .map(drop),
            Provider::Hms => Ok(()),
        }
    }

    /// The form keeper publishes to centers.
    pub fn to_proto(&self, app: &str, provider: Provider, updated_ms: u64) -> NotifyProvider {
        NotifyProvider {
            app: app.to_string(),
            provider: provider.as_str().to_string(),
            key_id: self.key_id.clone(),
            team_id: self.team_id.clone(),
            private_key: self.private_key.clone(),
            topic: self.topic.clone(),
            project_id: self.project_id.clone(),
            client_email: self.client_email.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            base_url: self.base_url.clone(),
            token_url: self.token_url.clone(),
            updated_ms,
        }
    }

    /// The fields of a published provider (the inverse of [`Self::to_proto`]).
    pub fn from_proto(stored: &NotifyProvider) -> ProviderFields {
        ProviderFields {
            key_id: stored.key_id.clone(),
            team_id: stored.team_id.clone(),
            private_key: stored.private_key.clone(),
            topic: stored.topic.clone(),
            project_id: stored.project_id.clone(),
            client_email: stored.client_email.clone(),
            client_id: stored.client_id.clone(),
            client_secret: stored.client_secret.clone(),
            base_url: stored.base_url.clone(),
            token_url: stored.token_url.clone(),
        }
    }

    /// The fields as one JSON object (what keeper stores), empty ones left out.
    pub fn to_json(&self) -> String {
        let mut object = Map::new();
        for name in Self::NAMES {
            let value = self.get(name);
            if !value.is_empty() {
                object.insert(name.to_string(), Value::from(value));
            }
        }
        Value::Object(object).to_string()
    }
}

/// What the admin API shows of a stored provider: every field but the
/// secrets, which appear as `sha256:` and the first 16 hex digits of their
/// digest, so an operator can tell which key is set without seeing it.
pub fn redacted(stored: &NotifyProvider) -> Value {
    let fields = ProviderFields::from_proto(stored);
    let mut object = Map::new();
    object.insert("app".into(), json!(stored.app));
    object.insert("provider".into(), json!(stored.provider));
    for name in ProviderFields::NAMES {
        let value = fields.get(name);
        if value.is_empty() {
            continue;
        }
        let shown = if SECRETS.contains(&name) {
            fingerprint(value)
        } else {
            value.to_string()
        };
        object.insert(name.to_string(), Value::from(shown));
    }
    object.insert("updated_ms".into(), json!(stored.updated_ms));
    Value::Object(object)
}

/// `sha256:` and the first 16 hex digits of the value's SHA-256.
pub(crate) fn fingerprint(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    let hex: String = digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::token::test_keys;

    fn apns() -> ProviderFields {
        ProviderFields {
            key_id: "ABC123DEFG".into(),
            team_id: "DEF123GHIJ".into(),
            private_key: test_keys::EC_PRIVATE.into(),
            topic: "com.example.app".into(),
            ..Default::default()
        }
    }

    fn fcm() -> ProviderFields {
        ProviderFields {
            project_id: "example-project".into(),
            client_email: "pushgrid@example-project.iam.gserviceaccount.com".into(),
            private_key: test_keys::RSA_PRIVATE.into(),
            ..Default::default()
        }
    }

    #[test]
    fn providers_parse_by_name_only() {
        for provider in Provider::ALL {
            assert_eq!(Provider::parse(provider.as_str()), Some(provider));
        }
        assert_eq!(Provider::parse("APNS"), None);
        assert_eq!(Provider::parse("gcm"), None);
    }

    #[test]
    fn complete_fields_with_working_keys_pass() {
        assert_eq!(apns().problems(Provider::Apns), Vec::<String>::new());
        assert_eq!(fcm().problems(Provider::Fcm), Vec::<String>::new());
        let hms = ProviderFields {
            client_id: "10293847".into(),
            client_secret: "s3cret".into(),
            token_url: "http://127.0.0.1:9/oauth2/v3/token".into(),
            ..Default::default()
        };
        assert_eq!(hms.problems(Provider::Hms), Vec::<String>::new());
    }

    #[test]
    fn each_problem_names_its_field() {
        let empty = ProviderFields::default();
        assert_eq!(
            empty.problems(Provider::Apns),
            [
                "key_id is required for apns",
                "team_id is required for apns",
                "private_key is required for apns",
                "topic is required for apns"
            ]
        );
        let mut wrong = apns();
        wrong.project_id = "p".into();
        wrong.base_url = "ftp://x".into();
        assert_eq!(
            wrong.problems(Provider::Apns),
            [
                "project_id is not a field of apns",
                "base_url must be an http(s) URL"
            ]
        );
        let mut slashed = fcm();
        slashed.project_id = "p/../other".into();
        assert_eq!(
            slashed.problems(Provider::Fcm),
            ["project_id may hold only letters, digits, '.', '-' and '_'"]
        );
        let mut long = fcm();
        long.client_email = "x".repeat(MAX_FIELD + 1);
        assert_eq!(
            long.problems(Provider::Fcm),
            ["client_email is longer than 1024 bytes"]
        );
    }

    #[test]
    fn a_key_that_cannot_sign_is_refused() {
        let mut garbage = apns();
        garbage.private_key =
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into();
        let problems = garbage.problems(Provider::Apns);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("private_key: "), "{problems:?}");
        // The right kind of key for the other provider is still the wrong key.
        let mut rsa_for_apns = apns();
        rsa_for_apns.private_key = test_keys::RSA_PRIVATE.into();
        assert_eq!(rsa_for_apns.problems(Provider::Apns).len(), 1);
        let mut ec_for_fcm = fcm();
        ec_for_fcm.private_key = test_keys::EC_PRIVATE.into();
        assert_eq!(ec_for_fcm.problems(Provider::Fcm).len(), 1);
    }

    #[test]
    fn secrets_are_shown_only_as_fingerprints() {
        let stored = apns().to_proto("demo", Provider::Apns, 7);
        let shown = redacted(&stored);
        let text = shown.to_string();
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert_eq!(shown["private_key"], fingerprint(test_keys::EC_PRIVATE));
        assert_eq!(shown["key_id"], "ABC123DEFG");
        assert_eq!(shown["topic"], "com.example.app");
        assert_eq!(shown["updated_ms"], 7);
        assert!(shown.get("client_secret").is_none());
        assert_eq!(format!("{:?}", apns()), "ProviderFields { .. }");
    }

    #[test]
    fn stored_json_round_trips() {
        let fields = fcm();
        let parsed: ProviderFields = serde_json::from_str(&fields.to_json()).unwrap();
        assert_eq!(
            parsed.to_proto("a", Provider::Fcm, 1),
            fields.to_proto("a", Provider::Fcm, 1)
        );
        let typo = serde_json::from_str::<ProviderFields>(r#"{"privat_key": "x"}"#);
        assert!(typo.is_err());
    }
}
