//! A Kafka record detached from the consumer, so a batch can outlive the poll that
//! produced it (retries, bisection, dead letters).

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// One Kafka record with its coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Kafka timestamp in milliseconds since the epoch, when the broker gave one.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// The producer's span of a valid W3C `traceparent` header (with its `tracestate`).
    pub fn span_context(&self) -> Option<SpanContext> {
        // From an empty context: `extract` falls back to the current one, which inside a
        // batch span is the batch's own trace.
        let context = TraceContextPropagator::new()
            .extract_with_context(&opentelemetry::Context::new(), &Headers(&self.headers));
        let span = context.span().span_context().clone();
        span.is_valid().then_some(span)
    }

    /// The trace id of a valid W3C `traceparent` header, as 32 lower-case hex digits.
    pub fn trace_id(&self) -> Option<String> {
        self.span_context().map(|c| c.trace_id().to_string())
    }

    /// Headers as JSON: `[{"key": .., "value": text}]`, or `"value_hex"` when not UTF-8.
    pub fn headers_json(&self) -> serde_json::Value {
        let items = self.headers.iter().map(|(k, v)| {
            let mut item = serde_json::Map::new();
            // jsonb cannot hold NUL: such text is kept as hex like any other binary value.
            item.insert("key".into(), k.replace('\0', "\u{fffd}").into());
            match v.as_deref().map(std::str::from_utf8) {
                None => item.insert("value".into(), serde_json::Value::Null),
                Some(Ok(text)) if !text.contains('\0') => item.insert("value".into(), text.into()),
                Some(_) => item.insert(
                    "value_hex".into(),
                    hex(v.as_deref().unwrap_or_default()).into(),
                ),
            };
            serde_json::Value::Object(item)
        });
        serde_json::Value::Array(items.collect())
    }

    /// Bytes this record holds in memory (for batch limits).
    pub fn size(&self) -> usize {
        self.value.as_ref().map_or(0, Vec::len) + self.key.as_ref().map_or(0, Vec::len)
    }
}

/// Kafka headers as a propagation carrier; values that are not UTF-8 are absent.
struct Headers<'a>(&'a [(String, Option<Vec<u8>>)]);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let (_, value) = self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key))?;
        std::str::from_utf8(value.as_deref()?).ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(value: &[u8]) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            value: None,
            headers: vec![("traceparent".into(), Some(value.to_vec()))],
            timestamp_ms: None,
        }
    }

    #[test]
    fn trace_id_is_read_from_a_valid_traceparent_only() {
        let ok = with_header(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(
            ok.trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(with_header(b"00-zz-00f067aa0ba902b7-01").trace_id(), None);
        let zeros = with_header(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01");
        assert_eq!(zeros.trace_id(), None);
    }

    #[test]
    fn binary_header_values_are_kept_as_hex() {
        let r = with_header(&[0xff, 0x00]);
        assert_eq!(r.headers_json()[0]["value_hex"], "ff00");
        let r = with_header(b"a\0b");
        assert_eq!(r.headers_json()[0]["value_hex"], "610062");
    }
}
