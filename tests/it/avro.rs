//! Avro values in the Confluent wire format (and `dev produce` in each registry format).
//! The writer schemas come from a registry each test serves itself (`dev::registry`),
//! implementing the REST subset the worker uses: `GET /schemas/ids/{id}` (a 404 with
//! error code 40403 for an id it does not hold). Bytes come from Confluent's own Python
//! `AvroSerializer` (`tests/fixtures/confluent-avro.json`, made by
//! `scripts/registry-fixtures`) and from apache-avro.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kafka_pg_ingest::dev::registry::DevRegistry;
use kafka_pg_ingest::pipeline::Pipeline;
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;

use crate::fixture::{Confluent, confluent_avro};
use crate::helpers::*;

/// The dev registry serving the fixture's schemas.
pub async fn registry(fixture: &Confluent) -> DevRegistry {
    DevRegistry::start(&fixture.schema_type, fixture.schemas.clone())
        .await
        .expect("the registry serves")
}

/// The default website-metrics mapping, reading Avro from `registry`.
fn avro_sink(registry: &DevRegistry) -> String {
    registry_sink(registry, "avro")
}

/// The default website-metrics mapping, reading `format` from `registry`.
pub fn registry_sink(registry: &DevRegistry, format: &str) -> String {
    format!(
        "sink:\n  format: {format}\nschema_registry:\n  url: {}\n  timeout_ms: 2000\n",
        registry.url
    )
}

/// A route of `format` from `topic` to `table`, reading [`PROBE_COLUMNS`], `columns`
/// (column, field, type) and the coordinates, its schemas from `registry`.
pub fn route(
    registry: &DevRegistry,
    topic: &str,
    table: &str,
    format: &str,
    columns: &[(&str, &str, &str)],
) -> String {
    let mut yaml = format!(
        "schema_registry:\n  url: {}\nroutes:\n  - topic: {topic}\n    table: {table}\n    format: {format}\n    columns:\n",
        registry.url
    );
    for (column, field, kind) in PROBE_COLUMNS.iter().chain(columns).chain(&[
        ("kafka_topic", "@topic", "text"),
        ("kafka_partition", "@partition", "int4"),
        ("kafka_offset", "@offset", "int8"),
    ]) {
        yaml.push_str(&format!(
            "      - {{ column: {column}, field: \"{field}\", type: {kind} }}\n"
        ));
    }
    yaml
}

/// Produces the fixture's records and runs a pipeline of `config` until each offset is
/// settled; the pipeline's metrics as scraped at the end.
pub async fn land_fixture(
    config: kafka_pg_ingest::config::Config,
    db: &TestDb,
    kafka: &TestKafka,
    fixture: &Confluent,
) -> String {
    kafka.produce(fixture.payloads());
    let total = fixture.records.len() as i64;
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        kafka,
        total,
        Duration::from_secs(60),
    )
    .await;
    let scrape = pipeline.observers().metrics.encode();
    pipeline.close().await;
    scrape
}

/// The website-metrics columns of the fixtures' tables, as (column, field, type).
pub const PROBE_COLUMNS: [(&str, &str, &str); 7] = [
    ("at", "request_timestamp", "timestamptz"),
    ("url", "url", "text"),
    ("ip", "ip_address", "inet"),
    ("response_time", "resp_time", "interval"),
    ("status", "resp_status_code", "int4"),
    ("found", "pattern_found", "bool"),
    ("comment", "comment", "text"),
];

/// SQL of a JSON object of a fixture table's probe columns (and `whole`'s comment), for
/// [`assert_probe`]; `extra` adds more keys.
pub fn probe_json(extra: &str) -> String {
    format!(
        "SELECT json_build_object('comment', comment, 'at', at, 'url', url, 'ip', host(ip),
           'response_us', (extract(epoch FROM response_time) * 1000000)::int8,
           'status', status, 'found', found, 'whole_comment', whole->>'comment', {extra})
         FROM probes.results ORDER BY comment::int"
    )
}

/// Asserts a row of [`probe_json`] holds the probe a fixture's record `expected` holds.
pub fn assert_probe(row: &Value, expected: &Value) {
    for (key, field) in [
        ("comment", "comment"),
        ("url", "url"),
        ("ip", "ip_address"),
        ("status", "resp_status_code"),
        ("found", "pattern_found"),
        ("whole_comment", "comment"),
    ] {
        assert_eq!(row[key], expected[field], "{key}: {row} {expected}");
    }
    assert!(
        same_instant(&row["at"], &expected["request_timestamp"]),
        "{row} {expected}"
    );
    // H:MM:SS.ffffff, under a minute here.
    let resp_time = expected["resp_time"].as_str().expect("text");
    let seconds: f64 = resp_time
        .rsplit(':')
        .next()
        .expect("seconds")
        .parse()
        .expect("a number");
    assert_eq!(
        row["response_us"],
        json!((seconds * 1e6).round() as i64),
        "{row}"
    );
}

/// Whether two RFC 3339 texts are the same instant.
pub fn same_instant(a: &Value, b: &Value) -> bool {
    let parse = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().expect("a timestamp")).expect("RFC 3339")
    };
    parse(a) == parse(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confluent_serialized_avro_of_two_schema_versions_lands_with_every_logical_type() {
    let db = TestDb::new().await;
    let fixture = confluent_avro();
    let registry = registry(&fixture).await;
    sqlx::raw_sql(
        "CREATE SCHEMA probes; CREATE TABLE probes.results (
           at timestamptz NOT NULL, url text NOT NULL, ip inet, response_time interval,
           status int4, found bool, comment text, region text, price numeric(12,4),
           probe_id uuid, day date, checked_at timestamptz, tags jsonb, raw bytea,
           whole jsonb, kafka_topic text NOT NULL, kafka_partition int4 NOT NULL,
           kafka_offset int8 NOT NULL,
           UNIQUE (kafka_topic, kafka_partition, kafka_offset))",
    )
    .execute(&db.pool)
    .await
    .expect("table");
    let kafka = TestKafka::new(2);
    let yaml = route(
        &registry,
        &kafka.topic,
        "probes.results",
        "avro",
        &[
            ("region", "region", "text"),
            ("price", "price", "numeric"),
            ("probe_id", "probe_id", "uuid"),
            ("day", "day", "date"),
            ("checked_at", "checked_at", "timestamptz"),
            ("tags", "/tags", "jsonb"),
            ("raw", "raw", "bytea"),
            ("whole", "@value", "jsonb"),
        ],
    );
    let config = kafka.config_with_yaml(&db, &yaml).expect("route loads");
    let scrape = land_fixture(config, &db, &kafka, &fixture).await;
    let total = fixture.records.len() as i64;

    let rows: Vec<Value> = sqlx::query_scalar(AssertSqlSafe(probe_json(
        "'region', region, 'price', price::text, 'probe_id', probe_id, 'day', day,
         'checked_at', checked_at, 'tags', tags, 'raw', encode(raw, 'hex'),
         'whole_price', whole->>'price'",
    )))
    .fetch_all(&db.pool)
    .await
    .expect("rows");
    assert_eq!(rows.len() as i64, total, "every record is a row");
    for (row, (_, expected)) in rows.iter().zip(&fixture.records) {
        assert_probe(row, expected);
        if expected.get("price").is_some() {
            assert_eq!(row["region"], expected["region"]);
            assert_eq!(row["price"], expected["price"], "exact at scale 4");
            assert_eq!(row["whole_price"], expected["price"]);
            assert_eq!(row["probe_id"], expected["probe_id"]);
            assert_eq!(row["day"], expected["day"]);
            assert!(same_instant(&row["checked_at"], &expected["checked_at"]));
            assert_eq!(row["tags"], expected["tags"]);
            assert_eq!(row["raw"], expected["raw"]);
        } else {
            // Version 1 has none of version 2's fields.
            for absent in [
                "region",
                "price",
                "probe_id",
                "day",
                "checked_at",
                "tags",
                "raw",
            ] {
                assert_eq!(row[absent], Value::Null, "{absent} of {row}");
            }
        }
    }
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM ingest.dead_letters")
        .fetch_one(&db.pool)
        .await
        .expect("dead letters");
    assert_eq!(dead, 0);
    assert_eq!(registry.requests(), 2, "one request per schema id");
    assert!(
        scrape.contains("kafka_pg_ingest_schema_registry_requests_total 2"),
        "{scrape}"
    );
    db.drop().await;
}

/// `count` website-metrics records framed under schema ids 1 and 2 (alternating) of
/// `fixture`, encoded by apache-avro.
fn encoded_probes(fixture: &Confluent, from: u64, count: u64) -> Vec<Option<Vec<u8>>> {
    use apache_avro::types::Value as Avro;
    let schemas: Vec<(u32, apache_avro::Schema)> = [1u32, 2]
        .iter()
        .map(|id| {
            let schema = apache_avro::Schema::parse_str(&fixture.schemas[id]).expect("schema");
            (*id, schema)
        })
        .collect();
    (from..from + count)
        .map(|i| {
            let (id, schema) = &schemas[(i % 2) as usize];
            let mut fields = vec![
                (
                    "request_timestamp".to_owned(),
                    Avro::TimestampMicros(1_764_547_200_000_000 + i as i64),
                ),
                (
                    "url".to_owned(),
                    Avro::String("https://www.example.com/".into()),
                ),
                (
                    "ip_address".to_owned(),
                    Avro::Union(1, Box::new(Avro::String("104.18.1.1".into()))),
                ),
                ("resp_time".to_owned(), Avro::Union(0, Box::new(Avro::Null))),
                ("resp_status_code".to_owned(), Avro::Int(200)),
                ("pattern_found".to_owned(), Avro::Boolean(true)),
                (
                    "service_name".to_owned(),
                    Avro::Union(0, Box::new(Avro::Null)),
                ),
                ("comment".to_owned(), Avro::String(i.to_string())),
            ];
            if *id == 2 {
                fields.extend([
                    ("region".to_owned(), Avro::Enum(1, "US".into())),
                    ("price".to_owned(), Avro::Union(0, Box::new(Avro::Null))),
                    ("probe_id".to_owned(), Avro::Union(0, Box::new(Avro::Null))),
                    ("day".to_owned(), Avro::Union(0, Box::new(Avro::Null))),
                    (
                        "checked_at".to_owned(),
                        Avro::Union(0, Box::new(Avro::Null)),
                    ),
                    ("tags".to_owned(), Avro::Map(HashMap::new())),
                    ("raw".to_owned(), Avro::Union(0, Box::new(Avro::Null))),
                ]);
            }
            let datum = apache_avro::writer::datum::GenericDatumWriter::builder(schema)
                .build()
                .expect("writer")
                .write_value_to_vec(Avro::Record(fields))
                .expect("encodes");
            let mut framed = vec![0];
            framed.extend_from_slice(&id.to_be_bytes());
            framed.extend_from_slice(&datum);
            Some(framed)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_avro_records_of_two_schema_versions_land_exactly_once_with_one_request_per_id()
 {
    let db = TestDb::new().await;
    let fixture = confluent_avro();
    let registry = registry(&fixture).await;
    let kafka = TestKafka::new(4);
    kafka.produce(encoded_probes(&fixture, 0, 10_000));
    let config = kafka
        .config_with_yaml(&db, &avro_sink(&registry))
        .expect("config loads");
    let pipeline = Pipeline::connect(config).await.expect("starts");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 10_000, 0).await;
    assert_eq!(registry.requests(), 2);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_down_for_10_s_mid_stream_dead_letters_nothing_and_the_stream_lands_once() {
    let db = TestDb::new().await;
    let fixture = confluent_avro();
    let registry = registry(&fixture).await;
    let kafka = TestKafka::new(2);
    // Schema id 1 only, so id 2 is first seen while the registry is down.
    let first: Vec<Option<Vec<u8>>> = encoded_probes(&fixture, 0, 2_000)
        .into_iter()
        .step_by(2)
        .collect();
    kafka.produce(first);
    let config = kafka
        .config_with_yaml(&db, &avro_sink(&registry))
        .expect("config loads");
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        1_000,
        Duration::from_secs(60),
    )
    .await;

    registry.down.store(true, Ordering::SeqCst);
    let down_at = std::time::Instant::now();
    let up = registry.down.clone();
    let outage = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        up.store(false, Ordering::SeqCst);
    });
    kafka.produce(encoded_probes(&fixture, 2_000, 1_000));
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        2_000,
        Duration::from_secs(90),
    )
    .await;
    assert!(
        down_at.elapsed() >= Duration::from_secs(10),
        "records of an unfetched schema waited for the registry"
    );
    outage.await.expect("outage ends");
    let scrape = pipeline.observers().metrics.encode();
    pipeline.close().await;
    assert_landed_once(&db, &kafka, 2_000, 0).await;
    let retried = scrape
        .lines()
        .find(|l| l.starts_with("kafka_pg_ingest_retries_total{class=\"transient\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .expect("retries exported");
    assert!(retried > 0, "the outage was retried: {scrape}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_schema_id_truncated_bytes_and_a_missing_magic_byte_are_one_dead_letter_each() {
    let db = TestDb::new().await;
    let fixture = confluent_avro();
    let registry = registry(&fixture).await;
    let kafka = TestKafka::new(1);
    let good = encoded_probes(&fixture, 0, 100);
    let mut payloads = good.clone();
    let sample = good[0].clone().expect("bytes");
    let mut unknown = sample.clone();
    unknown[1..5].copy_from_slice(&99u32.to_be_bytes());
    let truncated = sample[..sample.len() - 3].to_vec();
    let unframed = br#"{"url": "https://www.example.com/"}"#.to_vec();
    payloads.insert(10, Some(unknown));
    payloads.insert(50, Some(truncated));
    payloads.insert(90, Some(unframed));
    payloads.insert(95, Some(vec![0, 0, 0]));
    kafka.produce(payloads);
    let config = kafka
        .config_with_yaml(&db, &avro_sink(&registry))
        .expect("config loads");
    let pipeline = Pipeline::connect(config).await.expect("starts");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 100, 4).await;
    let reasons: Vec<(String, String)> =
        sqlx::query_as("SELECT reason_code, reason FROM ingest.dead_letters ORDER BY \"offset\"")
            .fetch_all(&db.pool)
            .await
            .expect("dead letters");
    let codes: Vec<&str> = reasons.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        codes,
        ["unknown_schema", "bad_avro", "not_framed", "not_framed"]
    );
    assert!(reasons[0].1.contains("schema id 99"), "{reasons:?}");
    assert!(reasons[1].1.contains("schema id 1"), "{reasons:?}");
    assert!(reasons[2].1.contains("magic byte 0"), "{reasons:?}");
    assert!(reasons[3].1.contains("too short"), "{reasons:?}");
    // The unknown id was asked for once, as each known one.
    assert_eq!(registry.requests(), 3);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_produce_registers_the_schema_and_its_avro_stream_lands_with_the_malformed_dead_lettered()
 {
    dev_produce_stream_lands("avro").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_produce_registers_the_schema_and_its_protobuf_stream_lands_with_the_malformed_dead_lettered()
 {
    dev_produce_stream_lands("protobuf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_produce_registers_the_schema_and_its_json_schema_stream_lands_with_the_malformed_dead_lettered()
 {
    dev_produce_stream_lands("json_schema").await;
}

/// `dev produce --format FORMAT` registers the website-metrics schema and produces 2,000
/// probes, some malformed; the worker reading FORMAT lands each valid one once and each
/// malformed one as the dead letter `dev produce` counted it as.
async fn dev_produce_stream_lands(format: &str) {
    let db = TestDb::new().await;
    let registry = DevRegistry::start("AVRO", HashMap::new())
        .await
        .expect("the registry serves");
    let kafka = TestKafka::new(2);
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(BINARY)
            .args([
                "dev",
                "produce",
                "--brokers",
                &kafka.brokers,
                "--topic",
                &kafka.topic,
            ])
            .args([
                "--count",
                "2000",
                "--malformed-ratio",
                "0.05",
                "--seed",
                "3",
            ])
            .args(["--format", format, "--schema-registry", &registry.url])
            .output()
            .expect("dev produce runs")
    });
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (valid, malformed) = produced_counts(&stdout);
    assert!(malformed > 0 && valid + malformed == 2_000, "{stdout}");
    let config = kafka
        .config_with_yaml(&db, &registry_sink(&registry, format))
        .expect("config loads");
    let pipeline = Pipeline::connect(config).await.expect("starts");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, valid, malformed).await;
    let reasons: Vec<(String, i64)> = sqlx::query_as(
        "SELECT reason_code, count(*) FROM ingest.dead_letters GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .expect("dead letters");
    for (reason, n) in &reasons {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == [reason.as_str(), &n.to_string()]),
            "{reason} {n} not in {stdout}"
        );
    }
    assert_eq!(
        registry.requests(),
        1,
        "the worker asked for the registered id once"
    );
    db.drop().await;
}
