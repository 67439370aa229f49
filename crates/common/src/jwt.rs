//! Device tokens: JWT HS256 with `sub` (user), `app`, `exp` and optional `dev`,
//! `iat` and `nbf`. Verification ([`verify`]) checks the signature (HS256
//! only), then the times against a [`TokenPolicy`]: `exp` not passed, `nbf`
//! and `iat` not in the future, and a lifetime within the maximum, each
//! allowing the policy's clock skew.

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

/// The time claims a token may carry besides `exp` (seconds since the epoch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Claims as they are on the wire: [`Claims`] and [`TimeClaims`].
#[derive(Serialize, Deserialize)]
struct WireClaims {
    #[serde(flatten)]
    claims: Claims,
    #[serde(flatten)]
    times: TimeClaims,
}

/// Signs a token with `iat` and `nbf` claims too.
pub fn sign_with_times(claims: &Claims, times: TimeClaims, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &WireClaims {
            claims: claims.clone(),
            times,
        },
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing with an in-memory key cannot fail")
}

/// How strictly a token's times are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPolicy {
    /// Clock difference allowed between the token's issuer and this host,
    /// for `exp`, `nbf` and `iat`.
    pub clock_skew_secs: u64,
    /// Longest lifetime: `exp - iat`, or `exp - now` for a token without `iat`.
    pub max_lifetime_secs: u64,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            clock_skew_secs: 60,
            max_lifetime_secs: 30 * 24 * 3600,
        }
    }
}

/// Verifies the signature (HS256 only; `alg: none` and others are refused)
/// and the times (see [`TokenPolicy`]); the error says what was wrong.
pub fn verify(token: &str, secret: &str, policy: &TokenPolicy) -> Result<Claims, TokenError> {
    verify_at(token, secret, policy, crate::now_ms() / 1000)
}

/// [`verify`] at `now` (seconds since the epoch).
pub fn verify_at(
    token: &str,
    secret: &str,
    policy: &TokenPolicy,
    now: u64,
) -> Result<Claims, TokenError> {
    let mut validation = Validation::new(Algorithm::HS256);
    // Times are checked below, against `now`, with messages of our own.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let wire = jsonwebtoken::decode::<WireClaims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(|error| TokenError::Rejected(error.to_string()))?
    .claims;
    check_times(&wire.claims, wire.times, policy, now)?;
    Ok(wire.claims)
}

fn check_times(
    claims: &Claims,
    times: TimeClaims,
    policy: &TokenPolicy,
    now: u64,
) -> Result<(), TokenError> {
    let skew = policy.clock_skew_secs;
    let rejected = |message: String| Err(TokenError::Rejected(message));
    if claims.exp.saturating_add(skew) < now {
        return rejected(format!(
            "ExpiredSignature: the token expired at {} (now {now})",
            claims.exp
        ));
    }
    if let Some(nbf) = times.nbf
        && nbf > now.saturating_add(skew)
    {
        return rejected(format!(
            "the token is not valid before {nbf} (nbf), {} s from now, more than the allowed clock skew of {skew} s",
            nbf - now
        ));
    }
    if let Some(iat) = times.iat
        && iat > now.saturating_add(skew)
    {
        return rejected(format!(
            "the token was issued in the future: iat {iat} is {} s from now, more than the allowed clock skew of {skew} s",
            iat - now
        ));
    }
    let max = policy.max_lifetime_secs;
    match times.iat {
        Some(iat) if claims.exp.saturating_sub(iat) > max => rejected(format!(
            "the token's lifetime of {} s (exp - iat) exceeds the maximum of {max} s",
            claims.exp - iat
        )),
        None if claims.exp.saturating_sub(now) > max.saturating_add(skew) => rejected(format!(
            "the token expires in {} s, more than the maximum lifetime of {max} s",
            claims.exp - now
        )),
        _ => Ok(()),
    }
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
        assert_eq!(
            verify(&token, "s", &TokenPolicy::default()).unwrap().sub,
            "alice"
        );
    }

    #[test]
    fn wrong_secret_expired_and_alg_none_are_refused() {
        let token = sign(&claims(crate::now_ms() / 1000 + 60), "s");
        let policy = TokenPolicy::default();
        assert!(matches!(
            verify(&token, "other", &policy),
            Err(TokenError::Rejected(_))
        ));
        let expired = sign(&claims(crate::now_ms() / 1000 - 3600), "s");
        let Err(TokenError::Rejected(message)) = verify(&expired, "s", &policy) else {
            panic!("an expired token passed");
        };
        assert!(message.contains("ExpiredSignature"), "{message}");
        // {"alg":"none"} with the same claims and an empty signature.
        let parts: Vec<&str> = token.split('.').collect();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
        assert!(verify(&none, "s", &policy).is_err());
        assert!(matches!(
            unverified_app("garbage"),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn times_are_checked_with_the_skew_and_the_maximum_lifetime() {
        let now = 1_800_000_000;
        let policy = TokenPolicy::default();
        let check = |exp: u64, iat: Option<u64>, nbf: Option<u64>| {
            let token = sign_with_times(&claims(exp), TimeClaims { iat, nbf }, "s");
            verify_at(&token, "s", &policy, now)
        };
        let rejected = |result: Result<Claims, TokenError>| match result {
            Err(TokenError::Rejected(message)) => message,
            other => panic!("expected a rejection, got {other:?}"),
        };
        // Within the skew: accepted.
        assert!(check(now + 60, Some(now + 60), Some(now + 60)).is_ok());
        assert!(check(now - 60, Some(now - 3600), None).is_ok());
        // Beyond it.
        let message = rejected(check(now + 3600, None, Some(now + 61)));
        assert!(message.contains("not valid before"), "{message}");
        let message = rejected(check(now + 3600, Some(now + 61), None));
        assert!(message.contains("issued in the future"), "{message}");
        let message = rejected(check(now - 61, None, None));
        assert!(message.contains("expired"), "{message}");
        // Lifetime: 30 days at most, from iat, or from now without one.
        let month = 30 * 24 * 3600;
        assert!(check(now + month, Some(now), None).is_ok());
        let message = rejected(check(now + month + 1, Some(now), None));
        assert_eq!(
            message,
            "the token's lifetime of 2592001 s (exp - iat) exceeds the maximum of 2592000 s"
        );
        let year_9999 = 253_402_300_799;
        let message = rejected(check(year_9999, None, None));
        assert!(
            message.contains("more than the maximum lifetime"),
            "{message}"
        );
        assert!(check(now + month, None, None).is_ok());
    }
}
