//! Decoder micro-benchmark: decodes 200,000 sample website-metrics messages into COPY
//! text and prints the time per record, as JSON and as the same probes in Avro (the
//! Confluent wire format, `sample::WEBSITE_METRIC_AVRO`, through the same mapping).
//!
//!     cargo run --release --example decode_speed

use std::sync::Arc;
use std::time::Instant;

use kafka_pg_ingest::config::{Config, Overrides, ValueFormat};
use kafka_pg_ingest::decode::framed::{Lookup, WriterSchema};
use kafka_pg_ingest::record::Record;
use kafka_pg_ingest::routes::Routes;
use kafka_pg_ingest::sample;
use rand::SeedableRng;

const RECORDS: u32 = 200_000;

/// The id the Avro values are framed under.
const SCHEMA_ID: u32 = 1;

fn main() -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let json: Vec<Vec<u8>> = (0..RECORDS)
        .map(|i| sample::website_metric(u64::from(i), &mut rng))
        .collect();
    let schema = apache_avro::Schema::parse_str(sample::WEBSITE_METRIC_AVRO)?;
    let avro = json
        .iter()
        .map(|message| sample::website_metric_avro(message, &schema, SCHEMA_ID))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut config = Config::load(None, Vec::new(), &Overrides::default())?;
    report("JSON", &Routes::new(&config)?, &json)?;
    config.sink.format = ValueFormat::Avro;
    let routes = Routes::new(&config)?;
    let schema = WriterSchema::parse(SCHEMA_ID, "AVRO", sample::WEBSITE_METRIC_AVRO, &[])
        .map_err(anyhow::Error::msg)?;
    routes.schemas().insert(
        SCHEMA_ID,
        ValueFormat::Avro,
        Lookup::Found(Arc::new(schema)),
    );
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
