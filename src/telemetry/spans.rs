//! The spans of one batch: `kafka-pg-ingest batch` (a root, kind consumer) with children
//! `poll`, `decode` and `commit`; retries and fencing are events on it. Attributes follow
//! the OpenTelemetry messaging and database semantic conventions.

use opentelemetry::trace::{Status, TraceContextExt};
use opentelemetry::{Array, StringValue, Value};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::record::Record;
use crate::store::Batch;

/// Name of the span of one batch.
pub const BATCH_SPAN: &str = "kafka-pg-ingest batch";

/// A new root span for a batch. When traced, its trace id is recorded as a field, so
/// every log line inside the batch carries it.
pub fn batch(traced: bool) -> Span {
    let span = tracing::info_span!(
        parent: None,
        BATCH_SPAN,
        otel.kind = "consumer",
        trace_id = tracing::field::Empty
    );
    if traced {
        let trace_id = span.context().span().span_context().trace_id();
        span.record("trace_id", tracing::field::display(trace_id));
    }
    span
}

/// Links the producer's trace of `record` (its W3C `traceparent`/`tracestate` headers).
pub fn link(span: &Span, record: &Record) {
    if let Some(context) = record.span_context() {
        span.add_link(context);
    }
}

/// What the batch holds: its destination, partitions, offset ranges and size.
pub fn describe(span: &Span, batch: &Batch, group: &str, table: &str) {
    let mut topics: Vec<&str> = batch.ranges.iter().map(|r| r.topic.as_str()).collect();
    topics.sort_unstable();
    topics.dedup();
    span.set_attribute("messaging.system", "kafka");
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.operation.name", "process");
    span.set_attribute("messaging.consumer.group.name", group.to_owned());
    span.set_attribute("messaging.destination.name", topics.join(","));
    if let [only] = batch.ranges.as_slice() {
        span.set_attribute(
            "messaging.destination.partition.id",
            only.partition.to_string(),
        );
    }
    span.set_attribute(
        "messaging.batch.message_count",
        count(batch.records.len() as u64),
    );
    let ranges: Vec<StringValue> = batch
        .ranges
        .iter()
        .map(|r| {
            let first = batch
                .records
                .iter()
                .find(|rec| rec.topic == r.topic && rec.partition == r.partition)
                .map_or(r.end - 1, |rec| rec.offset);
            format!("{}/{}:{}-{}", r.topic, r.partition, first, r.end - 1).into()
        })
        .collect();
    span.set_attribute(
        "kafka_pg_ingest.offset_ranges",
        Value::Array(Array::String(ranges)),
    );
    database(span, table);
}

/// A `commit` child of the current span: one transaction attempt.
pub fn commit(table: &str) -> Span {
    let span = tracing::info_span!("commit", otel.kind = "client");
    database(&span, table);
    span.set_attribute("db.operation.name", "COPY");
    span
}

/// The database attributes (both the old `db.system` and the current `db.system.name`).
fn database(span: &Span, table: &str) {
    span.set_attribute("db.system", "postgresql");
    span.set_attribute("db.system.name", "postgresql");
    span.set_attribute("db.collection.name", table.to_owned());
}

/// How the batch ended.
pub fn committed(span: &Span, rows: u64, dead_letters: u64) {
    span.set_attribute("kafka_pg_ingest.rows", count(rows));
    span.set_attribute("kafka_pg_ingest.dead_letters", count(dead_letters));
}

/// Marks the batch failed with `error`.
pub fn failed(span: &Span, error: &dyn std::fmt::Display) {
    span.set_status(Status::error(error.to_string()));
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
