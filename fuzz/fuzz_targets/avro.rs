//! Decodes arbitrary bytes as an Avro value in the Confluent wire format through the
//! website-metrics mapping (`sink.format: avro`), with the tests' two writer schemas
//! cached under ids 1 and 2: every input must end as one well-formed COPY line or one
//! rejection (`not_framed`, `unknown_schema`, `bad_avro`, ...), never a panic. Inputs
//! that start `00 00 00 00 01` or `... 02` reach the datum decoder.
//!
//!     cargo +nightly fuzz run avro -- -max_total_time=600 -rss_limit_mb=2048

#![no_main]

use std::sync::{Arc, LazyLock};

use kafka_pg_ingest::config::{Config, ValueFormat};
use kafka_pg_ingest::decode::Decoder;
use kafka_pg_ingest::decode::avro::{Lookup, WriterSchema};
use kafka_pg_ingest::record::Record;
use kafka_pg_ingest::routes::Routes;
use libfuzzer_sys::fuzz_target;

// Its schemas only; the tests read its records too.
#[allow(dead_code)]
#[path = "../../src/decode/fixture.rs"]
mod fixture;

// Shared with the decode target, which uses the rest of it.
#[allow(dead_code)]
#[path = "../../src/decode/invariants.rs"]
mod invariants;

static DECODER: LazyLock<Decoder> = LazyLock::new(|| {
    let mut config = Config::load(None, Vec::new(), &Default::default())
        .expect("the built-in configuration loads");
    config.sink.format = ValueFormat::Avro;
    let routes = Routes::new(&config).expect("the built-in route is valid");
    for (id, text) in fixture::confluent_avro().schemas {
        let schema = WriterSchema::parse(id, &text, &[]).expect("the schema parses");
        routes.schemas().insert(id, Lookup::Found(Arc::new(schema)));
    }
    routes.decoders()[0].clone()
});

fuzz_target!(|data: &[u8]| {
    let record = Record {
        topic: "website-metrics".into(),
        partition: 0,
        offset: 0,
        key: None,
        value: Some(data.to_vec()),
        headers: Vec::new(),
        timestamp_ms: None,
    };
    let before = b"earlier\tline\n";
    let mut out = before.to_vec();
    let result = DECODER.decode_into(&record, &mut out);
    let fields = DECODER.column_names().count();
    let rejected = result.as_ref().err().map(|r| r.reason.as_str());
    invariants::assert_decided(before, &out, fields, rejected);
});
