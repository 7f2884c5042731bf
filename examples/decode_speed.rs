//! Decoder micro-benchmark: decodes 200,000 sample website-metrics messages into COPY
//! text and prints the time per record.
//!
//!     cargo run --release --example decode_speed

use std::time::Instant;

use kafka_pg_ingest::config::{Config, Overrides};
use kafka_pg_ingest::record::Record;
use kafka_pg_ingest::routes::Routes;
use kafka_pg_ingest::sample;
use rand::SeedableRng;

const RECORDS: u32 = 200_000;

fn main() -> anyhow::Result<()> {
    let config = Config::load(None, Vec::new(), &Overrides::default())?;
    let routes = Routes::new(&config)?;
    let decoder = &routes.decoders()[0];
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let records: Vec<Record> = (0..RECORDS)
        .map(|i| Record {
            topic: "website-metrics".into(),
            partition: 0,
            offset: i64::from(i),
            key: None,
            value: Some(sample::website_metric(u64::from(i), &mut rng)),
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
        "{:?} per record ({} records, {} bytes of COPY text)",
        started.elapsed() / RECORDS,
        RECORDS,
        out.len()
    );
    Ok(())
}
