//! Decoder micro-benchmark: decodes 200,000 sample website-metrics messages into COPY
//! text and prints the time per record, as JSON and as the same probes in Avro (the
//! Confluent wire format, the tests' website-metrics schema, through the same mapping).
//!
//!     cargo run --release --example decode_speed

use std::sync::Arc;
use std::time::Instant;

use apache_avro::types::Value as Avro;
use kafka_pg_ingest::config::{Config, Overrides, ValueFormat};
use kafka_pg_ingest::decode::avro::{Lookup, WriterSchema};
use kafka_pg_ingest::record::Record;
use kafka_pg_ingest::routes::Routes;
use kafka_pg_ingest::sample;
use rand::SeedableRng;
use serde_json::Value;

const RECORDS: u32 = 200_000;

/// Schema id 1 of the tests' fixture: the website-metrics record.
const SCHEMA_ID: u32 = 1;

fn main() -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let json: Vec<Vec<u8>> = (0..RECORDS)
        .map(|i| sample::website_metric(u64::from(i), &mut rng))
        .collect();
    let fixture: Value =
        serde_json::from_str(include_str!("../tests/fixtures/confluent-avro.json"))?;
    let text = fixture["schemas"][SCHEMA_ID.to_string()]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no schema {SCHEMA_ID} in the fixture"))?;
    let avro = json
        .iter()
        .map(|message| as_avro(text, message))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut config = Config::load(None, Vec::new(), &Overrides::default())?;
    report("JSON", &Routes::new(&config)?, &json)?;
    config.sink.format = ValueFormat::Avro;
    let routes = Routes::new(&config)?;
    let schema = WriterSchema::parse(SCHEMA_ID, text, &[]).map_err(anyhow::Error::msg)?;
    routes
        .schemas()
        .insert(SCHEMA_ID, Lookup::Found(Arc::new(schema)));
    report("Avro", &routes, &avro)
}

/// Decodes `values` through the first route and prints the time per record.
fn report(label: &str, routes: &Routes, values: &[Vec<u8>]) -> anyhow::Result<()> {
    let decoder = &routes.decoders()[0];
    let records: Vec<Record> = values
        .iter()
        .zip(0..)
        .map(|(value, offset)| Record {
            topic: "website-metrics".into(),
            partition: 0,
            offset,
            key: None,
            value: Some(value.clone()),
            headers: Vec::new(),
            timestamp_ms: None,
        })
        .collect();
    let mut out = Vec::new();
    let started = Instant::now();
    for record in &records {
        decoder
            .decode_into(record, &mut out)
            .map_err(|r| anyhow::anyhow!("sample does not decode: {}", r.reason))?;
    }
    println!(
        "{label}: {:?} per record ({} records, {} bytes of COPY text)",
        started.elapsed() / RECORDS,
        records.len(),
        out.len()
    );
    Ok(())
}

/// A sample JSON message as the same probe in Avro, framed under [`SCHEMA_ID`].
fn as_avro(schema: &str, message: &[u8]) -> anyhow::Result<Vec<u8>> {
    let schema = apache_avro::Schema::parse_str(schema)?;
    let v: Value = serde_json::from_slice(message)?;
    let text = |key: &str| v[key].as_str().unwrap_or_default().to_owned();
    let optional = |key: &str| Avro::Union(1, Box::new(Avro::String(text(key))));
    let at =
        chrono::NaiveDateTime::parse_from_str(&text("request_timestamp"), "%Y-%m-%d %H:%M:%S")?
            .and_utc();
    let record = Avro::Record(vec![
        (
            "request_timestamp".into(),
            Avro::TimestampMicros(at.timestamp_micros()),
        ),
        ("url".into(), Avro::String(text("url"))),
        ("ip_address".into(), optional("ip_address")),
        ("resp_time".into(), optional("resp_time")),
        (
            "resp_status_code".into(),
            Avro::Int(v["resp_status_code"].as_i64().unwrap_or(0) as i32),
        ),
        (
            "pattern_found".into(),
            Avro::Boolean(v["pattern_found"].as_bool().unwrap_or(false)),
        ),
        ("service_name".into(), optional("service_name")),
        ("comment".into(), Avro::String(text("comment"))),
    ]);
    let datum = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()?
        .write_value_to_vec(record)?;
    let mut framed = vec![0];
    framed.extend_from_slice(&SCHEMA_ID.to_be_bytes());
    framed.extend_from_slice(&datum);
    Ok(framed)
}
