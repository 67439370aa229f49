//! Latency histograms: the bounds every part of the load test records in, the
//! percentiles a report shows, and the base64 form in which a worker hands
//! its histograms to the coordinator.

use base64::Engine;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of a histogram of microseconds, in milliseconds.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

pub fn percentiles_ms(histogram: &Histogram<u64>) -> Percentiles {
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        count: histogram.len(),
        p50: ms(histogram.value_at_quantile(0.5)),
        p99: ms(histogram.value_at_quantile(0.99)),
        p999: ms(histogram.value_at_quantile(0.999)),
        max: ms(histogram.max()),
    }
}

/// Microseconds from 1 µs to 10 minutes, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds")
}

/// Connect (TCP + AUTH) durations: microseconds from 1 µs to 2 minutes.
pub fn connect_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("static histogram bounds")
}

/// Base64 of the histogram's hdrhistogram V2 serialisation ("" for none).
pub fn to_base64(histogram: Option<&Histogram<u64>>) -> String {
    let mut bytes = Vec::new();
    if let Some(histogram) = histogram {
        let _ = hdrhistogram::serialization::Serializer::serialize(
            &mut hdrhistogram::serialization::V2Serializer::new(),
            histogram,
            &mut bytes,
        );
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The histogram [`to_base64`] wrote, or `None` for anything else.
pub fn from_base64(base64_text: &str) -> Option<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(base64_text)
        .ok()?;
    hdrhistogram::serialization::Deserializer::new()
        .deserialize::<u64, _>(&mut &bytes[..])
        .ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_histogram_survives_base64_and_garbage_does_not_decode() {
        let mut histogram = latency_histogram();
        for us in [1_000, 2_000, 3_000] {
            histogram.record(us).unwrap();
        }
        let back = from_base64(&to_base64(Some(&histogram))).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(percentiles_ms(&back).max, percentiles_ms(&histogram).max);
        assert!(from_base64("").is_none());
        assert!(from_base64("not base64!").is_none());
    }
}
