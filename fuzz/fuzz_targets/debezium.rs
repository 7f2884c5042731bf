//! Decodes arbitrary bytes as a Debezium change event (`envelope: debezium`, schemas or
//! not): every input must end as one well-formed COPY line, nothing (a tombstone, an
//! ignored truncate) or one rejection, never a panic. The first byte splits the rest
//! into the record key and value; the value also rides in a `traceparent` header.
//!
//!     cargo +nightly fuzz run debezium -- -max_total_time=600 -rss_limit_mb=2048

#![no_main]

use std::sync::LazyLock;

use kafka_pg_ingest::config::Config;
use kafka_pg_ingest::decode::Decoder;
use kafka_pg_ingest::record::Record;
use kafka_pg_ingest::routes::Routes;
use libfuzzer_sys::fuzz_target;

#[path = "../../src/decode/invariants.rs"]
mod invariants;

/// The decoder of the fixtures' route, and one with the limits tightened.
static DECODERS: LazyLock<[Decoder; 2]> = LazyLock::new(|| {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/debezium-route.yaml"
    );
    let config = Config::load(
        Some(std::path::Path::new(path)),
        Vec::new(),
        &Default::default(),
    );
    let mut config = config.expect("the route loads");
    let decoder = |config: &Config| -> Decoder {
        let routes = Routes::new(config).expect("the route is valid");
        routes.decoders()[0].clone()
    };
    let route = decoder(&config);
    let sink = &mut config.sink;
    [sink.max_json_depth, sink.max_string_bytes, sink.max_fields] = invariants::TIGHT_LIMITS;
    [route, decoder(&config)]
});

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let (key, value) = rest.split_at(usize::from(split).min(rest.len()));
    let record = Record {
        topic: "dbserver1.inventory.customers".into(),
        partition: 0,
        offset: 0,
        key: (!key.is_empty()).then(|| key.to_vec()),
        value: (!value.is_empty()).then(|| value.to_vec()),
        // A dead letter stores the headers as jsonb and the trace id they carry.
        headers: vec![("traceparent".into(), Some(value.to_vec()))],
        timestamp_ms: None,
    };
    for decoder in DECODERS.iter() {
        let before = b"earlier\tline\n";
        let mut out = before.to_vec();
        let result = decoder.decode_into(&record, &mut out);
        match result {
            Ok(false) => assert_eq!(out, before, "a record that writes nothing adds nothing"),
            _ => {
                // The mapped columns, then unread columns, truncate and delete flags.
                let fields = decoder.column_names().count() + 3;
                let rejected = result.as_ref().err().map(|r| r.reason.as_str());
                invariants::assert_decided(before, &out, fields, rejected);
            }
        }
    }
    invariants::assert_storable_dead_letter(
        &record.headers_json().to_string(),
        record.trace_id().as_deref(),
    );
});
