//! Sending notifications (issue 25) with `pushgrid_notify::Sender` to local
//! HTTP/2-over-TLS stand-ins of APNs, FCM and HMS. Each stand-in checks a
//! request the way its provider documents it (method and path, the APNs
//! headers, the bearer JWT's algorithm, key id, claims and signature against
//! the public half of the test key, FCM's OAuth assertion exchange and
//! message JSON, HMS's client credentials) and answers with the provider's
//! documented replies: success, a dead token, 429 with Retry-After, 503, an
//! expired provider token.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pushgrid_e2e::provider::{Reply, Request, StandIn};
use pushgrid_notify::{Device, Notification, Outcome, Provider, ProviderFields, Sender};
use pushgrid_proto::cluster::NotifyProvider;
use serde_json::{Value, json};

const EC_PRIVATE: &str = include_str!("../../crates/notify/testdata/apns-test-key.p8");
const EC_PUBLIC: &str = include_str!("../../crates/notify/testdata/apns-test-key.pub.pem");
const RSA_PRIVATE: &str = include_str!("../../crates/notify/testdata/fcm-test-key.pem");
const RSA_PUBLIC: &str = include_str!("../../crates/notify/testdata/fcm-test-key.pub.pem");
const TEAM: &str = "DEF123GHIJ";
const TOPIC: &str = "com.example.app";
const LIVE: &str = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0";
const DEAD: &str = "dead13adff785122b4ad28809a3420982341241421348097878e577c991de8f0";

fn sender(stand_in: &StandIn) -> Sender {
    Sender::new(
        std::slice::from_ref(&stand_in.ca_pem),
        Duration::from_secs(10),
    )
    .unwrap()
}

fn notification() -> Notification {
    Notification {
        title: "Hello".into(),
        body: "You have a message".into(),
        badge: Some(3),
        sound: "default".into(),
        collapse_id: "chat-42".into(),
        data: BTreeMap::from([("room".to_string(), "42".to_string())]),
    }
}

fn device(token: &str) -> Device<'_> {
    Device { token, bundle: "" }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The claims of `jwt` when it verifies with `public_pem` under `algorithm`.
fn verified(
    jwt: &str,
    algorithm: Algorithm,
    public_pem: &str,
    audience: Option<&str>,
) -> Result<Value, String> {
    let key = match algorithm {
        Algorithm::ES256 => DecodingKey::from_ec_pem(public_pem.as_bytes()),
        _ => DecodingKey::from_rsa_pem(public_pem.as_bytes()),
    }
    .map_err(|error| error.to_string())?;
    let mut validation = Validation::new(algorithm);
    validation.validate_exp = audience.is_some();
    validation.required_spec_claims.clear();
    match audience {
        Some(audience) => validation.set_audience(&[audience]),
        None => validation.validate_aud = false,
    }
    jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .map(|data| data.claims)
        .map_err(|error| error.to_string())
}

/// What APNs would refuse in `request`, signed by `key_id`; None when it
/// is a well-formed notification request.
fn apns_problem(request: &Request, key_id: &str) -> Option<String> {
    if request.method != "POST" || !request.path.starts_with("/3/device/") {
        return Some(format!("{} {}", request.method, request.path));
    }
    for (name, expected) in [("apns-push-type", "alert"), ("apns-priority", "10")] {
        if request.header(name) != expected {
            return Some(format!("{name}: {:?}", request.header(name)));
        }
    }
    if request.header("apns-topic").is_empty() {
        return Some("no apns-topic".into());
    }
    let Some(jwt) = request.header("authorization").strip_prefix("bearer ") else {
        return Some("authorization is not a bearer token".into());
    };
    let header = match jsonwebtoken::decode_header(jwt) {
        Ok(header) => header,
        Err(error) => return Some(format!("jwt header: {error}")),
    };
    if header.alg != Algorithm::ES256 || header.kid.as_deref() != Some(key_id) {
        return Some(format!("jwt header {header:?}"));
    }
    let claims = match verified(jwt, Algorithm::ES256, EC_PUBLIC, None) {
        Ok(claims) => claims,
        Err(error) => return Some(format!("jwt signature: {error}")),
    };
    let iat = claims["iat"].as_u64().unwrap_or(0);
    if claims["iss"] != TEAM || iat + 3600 < unix_now() || iat > unix_now() + 60 {
        return Some(format!("jwt claims {claims}"));
    }
    None
}

fn apns_credentials(stand_in: &StandIn, key_id: &str, updated_ms: u64) -> NotifyProvider {
    let fields = ProviderFields {
        key_id: key_id.into(),
        team_id: TEAM.into(),
        private_key: EC_PRIVATE.into(),
        topic: TOPIC.into(),
        base_url: stand_in.base_url(),
        ..Default::default()
    };
    assert_eq!(fields.problems(Provider::Apns), Vec::<String>::new());
    fields.to_proto("demo", Provider::Apns, updated_ms)
}

/// An APNs stand-in: a problem is a 400 naming it; `dead…` tokens are
/// unregistered (410); the rest are accepted.
fn apns_reply(request: &Request, key_id: &str) -> Reply {
    if let Some(problem) = apns_problem(request, key_id) {
        return Reply::json(400, json!({ "reason": format!("BadRequest: {problem}") }));
    }
    if request.path.starts_with("/3/device/dead") {
        return Reply::json(
            410,
            json!({ "reason": "Unregistered", "timestamp": 1_700_000_000_000u64 }),
        );
    }
    Reply::empty(200).with_header("apns-id", "7a2ef1f0-2b8c-4b39-a7a6-7b7c1d0e9f01")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_gets_the_documented_request_and_a_410_is_a_dead_token() {
    let stand_in = StandIn::start(|request| apns_reply(request, "KEY1234567")).await;
    let sender = sender(&stand_in);
    let credentials = apns_credentials(&stand_in, "KEY1234567", 1);

    assert_eq!(
        sender
            .send(&credentials, device(LIVE), &notification())
            .await,
        Outcome::Sent
    );
    let other_app = Device {
        token: LIVE,
        bundle: "com.example.other",
    };
    assert_eq!(
        sender.send(&credentials, other_app, &notification()).await,
        Outcome::Sent
    );
    match sender
        .send(&credentials, device(DEAD), &notification())
        .await
    {
        Outcome::DeadToken(reason) => assert_eq!(reason, "apns 410 Gone Unregistered"),
        other => panic!("a 410 is a dead token, not {other:?}"),
    }

    let requests = stand_in.requests();
    assert_eq!(requests.len(), 3);
    let first = &requests[0];
    assert_eq!(first.path, format!("/3/device/{LIVE}"));
    assert_eq!(first.header("apns-topic"), TOPIC);
    assert_eq!(first.header("apns-collapse-id"), "chat-42");
    assert_eq!(
        first.json(),
        json!({
            "aps": { "alert": { "title": "Hello", "body": "You have a message" }, "badge": 3, "sound": "default" },
            "room": "42",
        })
    );
    // A device's own bundle is its topic.
    assert_eq!(requests[1].header("apns-topic"), "com.example.other");
    // One provider token for all three: signed once, reused.
    assert!(
        requests
            .iter()
            .all(|r| r.header("authorization") == first.header("authorization"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_expired_provider_token_is_signed_again_and_rotated_credentials_sign_with_the_new_key()
{
    let refused_once = Arc::new(AtomicU32::new(0));
    let refused = refused_once.clone();
    let stand_in = StandIn::start(move |request| {
        let key_id = jsonwebtoken::decode_header(
            request
                .header("authorization")
                .trim_start_matches("bearer "),
        )
        .ok()
        .and_then(|header| header.kid)
        .unwrap_or_default();
        if refused.fetch_add(1, Ordering::SeqCst) == 0 {
            return Reply::json(403, json!({ "reason": "ExpiredProviderToken" }));
        }
        apns_reply(request, &key_id)
    })
    .await;
    let sender = sender(&stand_in);
    let credentials = apns_credentials(&stand_in, "KEY1234567", 1);
    assert_eq!(
        sender
            .send(&credentials, device(LIVE), &notification())
            .await,
        Outcome::Sent
    );
    assert_eq!(
        stand_in.requests().len(),
        2,
        "refused once, then sent with a new token"
    );

    // New credentials (a new key id, updated_ms 2): the next request is
    // signed with them, no restart.
    let rotated = apns_credentials(&stand_in, "NEWKEY4567", 2);
    assert_eq!(
        sender.send(&rotated, device(LIVE), &notification()).await,
        Outcome::Sent
    );
    let last = stand_in.requests().pop().unwrap();
    let header =
        jsonwebtoken::decode_header(last.header("authorization").trim_start_matches("bearer "))
            .unwrap();
    assert_eq!(header.kid.as_deref(), Some("NEWKEY4567"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_tried_again_after_its_retry_after_and_a_lasting_503_gives_up() {
    let busy_calls = Arc::new(AtomicU32::new(0));
    let busy = busy_calls.clone();
    let stand_in = StandIn::start(move |request| {
        if request.path.starts_with("/3/device/b") && busy.fetch_add(1, Ordering::SeqCst) == 0 {
            return Reply::json(429, json!({ "reason": "TooManyRequests" }))
                .with_header("retry-after", "1");
        }
        if request.path.starts_with("/3/device/d0") {
            return Reply::json(503, json!({ "reason": "ServiceUnavailable" }))
                .with_header("retry-after", "0");
        }
        apns_reply(request, "KEY1234567")
    })
    .await;
    let sender = sender(&stand_in);
    let credentials = apns_credentials(&stand_in, "KEY1234567", 1);

    let started = Instant::now();
    let busy_token = "b".repeat(64);
    assert_eq!(
        sender
            .send(&credentials, device(&busy_token), &notification())
            .await,
        Outcome::Sent
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not waited for"
    );
    assert_eq!(stand_in.requests_to("/3/device/b").len(), 2);

    let down_token = format!("d0{}", "0".repeat(62));
    let outcome = sender
        .send(&credentials, device(&down_token), &notification())
        .await;
    assert_eq!(
        outcome,
        Outcome::Failed(
            "gave up after 3 attempts: apns 503 Service Unavailable ServiceUnavailable".into()
        )
    );
    assert_eq!(stand_in.requests_to("/3/device/d0").len(), 3);
}

/// An FCM stand-in: its token endpoint checks the signed assertion; its send
/// endpoint checks the access token and the message.
fn fcm_reply(request: &Request, base: &str, exchanges: &AtomicU32) -> Reply {
    if request.path == "/token" {
        let form = request.form();
        let assertion = form.get("assertion").cloned().unwrap_or_default();
        let claims = verified(
            &assertion,
            Algorithm::RS256,
            RSA_PUBLIC,
            Some(&format!("{base}/token")),
        );
        let grant = form.get("grant_type").map(String::as_str);
        return match claims {
            Ok(claims)
                if grant == Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
                    && claims["iss"] == "sa@example-project.iam.gserviceaccount.com"
                    && claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging" =>
            {
                let n = exchanges.fetch_add(1, Ordering::SeqCst);
                Reply::json(
                    200,
                    json!({ "access_token": format!("ya29.test-{n}"), "expires_in": 3599, "token_type": "Bearer" }),
                )
            }
            other => Reply::json(
                400,
                json!({ "error": "invalid_grant", "error_description": format!("{other:?} {grant:?}") }),
            ),
        };
    }
    if request.path != "/v1/projects/example-project/messages:send"
        || !request
            .header("authorization")
            .starts_with("Bearer ya29.test-")
    {
        return Reply::json(
            401,
            json!({ "error": { "code": 401, "status": "UNAUTHENTICATED" } }),
        );
    }
    let message = &request.json()["message"];
    if message["token"] == "not-found-fcm-token" {
        return Reply::json(
            404,
            json!({ "error": { "code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND" } }),
        );
    }
    if message["token"] == "dead-fcm-token" {
        return Reply::json(
            404,
            json!({ "error": { "code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
            "details": [{ "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED" }] } }),
        );
    }
    Reply::json(
        200,
        json!({ "name": "projects/example-project/messages/0:1" }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_exchanges_one_signed_assertion_and_sends_v1_messages() {
    let exchanges = Arc::new(AtomicU32::new(0));
    let counted = exchanges.clone();
    let base = Arc::new(std::sync::OnceLock::<String>::new());
    let base_seen = base.clone();
    let stand_in =
        StandIn::start(move |request| fcm_reply(request, base_seen.get().unwrap(), &counted)).await;
    base.set(stand_in.base_url()).unwrap();
    let sender = sender(&stand_in);
    let fields = ProviderFields {
        project_id: "example-project".into(),
        client_email: "sa@example-project.iam.gserviceaccount.com".into(),
        private_key: RSA_PRIVATE.into(),
        base_url: stand_in.base_url(),
        token_url: format!("{}/token", stand_in.base_url()),
        ..Default::default()
    };
    let credentials = fields.to_proto("demo", Provider::Fcm, 1);
    // Three at once with no access token yet: one exchange serves them all.
    let message = notification();
    let sends = (0..3).map(|_| sender.send(&credentials, device("live-fcm-token"), &message));
    assert_eq!(
        futures::future::join_all(sends).await,
        vec![Outcome::Sent; 3]
    );
    match sender
        .send(&credentials, device("dead-fcm-token"), &notification())
        .await
    {
        Outcome::DeadToken(reason) => assert_eq!(reason, "fcm 404 Not Found UNREGISTERED"),
        other => panic!("UNREGISTERED is a dead token, not {other:?}"),
    }
    // A 404 that does not say UNREGISTERED keeps the token.
    match sender
        .send(&credentials, device("not-found-fcm-token"), &notification())
        .await
    {
        Outcome::Failed(reason) => assert!(
            reason.starts_with("fcm 404 Not Found NOT_FOUND"),
            "{reason}"
        ),
        other => panic!("a bare 404 is a failure, not {other:?}"),
    }
    assert_eq!(
        exchanges.load(Ordering::SeqCst),
        1,
        "the access token is cached"
    );
    let sent = stand_in.requests_to("/v1/");
    assert_eq!(sent.len(), 5);
    assert_eq!(
        sent[0].json(),
        json!({ "message": {
            "token": "live-fcm-token",
            "notification": { "title": "Hello", "body": "You have a message" },
            "data": { "room": "42" },
            "android": { "collapse_key": "chat-42", "notification": { "sound": "default" } },
            "apns": { "headers": { "apns-collapse-id": "chat-42" }, "payload": { "aps": { "badge": 3 } } },
        } })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hms_uses_client_credentials_and_reads_the_answer_codes() {
    let stand_in = StandIn::start(|request| {
        if request.path == "/oauth2/v3/token" {
            let form = request.form();
            let ok = form.get("grant_type").map(String::as_str) == Some("client_credentials")
                && form.get("client_id").map(String::as_str) == Some("10293847")
                && form.get("client_secret").map(String::as_str) == Some("s3cret+/=");
            return if ok {
                Reply::json(200, json!({ "access_token": "CF3Xl2XV6j", "expires_in": 3600, "token_type": "Bearer" }))
            } else {
                Reply::json(400, json!({ "error": 1101, "error_description": "invalid client" }))
            };
        }
        if request.path != "/v1/10293847/messages:send" || request.header("authorization") != "Bearer CF3Xl2XV6j" {
            return Reply::json(401, json!({ "code": "80200003", "msg": "OAuth token expired" }));
        }
        if request.json()["message"]["token"] == json!(["dead-hms-token"]) {
            return Reply::json(200, json!({ "code": "80300007", "msg": "All the tokens are invalid" }));
        }
        Reply::json(200, json!({ "code": "80000000", "msg": "Success", "requestId": "1" }))
    })
    .await;
    let sender = sender(&stand_in);
    let fields = ProviderFields {
        client_id: "10293847".into(),
        client_secret: "s3cret+/=".into(),
        base_url: stand_in.base_url(),
        token_url: format!("{}/oauth2/v3/token", stand_in.base_url()),
        ..Default::default()
    };
    let credentials = fields.to_proto("demo", Provider::Hms, 1);
    assert_eq!(
        sender
            .send(&credentials, device("live-hms-token"), &notification())
            .await,
        Outcome::Sent
    );
    match sender
        .send(&credentials, device("dead-hms-token"), &notification())
        .await
    {
        Outcome::DeadToken(reason) => assert_eq!(reason, "hms 200 OK 80300007"),
        other => panic!("80300007 is a dead token, not {other:?}"),
    }
    let sent = stand_in.requests_to("/v1/");
    let message = &sent[0].json()["message"];
    assert_eq!(message["token"], json!(["live-hms-token"]));
    assert_eq!(
        message["android"]["notification"]["click_action"]["type"],
        3
    );
    assert_eq!(message["android"]["notification"]["tag"], "chat-42");
    assert_eq!(message["data"], json!("{\"room\":\"42\"}"));
    assert_eq!(stand_in.requests_to("/oauth2/").len(), 1);
}

/// The stand-in's APNs check can fail: a wrong key id, a tampered signature,
/// a wrong push type, a header that is not a JWT and an old token are each
/// refused.
#[test]
fn the_apns_stand_in_refuses_what_apns_would() {
    let jwt =
        pushgrid_notify::token::apns_provider_token("KEY1234567", TEAM, EC_PRIVATE, unix_now())
            .unwrap();
    let request = |authorization: String, push_type: &str| Request {
        method: "POST".into(),
        path: format!("/3/device/{LIVE}"),
        headers: BTreeMap::from([
            ("authorization".to_string(), authorization),
            ("apns-topic".to_string(), TOPIC.to_string()),
            ("apns-push-type".to_string(), push_type.to_string()),
            ("apns-priority".to_string(), "10".to_string()),
        ]),
        body: Vec::new(),
    };
    assert_eq!(
        apns_problem(&request(format!("bearer {jwt}"), "alert"), "KEY1234567"),
        None
    );
    assert!(apns_problem(&request(format!("bearer {jwt}"), "alert"), "OTHERKEY00").is_some());
    assert!(
        apns_problem(
            &request(format!("bearer {jwt}"), "background"),
            "KEY1234567"
        )
        .is_some()
    );
    // One character well inside the signature changed.
    let mut tampered: Vec<char> = jwt.chars().collect();
    let at = tampered.len() - 10;
    tampered[at] = if tampered[at] == 'A' { 'B' } else { 'A' };
    let tampered: String = tampered.into_iter().collect();
    assert!(
        apns_problem(
            &request(format!("bearer {tampered}"), "alert"),
            "KEY1234567"
        )
        .is_some()
    );
    assert!(apns_problem(&request("bearer not-a-jwt".into(), "alert"), "KEY1234567").is_some());
    let old = pushgrid_notify::token::apns_provider_token(
        "KEY1234567",
        TEAM,
        EC_PRIVATE,
        unix_now() - 7200,
    )
    .unwrap();
    assert!(apns_problem(&request(format!("bearer {old}"), "alert"), "KEY1234567").is_some());
}
