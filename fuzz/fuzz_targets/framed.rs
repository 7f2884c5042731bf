//! Decodes arbitrary bytes as a value in the Confluent wire format through the
//! website-metrics mapping, in the format the first byte picks (0 Avro, 1 Protobuf,
//! 2 JSON Schema), with the fixtures' two writer schemas of that format cached under ids
//! 1 and 2: every input must end as one well-formed COPY line or one rejection
//! (`not_framed`, `unknown_schema`, `bad_avro`, `bad_protobuf`, `bad_json_schema`, ...),
//! never a panic. Inputs whose rest starts `00 00 00 00 01` or `... 02` reach the
//! payload decoders.
//!
//!     cargo +nightly fuzz run framed -- -max_total_time=600 -rss_limit_mb=2048

#![no_main]

use std::sync::{Arc, LazyLock};

use kafka_pg_ingest::config::{Config, ValueFormat};
use kafka_pg_ingest::decode::Decoder;
use kafka_pg_ingest::decode::framed::{Lookup, WriterSchema};
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

/// The website-metrics decoder reading `format`, with `fixture`'s schemas.
fn decoder(format: ValueFormat, fixture: fixture::Confluent) -> Decoder {
    let mut config = Config::load(None, Vec::new(), &Default::default())
        .expect("the built-in configuration loads");
    config.sink.format = format;
    let routes = Routes::new(&config).expect("the built-in route is valid");
    for (id, text) in fixture.schemas {
        let schema =
            WriterSchema::parse(id, &fixture.schema_type, &text, &[]).expect("the schema parses");
        routes
            .schemas()
            .insert(id, format, Lookup::Found(Arc::new(schema)));
    }
    routes.decoders()[0].clone()
}

static DECODERS: LazyLock<[Decoder; 3]> = LazyLock::new(|| {
    [
        decoder(ValueFormat::Avro, fixture::confluent_avro()),
        decoder(ValueFormat::Protobuf, fixture::confluent_protobuf()),
        decoder(ValueFormat::JsonSchema, fixture::confluent_json_schema()),
    ]
});

fuzz_target!(|input: &[u8]| {
    let Some((&pick, data)) = input.split_first() else {
        return;
    };
    let decoder = &DECODERS[usize::from(pick) % 3];
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
    let result = decoder.decode_into(&record, &mut out);
    let fields = decoder.column_names().count();
    let rejected = result.as_ref().err().map(|r| r.reason.as_str());
    invariants::assert_decided(before, &out, fields, rejected);
});
