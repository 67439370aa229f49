//! Device tokens: JWT HS256 with `sub` (user), `app`, `exp` and optional `dev`.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub app: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dev: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("unknown app {0:?}")]
    UnknownApp(String),
    #[error("token rejected: {0}")]
    Rejected(String),
}

/// Signs a token.
pub fn sign(claims: &Claims, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing with an in-memory key cannot fail")
}

/// Reads the `app` claim without verifying, to find which secret to verify with.
pub fn unverified_app(token: &str) -> Result<String, TokenError> {
    let data = jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
        .map_err(|error| TokenError::Malformed(error.to_string()))?;
    Ok(data.claims.app)
}

/// Verifies signature (HS256 only; `alg: none` and others are refused) and expiry.
pub fn verify(token: &str, secret: &str) -> Result<Claims, TokenError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 30;
    validation.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map(|data| data.claims)
    .map_err(|error| TokenError::Rejected(error.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            app: "demo".into(),
            exp,
            dev: "d1".into(),
        }
    }

    #[test]
    fn sign_and_verify() {
        let token = sign(&claims(crate::now_ms() / 1000 + 60), "s");
        assert_eq!(unverified_app(&token).unwrap(), "demo");
        assert_eq!(verify(&token, "s").unwrap().sub, "alice");
    }

    #[test]
    fn wrong_secret_expired_and_alg_none_are_refused() {
        let token = sign(&claims(crate::now_ms() / 1000 + 60), "s");
        assert!(matches!(
            verify(&token, "other"),
            Err(TokenError::Rejected(_))
        ));
        let expired = sign(&claims(crate::now_ms() / 1000 - 3600), "s");
        assert!(matches!(
            verify(&expired, "s"),
            Err(TokenError::Rejected(_))
        ));
        // {"alg":"none"} with the same claims and an empty signature.
        let parts: Vec<&str> = token.split('.').collect();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
        assert!(verify(&none, "s").is_err());
        assert!(matches!(
            unverified_app("garbage"),
            Err(TokenError::Malformed(_))
        ));
    }
}
