use super::*;
use crate::config::{Config, Overrides};

fn decoder() -> Decoder {
    let config = Config::load(None, Vec::new(), &Overrides::default()).expect("defaults load");
    Decoder::new(&config.sink)
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
            Ok(()) => assert!(out.ends_with(b"\n")),
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
