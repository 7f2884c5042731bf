//! Decoder micro-benchmark: decodes 200,000 sample website-metrics messages into COPY
//! text and prints the time per record, as JSON and as the same probes in Avro, Protobuf
//! and JSON Schema (the Confluent wire format, the schemas of `sample::Framer`, through
//! the same mapping). The COPY text of each must be the JSON's, byte for byte.
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

/// The id the framed values carry.
const SCHEMA_ID: u32 = 1;

fn main() -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let json: Vec<Vec<u8>> = (0..RECORDS)
        .map(|i| sample::website_metric(u64::from(i), &mut rng))
        .collect();
    let mut config = Config::load(None, Vec::new(), &Overrides::default())?;
    let copy = report("JSON", &Routes::new(&config)?, &json)?;
    for format in [
        ValueFormat::Avro,
        ValueFormat::Protobuf,
        ValueFormat::JsonSchema,
    ] {
        let framer = sample::Framer::new(format, SCHEMA_ID)?.expect("a registry format");
        let framed = json
            .iter()
            .map(|message| framer.encode(message))
            .collect::<anyhow::Result<Vec<_>>>()?;
        config.sink.format = format;
        let routes = Routes::new(&config)?;
        let (kind, text) = sample::Framer::schema(format).expect("a registry format");
        let schema = WriterSchema::parse(SCHEMA_ID, kind, text, &[]).map_err(anyhow::Error::msg)?;
        routes
            .schemas()
            .insert(SCHEMA_ID, format, Lookup::Found(Arc::new(schema)));
        let same = report(format.name(), &routes, &framed)?;
        anyhow::ensure!(
            same == copy,
            "{} gives other COPY text than JSON",
            format.name()
        );
    }
    Ok(())
}

/// Decodes `values` through the first route and prints the time per record; the COPY
/// text.
fn report(label: &str, routes: &Routes, values: &[Vec<u8>]) -> anyhow::Result<Vec<u8>> {
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
    Ok(out)
}
