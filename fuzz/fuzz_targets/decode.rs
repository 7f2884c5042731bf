//! Decodes arbitrary bytes as a record value with the built-in configuration (and with its
//! limits tightened): every input must end as one well-formed COPY line or one rejection,
//! never a panic. The bytes also
//! ride in a `traceparent` header, because a dead letter stores the headers as `jsonb` and
//! the trace id they carry.
//!
//!     cargo +nightly fuzz run decode -- -max_total_time=600 -rss_limit_mb=2048

#![no_main]

use std::sync::LazyLock;

use kafka_pg_ingest::config::Config;
use kafka_pg_ingest::decode::Decoder;
use kafka_pg_ingest::record::Record;
use kafka_pg_ingest::routes::Routes;
use libfuzzer_sys::fuzz_target;

#[path = "../../src/decode/invariants.rs"]
mod invariants;

/// The built-in configuration's decoder, and one with the limits tightened.
static DECODERS: LazyLock<[Decoder; 2]> = LazyLock::new(|| {
    let mut config = Config::load(None, Vec::new(), &Default::default())
        .expect("the built-in configuration loads");
    let decoder = |config: &Config| -> Decoder {
        let routes = Routes::new(config).expect("the built-in route is valid");
        routes.decoders()[0].clone()
    };
    let default = decoder(&config);
    let sink = &mut config.sink;
    [sink.max_json_depth, sink.max_string_bytes, sink.max_fields] = invariants::TIGHT_LIMITS;
    [default, decoder(&config)]
});

fuzz_target!(|data: &[u8]| {
    let record = Record {
        topic: "website-metrics".into(),
        partition: 0,
        offset: 0,
        key: None,
        value: Some(data.to_vec()),
        headers: vec![("traceparent".into(), Some(data.to_vec()))],
        timestamp_ms: None,
    };
    for decoder in DECODERS.iter() {
        // A rejection must leave the lines already in the batch's buffer untouched.
        let before = b"earlier\tline\n";
        let mut out = before.to_vec();
        let result = decoder.decode_into(&record, &mut out);
        // The mapped columns, then topic, partition and offset.
        let fields = decoder.column_names().count();
        let rejected = result.as_ref().err().map(|r| r.reason.as_str());
        invariants::assert_decided(before, &out, fields, rejected);
    }
    invariants::assert_storable_dead_letter(
        &record.headers_json().to_string(),
        record.trace_id().as_deref(),
    );
});
