use super::*;
use crate::config::{Config, Overrides};

fn decoder() -> Decoder {
    decoder_with(|_| {})
}

/// A decoder of the default configuration with `change` applied to its sink.
fn decoder_with(change: impl FnOnce(&mut SinkConfig)) -> Decoder {
    let mut config = Config::load(None, Vec::new(), &Overrides::default()).expect("defaults load");
    let routes = crate::routes::Routes::new(&config).expect("the default route is valid");
    change(&mut config.sink);
    Decoder::new(
        &config.sink,
        routes.decoders()[0].route().clone(),
        routes.schemas(),
    )
}

fn record(value: Option<&[u8]>) -> Record {
    Record {
        topic: "website-metrics".into(),
        partition: 3,
        offset: 42,
        key: None,
        value: value.map(<[u8]>::to_vec),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

fn decode(value: &str) -> Result<String, Rejection> {
    let mut out = Vec::new();
    decoder().decode_into(&record(Some(value.as_bytes())), &mut out)?;
    Ok(String::from_utf8(out).expect("COPY text is UTF-8"))
}

fn code(value: &[u8]) -> ReasonCode {
    let mut out = b"kept".to_vec();
    let err = decoder()
        .decode_into(&record(Some(value)), &mut out)
        .unwrap_err();
    assert_eq!(out, b"kept", "a rejection leaves the buffer as it was");
    err.code
}

const SEED: &str = r#"{"request_timestamp": "2021-01-01 00:00:00", "url": "https://www.example.com/",
 "ip_address": "104.18.91.87", "resp_time": "0:00:00.123456", "resp_status_code": 200,
 "pattern_found": true, "service_name": "Web metric collection service", "comment": "test"}"#;

#[test]
fn seed_message_maps_to_every_column() {
    assert_eq!(
        decode(SEED).expect("seed decodes"),
        "2021-01-01 00:00:00.000000+00\thttps://www.example.com/\tWeb metric collection service\t\
         0:00:00.123456\t200\t104.18.91.87\tt\ttest\twebsite-metrics\t3\t42\n"
    );
}

#[test]
fn optional_fields_may_be_null_or_absent_and_extra_fields_are_ignored() {
    let line = decode(r#"{"request_timestamp": "2021-01-01T10:00:00+02:00", "url": "u", "comment": null, "extra": [1]}"#)
        .expect("decodes");
    assert_eq!(
        line,
        "2021-01-01 08:00:00.000000+00\tu\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\twebsite-metrics\t3\t42\n"
    );
}

#[test]
fn resp_time_accepts_seconds_and_text_is_escaped() {
    let line = decode(r#"{"request_timestamp": "2021-01-01 00:00:00Z", "url": "a\tb\\c\nd", "resp_time": 3725.5}"#)
        .expect("decodes");
    assert!(
        line.starts_with("2021-01-01 00:00:00.000000+00\ta\\tb\\\\c\\nd\t\\N\t1:02:05.500000\t"),
        "{line}"
    );
}

#[test]
fn each_kind_of_bad_record_gets_its_reason_code() {
    let mut out = Vec::new();
    assert_eq!(
        decoder()
            .decode_into(&record(None), &mut out)
            .unwrap_err()
            .code,
        ReasonCode::Tombstone
    );
    assert_eq!(code(b""), ReasonCode::Empty);
    assert_eq!(code(&[0xff, 0xfe, b'{']), ReasonCode::NotUtf8);
    assert_eq!(code(b"{not json"), ReasonCode::NotJson);
    assert_eq!(code(b"[1,2]"), ReasonCode::NotObject);
    assert_eq!(code(&vec![b'['; 100_000]), ReasonCode::TooDeep);
    assert_eq!(
        code(format!(r#"{{"url": "{}"}}"#, "x".repeat(100_000)).as_bytes()),
        ReasonCode::TooLongString
    );
    assert_eq!(
        code(format!("[{}0]", "0,".repeat(100_000)).as_bytes()),
        ReasonCode::TooManyFields
    );
    assert_eq!(code(&vec![b' '; 2 * 1024 * 1024]), ReasonCode::TooLarge);
    assert_eq!(code(br#"{"url": "u"}"#), ReasonCode::MissingField);
    assert_eq!(
        code(br#"{"url": null, "request_timestamp": "2021-01-01 00:00:00"}"#),
        ReasonCode::MissingField
    );
    let base = r#""url": "u", "request_timestamp": "2021-01-01 00:00:00""#;
    let with = |extra: &str| format!("{{{base}, {extra}}}");
    assert_eq!(
        code(br#"{"url": "u", "request_timestamp": "yesterday"}"#),
        ReasonCode::BadTimestamp
    );
    assert_eq!(
        code(with(r#""ip_address": "300.1.1.1""#).as_bytes()),
        ReasonCode::BadIp
    );
    assert_eq!(
        code(with(r#""resp_time": "0:0:1""#).as_bytes()),
        ReasonCode::BadInterval
    );
    assert_eq!(
        code(with(r#""resp_time": -1"#).as_bytes()),
        ReasonCode::BadInterval
    );
    assert_eq!(
        code(with(r#""resp_status_code": "200""#).as_bytes()),
        ReasonCode::BadValue
    );
    assert_eq!(
        code(with(r#""resp_status_code": 1e40"#).as_bytes()),
        ReasonCode::BadValue
    );
    assert_eq!(
        code(with(r#""pattern_found": "yes""#).as_bytes()),
        ReasonCode::BadValue
    );
    assert_eq!(
        code(with(r#""comment": "a\u0000b""#).as_bytes()),
        ReasonCode::NulInText
    );
}

#[test]
fn rejection_names_the_field() {
    let err =
        decode(r#"{"url": "u", "request_timestamp": "2021-01-01 00:00:00", "ip_address": "x"}"#)
            .unwrap_err();
    assert!(err.reason.contains("ip_address"), "{}", err.reason);
}

#[test]
fn brackets_inside_strings_do_not_count_as_depth() {
    let deep_string = format!(
        r#"{{"url": "{}", "request_timestamp": "2021-01-01 00:00:00"}}"#,
        "[".repeat(500)
    );
    assert!(decode(&deep_string).is_ok());
}

/// A record with the two required fields and `extra` (`"key": value, ...`) after them.
fn with_fields(extra: &str) -> String {
    format!(r#"{{"url": "u", "request_timestamp": "2021-01-01 00:00:00"{extra}}}"#)
}

fn rejection(value: &str) -> Rejection {
    decode(value).expect_err("rejected")
}

#[test]
fn string_value_or_key_longer_than_max_string_bytes_is_too_long_string() {
    let limit = 65536;
    let comment = |len: usize| with_fields(&format!(r#", "comment": "{}""#, "x".repeat(len)));
    decode(&comment(limit)).expect("a string at the limit decodes");
    let err = rejection(&comment(limit + 1));
    assert_eq!(err.code, ReasonCode::TooLongString);
    assert_eq!(
        err.reason,
        "a string of 65537 bytes exceeds sink.max_string_bytes (65536)"
    );

    let key = |len: usize| with_fields(&format!(r#", "{}": 1"#, "k".repeat(len)));
    decode(&key(limit)).expect("a key at the limit decodes");
    assert_eq!(rejection(&key(limit + 1)).code, ReasonCode::TooLongString);

    // Escapes count as written, so the limit also bounds the decoded string.
    let escaped = with_fields(&format!(
        r#", "comment": "{}""#,
        "\\n".repeat(limit / 2 + 1)
    ));
    assert_eq!(rejection(&escaped).code, ReasonCode::TooLongString);
}

#[test]
fn object_or_array_with_more_than_max_fields_entries_is_too_many_fields() {
    let limit = 1000;
    // The two required fields are entries of the top-level object too.
    let keys = |n: usize| {
        let extra: String = (0..n - 2).map(|i| format!(r#", "k{i}": {i}"#)).collect();
        with_fields(&extra)
    };
    decode(&keys(limit)).expect("an object at the limit decodes");
    let err = rejection(&keys(limit + 1));
    assert_eq!(err.code, ReasonCode::TooManyFields);
    assert_eq!(
        err.reason,
        "an object or array holds more than sink.max_fields (1000) entries"
    );

    let elements = |n: usize| {
        let list = vec!["[0]"; n].join(",");
        with_fields(&format!(r#", "extra": {{"list": [{list}]}}"#))
    };
    decode(&elements(limit)).expect("a nested array at the limit decodes");
    assert_eq!(
        rejection(&elements(limit + 1)).code,
        ReasonCode::TooManyFields
    );
}

#[test]
fn entries_are_counted_per_container_and_commas_in_strings_do_not_count() {
    let d = decoder_with(|sink| sink.max_fields = 3);
    let decide = |value: &str| d.decode_into(&record(Some(value.as_bytes())), &mut Vec::new());
    // Top level: url, request_timestamp and one more; the array holds 3 elements.
    decide(&with_fields(
        r#", "extra": [1, {"a": 1, "b": 2, "c": 3}, "x,y,z,w"]"#,
    ))
    .expect("every container is at the limit");
    let err = decide(&with_fields(r#", "extra": [1, 2], "more": 1"#)).unwrap_err();
    assert_eq!(err.code, ReasonCode::TooManyFields, "{}", err.reason);
    let err = decide(&with_fields(r#", "extra": [1, [2], 3, 4]"#)).unwrap_err();
    assert_eq!(err.code, ReasonCode::TooManyFields, "{}", err.reason);
}

#[test]
fn arbitrary_bytes_never_panic_and_always_decide() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let d = decoder();
    let alphabet = br#"{}[]":,\ 0123456789.-eE truefalsnul/\u00"#;
    for _ in 0..20_000 {
        let len = rng.random_range(0..64);
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                if rng.random_bool(0.8) {
                    alphabet[rng.random_range(0..alphabet.len())]
                } else {
                    rng.random()
                }
            })
            .collect();
        let mut out = Vec::new();
        match d.decode_into(&record(Some(&bytes)), &mut out) {
            Ok(written) => assert!(written && out.ends_with(b"\n")),
            Err(_) => assert!(out.is_empty()),
        }
    }
}

#[test]
fn timestamps_without_offset_are_utc() {
    let a = value::parse_timestamp("2021-06-01T12:30:00.5").expect("parses");
    let b = value::parse_timestamp("2021-06-01 14:30:00.5+02:00").expect("parses");
    assert_eq!(a, b);
    assert!(value::parse_timestamp("0000-01-01 00:00:00").is_none());
    let utc = value::parse_timestamp("2021-06-01T12:30:00Z").expect("parses");
    for same in [
        "2021-06-01 12:30:00",
        "2021-06-01t12:30:00.000000000",
        "2021-06-01T14:30:00+02:00",
        "2021-06-01T14:30:00+0200",
        "2021-06-01T14:30:00+02",
        "2021-06-01T07:00:00-05:30",
        "2021-06-01T12:30",
    ] {
        assert_eq!(value::parse_timestamp(same), Some(utc), "{same}");
    }
    for bad in [
        "2021-02-30 00:00:00",
        "2021-06-01T25:00:00",
        "2021-06-01T12:30:00.",
        "2021-06-01T12:30:00+2",
        "2021-06-01T12:30:00.1234567890",
    ] {
        assert_eq!(value::parse_timestamp(bad), None, "{bad}");
    }
}

#[test]
fn fuzz_corpus_and_crash_inputs_decode_or_reject_cleanly() {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let decoders = [
        decoder(),
        decoder_with(|sink| {
            [sink.max_json_depth, sink.max_string_bytes, sink.max_fields] =
                invariants::TIGHT_LIMITS;
        }),
    ];
    // The mapped columns, then topic, partition and offset.
    let fields = decoders[0].column_names().count();
    let mut replayed = 0;
    for (dir, required) in [("corpus/decode", true), ("artifacts/decode", false)] {
        let entries = match std::fs::read_dir(fuzz.join(dir)) {
            Ok(entries) => entries,
            // Crash artifacts exist only where a fuzz run found something.
            Err(_) if !required => continue,
            Err(e) => panic!("fuzz/{dir}: {e}"),
        };
        for entry in entries {
            let path = entry.expect("corpus directory is readable").path();
            let bytes = std::fs::read(&path).expect("corpus file is readable");
            // Same record as the fuzz target builds.
            let mut r = record(Some(&bytes));
            r.headers = vec![("traceparent".into(), Some(bytes.clone()))];
            let checked = std::panic::catch_unwind(|| {
                for d in &decoders {
                    let before = b"earlier\tline\n";
                    let mut out = before.to_vec();
                    let result = d.decode_into(&r, &mut out);
                    let rejected = result.as_ref().err().map(|e| e.reason.as_str());
                    invariants::assert_decided(before, &out, fields, rejected);
                }
                invariants::assert_storable_dead_letter(
                    &r.headers_json().to_string(),
                    r.trace_id().as_deref(),
                );
            });
            assert!(checked.is_ok(), "{} breaks the decoder", path.display());
            replayed += 1;
        }
    }
    assert!(
        replayed >= 30,
        "the seed corpus is there ({replayed} files)"
    );
}

/// The default decoder, and the same parsing the whole value (no fields picked).
struct BothWays {
    picking: Decoder,
    whole: Decoder,
}

impl BothWays {
    fn new() -> Self {
        let picking = decoder();
        assert!(picking.picks.is_some(), "the default route picks fields");
        let whole = Decoder {
            picks: None,
            ..picking.clone()
        };
        Self { picking, whole }
    }

    /// What the decoder makes of `value`, having checked that parsing the whole value
    /// makes the same: the same line, or the same code and reason.
    fn decode(&self, value: &str) -> Result<String, Rejection> {
        let run = |d: &Decoder| {
            let mut out = Vec::new();
            d.decode_into(&record(Some(value.as_bytes())), &mut out)
                .map(|_| String::from_utf8(out).expect("COPY text is UTF-8"))
        };
        let result = run(&self.picking);
        assert_eq!(result, run(&self.whole), "{value}");
        result
    }
}

fn decode_both_ways(value: &str) -> Result<String, Rejection> {
    BothWays::new().decode(value)
}

#[test]
fn the_last_of_duplicate_keys_wins() {
    let line = decode_both_ways(&with_fields(r#", "url": "second""#)).expect("decodes");
    assert!(line.contains("\tsecond\t"), "{line}");
    let err = decode_both_ways(&with_fields(r#", "url": null"#)).unwrap_err();
    assert_eq!(err.code, ReasonCode::MissingField);
}

#[test]
fn escaped_keys_are_read_as_decoded() {
    let line = decode_both_ways(
        r#"{"ur\u006c": "escaped", "request_timestamp": "2021-01-01 00:00:00", "url\n": "not it"}"#,
    )
    .expect("decodes");
    assert!(line.contains("\tescaped\t"), "{line}");
}

#[test]
fn values_not_objects_are_refused_alike() {
    for value in [
        "[1, 2]",
        " \n\t\r\"url\"",
        "5",
        "null",
        "true",
        "[{\"url\": 1}]",
    ] {
        let err = decode_both_ways(value).unwrap_err();
        assert_eq!(err.code, ReasonCode::NotObject, "{value}");
    }
}

#[test]
fn skipped_fields_may_nest_and_hide_picked_names() {
    let line = decode_both_ways(&with_fields(
        r#", "extra": {"url": "nested", "a": [1, {"comment": "deep"}, [], {}]}, "b": [[[]]]"#,
    ))
    .expect("decodes");
    assert!(line.contains("\tu\t"), "{line}");
    assert!(!line.contains("nested") && !line.contains("deep"), "{line}");
}

#[test]
fn invalid_json_in_a_skipped_field_is_not_json() {
    for extra in [
        r#", "extra": [1, }"#,
        r#", "extra": {"a" 1}"#,
        r#", "extra": tru"#,
        // Numbers out of range and lone surrogates: what `Value` refuses but
        // `IgnoredAny` would not.
        r#", "extra": 1e400"#,
        r#", "extra": [-1e999]"#,
        r#", "extra": "\ud800""#,
        r#", "extra": {"\udc00": 1}"#,
        r#", "extra": "\x""#,
        ", \"extra\": \"tab\there\"",
    ] {
        let err = decode_both_ways(&with_fields(extra)).unwrap_err();
        assert_eq!(err.code, ReasonCode::NotJson, "{extra}: {}", err.reason);
    }
    for trailing in ["}", " x", ",", " {}"] {
        let err = decode_both_ways(&format!("{}{trailing}", with_fields(""))).unwrap_err();
        assert_eq!(err.code, ReasonCode::NotJson, "{trailing}: {}", err.reason);
    }
}

/// serde_json's `Value` parses the string after this key, when it comes first in an
/// object, as the object's JSON.
#[test]
fn serde_json_raw_value_marker_reads_as_value_reads_it() {
    let both = BothWays::new();
    let key = "$serde_json::private::RawValue";
    let inner = with_fields("").replace('"', "\\\"");
    for value in [
        format!(r#"{{"{key}": "{inner}"}}"#),
        format!(r#"{{"{key}": "[1]"}}"#),
        format!(r#"{{"{key}": 5}}"#),
        format!(r#"{{"{key}": "{inner}", "url": "after"}}"#),
        with_fields(&format!(r#", "extra": {{"{key}": "{{}}"}}"#)),
        with_fields(&format!(r#", "extra": [{{"{key}": 5}}]"#)),
        with_fields(&format!(r#", "extra": {{"{key}": "nope"}}"#)),
        with_fields(&format!(r#", "extra": {{"a": 1, "{key}": 5}}"#)),
        with_fields(&format!(r#", "{key}": 5"#)),
    ] {
        let _ = both.decode(&value);
    }
    assert!(both.decode(&format!(r#"{{"{key}": "{inner}"}}"#)).is_ok());
}

#[test]
fn random_objects_decide_as_the_whole_value_does() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let both = BothWays::new();
    let keys = [
        "url",
        "ur\\u006c",
        "request_timestamp",
        "comment",
        "resp_status_code",
        "extra",
        "$serde_json::private::RawValue",
    ];
    let values = [
        "\"u\"",
        "\"2021-01-01 00:00:00\"",
        "null",
        "200",
        "1e400",
        "-0.5",
        "\"\\ud800\"",
        "[1, {\"url\": 2}]",
        "{\"$serde_json::private::RawValue\": \"{}\"}",
        "\"{\\\"url\\\": \\\"raw\\\"}\"",
        "{",
        "]",
        "tru",
    ];
    for _ in 0..20_000 {
        let entries: Vec<String> = (0..rng.random_range(0..6))
            .map(|_| {
                let key = keys[rng.random_range(0..keys.len())];
                let value = values[rng.random_range(0..values.len())];
                format!("\"{key}\": {value}")
            })
            .collect();
        let _ = both.decode(&format!("{{{}}}", entries.join(", ")));
    }
}

#[test]
fn string_scan_finds_the_first_quote_or_backslash() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..20_000 {
        let bytes: Vec<u8> = (0..rng.random_range(0..40))
            .map(|_| {
                *b"ab\"\\\0\x80\xff"[..]
                    .get(rng.random_range(0..7))
                    .expect("in range")
            })
            .collect();
        let from = rng.random_range(0..bytes.len() + 3);
        let expected = match bytes.get(from..) {
            Some(rest) => rest
                .iter()
                .position(|&b| b == b'"' || b == b'\\')
                .map_or(bytes.len(), |at| from + at),
            None => from,
        };
        assert_eq!(
            quote_or_backslash(&bytes, from),
            expected,
            "{bytes:?} from {from}"
        );
    }
}

/// The website-metrics decoder reading `format`, with the writer schemas of `fixture`
/// (made by Confluent's serializer) cached under their ids, and its framed values.
fn registry_fixture(format: ValueFormat, fixture: fixture::Confluent) -> (Decoder, Vec<Vec<u8>>) {
    let mut config = Config::load(None, Vec::new(), &Overrides::default()).expect("defaults load");
    config.sink.format = format;
    let routes = crate::routes::Routes::new(&config).expect("the default route is valid");
    for (id, text) in &fixture.schemas {
        let schema = framed::WriterSchema::parse(*id, &fixture.schema_type, text, &[])
            .expect("the schema parses");
        routes
            .schemas()
            .insert(*id, format, framed::Lookup::Found(Arc::new(schema)));
    }
    let values = fixture.records.into_iter().map(|(bytes, _)| bytes).collect();
    (routes.decoders()[0].clone(), values)
}

/// Each fixture's decoder and values.
fn registry_fixtures() -> [(Decoder, Vec<Vec<u8>>); 3] {
    [
        registry_fixture(ValueFormat::Avro, fixture::confluent_avro()),
        registry_fixture(ValueFormat::Protobuf, fixture::confluent_protobuf()),
        registry_fixture(ValueFormat::JsonSchema, fixture::confluent_json_schema()),
    ]
}

#[test]
fn confluent_framed_values_of_every_format_decode_through_the_json_mapping() {
    for (decoder, values) in registry_fixtures() {
        let format = decoder.route().format;
        // Record 1 is of each fixture's second schema version (for Protobuf, the
        // schema's second message); record 0 of the first.
        for (value, line) in [
            (
                &values[1],
                "2026-12-02 01:01:01.001000+00\thttps://site1.example/\tWeb metric collection service\t\
                 0:00:01.000001\t301\t104.18.1.2\tf\t1\twebsite-metrics\t3\t42\n",
            ),
            (
                &values[0],
                "2026-12-01 00:00:00.000000+00\thttps://site0.example/\tWeb metric collection service\t\
                 0:00:00.000000\t200\t\\N\tt\t0\twebsite-metrics\t3\t42\n",
            ),
        ] {
            let mut out = Vec::new();
            decoder
                .decode_into(&record(Some(value)), &mut out)
                .unwrap_or_else(|e| panic!("{format:?}: {e:?}"));
            assert_eq!(String::from_utf8(out).expect("UTF-8"), line, "{format:?}");
        }
    }
}

#[test]
fn mutated_framed_values_each_end_as_one_row_or_one_rejection() {
    for (decoder, values) in registry_fixtures() {
        mutations_each_end_as_one_row_or_one_rejection(&decoder, &values);
    }
}

fn mutations_each_end_as_one_row_or_one_rejection(decoder: &Decoder, values: &[Vec<u8>]) {
    let fields = decoder.column_names().count();
    // xorshift64: the same mutations on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut rejected = 0;
    for value in values {
        for _ in 0..50 {
            let mut bytes = value.clone();
            match next() % 4 {
                0 => {
                    let i = (next() as usize) % bytes.len();
                    bytes[i] = next() as u8;
                }
                1 => bytes.truncate((next() as usize) % bytes.len()),
                2 => {
                    // A length prefix or count claiming far more than the record holds.
                    let i = 5 + (next() as usize) % (bytes.len() - 5);
                    bytes.splice(i..i, [0xfe, 0xff, 0xff, 0xff, 0x0f]);
                }
                _ => bytes.extend((0..next() % 8).map(|_| next() as u8)),
            }
            let before = b"earlier\tline\n";
            let mut out = before.to_vec();
            let result = decoder.decode_into(&record(Some(&bytes)), &mut out);
            rejected += usize::from(result.is_err());
            let reason = result.as_ref().err().map(|r| r.reason.as_str());
            invariants::assert_decided(before, &out, fields, reason);
        }
    }
    assert!(rejected > 0, "mutations were rejected");
}

#[test]
fn the_sample_schemas_are_the_ones_confluents_serializers_registered() {
    use crate::sample::Framer;
    for (format, fixture) in [
        (ValueFormat::Avro, fixture::confluent_avro()),
        (ValueFormat::Protobuf, fixture::confluent_protobuf()),
        (ValueFormat::JsonSchema, fixture::confluent_json_schema()),
    ] {
        let (kind, text) = Framer::schema(format).expect("a registry format");
        assert_eq!((kind, text), (fixture.schema_type.as_str(), fixture.schemas[&1].as_str()));
    }
}

#[test]
fn sample_probes_framed_in_each_format_decode_to_the_json_probes_row() {
    use rand::SeedableRng;
    let json_decoder = registry_fixture(ValueFormat::Json, fixture::confluent_avro()).0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let probe = crate::sample::website_metric(11, &mut rng);
    let mut expected = Vec::new();
    json_decoder
        .decode_into(&record(Some(&probe)), &mut expected)
        .expect("the JSON probe decodes");
    for (decoder, _) in registry_fixtures() {
        let format = decoder.route().format;
        let framer = crate::sample::Framer::new(format, 1)
            .expect("encodes")
            .expect("a registry format");
        let framed = framer.encode(&probe).expect("encodes");
        let mut out = Vec::new();
        decoder
            .decode_into(&record(Some(&framed)), &mut out)
            .unwrap_or_else(|e| panic!("{format:?}: {e:?}"));
        assert_eq!(out, expected, "{format:?}");
        // Cut short by a byte, it is a dead letter of its format.
        let rejection = decoder
            .decode_into(&record(Some(&framed[..framed.len() - 1])), &mut out)
            .expect_err("a value cut short");
        assert_eq!(rejection.code.as_str(), framer.cut_short_reason(), "{format:?}");
    }
}

/// A decoder of one Debezium route with these YAML column mappings (and `extra` route
/// keys).
fn debezium(columns: &str, extra: &str) -> Decoder {
    let yaml = format!(
        "routes:\n  - topic: t\n    table: m.t\n    mode: upsert\n    key: [id]\n    \
         envelope: debezium\n{extra}    columns:\n{columns}"
    );
    let path = std::env::temp_dir().join(format!("kpi-dbz-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&path, yaml).expect("temp file");
    let config = Config::load(Some(&path), Vec::new(), &Overrides::default());
    let _ = std::fs::remove_file(&path);
    let config = config.expect("route loads");
    let routes = crate::routes::Routes::new(&config).expect("route is valid");
    routes.decoders()[0].clone()
}

fn decode_event(d: &Decoder, key: Option<&str>, value: Option<&str>) -> Result<Option<String>, Rejection> {
    let record = Record {
        key: key.map(|k| k.as_bytes().to_vec()),
        ..record(value.map(str::as_bytes))
    };
    let mut out = Vec::new();
    let written = d.decode_into(&record, &mut out)?;
    Ok(written.then(|| String::from_utf8(out).expect("COPY text")))
}

#[test]
fn debezium_logical_types_are_read_by_their_field_schema() {
    let d = debezium(
        "      - { column: id, field: id, type: int4 }
      - { column: t, field: t, type: text }
      - { column: ns, field: ns, type: timestamptz }
      - { column: ms, field: ms, type: timestamptz }
      - { column: dur, field: dur, type: interval }
      - { column: geo, field: geo, type: bytea }
      - { column: bits, field: bits, type: bytea }
      - { column: vs, field: vs, type: numeric }
      - { column: day, field: day, type: date }
      - { column: doc, field: doc, type: jsonb }
      - { column: lsn, field: \"@source:/lsn\", type: int8 }
      - { column: op, field: \"@op\", type: text }\n",
        "",
    );
    let field = |name: &str, kind: &str, logical: &str| {
        serde_json::json!({"field": name, "type": kind, "name": logical, "optional": true})
    };
    let fields = serde_json::json!([
        {"field": "id", "type": "int32"},
        field("t", "int64", "io.debezium.time.MicroTime"),
        field("ns", "int64", "io.debezium.time.NanoTimestamp"),
        field("ms", "int64", "org.apache.kafka.connect.data.Timestamp"),
        field("dur", "int64", "io.debezium.time.MicroDuration"),
        field("geo", "struct", "io.debezium.data.geometry.Point"),
        field("bits", "bytes", "io.debezium.data.Bits"),
        field("vs", "struct", "io.debezium.data.VariableScaleDecimal"),
        field("day", "int32", "io.debezium.time.Date"),
        field("doc", "string", "io.debezium.data.Json"),
    ]);
    let event = serde_json::json!({
        "schema": {"type": "struct", "fields": [
            {"field": "before", "type": "struct", "fields": fields},
            {"field": "after", "type": "struct", "fields": fields},
        ]},
        "payload": {"op": "u", "source": {"lsn": 77}, "before": null, "after": {
            "id": 1, "t": 34_200_000_001_i64, "ns": 1_700_000_000_123_456_789_i64,
            "ms": 1_700_000_000_123_i64, "dur": 90_500_000, "geo": {"x": 1.0, "y": 2.0,
            "wkb": "AQE=", "srid": null}, "bits": "Bw==", "vs": {"scale": 3, "value": "/w=="},
            "day": -1, "doc": "{\"a\": [1, 2.5]}"}}
    });
    let line = decode_event(&d, None, Some(&event.to_string())).expect("decodes");
    assert_eq!(
        line.as_deref(),
        Some(
            "1\t9:30:00.000001\t2023-11-14 22:13:20.123456+00\t2023-11-14 22:13:20.123000+00\t\
             0:01:30.500000\t\\\\x0101\t\\\\x07\t-0.001\t1969-12-31\t{\"a\":[1,2.5]}\t77\tu\t\\N\tf\tf\n"
        )
    );
    // The same value without its schema: the column types decide. A timestamptz column
    // reads a number by its `format` (iso8601 here): the nanoseconds are refused, naming
    // the column.
    let bare = event["payload"].to_string();
    let err = decode_event(&d, None, Some(&bare)).unwrap_err();
    assert_eq!(err.code, ReasonCode::BadTimestamp);
    assert!(err.reason.contains("column `ns`"), "{}", err.reason);
    // Without schema, an interval column reads Debezium's microseconds, a date column
    // days, a numeric column decimal text.
    let d = debezium(
        "      - { column: id, field: id, type: int4 }
      - { column: dur, field: dur, type: interval }
      - { column: day, field: day, type: date }
      - { column: n, field: n, type: numeric }\n",
        "",
    );
    let bare = r#"{"op": "r", "after": {"id": 2, "dur": 90500000, "day": 19000, "n": "-0.50"}}"#;
    assert_eq!(
        decode_event(&d, None, Some(bare)).unwrap().as_deref(),
        Some("2\t0:01:30.500000\t2022-01-08\t-0.50\t\\N\tf\tf\n")
    );
}

#[test]
fn debezium_ops_decide_what_a_line_does() {
    let columns = "      - { column: id, field: id, type: int4 }
      - { column: note, field: note, type: text }
      - { column: lsn, field: \"@source:/lsn\", type: int8 }\n";
    let d = debezium(columns, "    version: lsn\n");
    let event = |op: &str, before: &str, after: &str| {
        format!(r#"{{"op": "{op}", "before": {before}, "after": {after}, "source": {{"lsn": 9}}}}"#)
    };
    // A placeholder: the column keeps its value (index 1), the field is NULL.
    let toast = event("u", "null", r#"{"id": 5, "note": "__debezium_unavailable_value"}"#);
    assert_eq!(
        decode_event(&d, None, Some(&toast)).unwrap().as_deref(),
        Some("5\t\\N\t9\t,1,\tf\tf\n")
    );
    // A delete keeps the key and the version; its key from the record key when `before`
    // is null (wrapped with schemas or not).
    let delete = event("d", "null", "null");
    for key in [r#"{"id": 6}"#, r#"{"schema": {}, "payload": {"id": 6}}"#] {
        assert_eq!(
            decode_event(&d, Some(key), Some(&delete)).unwrap().as_deref(),
            Some("6\t\\N\t9\t\\N\tf\tt\n"),
            "{key}"
        );
    }
    let err = decode_event(&d, None, Some(&delete)).unwrap_err();
    assert_eq!(err.code, ReasonCode::MissingField, "{}", err.reason);
    // A tombstone and an ignored truncate write nothing; a kept truncate writes a line.
    assert_eq!(decode_event(&d, Some(r#"{"id": 6}"#), None).unwrap(), None);
    let truncate = r#"{"op": "t", "source": {"lsn": 10}}"#;
    assert_eq!(decode_event(&d, None, Some(truncate)).unwrap(), None);
    // A kept truncate writes its version only.
    let kept = debezium(columns, "    version: lsn\n    on_truncate: truncate\n");
    assert_eq!(
        decode_event(&kept, None, Some(truncate)).unwrap().as_deref(),
        Some("\\N\t\\N\t10\t\\N\tt\tf\n")
    );
    // Without its version, a change is refused.
    let unversioned = r#"{"op": "c", "after": {"id": 1}, "source": {}}"#;
    let err = decode_event(&d, None, Some(unversioned)).unwrap_err();
    assert_eq!(err.code, ReasonCode::MissingField, "{}", err.reason);
    // A delete whose key is not JSON and whose `before` has it reads `before`.
    let with_before = event("d", r#"{"id": 8}"#, "null");
    assert_eq!(
        decode_event(&d, Some("not json"), Some(&with_before)).unwrap().as_deref(),
        Some("8\t\\N\t9\t\\N\tf\tt\n")
    );
    let placeholder_key = event("c", "null", r#"{"id": "__debezium_unavailable_value"}"#);
    let err = decode_event(&d, None, Some(&placeholder_key)).unwrap_err();
    assert_eq!(err.code, ReasonCode::BadEnvelope, "{}", err.reason);
}

/// `v` with one node (picked by `rng`) replaced by a value that may not fit there.
fn mangle(v: &mut Value, rng: &mut impl rand::Rng) {
    let mut nodes = 0;
    count_nodes(v, &mut nodes);
    let mut pick = rng.random_range(0..nodes);
    let replacement = match rng.random_range(0..12) {
        0 => Value::Null,
        1 => serde_json::json!(i64::MAX),
        2 => serde_json::json!(-1),
        3 => serde_json::json!(1.5e300),
        4 => serde_json::json!("__debezium_unavailable_value"),
        5 => serde_json::json!("////////////////////////////"),
        6 => serde_json::json!({"scale": 99999, "value": "AQ=="}),
        7 => serde_json::json!([]),
        8 => serde_json::json!("d"),
        9 => serde_json::json!({"wkb": 7}),
        10 => serde_json::json!("t"),
        _ => serde_json::json!("not a date"),
    };
    replace_node(v, &mut pick, replacement);
}

fn count_nodes(v: &Value, n: &mut usize) {
    *n += 1;
    match v {
        Value::Object(o) => o.values().for_each(|c| count_nodes(c, n)),
        Value::Array(a) => a.iter().for_each(|c| count_nodes(c, n)),
        _ => {}
    }
}

fn replace_node(v: &mut Value, pick: &mut usize, with: Value) -> bool {
    if *pick == 0 {
        *v = with;
        return true;
    }
    *pick -= 1;
    match v {
        Value::Object(o) => o.values_mut().any(|c| replace_node(c, pick, with.clone())),
        Value::Array(a) => a.iter_mut().any(|c| replace_node(c, pick, with.clone())),
        _ => false,
    }
}

#[test]
fn mangled_debezium_events_decode_or_reject_cleanly() {
    use rand::{Rng, SeedableRng};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/debezium-route.yaml");
    let config = Config::load(Some(std::path::Path::new(path)), Vec::new(), &Overrides::default())
        .expect("route loads");
    let routes = crate::routes::Routes::new(&config).expect("route is valid");
    let d = routes.decoders()[0].clone();
    // The mapped columns, then unread columns, truncate and delete.
    let fields = d.column_names().count() + 3;
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let fixtures = [
        include_str!("../../tests/fixtures/debezium-postgres.jsonl"),
        include_str!("../../tests/fixtures/debezium-postgres-plain.jsonl"),
    ];
    let mut outcomes = [0usize; 3];
    for line in fixtures.iter().flat_map(|f| f.lines()) {
        let event: Value = serde_json::from_str(line).expect("fixture line");
        for round in 0..300 {
            let mut value = event["value"].clone();
            let mut key = event["key"].clone();
            if round > 0 {
                for _ in 0..rng.random_range(1..4) {
                    if rng.random_bool(0.8) && !value.is_null() {
                        mangle(&mut value, &mut rng);
                    } else if !key.is_null() {
                        mangle(&mut key, &mut rng);
                    }
                }
            }
            let bytes = |v: &Value| (!v.is_null()).then(|| v.to_string().into_bytes());
            let mut record = record(None);
            record.value = bytes(&value);
            record.key = bytes(&key);
            if round % 7 == 3
                && let Some(v) = record.value.as_mut()
            {
                v.truncate(rng.random_range(0..v.len()));
            }
            let before = b"earlier\tline\n";
            let mut out = before.to_vec();
            let result = d.decode_into(&record, &mut out);
            match &result {
                Ok(false) => assert_eq!(out, before, "a record that writes nothing adds nothing"),
                _ => invariants::assert_decided(
                    before,
                    &out,
                    fields,
                    result.as_ref().err().map(|e| e.reason.as_str()),
                ),
            }
            outcomes[match result {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(_) => 2,
            }] += 1;
        }
    }
    // Every outcome is reached: the mangling reaches past the envelope.
    assert!(outcomes.iter().all(|&n| n > 100), "{outcomes:?}");
}
