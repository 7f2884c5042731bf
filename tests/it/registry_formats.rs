//! Protobuf and JSON Schema values in the Confluent wire format, as Confluent's own
//! Python `ProtobufSerializer` and `JSONSerializer` wrote them (`tests/fixtures/
//! confluent-protobuf.json` and `confluent-json-schema.json`, made by
//! `scripts/registry-fixtures`), their schemas served by a registry each test starts
//! (`dev::registry`: `GET /schemas/ids/{id}`, with `?format=serialized` for Protobuf).

use std::time::Duration;

use kafka_pg_ingest::pipeline::Pipeline;
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;

use crate::avro::{
    assert_probe, land_fixture, probe_json, registry, registry_sink, route, same_instant,
};
use crate::fixture::{confluent_json_schema, confluent_protobuf};
use crate::helpers::*;
use crate::routes::{Msg, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confluent_serialized_protobuf_of_two_schema_versions_lands_with_well_known_types() {
    let db = TestDb::new().await;
    let fixture = confluent_protobuf();
    let registry = registry(&fixture).await;
    exec(
        &db.pool,
        "CREATE SCHEMA probes; CREATE TABLE probes.results (
           at timestamptz NOT NULL, url text NOT NULL, ip inet, response_time interval,
           status int4, found bool, comment text, region text, latency interval,
           bytes_sent int8, checksum numeric, score float8, raw bytea, tags jsonb,
           codes jsonb, note text, probe text, retries int8, hops jsonb, whole jsonb,
           kafka_topic text NOT NULL, kafka_partition int4 NOT NULL, kafka_offset int8 NOT NULL,
           UNIQUE (kafka_topic, kafka_partition, kafka_offset))",
    )
    .await;
    let kafka = TestKafka::new(2);
    let yaml = route(
        &registry,
        &kafka.topic,
        "probes.results",
        "protobuf",
        &[
            ("region", "region", "text"),
            ("latency", "latency", "interval"),
            ("bytes_sent", "bytes_sent", "int8"),
            ("checksum", "checksum", "numeric"),
            ("score", "score", "float8"),
            ("raw", "raw", "bytea"),
            ("tags", "/tags", "jsonb"),
            ("codes", "codes", "jsonb"),
            ("note", "note", "text"),
            ("probe", "/probe/id", "text"),
            ("retries", "retries", "int8"),
            ("hops", "hops", "jsonb"),
            ("whole", "@value", "jsonb"),
        ],
    );
    let config = kafka.config_with_yaml(&db, &yaml).expect("route loads");
    land_fixture(config, &db, &kafka, &fixture).await;
    let total = fixture.records.len() as i64;
    let dead: Vec<String> = sqlx::query_scalar("SELECT reason FROM ingest.dead_letters")
        .fetch_all(&db.pool)
        .await
        .expect("dead letters");
    assert_eq!(dead, Vec::<String>::new(), "no dead letters");

    let rows: Vec<Value> = sqlx::query_scalar(AssertSqlSafe(probe_json(
        "'region', region, 'latency_us', (extract(epoch FROM latency) * 1000000)::int8,
         'bytes_sent', bytes_sent, 'checksum', checksum::text, 'score', score,
         'raw', encode(raw, 'hex'), 'tags', tags, 'codes', codes, 'note', note,
         'probe', probe, 'retries', retries, 'hops', hops,
         'whole_hop', whole->'hops'->0->>'host'",
    )))
    .fetch_all(&db.pool)
    .await
    .expect("rows");
    assert_eq!(rows.len() as i64, total, "every record is a row");
    for (row, (_, expected)) in rows.iter().zip(&fixture.records) {
        // A wrapper unset (ip_address of every fifth) is null.
        assert_probe(row, expected);
        if expected.get("region").is_some() {
            for key in [
                "region",
                "latency_us",
                "bytes_sent",
                "checksum",
                "score",
                "raw",
                "tags",
                "codes",
                "note",
                "probe",
                "retries",
            ] {
                assert_eq!(row[key], expected[key], "{key}: {row}");
            }
            let hops: Vec<Value> = expected["hops"]
                .as_array()
                .expect("hops")
                .iter()
                .map(|h| json!({ "host": h }))
                .collect();
            assert_eq!(row["hops"], Value::Array(hops), "{row}");
            assert_eq!(row["whole_hop"], expected["hops"][0]);
        } else {
            // Version 1 has none of version 2's fields.
            for absent in [
                "region",
                "latency_us",
                "checksum",
                "note",
                "probe",
                "retries",
                "hops",
            ] {
                assert_eq!(row[absent], Value::Null, "{absent} of {row}");
            }
        }
    }
    assert_eq!(registry.requests(), 2, "one request per schema id");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_schema_values_land_and_invalid_ones_are_dead_letters_naming_what_failed() {
    let db = TestDb::new().await;
    let fixture = confluent_json_schema();
    let registry = registry(&fixture).await;
    let kafka = TestKafka::new(1);
    let mut payloads = fixture.payloads();
    let framed = |id: u32, json: &str| {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.extend_from_slice(json.as_bytes());
        Some(bytes)
    };
    let invalid = r#"{"request_timestamp": "2026-12-01 00:00:00", "url": "u", "resp_status_code": 42, "pattern_found": true, "comment": "x"}"#;
    payloads.insert(10, framed(1, invalid));
    payloads.insert(20, framed(2, r#"{"url": "u"}"#));
    payloads.insert(30, framed(1, "<html>"));
    payloads.insert(40, framed(77, "{}"));
    payloads.insert(50, Some(br#"{"url": "unframed"}"#.to_vec()));
    kafka.produce(payloads);
    let config = kafka
        .config_with_yaml(&db, &registry_sink(&registry, "json_schema"))
        .expect("config loads");
    let pipeline = Pipeline::connect(config).await.expect("starts");
    let valid = fixture.records.len() as i64;
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, valid, 5).await;
    let reasons: Vec<(String, String)> =
        sqlx::query_as("SELECT reason_code, reason FROM ingest.dead_letters ORDER BY \"offset\"")
            .fetch_all(&db.pool)
            .await
            .expect("dead letters");
    let codes: Vec<&str> = reasons.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        codes,
        [
            "bad_json_schema",
            "bad_json_schema",
            "bad_json_schema",
            "unknown_schema",
            "not_framed"
        ]
    );
    let says = |i: usize, words: &[&str]| {
        assert!(
            words.iter().all(|w| reasons[i].1.contains(w)),
            "{words:?} in {reasons:?}"
        );
    };
    says(0, &["schema id 1", "/resp_status_code", "42"]);
    says(1, &["schema id 2", "required"]);
    says(2, &["schema id 1", "not JSON"]);
    says(3, &["schema id 77"]);
    let rows: Vec<Value> = sqlx::query_scalar(
        "SELECT json_build_object('comment', comment, 'url', url, 'ip', host(ip),
           'status', status_code) FROM web_metrics.metrics ORDER BY comment::int",
    )
    .fetch_all(&db.pool)
    .await
    .expect("rows");
    assert_eq!(rows.len() as i64, valid);
    for (row, (_, expected)) in rows.iter().zip(&fixture.records) {
        assert_eq!(row["comment"], expected["comment"]);
        assert_eq!(row["url"], expected["url"]);
        assert_eq!(row["ip"], expected["ip_address"]);
        assert_eq!(row["status"], expected["resp_status_code"]);
    }
    assert_eq!(
        registry.requests(),
        3,
        "one request per schema id, 77 included"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn protobuf_keys_are_read_through_key_json_and_their_schemas_fetched_once() {
    let db = TestDb::new().await;
    let fixture = confluent_protobuf();
    let registry = registry(&fixture).await;
    let kafka = TestKafka::new(1);
    exec(
        &db.pool,
        "CREATE SCHEMA probes; CREATE TABLE probes.keyed (
           url text NOT NULL, at timestamptz NOT NULL, region text, note text NOT NULL,
           kafka_topic text NOT NULL, kafka_partition int4 NOT NULL, kafka_offset int8 NOT NULL,
           UNIQUE (kafka_topic, kafka_partition, kafka_offset))",
    )
    .await;
    let yaml = format!(
        "schema_registry:\n  url: {}\nroutes:\n  - topic: {}\n    table: probes.keyed\n    \
         key_format: protobuf\n    columns:\n      \
         - {{ column: url, field: \"@key_json:/url\", type: text }}\n      \
         - {{ column: at, field: \"@key_json:/request_timestamp\", type: timestamptz }}\n      \
         - {{ column: region, field: \"@key_json:/region\", type: text }}\n      \
         - {{ column: note, field: note, type: text }}\n      \
         - {{ column: kafka_topic, field: \"@topic\", type: text }}\n      \
         - {{ column: kafka_partition, field: \"@partition\", type: int4 }}\n      \
         - {{ column: kafka_offset, field: \"@offset\", type: int8 }}\n",
        registry.url, kafka.topic
    );
    let config = kafka.config_with_yaml(&db, &yaml).expect("route loads");
    // Keys are the fixture's framed messages; values are JSON.
    let msg = |key: Vec<u8>, i: usize| Msg {
        key: Some(key),
        value: Some(json!({ "note": format!("n{i}") }).to_string().into_bytes()),
        ..Msg::default()
    };
    let mut msgs: Vec<Msg> = (0..50)
        .map(|i| msg(fixture.records[i].0.clone(), i))
        .collect();
    let mut unknown = fixture.records[0].0.clone();
    unknown[1..5].copy_from_slice(&99u32.to_be_bytes());
    msgs.push(msg(b"plain-text-key".to_vec(), 50));
    msgs.push(msg(unknown, 51));
    send(&kafka, &kafka.topic, &msgs);
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(&mut pipeline, &db.pool, &kafka, 52, Duration::from_secs(60)).await;
    pipeline.close().await;
    let rows: Vec<Value> = sqlx::query_scalar(
        "SELECT json_build_object('url', url, 'at', at, 'region', region, 'note', note)
         FROM probes.keyed ORDER BY kafka_offset",
    )
    .fetch_all(&db.pool)
    .await
    .expect("rows");
    // One row per offset of the 50 valid records, in offset order.
    assert_eq!(rows.len(), 50);
    for (i, (row, (_, expected))) in rows.iter().zip(&fixture.records).enumerate() {
        assert_eq!(row["url"], expected["url"], "{row}");
        assert!(
            same_instant(&row["at"], &expected["request_timestamp"]),
            "{row}"
        );
        // Version 2 keys carry a region; version 1 keys have no such field.
        let region = expected.get("region").cloned().unwrap_or(Value::Null);
        assert_eq!(row["region"], region, "{row}");
        assert_eq!(row["note"], json!(format!("n{i}")));
    }
    let reasons: Vec<(String, String)> =
        sqlx::query_as("SELECT reason_code, reason FROM ingest.dead_letters ORDER BY \"offset\"")
            .fetch_all(&db.pool)
            .await
            .expect("dead letters");
    let codes: Vec<&str> = reasons.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(codes, ["not_framed", "unknown_schema"]);
    assert!(
        reasons
            .iter()
            .all(|(_, r)| r.starts_with("record key for column `url`")),
        "{reasons:?}"
    );
    assert!(reasons[1].1.contains("schema id 99"), "{reasons:?}");
    assert_eq!(registry.requests(), 3, "ids 1, 2 and 99, each once");
    db.drop().await;
}
