//! OpenTelemetry: the real binary exports batch spans over OTLP/HTTP to a collector the
//! test runs, linked to the traces of the producers of their records.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use rand::Rng;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::helpers::*;

type Received = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

/// An OTLP/HTTP trace receiver on an ephemeral port: keeps every export request.
async fn start_collector() -> (SocketAddr, Received) {
    let received = Received::default();
    let app = Router::new()
        .route(
            "/v1/traces",
            post(|State(store): State<Received>, body: Bytes| async move {
                let request =
                    ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf trace export");
                store.lock().expect("not poisoned").push(request);
                // An empty ExportTraceServiceResponse: full success.
                [("content-type", "application/x-protobuf")]
            }),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, received)
}

/// Produces `payloads`, each with a `traceparent` (and `tracestate`) of its own when
/// `traced`, round-robin over the partitions; returns the trace ids sent.
fn produce_traced(kafka: &TestKafka, payloads: &[(bool, Vec<u8>)]) -> Vec<String> {
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()
        .expect("producer");
    let mut rng = rand::rng();
    let mut trace_ids = Vec::new();
    for (i, (traced, payload)) in payloads.iter().enumerate() {
        let mut record = BaseRecord::<(), [u8]>::to(&kafka.topic)
            .payload(payload)
            .partition(i as i32 % kafka.partitions);
        if *traced {
            let trace_id = format!("{:032x}", rng.random::<u128>() | 1);
            let traceparent = format!("00-{trace_id}-{:016x}-01", rng.random::<u64>() | 1);
            record = record.headers(
                OwnedHeaders::new()
                    .insert(Header {
                        key: "traceparent",
                        value: Some(&traceparent),
                    })
                    .insert(Header {
                        key: "tracestate",
                        value: Some("checker=probe"),
                    }),
            );
            trace_ids.push(trace_id);
        }
        producer.send(record).map_err(|(e, _)| e).expect("queued");
    }
    producer.flush(Duration::from_secs(30)).expect("flushed");
    trace_ids
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn text<'a>(span: &'a Span, key: &str) -> &'a str {
    match attribute(&span.attributes, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("span {} attribute {key}: {other:?}", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(&span.attributes, key) {
        Some(Value::IntValue(n)) => *n,
        other => panic!("span {} attribute {key}: {other:?}", span.name),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_spans_link_every_producer_trace_and_are_flushed_on_sigterm() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(2);
    let (collector, received) = start_collector().await;
    let mut payloads: Vec<(bool, Vec<u8>)> = valid_messages(0, 150)
        .into_iter()
        .enumerate()
        .map(|(i, m)| (i % 10 != 0, m.expect("a value")))
        .collect();
    payloads.extend([
        (true, b"<html>".to_vec()),
        (true, b"{\"url\": 1}".to_vec()),
        (false, Vec::new()),
    ]);
    let trace_ids = produce_traced(&kafka, &payloads);
    let dead_ids: BTreeSet<String> = trace_ids[trace_ids.len() - 2..].iter().cloned().collect();
    let trace_ids: BTreeSet<String> = trace_ids.into_iter().collect();
    let total = payloads.len() as i64;

    let log = std::env::temp_dir().join(format!("{}.log", kafka.group));
    let mut command = worker_command(&kafka, &db);
    command
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_SERVICE_NAME", "kpi-trace-test")
        // Nothing leaves before shutdown: what arrives was flushed by SIGTERM.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .env("KAFKA_PG_INGEST__BATCH__MAX_RECORDS", "40")
        .env("RUST_LOG", "info,kafka_pg_ingest=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut worker = Reaped(command.spawn().expect("worker starts"));
    wait_for(
        "the worker ingesting everything",
        Duration::from_secs(60),
        || async { stored_total(&db.pool, &kafka.group, &kafka.topic).await == total },
    )
    .await;
    assert!(
        received.lock().expect("not poisoned").is_empty(),
        "spans are held until shutdown"
    );
    let status = terminate(&mut worker);
    assert!(status.success(), "SIGTERM exits 0, got {status}");

    let requests = std::mem::take(&mut *received.lock().expect("not poisoned"));
    let mut spans = Vec::new();
    for request in requests {
        for resource in request.resource_spans {
            let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
            assert!(
                matches!(attribute(&attributes, "service.name"), Some(Value::StringValue(s)) if s == "kpi-trace-test"),
                "resource: {attributes:?}"
            );
            spans.extend(resource.scope_spans.into_iter().flat_map(|s| s.spans));
        }
    }
    let batches: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "kafka-pg-ingest batch")
        .collect();
    assert!(batches.len() >= 4, "{} batch spans", batches.len());

    // Links: exactly the producers' traces, each once, with their tracestate.
    let mut linked = Vec::new();
    for batch in &batches {
        for link in &batch.links {
            linked.push(hex(&link.trace_id));
            assert_eq!(link.trace_state, "checker=probe");
        }
    }
    assert_eq!(linked.len(), trace_ids.len(), "one link per traced record");
    assert_eq!(linked.into_iter().collect::<BTreeSet<_>>(), trace_ids);

    // Semantic-convention attributes, and counts that add up to what Postgres holds.
    let mut counts = BTreeMap::new();
    for batch in &batches {
        assert_eq!(batch.kind, SpanKind::Consumer as i32);
        assert_eq!(text(batch, "messaging.system"), "kafka");
        assert_eq!(text(batch, "messaging.operation.type"), "process");
        assert_eq!(text(batch, "messaging.destination.name"), kafka.topic);
        assert_eq!(text(batch, "messaging.consumer.group.name"), kafka.group);
        assert_eq!(text(batch, "db.system"), "postgresql");
        assert_eq!(text(batch, "db.collection.name"), "web_metrics.metrics");
        assert!(matches!(
            attribute(&batch.attributes, "kafka_pg_ingest.offset_ranges"),
            Some(Value::ArrayValue(a)) if !a.values.is_empty()
        ));
        for key in [
            "messaging.batch.message_count",
            "kafka_pg_ingest.rows",
            "kafka_pg_ingest.dead_letters",
        ] {
            *counts.entry(key).or_insert(0) += int(batch, key);
        }
        // poll, decode and commit are its children.
        let children: BTreeSet<&str> = spans
            .iter()
            .filter(|s| s.parent_span_id == batch.span_id && s.trace_id == batch.trace_id)
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(children, BTreeSet::from(["poll", "decode", "commit"]));
    }
    let landed = Landed::read(&db.pool, &kafka.topic).await;
    landed.assert_exactly_once(total - 3, 3);
    assert_eq!(counts["messaging.batch.message_count"], total);
    assert_eq!(counts["kafka_pg_ingest.rows"], total - 3);
    assert_eq!(counts["kafka_pg_ingest.dead_letters"], 3);

    // Dead letters keep their record's trace id; log lines inside a batch carry the
    // batch's.
    let stored: BTreeSet<String> = sqlx::query_scalar::<_, String>(
        "SELECT trace_id FROM ingest.dead_letters WHERE trace_id IS NOT NULL",
    )
    .fetch_all(&db.pool)
    .await
    .expect("dead letters")
    .into_iter()
    .collect();
    assert_eq!(stored, dead_ids);
    let logs = std::fs::read_to_string(&log).expect("log");
    let batch_trace = hex(&batches[0].trace_id);
    assert!(
        logs.lines()
            .any(|l| l.contains(&format!("trace_id={batch_trace}"))),
        "no log line carries trace id {batch_trace}:\n{logs}"
    );
    let _ = std::fs::remove_file(&log);
    db.drop().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
