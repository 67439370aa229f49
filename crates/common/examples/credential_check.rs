//! What the trust checks of issue 20 cost per call, next to what a push
//! costs: the role key a client adds to every internal gRPC call
//! (`WithCredential`), the check a server runs before any handler
//! (`ClusterAuth`: one SHA-256, a constant-time comparison per verifier of
//! the role, the permission table), and a device token's verification at
//! AUTH (JWT HS256 and its time checks).
//!
//! ```text
//! cargo run --release -p pushgrid-common --example credential_check -- --push-cpu-us 459
//! ```
//!
//! Each figure is the median of 7 rounds of `--iterations` calls (after one
//! warm-up round), in nanoseconds per call; the layers are timed as the
//! difference between the same request through the layer and through the
//! bare inner service. `--push-cpu-us` is the machine CPU one push takes in
//! a measured push-rate run (cores × seconds / pushes), used to state the
//! checks' share of a push. Prints one JSON object.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Instant;

use pushgrid_common::auth::{Credentials, RoleKey, Verifiers};
use pushgrid_common::jwt::{self, Claims, TimeClaims, TokenPolicy};
use pushgrid_proto::cluster::Role;
use serde_json::json;
use tower::{Layer, Service, ServiceExt};

/// Internal calls a single-user unicast push to a connected device crosses
/// with nothing coalesced: center → saver `Store`, center → register
/// `Lookup`, center → room `Deliver`, room → saver `Delivered` and `Ack`.
/// Batching (StoreMany, batched reports) only lowers it.
const CHECKED_CALLS_PER_PUSH: f64 = 5.0;

struct Args {
    iterations: u64,
    push_cpu_us: Option<f64>,
}

fn args() -> Args {
    let mut parsed = Args {
        iterations: 200_000,
        push_cpu_us: None,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value = given.next().unwrap_or_default();
        match flag.as_str() {
            "--iterations" => parsed.iterations = value.parse().unwrap_or(parsed.iterations),
            "--push-cpu-us" => parsed.push_cpu_us = value.parse().ok(),
            other => {
                eprintln!("unknown flag {other}; flags: --iterations N, --push-cpu-us US");
                std::process::exit(2);
            }
        }
    }
    parsed
}

/// Median nanoseconds per call of `round(iterations)` over 7 rounds.
fn median_ns(iterations: u64, mut round: impl FnMut(u64)) -> f64 {
    round(iterations / 4 + 1);
    let mut samples: Vec<f64> = (0..7)
        .map(|_| {
            let started = Instant::now();
            round(iterations);
            started.elapsed().as_nanos() as f64 / iterations as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[3]
}

fn grpc_request(
    path: &'static str,
    authorization: Option<&http::HeaderValue>,
) -> http::Request<tonic::body::Body> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:7002{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::empty())
        .expect("a valid request");
    if let Some(value) = authorization {
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, value.clone());
    }
    request
}

type Inner = tower::util::ServiceFn<
    fn(
        http::Request<tonic::body::Body>,
    ) -> std::future::Ready<Result<http::Response<tonic::body::Body>, Infallible>>,
>;

fn inner() -> Inner {
    fn answer(
        request: http::Request<tonic::body::Body>,
    ) -> std::future::Ready<Result<http::Response<tonic::body::Body>, Infallible>> {
        black_box(&request);
        std::future::ready(Ok(http::Response::new(tonic::body::Body::empty())))
    }
    tower::service_fn(answer as fn(_) -> _)
}

/// Nanoseconds per call of `service` on requests made by `make`.
fn time_service<S>(
    runtime: &tokio::runtime::Runtime,
    iterations: u64,
    mut service: S,
    make: impl Fn() -> http::Request<tonic::body::Body>,
) -> f64
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Error: std::fmt::Debug,
{
    median_ns(iterations, |count| {
        runtime.block_on(async {
            for _ in 0..count {
                let response = service
                    .ready()
                    .await
                    .expect("ready")
                    .call(make())
                    .await
                    .expect("answered");
                black_box(response);
            }
        })
    })
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, usize::from),
        "loadavg_at_start": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

/// The key of `role` among the cluster's keys (one per role, in the order
/// of `ROLES`).
fn key_of(keys: &[RoleKey], role: Role) -> RoleKey {
    keys[pushgrid_common::auth::ROLES
        .iter()
        .position(|known| *known == role)
        .expect("every role has a key")]
    .clone()
}

/// Median ns of one `Verifiers::check`: accepted among 7 verifiers,
/// accepted among 14 (mid-rotation), refused (an unknown key).
fn verifier_checks(
    iterations: u64,
    verifiers: &Verifiers,
    rotating: &Verifiers,
    center: &RoleKey,
    stranger: &RoleKey,
) -> (f64, f64, f64) {
    let check_7 = median_ns(iterations, |count| {
        for _ in 0..count {
            black_box(verifiers.check(black_box(center.expose())).ok());
        }
    });
    let check_14 = median_ns(iterations, |count| {
        for _ in 0..count {
            black_box(rotating.check(black_box(center.expose())).ok());
        }
    });
    let check_refused = median_ns(iterations, |count| {
        for _ in 0..count {
            black_box(verifiers.check(black_box(stranger.expose())).err());
        }
    });
    (check_7, check_14, check_refused)
}

/// Median ns of verifying a device token, done once per connection (AUTH),
/// not per push.
fn jwt_verify_ns(iterations: u64) -> f64 {
    let now = pushgrid_common::now_ms() / 1000;
    let token = jwt::sign_with_times(
        &Claims {
            sub: "alice".into(),
            app: "demo".into(),
            exp: now + 7 * 24 * 3600,
            dev: "alice-phone".into(),
        },
        TimeClaims {
            iat: Some(now),
            nbf: None,
        },
        "demo-secret-of-32-bytes-or-more!",
    );
    let policy = TokenPolicy::default();
    median_ns(iterations / 10 + 1, |count| {
        for _ in 0..count {
            black_box(
                jwt::verify(
                    black_box(&token),
                    "demo-secret-of-32-bytes-or-more!",
                    &policy,
                )
                .ok(),
            );
        }
    })
}

/// What the checks cost of one push, given the push's CPU time.
fn push_share(
    push_cpu_us: Option<f64>,
    per_push_ns: f64,
    jwt_ns: f64,
) -> Option<serde_json::Value> {
    push_cpu_us.map(|push_us| {
        json!({
            "push_cpu_us": push_us,
            "checks_per_push_ns": per_push_ns.round(),
            "checks_share_of_push_percent": (per_push_ns / (push_us * 1000.0) * 100.0 * 1000.0).round() / 1000.0,
            "jwt_verify_share_of_push_percent": (jwt_ns / (push_us * 1000.0) * 100.0 * 1000.0).round() / 1000.0,
        })
    })
}

fn main() {
    let args = args();
    let iterations = args.iterations;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let machine = machine();

    // The cluster's keys: one per role, every server holding all verifiers.
    let roles = pushgrid_common::auth::ROLES;
    let keys: Vec<RoleKey> = roles.iter().map(|role| RoleKey::generate(*role)).collect();
    let center = key_of(&keys, Role::Center);
    let verifiers = Verifiers::new(keys.iter().map(RoleKey::verifier).collect());
    // Mid-rotation: two keys per role.
    let rotating = Verifiers::new(
        keys.iter()
            .map(RoleKey::verifier)
            .chain(roles.iter().map(|role| RoleKey::generate(*role).verifier()))
            .collect(),
    );
    let stranger = RoleKey::generate(Role::Center);

    let (check_7, check_14, check_refused) =
        verifier_checks(iterations, &verifiers, &rotating, &center, &stranger);

    // The server side: saver's layer in front of a service that answers at once.
    let saver = Credentials::new(key_of(&keys, Role::Saver), verifiers.clone());
    let center_credentials = Credentials::new(center.clone(), verifiers.clone());
    let header = center_credentials.header();
    const STORE: &str = "/pushgrid.cluster.Saver/Store";
    let bare = time_service(&runtime, iterations, inner(), || {
        grpc_request(STORE, Some(&header))
    });
    let checked = time_service(
        &runtime,
        iterations,
        saver.server_layer(Role::Saver).layer(inner()),
        || grpc_request(STORE, Some(&header)),
    );
    // The client side: center's key added to a request that had none.
    let bare_unkeyed = time_service(&runtime, iterations, inner(), || grpc_request(STORE, None));
    let keyed = time_service(
        &runtime,
        iterations,
        center_credentials.attach(inner()),
        || grpc_request(STORE, None),
    );
    let layer_ns = (checked - bare).max(0.0);
    let attach_ns = (keyed - bare_unkeyed).max(0.0);

    let jwt_ns = jwt_verify_ns(iterations);

    let per_push_ns = CHECKED_CALLS_PER_PUSH * (layer_ns + attach_ns);
    let share = push_share(args.push_cpu_us, per_push_ns, jwt_ns);
    let report = json!({
        "iterations_per_round": iterations,
        "rounds": 7,
        "machine": machine,
        "ns_per_call": {
            "verifiers_check_7_verifiers_accepted": (check_7 * 10.0).round() / 10.0,
            "verifiers_check_14_verifiers_accepted": (check_14 * 10.0).round() / 10.0,
            "verifiers_check_refused_unknown_key": (check_refused * 10.0).round() / 10.0,
            "server_request_without_layer": (bare * 10.0).round() / 10.0,
            "server_request_through_cluster_auth_layer": (checked * 10.0).round() / 10.0,
            "cluster_auth_layer": (layer_ns * 10.0).round() / 10.0,
            "client_request_without_key": (bare_unkeyed * 10.0).round() / 10.0,
            "client_request_with_key_attached": (keyed * 10.0).round() / 10.0,
            "with_credential_attach": (attach_ns * 10.0).round() / 10.0,
            "jwt_verify_hs256_with_time_checks": jwt_ns.round(),
        },
        "checked_calls_per_push_upper_bound": CHECKED_CALLS_PER_PUSH,
        "authorization_header_bytes": header.len(),
        "per_push": share,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("JSON of plain values")
    );
}
