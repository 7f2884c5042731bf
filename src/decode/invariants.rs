//! What decoding leaves behind for any input. Checked by the fuzz target
//! (`fuzz/fuzz_targets/decode.rs` includes this file) and by the unit test replaying the
//! fuzz corpus, so both assert the same thing; plain types only, so it compiles in both.

/// `sink.max_json_depth`, `sink.max_string_bytes` and `sink.max_fields` low enough for
/// short inputs to reach them: inputs are also decoded with these limits (still a valid
/// configuration for the built-in mapping), as the defaults are far above what a fuzzer
/// tries.
pub const TIGHT_LIMITS: [usize; 3] = [4, 32, 8];

/// Panics unless `out` is `before` followed by one COPY text line of `fields` fields (the
/// record decoded), or exactly `before` with a reason Postgres can store (it was
/// rejected with `rejected`).
pub fn assert_decided(before: &[u8], out: &[u8], fields: usize, rejected: Option<&str>) {
    if let Some(reason) = rejected {
        assert_eq!(out, before, "a rejection leaves the COPY buffer as it was");
        assert!(!reason.contains('\0'), "text cannot hold NUL: {reason:?}");
        assert!(reason.chars().count() <= 1000, "the reason is bounded");
        return;
    }
    assert!(out.starts_with(before), "a decoded record is appended");
    let line = &out[before.len()..];
    assert!(std::str::from_utf8(line).is_ok(), "COPY text is UTF-8");
    assert_eq!(line.last(), Some(&b'\n'), "the line ends with a newline");
    assert_eq!(
        line.iter().filter(|&&b| b == b'\n').count(),
        1,
        "newlines inside values are escaped"
    );
    assert!(!line.contains(&b'\r'), "carriage returns are escaped");
    assert!(!line.contains(&0), "text cannot hold NUL");
    assert_eq!(
        line.iter().filter(|&&b| b == b'\t').count() + 1,
        fields,
        "one field per column: {}",
        String::from_utf8_lossy(line)
    );
}

/// Panics unless a dead letter's headers (as JSON text) and trace id are storable:
/// `jsonb` refuses `\u0000`, and a trace id is 32 lower-case hex digits.
pub fn assert_storable_dead_letter(headers_json: &str, trace_id: Option<&str>) {
    let mut rest = headers_json;
    while let Some(i) = rest.find('\\') {
        let mut escape = rest[i + 1..].chars();
        assert!(!escape.as_str().starts_with("u0000"), "{headers_json}");
        // Skip the escaped character: in `\\u0000` the second backslash is not an escape.
        escape.next();
        rest = escape.as_str();
    }
    if let Some(id) = trace_id {
        assert!(
            id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{id}"
        );
    }
}
