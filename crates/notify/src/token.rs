//! The tokens signed with a provider's credentials.
//!
//! - APNs token-based authentication: an ES256 JWT with the key id in its
//!   header and the team id and issue time as claims. APNs accepts one for
//!   an hour and refuses one renewed more often than every 20 minutes, so a
//!   sender keeps one for [`APNS_TOKEN_REUSE_SECS`].
//! - FCM HTTP v1: an RS256 JWT assertion of the service account, exchanged at
//!   the token URL for an OAuth2 access token (RFC 7523).

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// APNs' production address; a sandbox or a stand-in is set as `base_url`.
pub const APNS_BASE_URL: &str = "https://api.push.apple.com";
/// FCM's production address.
pub const FCM_BASE_URL: &str = "https://fcm.googleapis.com";
/// Google's OAuth2 token endpoint (a service account's `token_uri`).
pub const FCM_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// The OAuth2 scope that lets a service account send through FCM.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// HMS Push Kit's production address.
pub const HMS_BASE_URL: &str = "https://push-api.cloud.huawei.com";
/// Huawei's OAuth2 token endpoint (client credentials).
pub const HMS_TOKEN_URL: &str = "https://oauth-login.cloud.huawei.com/oauth2/v3/token";

/// How long an APNs provider token is used before a new one is signed:
/// under APNs' hour of validity, over its 20 minutes between renewals.
pub const APNS_TOKEN_REUSE_SECS: u64 = 50 * 60;
/// How long an FCM assertion says it is valid (Google's maximum, an hour).
pub const FCM_ASSERTION_SECS: u64 = 3600;

/// A key that cannot sign the provider's token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("not a PKCS#8 PEM P-256 key (an APNs .p8 key): {0}")]
    NotEcKey(jsonwebtoken::errors::Error),
    #[error("not a PEM RSA key (a service account's private_key): {0}")]
    NotRsaKey(jsonwebtoken::errors::Error),
    #[error("signing failed: {0}")]
    Signing(jsonwebtoken::errors::Error),
}

#[derive(Serialize)]
struct ApnsClaims<'a> {
    iss: &'a str,
    iat: u64,
}

/// The APNs provider token issued at `issued_at` (Unix seconds).
pub fn apns_provider_token(
    key_id: &str,
    team_id: &str,
    private_key_pem: &str,
    issued_at: u64,
) -> Result<String, TokenError> {
    let key = EncodingKey::from_ec_pem(private_key_pem.as_bytes()).map_err(TokenError::NotEcKey)?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key_id.to_string());
    // APNs' documented header is {alg, kid}: no typ.
    header.typ = None;
    let claims = ApnsClaims {
        iss: team_id,
        iat: issued_at,
    };
    jsonwebtoken::encode(&header, &claims, &key).map_err(TokenError::Signing)
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// The service account's signed assertion for `token_url`, issued at
/// `issued_at` (Unix seconds), asking for the FCM scope.
pub fn fcm_assertion(
    client_email: &str,
    private_key_pem: &str,
    token_url: &str,
    issued_at: u64,
) -> Result<String, TokenError> {
    let key =
        EncodingKey::from_rsa_pem(private_key_pem.as_bytes()).map_err(TokenError::NotRsaKey)?;
    let claims = AssertionClaims {
        iss: client_email,
        scope: FCM_SCOPE,
        aud: token_url,
        iat: issued_at,
        exp: issued_at + FCM_ASSERTION_SECS,
    };
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).map_err(TokenError::Signing)
}

#[cfg(test)]
pub(crate) mod test_keys {
    pub const EC_PRIVATE: &str = include_str!("../testdata/apns-test-key.p8");
    pub const EC_PUBLIC: &str = include_str!("../testdata/apns-test-key.pub.pem");
    pub const RSA_PRIVATE: &str = include_str!("../testdata/fcm-test-key.pem");
    pub const RSA_PUBLIC: &str = include_str!("../testdata/fcm-test-key.pub.pem");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};
    use serde_json::Value;

    #[test]
    fn apns_token_verifies_with_the_public_key() {
        let token = apns_provider_token(
            "KEY1234567",
            "TEAM123456",
            test_keys::EC_PRIVATE,
            1_700_000_000,
        )
        .unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("KEY1234567"));
        let mut validation = Validation::new(Algorithm::ES256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let key = DecodingKey::from_ec_pem(test_keys::EC_PUBLIC.as_bytes()).unwrap();
        let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation)
            .unwrap()
            .claims;
        assert_eq!(
            claims,
            serde_json::json!({"iss": "TEAM123456", "iat": 1_700_000_000u64})
        );
        // Another key's public half refuses it.
        let other = DecodingKey::from_rsa_pem(test_keys::RSA_PUBLIC.as_bytes()).unwrap();
        assert!(jsonwebtoken::decode::<Value>(&token, &other, &validation).is_err());
    }

    #[test]
    fn fcm_assertion_carries_the_scope_and_audience() {
        let token = fcm_assertion(
            "sa@p.iam.gserviceaccount.com",
            test_keys::RSA_PRIVATE,
            "http://127.0.0.1:1/token",
            100,
        )
        .unwrap();
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.set_audience(&["http://127.0.0.1:1/token"]);
        let key = DecodingKey::from_rsa_pem(test_keys::RSA_PUBLIC.as_bytes()).unwrap();
        let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation)
            .unwrap()
            .claims;
        assert_eq!(claims["iss"], "sa@p.iam.gserviceaccount.com");
        assert_eq!(claims["scope"], FCM_SCOPE);
        assert_eq!(claims["iat"], 100);
        assert_eq!(claims["exp"], 100 + FCM_ASSERTION_SECS);
    }

    #[test]
    fn wrong_keys_are_named() {
        let error = apns_provider_token("k", "t", "not a key", 0).unwrap_err();
        assert!(
            error.to_string().starts_with("not a PKCS#8 PEM P-256 key"),
            "{error}"
        );
        let error = fcm_assertion("e", "not a key", FCM_TOKEN_URL, 0).unwrap_err();
        assert!(
            error.to_string().starts_with("not a PEM RSA key"),
            "{error}"
        );
    }
}
