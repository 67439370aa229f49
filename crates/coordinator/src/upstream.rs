//! UPSTREAM routing: a device's frame goes to the HTTP endpoint of its
//! (app, product, type) route, or to the app's webhook when no route matches,
//! with a timeout per attempt, retries with jittered backoff, and a cap on
//! requests in flight per route.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use dashmap::DashMap;
use pushgrid_common::cluster::ClusterView;
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::UpstreamRequest;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::CoordinatorError;

use crate::CoordinatorConfig;

/// Where one upstream request goes and how hard to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// Names the route in metrics and in the concurrency map.
    pub key: String,
    pub url: String,
    pub timeout: Duration,
    pub retries: u32,
    pub concurrency: u32,
}

/// The route of an upstream request: a configured route, else the app's webhook.
pub(crate) fn target(
    view: &ClusterView,
    config: &CoordinatorConfig,
    request: &UpstreamRequest,
) -> Result<Target, CoordinatorError> {
    if let Some(route) = view.route_for(&request.app, &request.product, &request.r#type) {
        return Ok(Target {
            key: format!("{}/{}/{}", route.app, route.product, route.r#type),
            url: route.url.clone(),
            timeout: Duration::from_millis(u64::from(route.timeout_ms.max(1))),
            retries: route.retries,
            concurrency: route.concurrency.max(1),
        });
    }
    let app = view
        .app(&request.app)
        .ok_or_else(|| CoordinatorError::UnknownApp(request.app.clone()))?;
    if app.webhook_url.is_empty() {
        return Err(CoordinatorError::NoRoute {
            product: request.product.clone(),
            kind: request.r#type.clone(),
        });
    }
    Ok(Target {
        key: format!("{}/webhook", app.id),
        url: app.webhook_url.clone(),
        timeout: Duration::from_millis(config.webhook_timeout_ms.max(1)),
        retries: config.webhook_retries,
        concurrency: config.webhook_concurrency.max(1),
    })
}

pub(crate) fn payload_fields(payload: &[u8]) -> serde_json::Value {
    let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
    match std::str::from_utf8(payload) {
        Ok(text) => json!({ "payload": text, "payload_b64": encoded }),
        Err(_) => json!({ "payload": null, "payload_b64": encoded }),
    }
}

fn body(request: &UpstreamRequest) -> serde_json::Value {
    let mut body = json!({
        "event": "upstream",
        "app": request.app,
        "user": request.user,
        "device": request.device,
        "product": request.product,
        "type": request.r#type,
        "client_msg_id": request.client_msg_id,
        "at_ms": now_ms(),
    });
    if let (Some(body), serde_json::Value::Object(fields)) =
        (body.as_object_mut(), payload_fields(&request.payload))
    {
        body.extend(fields);
    }
    body
}

/// Sends upstream requests; holds one semaphore per route.
pub(crate) struct Upstreams {
    http: reqwest::Client,
    in_flight: DashMap<String, (u32, Arc<Semaphore>)>,
}

impl Upstreams {
    pub fn new(http: reqwest::Client) -> Upstreams {
        Upstreams {
            http,
            in_flight: DashMap::new(),
        }
    }

    fn semaphore(&self, target: &Target) -> Arc<Semaphore> {
        let mut entry = self.in_flight.entry(target.key.clone()).or_insert_with(|| {
            (
                target.concurrency,
                Arc::new(Semaphore::new(target.concurrency as usize)),
            )
        });
        if entry.0 != target.concurrency {
            // The route's limit changed in keeper: start a new semaphore.
            *entry = (
                target.concurrency,
                Arc::new(Semaphore::new(target.concurrency as usize)),
            );
        }
        entry.1.clone()
    }

    /// Delivers `request` to `target`; Ok once it answered 2xx.
    pub async fn send(
        &self,
        target: &Target,
        request: &UpstreamRequest,
    ) -> Result<(), CoordinatorError> {
        let semaphore = self.semaphore(target);
        // Waiting for a place counts against the first attempt's time.
        let Ok(Ok(_permit)) = tokio::time::timeout(target.timeout, semaphore.acquire_owned()).await
        else {
            metrics::counter!("pushgrid_coordinator_upstream_total", "result" => "busy")
                .increment(1);
            return Err(CoordinatorError::RouteBusy {
                route: target.key.clone(),
                concurrency: target.concurrency,
            });
        };
        let body = body(request);
        let mut last_error = String::new();
        for attempt in 0..=target.retries {
            if attempt > 0 {
                metrics::counter!("pushgrid_coordinator_upstream_retries_total").increment(1);
                tokio::time::sleep(backoff(attempt)).await;
            }
            let started = tokio::time::Instant::now();
            let result = self
                .http
                .post(&target.url)
                .timeout(target.timeout)
                .json(&body)
                .send()
                .await;
            metrics::histogram!("pushgrid_coordinator_webhook_seconds")
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(response) if response.status().is_success() => {
                    metrics::counter!("pushgrid_coordinator_upstream_total", "result" => "ok")
                        .increment(1);
                    return Ok(());
                }
                Ok(response) => {
                    let status = response.status();
                    last_error = format!("the endpoint answered {status}");
                    // A client error other than timeout/throttling will not
                    // change on retry.
                    if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429
                    {
                        break;
                    }
                }
                Err(error) => {
                    last_error = if error.is_timeout() {
                        format!(
                            "the endpoint timed out after {} ms",
                            target.timeout.as_millis()
                        )
                    } else {
                        format!("the endpoint failed: {error}")
                    };
                }
            }
        }
        metrics::counter!("pushgrid_coordinator_upstream_total", "result" => "failed").increment(1);
        Err(CoordinatorError::EndpointFailed(last_error))
    }
}

/// 100 ms, 200 ms, 400 ms ... capped at 2 s, with up to 50% jitter.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(5)).min(2000);
    Duration::from_millis(base / 2 + rand::random::<u64>() % (base / 2 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_text_when_utf8_and_always_base64() {
        let text = payload_fields(b"hi");
        assert_eq!(text["payload"], "hi");
        assert_eq!(text["payload_b64"], "aGk=");
        let binary = payload_fields(&[0xff, 0x00]);
        assert!(binary["payload"].is_null());
        assert_eq!(binary["payload_b64"], "/wA=");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..10 {
            let delay = backoff(attempt);
            let base = (100u64 << attempt.min(5)).min(2000);
            assert!(
                delay >= Duration::from_millis(base / 2) && delay <= Duration::from_millis(base),
                "{delay:?}"
            );
        }
    }
}
