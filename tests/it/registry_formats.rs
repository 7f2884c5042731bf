//! Protobuf and JSON Schema values in the Confluent wire format, as Confluent's own
//! Python `ProtobufSerializer` and `JSONSerializer` wrote them (`tests/fixtures/
//! confluent-protobuf.json` and `confluent-json-schema.json`, made by
//! `scripts/registry-fixtures`), their schemas served by a registry each test starts
//! (`dev::registry`: `GET /schemas/ids/{id}`, with `?format=serialized` for Protobuf).

use std::collections::HashMap;
use std::time::Duration;

use kafka_pg_ingest::dev::registry::DevRegistry;
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
        Some(kafka_pg_ingest::sample::website_metric_json_schema(
            json.as_bytes(),
            id,
        ))
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

/// Runs the binary's `args` with `yaml` as its configuration, against `db`.
fn tool(db: &TestDb, args: &[&str], yaml: &str) -> std::process::Output {
    let path = std::env::temp_dir().join(format!("kpi-tool-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&path, yaml).expect("writable");
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(BINARY)
            .args(args)
            .arg("--config")
            .arg(&path)
            .args(["--database-url", &db.url])
            .output()
            .expect("the binary runs")
    });
    let _ = std::fs::remove_file(&path);
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schema_from_registry_maps_each_formats_latest_schema_its_table_takes_the_stream_and_check_finds_misfits()
 {
    use kafka_pg_ingest::config::ValueFormat;
    use kafka_pg_ingest::dev::registry::register_website_metric;
    use kafka_pg_ingest::sample::{Framer, website_metric};
    use rand::SeedableRng;
    // (column, type) the latest website-metrics schema of each format maps to.
    let text = "text";
    // Avro and Protobuf alike: the fields in their order, typed by their types.
    let typed = [
        ("request_timestamp", "timestamp with time zone"),
        ("url", text),
        ("ip_address", text),
        ("resp_time", text),
        ("resp_status_code", "integer"),
        ("pattern_found", "boolean"),
        ("service_name", text),
        ("comment", text),
    ];
    for (format, expected) in [
        (ValueFormat::Avro, typed),
        (ValueFormat::Protobuf, typed),
        (
            ValueFormat::JsonSchema,
            // A JSON object's properties come in name order.
            [
                ("comment", text),
                ("ip_address", text),
                ("pattern_found", "boolean"),
                ("request_timestamp", text),
                ("resp_status_code", "bigint"),
                ("resp_time", text),
                ("service_name", text),
                ("url", text),
            ],
        ),
    ] {
        let db = TestDb::new().await;
        let kafka = TestKafka::new(1);
        let registry = DevRegistry::start("AVRO", HashMap::new())
            .await
            .expect("the registry serves");
        let id = register_website_metric(&registry.url, &kafka.topic, format)
            .await
            .expect("registers");
        let route = |columns: &str| {
            format!(
                "schema_registry:\n  url: {}\nroutes:\n  - topic: {}\n    table: probes.latest\n    \
                 format: {}\n    columns:\n{columns}",
                registry.url,
                kafka.topic,
                format.name()
            )
        };
        // Value columns are replaced; the coordinates stay as configured.
        let placeholder = "      - { column: c, field: c, type: text }\n      \
                           - { column: kafka_topic, field: \"@topic\", type: text }\n      \
                           - { column: kafka_partition, field: \"@partition\", type: int4 }\n      \
                           - { column: kafka_offset, field: \"@offset\", type: int8 }\n";
        let output = tool(&db, &["schema", "--from-registry"], &route(placeholder));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        exec(&db.pool, "CREATE SCHEMA probes").await;
        exec(&db.pool, &stdout).await;
        let columns: Vec<(String, String)> = sqlx::query_as(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = 'probes' AND table_name = 'latest' ORDER BY ordinal_position",
        )
        .fetch_all(&db.pool)
        .await
        .expect("columns");
        let mut wanted: Vec<(String, String)> = expected
            .iter()
            .map(|(c, t)| ((*c).to_owned(), (*t).to_owned()))
            .collect();
        for (c, t) in [
            ("kafka_topic", text),
            ("kafka_partition", "integer"),
            ("kafka_offset", "bigint"),
        ] {
            wanted.push((c.to_owned(), t.to_owned()));
        }
        assert_eq!(columns, wanted, "{format:?}: {stdout}");

        // The printed columns, pasted into the route, take the stream.
        let pasted: String = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("--   "))
            .map(|l| format!("      {l}\n"))
            .collect();
        let config = kafka
            .config_with_yaml(&db, &route(&pasted))
            .expect("the pasted route loads");
        let framer = Framer::new(format, id)
            .expect("encodes")
            .expect("a registry format");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let payloads = (0..100)
            .map(|i| {
                Some(
                    framer
                        .encode(&website_metric(i, &mut rng))
                        .expect("encodes"),
                )
            })
            .collect();
        kafka.produce(payloads);
        let mut pipeline = Pipeline::connect(config).await.expect("starts");
        drive_until_caught_up(
            &mut pipeline,
            &db.pool,
            &kafka,
            100,
            Duration::from_secs(60),
        )
        .await;
        pipeline.close().await;
        let landed: i64 = scalar(
            &db.pool,
            "SELECT count(DISTINCT comment) FROM probes.latest WHERE url LIKE 'https://%'",
        )
        .await;
        assert_eq!(landed, 100, "{format:?}");
        assert_eq!(
            scalar(&db.pool, "SELECT count(*) FROM ingest.dead_letters").await,
            0
        );
        db.drop().await;
    }
}
