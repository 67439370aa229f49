//! Device push tokens (issue 25): the one check of a token's provider, token
//! and bundle, shared by the room (PUSH_TOKEN frames), center (the API) and
//! the SDK, so all three refuse the same input with the same words.

/// The notification providers a token may belong to.
pub const PROVIDERS: &[&str] = &["apns", "fcm", "hms"];
/// Longest token, in bytes (FCM and HMS tokens are about 150 to 300 today).
pub const MAX_TOKEN_BYTES: usize = 512;
/// Shortest and longest APNs device token, in hex digits (32 bytes today;
/// Apple says the length may change).
pub const APNS_TOKEN_HEX: std::ops::RangeInclusive<usize> = 16..=200;
/// Longest bundle id or package name, in bytes.
pub const MAX_BUNDLE_BYTES: usize = 255;

/// Checks a token's provider, token and bundle; the error starts with the
/// field at fault (`provider: ...`, `token: ...`, `bundle: ...`).
pub fn check_push_token(provider: &str, token: &str, bundle: &str) -> Result<(), String> {
    check_provider(provider)?;
    if provider == "apns" {
        if !APNS_TOKEN_HEX.contains(&token.len())
            || !token.len().is_multiple_of(2)
            || !token.bytes().all(|byte| byte.is_ascii_hexdigit())
        {
            return Err(format!(
                "token: an APNs device token is an even number of hex digits, {} to {}; got {} bytes",
                APNS_TOKEN_HEX.start(),
                APNS_TOKEN_HEX.end(),
                token.len()
            ));
        }
    } else if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(format!(
            "token: must be 1 to {MAX_TOKEN_BYTES} bytes, not {}",
            token.len()
        ));
    } else if let Some(at) = token.bytes().position(|byte| !byte.is_ascii_graphic()) {
        return Err(format!(
            "token: must be printable ASCII without spaces; byte {at} is not"
        ));
    }
    check_bundle(bundle)
}

/// Checks a provider name: `apns`, `fcm` or `hms`.
pub fn check_provider(provider: &str) -> Result<(), String> {
    if PROVIDERS.contains(&provider) {
        Ok(())
    } else {
        Err(format!(
            "provider: must be one of {}, not {provider:?}",
            PROVIDERS.join(", ")
        ))
    }
}

/// Checks a bundle id (APNs topic) or Android package name.
pub fn check_bundle(bundle: &str) -> Result<(), String> {
    if bundle.is_empty() || bundle.len() > MAX_BUNDLE_BYTES {
        return Err(format!(
            "bundle: must be 1 to {MAX_BUNDLE_BYTES} bytes, not {}",
            bundle.len()
        ));
    }
    match bundle
        .bytes()
        .position(|byte| !(byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'-' | b'_')))
    {
        None => Ok(()),
        Some(at) => Err(format!(
            "bundle: letters, digits, '.', '-' and '_' only; byte {at} is not one"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const APNS: &str = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0";

    #[test]
    fn good_tokens_pass() {
        assert_eq!(check_push_token("apns", APNS, "com.example.chat"), Ok(()));
        assert_eq!(
            check_push_token("fcm", "dGVzdA:APA91bH-x_y", "com.example.chat"),
            Ok(())
        );
        assert_eq!(check_push_token("hms", "0123abc", "com.example"), Ok(()));
    }

    #[test]
    fn each_error_names_its_field() {
        let cases = [
            ("gcm", APNS, "b", "provider:"),
            ("apns", "xyz", "b", "token:"),
            ("apns", &APNS[1..], "b", "token:"),
            ("fcm", "", "b", "token:"),
            ("fcm", "a b", "b", "token:"),
            ("fcm", &"a".repeat(MAX_TOKEN_BYTES + 1), "b", "token:"),
            ("fcm", "abc", "", "bundle:"),
            ("fcm", "abc", "com/evil", "bundle:"),
        ];
        for (provider, token, bundle, field) in cases {
            let error = check_push_token(provider, token, bundle).unwrap_err();
            assert!(
                error.starts_with(field),
                "{provider} {token} {bundle}: {error}"
            );
        }
    }
}
