//! Bytes -> a row of the target table, or a dead-letter reason.
//!
//! Decoding never panics and never drops a record: every input byte sequence ends as one
//! encoded COPY line or one [`Rejection`]. Rows are encoded straight into the batch's
//! COPY buffer (PostgreSQL text format, or COPY BINARY where the route's columns allow
//! it), so a valid record costs no row allocation.

pub mod avro;
mod debezium;
pub mod framed;
pub mod json_schema;
pub mod protobuf;
mod value;

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

pub use value::CopyFormat;
pub(crate) use value::encode_value;

use crate::config::{ColumnType, Envelope, OnTruncate, SinkConfig, ValueFormat, WriteMode};
use crate::record::Record;
use crate::route::{Column, Route, Source};

/// Stable, machine-readable reasons a record became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    /// The record has no value (a tombstone).
    Tombstone,
    /// The value is zero bytes long.
    Empty,
    /// The value exceeds `sink.max_record_bytes`.
    TooLarge,
    /// The value is not valid UTF-8.
    NotUtf8,
    /// The value does not parse as JSON.
    NotJson,
    /// The JSON nests deeper than `sink.max_json_depth`.
    TooDeep,
    /// A JSON string (a value or a key) is longer than `sink.max_string_bytes`.
    TooLongString,
    /// A JSON object or array holds more than `sink.max_fields` entries.
    TooManyFields,
    /// The JSON is valid but not an object.
    NotObject,
    /// A required field is absent or null.
    MissingField,
    /// A timestamp field does not parse.
    BadTimestamp,
    /// An IP address field does not parse.
    BadIp,
    /// A duration field does not parse.
    BadInterval,
    /// A field has the wrong JSON type or is out of range.
    BadValue,
    /// A text field holds a NUL character, which Postgres text cannot store.
    NulInText,
    /// Postgres rejected the row (a constraint or a data error); see `sqlstate`.
    DbRejected,
    /// No route reads the record's topic.
    NoRoute,
    /// A re-driven record of an upsert route whose key's row was written from a later
    /// record of the same partition: writing it would put an older version over a newer.
    Superseded,
    /// A value of a registry format without the Confluent wire format's framing (byte 0
    /// and a 4-byte schema id).
    NotFramed,
    /// The registry does not know the value's schema id, or its schema is not one the
    /// route's format reads.
    UnknownSchema,
    /// The value does not decode under its Avro writer schema.
    BadAvro,
    /// The value does not decode under its Protobuf schema.
    BadProtobuf,
    /// The value is not JSON, or not valid under its JSON Schema.
    BadJsonSchema,
    /// A Debezium change event without a known `op` or the row image its op needs.
    BadEnvelope,
}

impl ReasonCode {
    /// Every code.
    pub const ALL: [ReasonCode; 24] = [
        Self::Tombstone,
        Self::Empty,
        Self::TooLarge,
        Self::NotUtf8,
        Self::NotJson,
        Self::TooDeep,
        Self::TooLongString,
        Self::TooManyFields,
        Self::NotObject,
        Self::MissingField,
        Self::BadTimestamp,
        Self::BadIp,
        Self::BadInterval,
        Self::BadValue,
        Self::NulInText,
        Self::DbRejected,
        Self::NoRoute,
        Self::Superseded,
        Self::NotFramed,
        Self::UnknownSchema,
        Self::BadAvro,
        Self::BadProtobuf,
        Self::BadJsonSchema,
        Self::BadEnvelope,
    ];

    /// The code as stored in `ingest.dead_letters.reason_code`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tombstone => "tombstone",
            Self::Empty => "empty",
            Self::TooLarge => "too_large",
            Self::NotUtf8 => "not_utf8",
            Self::NotJson => "not_json",
            Self::TooDeep => "too_deep",
            Self::TooLongString => "too_long_string",
            Self::TooManyFields => "too_many_fields",
            Self::NotObject => "not_object",
            Self::MissingField => "missing_field",
            Self::BadTimestamp => "bad_timestamp",
            Self::BadIp => "bad_ip",
            Self::BadInterval => "bad_interval",
            Self::BadValue => "bad_value",
            Self::NulInText => "nul_in_text",
            Self::DbRejected => "db_rejected",
            Self::NoRoute => "no_route",
            Self::Superseded => "superseded",
            Self::NotFramed => "not_framed",
            Self::UnknownSchema => "unknown_schema",
            Self::BadAvro => "bad_avro",
            Self::BadProtobuf => "bad_protobuf",
            Self::BadJsonSchema => "bad_json_schema",
            Self::BadEnvelope => "bad_envelope",
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a record cannot become a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ReasonCode,
    /// Human-readable detail, naming the field where there is one.
    pub reason: String,
    /// The SQLSTATE when Postgres rejected the row.
    pub sqlstate: Option<String>,
}

impl Rejection {
    /// A rejection whose reason is made safe to store: record bytes quoted in it may hold
    /// NUL (which Postgres text refuses) or be arbitrarily long.
    pub fn new(code: ReasonCode, reason: impl Into<String>) -> Self {
        const MAX_REASON_CHARS: usize = 1000;
        let reason: String = reason
            .into()
            .replace('\0', "\\u0000")
            .chars()
            .take(MAX_REASON_CHARS)
            .collect();
        Self {
            code,
            reason,
            sqlstate: None,
        }
    }
}

/// Decodes the records of one route.
#[derive(Debug, Clone)]
pub struct Decoder {
    route: Route,
    /// The value must be a JSON object: a column reads one of its fields.
    reads_object: bool,
    /// The value must be JSON: a column reads it.
    reads_value: bool,
    /// Set where every column reading the value reads a top-level field: an object value
    /// then keeps only those fields' values, as building the rest costs most of decoding.
    picks: Option<Picks>,
    max_record_bytes: usize,
    max_json_depth: usize,
    max_string_bytes: usize,
    max_fields: usize,
    format: CopyFormat,
    /// Writer schemas, for a route reading values or keys in a registry format.
    schemas: Option<Arc<framed::SchemaCache>>,
    /// Whether a column reads the key through `key_format` (`@key_json:`).
    reads_key: bool,
}

impl Decoder {
    /// A decoder of `route`; one reading a registry format finds writer schemas in
    /// `schemas`.
    pub fn new(sink: &SinkConfig, route: Route, schemas: &Arc<framed::SchemaCache>) -> Self {
        let framed = route.format.framed() || route.key_format.framed().is_some();
        let schemas = framed.then(|| schemas.clone());
        if route.format == ValueFormat::Avro || route.key_format.framed() == Some(ValueFormat::Avro) {
            // apache-avro reserves what a datum's length prefixes claim, up to this
            // (process-wide, 512 MiB unless set): a record of a few bytes claiming
            // millions of items would otherwise reserve that much. Items decode to
            // values of tens of bytes, hence the factor over the largest record.
            apache_avro::util::max_allocation_bytes(sink.max_record_bytes.saturating_mul(64));
        }
        let sources = || route.columns.iter().map(|c| &c.source);
        // A change event is read whole: its op decides which image the columns read.
        let envelope = route.envelope == Envelope::Debezium;
        let reads_value = envelope || sources().any(Source::reads_value);
        // A Debezium delete may read its key from the record key.
        let reads_key = envelope || sources().any(|s| matches!(s, Source::KeyJson(_)));
        let only_fields = !envelope
            && sources().all(|s| !s.reads_value() || matches!(s, Source::Field(_)));
        Self {
            reads_object: envelope
                || sources().any(|s| matches!(s, Source::Field(_) | Source::Pointer(_))),
            reads_value,
            reads_key,
            picks: (reads_value && only_fields).then(|| Picks::new(&route)),
            route,
            max_record_bytes: sink.max_record_bytes,
            max_json_depth: sink.max_json_depth,
            max_string_bytes: sink.max_string_bytes,
            max_fields: sink.max_fields,
            format: CopyFormat::Text,
            schemas,
        }
    }

    /// The writer schema ids that decoding `record` needs, each with the format it is
    /// read in: its value's and its key's, where the route reads them in a registry
    /// format and they are framed.
    pub fn schema_ids(&self, record: &Record) -> impl Iterator<Item = (u32, ValueFormat)> {
        let value = self
            .route
            .format
            .framed()
            .then_some(record.value.as_deref())
            .flatten()
            .and_then(|v| Some((framed::schema_id(v)?, self.route.format)));
        let key = self
            .route
            .key_format
            .framed()
            .filter(|_| self.reads_key)
            .zip(record.key.as_deref())
            .and_then(|(format, k)| Some((framed::schema_id(k)?, format)));
        value.into_iter().chain(key)
    }

    /// Writes rows in `format` from now on.
    pub(crate) fn set_format(&mut self, format: CopyFormat) {
        self.format = format;
    }

    /// The format rows are written in (for tests; the store reads its route's).
    #[cfg(any(test, feature = "internals"))]
    pub fn format(&self) -> CopyFormat {
        self.format
    }

    /// The route this decoder serves.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Target columns in COPY order.
    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.route.columns.iter().map(|c| c.name.as_str())
    }

    /// Appends one COPY text line (or COPY BINARY tuple) for `record` to `out` and says
    /// true; says false when the record writes nothing (a Debezium tombstone, or a
    /// truncate under `on_truncate: ignore`); or leaves `out` as it was and says why not.
    /// An upsert route's row ends with one more field: whether the record deletes its key
    /// (true: a tombstone, a Debezium delete) or writes it. A Debezium route's has two
    /// more before that: the columns that keep their stored value (`,2,5,`: Debezium did
    /// not read them), and whether the record truncates the table.
    pub fn decode_into(&self, record: &Record, out: &mut Vec<u8>) -> Result<bool, Rejection> {
        let mark = out.len();
        let result = self.encode(record, out);
        if result.is_err() {
            out.truncate(mark);
        }
        result
    }

    fn encode(&self, record: &Record, out: &mut Vec<u8>) -> Result<bool, Rejection> {
        let route = &self.route;
        let envelope = route.envelope == Envelope::Debezium;
        if envelope && record.value.is_none() {
            // The tombstone after a delete, for log compaction: the delete did the work.
            return Ok(false);
        }
        let tombstone_deletes = route.delete_on_tombstone && record.value.is_none();
        let value = if self.reads_value && !tombstone_deletes {
            Some(self.parse(record)?)
        } else {
            None
        };
        // A registry format's event, as JSON (with no Connect schema: its column types
        // decide how values are read).
        let framed_event = match (envelope, &value) {
            (true, Some(parsed)) => as_json(parsed)?,
            _ => None,
        };
        let change = match (envelope, framed_event.as_ref().or(value.as_ref().and_then(Parsed::whole))) {
            (true, Some(v)) => Some(
                debezium::Change::read(v)
                    .map_err(|why| Rejection::new(ReasonCode::BadEnvelope, why))?,
            ),
            _ => None,
        };
        let action = change.as_ref().map(|c| c.action);
        let truncates = action == Some(debezium::Action::Truncate);
        if truncates && route.on_truncate == OnTruncate::Ignore {
            return Ok(false);
        }
        let deletes = tombstone_deletes || action == Some(debezium::Action::Delete);
        let mut key = None;
        // A Debezium delete's record key as JSON, read when `before` lacks the key.
        let mut key_json = None;
        // `,i,j,`: the columns Debezium left unread.
        let mut unchanged = String::new();
        let format = self.format;
        if format == CopyFormat::Binary {
            let flags = match route.mode {
                WriteMode::Upsert if envelope => 3,
                WriteMode::Upsert => 1,
                WriteMode::Insert => 0,
            };
            let fields = route.columns.len() + flags;
            out.extend_from_slice(&(fields as i16).to_be_bytes());
        }
        for (i, column) in route.columns.iter().enumerate() {
            if i > 0 && format == CopyFormat::Text {
                out.push(b'\t');
            }
            // A delete needs its key, and its coordinates or version to be ordered
            // against the row's (see `Route::source_version`); the rest stays NULL. A
            // truncate needs its version only.
            let version = route.version.as_ref() == Some(&column.name);
            let orders = version
                || matches!(
                    column.source,
                    Source::Topic | Source::Partition | Source::Offset
                );
            if truncates && !version || deletes && !route.is_key(&column.name) && !orders {
                push_null(format, out);
                continue;
            }
            let input = match &change {
                Some(change) if column.source.reads_value() => {
                    let mut read = change
                        .input(column, None)
                        .map_err(|why| value::bad(column, &why))?;
                    // A delete's `before` may lack its key: it is then the record key's
                    // (read as JSON; one that is not leaves the key missing).
                    let absent = read
                        .as_ref()
                        .is_none_or(|r| matches!(r, debezium::Read::Input(i) if i.is_null()));
                    if deletes && absent && route.is_key(&column.name) {
                        if key_json.is_none()
                            && let Some(bytes) = record.key.as_deref()
                        {
                            key_json = match self.parse_key(bytes, column) {
                                Ok(Parsed::Whole(v)) => Some(v),
                                Ok(framed) => as_json(&framed)?,
                                // A key in a registry format must decode; a plain one
                                // may be no JSON (a string key), leaving the key missing.
                                Err(refused) if route.key_format.framed().is_some() => {
                                    return Err(refused);
                                }
                                Err(_) => None,
                            };
                        }
                        let record_key = key_json.as_ref().map(|k| debezium::unwrap(k).0);
                        read = change
                            .input(column, record_key)
                            .map_err(|why| value::bad(column, &why))?;
                    }
                    match read {
                        Some(debezium::Read::Unavailable) if route.is_key(&column.name) => {
                            return Err(Rejection::new(
                                ReasonCode::BadEnvelope,
                                format!(
                                    "key column `{}` holds Debezium's placeholder for an unread value",
                                    column.name
                                ),
                            ));
                        }
                        Some(debezium::Read::Unavailable) => {
                            if unchanged.is_empty() {
                                unchanged.push(',');
                            }
                            unchanged.push_str(&format!("{i},"));
                            push_null(format, out);
                            continue;
                        }
                        Some(debezium::Read::Input(input)) => Some(input),
                        None => None,
                    }
                }
                _ => self.input(i, column, record, value.as_ref(), &mut key)?,
            };
            match input {
                Some(input) if !input.is_null() => value::encode(column, input, format, out)?,
                _ => match &column.default {
                    Some(default) => value::encode_value(column, default, format, out)?,
                    // The version orders every write and delete: one without is refused.
                    None if column.required || route.is_key(&column.name) || version => {
                        return Err(Rejection::new(
                            ReasonCode::MissingField,
                            format!(
                                "required field `{}` for column `{}` is absent or null",
                                column.field, column.name
                            ),
                        ));
                    }
                    None => push_null(format, out),
                },
            }
        }
        if route.mode == WriteMode::Upsert {
            if envelope {
                push_field(format, out, (!unchanged.is_empty()).then_some(unchanged.as_bytes()));
                push_flag(format, out, truncates);
            }
            push_flag(format, out, deletes);
        }
        if format == CopyFormat::Text {
            out.push(b'\n');
        }
        Ok(true)
    }

    /// The value of `column` (the route's `index`th) in `record`; `None` when absent.
    fn input<'a>(
        &self,
        index: usize,
        column: &Column,
        record: &'a Record,
        value: Option<&'a Parsed>,
        key: &'a mut Option<Parsed>,
    ) -> Result<Option<value::Input<'a>>, Rejection> {
        use value::Input;
        let source = &column.source;
        let typed = match value {
            Some(Parsed::Avro(decoded)) if source.reads_value() => {
                typed_input(decoded, source, column, ReasonCode::BadAvro)
            }
            Some(Parsed::Protobuf(decoded)) if source.reads_value() => {
                typed_input(decoded, source, column, ReasonCode::BadProtobuf)
            }
            _ => None,
        };
        if let Some(input) = typed {
            return input;
        }
        Ok(match &column.source {
            Source::Field(name) => value
                .and_then(|v| match v {
                    Parsed::Whole(v) => v.get(name),
                    Parsed::Fields(fields) => {
                        let slot = self.picks.as_ref().and_then(|p| p.slots[index])?;
                        fields[slot].as_ref()
                    }
                    Parsed::Avro(_) | Parsed::Protobuf(_) => None,
                })
                .map(Input::Json),
            Source::Pointer(pointer) => value
                .and_then(Parsed::whole)
                .and_then(|v| v.pointer(pointer))
                .map(Input::Json),
            Source::Value => value.and_then(Parsed::whole).map(Input::Json),
            Source::Key => record.key.as_deref().map(Input::Bytes),
            Source::KeyJson(pointer) => {
                let Some(bytes) = record.key.as_deref() else {
                    return Ok(None);
                };
                if key.is_none() {
                    *key = Some(self.parse_key(bytes, column)?);
                }
                match key.as_ref() {
                    Some(Parsed::Avro(decoded)) => {
                        return typed_input(decoded, &column.source, column, ReasonCode::BadAvro)
                            .unwrap_or(Ok(None));
                    }
                    Some(Parsed::Protobuf(decoded)) => {
                        return typed_input(
                            decoded,
                            &column.source,
                            column,
                            ReasonCode::BadProtobuf,
                        )
                        .unwrap_or(Ok(None));
                    }
                    parsed => parsed
                        .and_then(Parsed::whole)
                        .and_then(|k| k.pointer(pointer))
                        .map(Input::Json),
                }
            }
            Source::Header(name) => record
                .headers
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.as_deref())
                .map(Input::Bytes),
            Source::Timestamp => record.timestamp_ms.map(Input::Int),
            Source::Topic => Some(Input::Str(&record.topic)),
            Source::Partition => Some(Input::Int(record.partition.into())),
            Source::Offset => Some(Input::Int(record.offset)),
            // Only a Debezium route maps these, and reads them from its change event.
            Source::Op | Source::EventMeta(_) => None,
        })
    }

    /// The record key in the route's `key_format` (as JSON, or decoded with its writer
    /// schema), under the same limits as values.
    fn parse_key(&self, key: &[u8], column: &Column) -> Result<Parsed, Rejection> {
        let about = format!("record key for column `{}` ({})", column.name, column.field);
        if key.len() > self.max_record_bytes {
            return Err(Rejection::new(
                ReasonCode::BadValue,
                format!(
                    "{about}: {} bytes, above sink.max_record_bytes = {}",
                    key.len(),
                    self.max_record_bytes
                ),
            ));
        }
        if let (Some(format), Some(schemas)) = (self.route.key_format.framed(), &self.schemas) {
            return self
                .parse_framed(schemas, format, key, false)
                .map_err(|r| Rejection::new(r.code, format!("{about}: {}", r.reason)));
        }
        let bad = |_, what: String| Rejection::new(ReasonCode::BadValue, format!("{about}: {what}"));
        self.parse_json(key, None, false, bad)
    }

    fn parse(&self, record: &Record) -> Result<Parsed, Rejection> {
        let bytes = match &record.value {
            None => {
                return Err(Rejection::new(
                    ReasonCode::Tombstone,
                    "record has no value (tombstone)",
                ));
            }
            Some(b) if b.is_empty() => {
                return Err(Rejection::new(ReasonCode::Empty, "record value is empty"));
            }
            Some(b) => b,
        };
        if bytes.len() > self.max_record_bytes {
            return Err(Rejection::new(
                ReasonCode::TooLarge,
                format!(
                    "value is {} bytes, above sink.max_record_bytes = {}",
                    bytes.len(),
                    self.max_record_bytes
                ),
            ));
        }
        if let Some(schemas) = self.schemas.as_ref().filter(|_| self.route.format.framed()) {
            return self.parse_framed(schemas, self.route.format, bytes, self.reads_object);
        }
        self.parse_json(bytes, self.picks.as_ref(), self.reads_object, Rejection::new)
    }

    /// JSON text as far as `picks` need it (all of it without), refused as `refuse`
    /// says: not UTF-8 or not JSON with its code and why; anything but an object when
    /// `object` is needed (the route reads fields of the value).
    fn parse_json(
        &self,
        bytes: &[u8],
        picks: Option<&Picks>,
        object: bool,
        refuse: impl Fn(ReasonCode, String) -> Rejection,
    ) -> Result<Parsed, Rejection> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| refuse(ReasonCode::NotUtf8, format!("value is not UTF-8: {e}")))?;
        self.check_shape(text.as_bytes())?;
        // serde_json skips this whitespace before a value; anything but an object goes the
        // whole way, to be refused as it always was.
        let is_object = text
            .trim_start_matches([' ', '\n', '\t', '\r'])
            .starts_with('{');
        let parsed = match picks {
            Some(picks) if is_object => pick::parse(text, &picks.names),
            _ => serde_json::from_str(text).map(Parsed::Whole),
        };
        match parsed {
            Ok(Parsed::Whole(other)) if object && !other.is_object() => {
                Err(Rejection::new(
                    ReasonCode::NotObject,
                    format!("JSON value is {}, not an object", json_kind(&other)),
                ))
            }
            Ok(parsed) => Ok(parsed),
            Err(e) => Err(refuse(ReasonCode::NotJson, format!("value is not JSON: {e}"))),
        }
    }

    /// A value (or key) in the Confluent wire format of `format`, decoded with its
    /// writer schema; a JSON one must be an `object` when that is needed.
    fn parse_framed(
        &self,
        schemas: &framed::SchemaCache,
        format: ValueFormat,
        bytes: &[u8],
        object: bool,
    ) -> Result<Parsed, Rejection> {
        let (id, schema, payload) = framed::writer(schemas, format, bytes)
            .map_err(|failure| match failure {
                framed::Failure::NotFramed(why) => Rejection::new(ReasonCode::NotFramed, why),
                framed::Failure::UnknownSchema(why) => {
                    Rejection::new(ReasonCode::UnknownSchema, why)
                }
            })?;
        match &*schema {
            framed::WriterSchema::Avro(schema) => avro::decode(schema, id, payload)
                .map(Parsed::Avro)
                .map_err(|why| Rejection::new(ReasonCode::BadAvro, why)),
            framed::WriterSchema::Protobuf(schema) => protobuf::decode(schema, id, payload)
                .map(Parsed::Protobuf)
                .map_err(|why| Rejection::new(ReasonCode::BadProtobuf, why)),
            framed::WriterSchema::JsonSchema(schema) => {
                let bad = |why: String| {
                    Rejection::new(ReasonCode::BadJsonSchema, format!("schema id {id}: {why}"))
                };
                // Validation needs the whole value.
                let parsed = self.parse_json(payload, None, object, |_, why| bad(why))?;
                if let Parsed::Whole(value) = &parsed {
                    schema.validate(value).map_err(|why| {
                        bad(format!("the value is not valid under its schema: {why}"))
                    })?;
                }
                Ok(parsed)
            }
        }
    }

    /// Enforces `sink.max_json_depth`, `sink.max_string_bytes` and `sink.max_fields` in
    /// one pass over the bytes, before parsing: serde_json would first build a `Value` of
    /// any shape the record describes (and stops at 128 levels with an opaque error),
    /// while this costs no allocation and names the limit. It does not validate JSON;
    /// brackets and commas inside strings do not count, and string lengths are as
    /// written, escapes included.
    fn check_shape(&self, bytes: &[u8]) -> Result<(), Rejection> {
        // Commas seen directly inside each open container (index = its depth). serde_json
        // refuses more than 128 levels, so deeper containers need no count.
        let mut commas = [0usize; 128];
        let mut depth = 0usize;
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'"' => {
                    let start = i + 1;
                    i = quote_or_backslash(bytes, start);
                    while bytes.get(i) == Some(&b'\\') {
                        i = quote_or_backslash(bytes, i + 2);
                    }
                    // An escape at the very end steps past it; an unclosed string runs
                    // to the end.
                    let len = i.min(bytes.len()) - start;
                    if len > self.max_string_bytes {
                        return Err(Rejection::new(
                            ReasonCode::TooLongString,
                            format!(
                                "a string of {len} bytes exceeds sink.max_string_bytes ({})",
                                self.max_string_bytes
                            ),
                        ));
                    }
                }
                b'[' | b'{' => {
                    depth += 1;
                    if depth > self.max_json_depth {
                        return Err(Rejection::new(
                            ReasonCode::TooDeep,
                            format!(
                                "JSON nests deeper than sink.max_json_depth = {}",
                                self.max_json_depth
                            ),
                        ));
                    }
                    if let Some(n) = commas.get_mut(depth) {
                        *n = 0;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b',' => {
                    if let Some(n) = commas.get_mut(depth) {
                        *n += 1;
                        // n commas separate n + 1 entries.
                        if *n >= self.max_fields {
                            return Err(Rejection::new(
                                ReasonCode::TooManyFields,
                                format!(
                                    "an object or array holds more than sink.max_fields ({}) entries",
                                    self.max_fields
                                ),
                            ));
                        }
                    }
                }
                _ => {}
            }
            i += 1;
        }
        Ok(())
    }
}

/// The top-level fields a route's columns read.
#[derive(Debug, Clone)]
struct Picks {
    /// Each field once.
    names: Vec<String>,
    /// For each column, the index in `names` of the field it reads.
    slots: Vec<Option<usize>>,
}

impl Picks {
    fn new(route: &Route) -> Self {
        let mut names: Vec<String> = Vec::new();
        let slots = route
            .columns
            .iter()
            .map(|column| {
                let Source::Field(name) = &column.source else {
                    return None;
                };
                Some(names.iter().position(|n| n == name).unwrap_or_else(|| {
                    names.push(name.clone());
                    names.len() - 1
                }))
            })
            .collect();
        Self { names, slots }
    }
}

/// A value decoded with its writer schema (Avro, Protobuf), addressed as JSON is.
trait Addressed {
    type Part<'a>
    where
        Self: 'a;
    /// The top-level field `name`.
    fn field(&self, name: &str) -> Option<Self::Part<'_>>;
    /// The part a JSON pointer (`/a/b/0`) leads to.
    fn pointer(&self, pointer: &str) -> Option<Self::Part<'_>>;
    /// The whole value.
    fn whole(&self) -> Self::Part<'_>;
    /// A part as a column's input, or why its value cannot be one.
    fn input<'a>(&'a self, part: Self::Part<'a>) -> Result<value::Input<'a>, String>;
}

/// A value decoded in a registry format as JSON (records and messages as objects);
/// `None` for JSON, which is JSON already.
fn as_json(parsed: &Parsed) -> Result<Option<Value>, Rejection> {
    fn whole<D: Addressed>(decoded: &D, code: ReasonCode) -> Result<Option<Value>, Rejection> {
        match decoded.input(decoded.whole()) {
            Ok(value::Input::Owned(v)) => Ok(Some(v)),
            Ok(_) => Err(Rejection::new(
                ReasonCode::BadEnvelope,
                "a Debezium event must be a record (message)",
            )),
            Err(why) => Err(Rejection::new(code, why)),
        }
    }
    match parsed {
        Parsed::Avro(decoded) => whole(decoded, ReasonCode::BadAvro),
        Parsed::Protobuf(decoded) => whole(decoded, ReasonCode::BadProtobuf),
        Parsed::Whole(_) | Parsed::Fields(_) => Ok(None),
    }
}

/// The input of `column` from `decoded` (its value, or its key for `@key_json:`) as
/// `source` addresses it, refused with `code`; `None` for a source that reads the record.
fn typed_input<'a, D: Addressed>(
    decoded: &'a D,
    source: &Source,
    column: &Column,
    code: ReasonCode,
) -> Option<Result<Option<value::Input<'a>>, Rejection>> {
    let part = match source {
        Source::Field(name) => decoded.field(name),
        Source::Pointer(pointer) | Source::KeyJson(pointer) => decoded.pointer(pointer),
        Source::Value => Some(decoded.whole()),
        _ => return None,
    };
    Some(match part {
        Some(part) => decoded.input(part).map(Some).map_err(|why| {
            Rejection::new(
                code,
                format!(
                    "field `{}` for column `{}`: {why}",
                    column.field, column.name
                ),
            )
        }),
        None => Ok(None),
    })
}

/// A record's value, parsed as far as its route reads it.
enum Parsed {
    /// All of it: the route reads more than top-level fields, or the value is no object.
    Whole(Value),
    /// The values of [`Picks::names`], in their order; `None` for a field the object lacks.
    Fields(Vec<Option<Value>>),
    /// An Avro value with its writer schema.
    Avro(avro::Decoded),
    /// A Protobuf message.
    Protobuf(protobuf::Decoded),
}

impl Parsed {
    /// The whole JSON value, which a route reading more than top-level fields of JSON
    /// always has.
    fn whole(&self) -> Option<&Value> {
        match self {
            Self::Whole(v) => Some(v),
            Self::Fields(_) | Self::Avro(_) | Self::Protobuf(_) => None,
        }
    }
}

/// Parsing an object into [`Parsed::Fields`]. It must accept, refuse (with the same
/// error) and pick exactly what `serde_json::from_str::<Value>` followed by `get` would:
/// so skipped values still go through `deserialize_any`, which checks what
/// `deserialize_ignored_any` does not (numbers in range, surrogate escapes), and an
/// object whose first key is serde_json's raw-value marker is handed to `Value`.
mod pick {
    use std::fmt;

    use serde::de::value::{MapAccessDeserializer, StrDeserializer};
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde::{Deserialize, de};
    use serde_json::Value;

    use super::Parsed;

    /// The key serde_json's `Value` (with the `raw_value` feature, which a dependency
    /// enables) reads as "parse the string that follows as JSON" when it comes first.
    const RAW_VALUE_KEY: &str = "$serde_json::private::RawValue";

    /// `text`, which starts with an object, keeping the values of the keys in `names`
    /// (the last of duplicates, as a map keeps).
    pub(super) fn parse(text: &str, names: &[String]) -> serde_json::Result<Parsed> {
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = Pick { names }.deserialize(&mut de)?;
        de.end()?;
        Ok(parsed)
    }

    /// An object, keeping the values of `names`.
    struct Pick<'n> {
        names: &'n [String],
    }

    impl<'de> DeserializeSeed<'de> for Pick<'_> {
        type Value = Parsed;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Parsed, D::Error> {
            de.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Pick<'_> {
        type Value = Parsed;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
            let mut fields = vec![None; self.names.len()];
            let mut first = true;
            while let Some(key) = map.next_key_seed(KeySeed {
                names: self.names,
                first,
            })? {
                match key {
                    Key::RawValue => {
                        let rest = AfterRawValueKey { key: true, map };
                        return Value::deserialize(MapAccessDeserializer::new(rest))
                            .map(Parsed::Whole);
                    }
                    Key::Pick(slot) => fields[slot] = Some(map.next_value()?),
                    Key::Skip => map.next_value_seed(Skip)?,
                }
                first = false;
            }
            Ok(Parsed::Fields(fields))
        }
    }

    enum Key {
        /// The index in the names picked.
        Pick(usize),
        Skip,
        /// [`RAW_VALUE_KEY`], first in its object.
        RawValue,
    }

    struct KeySeed<'n> {
        names: &'n [String],
        first: bool,
    }

    impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
        type Value = Key;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Key, D::Error> {
            de.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for KeySeed<'_> {
        type Value = Key;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string key")
        }

        fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
            if self.first && key == RAW_VALUE_KEY {
                return Ok(Key::RawValue);
            }
            Ok(match self.names.iter().position(|n| n == key) {
                Some(slot) => Key::Pick(slot),
                None => Key::Skip,
            })
        }
    }

    /// The rest of an object whose first key, [`RAW_VALUE_KEY`], was read: reads that
    /// key again, then the object's entries.
    struct AfterRawValueKey<A> {
        /// The key is still to be read again.
        key: bool,
        map: A,
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for AfterRawValueKey<A> {
        type Error = A::Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, A::Error> {
            if std::mem::take(&mut self.key) {
                seed.deserialize(StrDeserializer::new(RAW_VALUE_KEY))
                    .map(Some)
            } else {
                self.map.next_key_seed(seed)
            }
        }

        fn next_value_seed<V: DeserializeSeed<'de>>(
            &mut self,
            seed: V,
        ) -> Result<V::Value, A::Error> {
            self.map.next_value_seed(seed)
        }
    }

    /// Any JSON value, checked as `Value` checks it and not kept.
    struct Skip;

    impl<'de> DeserializeSeed<'de> for Skip {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
            de.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Skip {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Ok(())
        }

        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            Ok(())
        }

        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            Ok(())
        }

        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            Ok(())
        }

        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Ok(())
        }

        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Ok(())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Skip)?.is_some() {}
            Ok(())
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
            Pick { names: &[] }.visit_map(map).map(drop)
        }
    }
}

/// The index of the first `"` or `\` in `bytes` from `from` on, else `bytes.len()` (or
/// `from`, past the end). Strings are most of a record, so this looks at 8 bytes a step.
fn quote_or_backslash(bytes: &[u8], from: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    // Sets the high bit of each zero byte of `x`, and maybe of bytes after one: so the
    // lowest bit set is the first zero byte's.
    let zero_bytes = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut i = from;
    while let Some(chunk) = bytes.get(i..).and_then(<[u8]>::first_chunk::<8>) {
        let word = u64::from_le_bytes(*chunk);
        let found = zero_bytes(word ^ (ONES * u64::from(b'"')))
            | zero_bytes(word ^ (ONES * u64::from(b'\\')));
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    match bytes.get(i..) {
        Some(rest) => rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\')
            .map_or(bytes.len(), |at| i + at),
        None => i,
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Appends a trailing field of raw bytes that need no escaping (or NULL) to a row.
fn push_field(format: CopyFormat, out: &mut Vec<u8>, field: Option<&[u8]>) {
    if format == CopyFormat::Text {
        out.push(b'\t');
    }
    match (field, format) {
        (None, _) => push_null(format, out),
        (Some(bytes), CopyFormat::Text) => out.extend_from_slice(bytes),
        (Some(bytes), CopyFormat::Binary) => {
            out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
            out.extend_from_slice(bytes);
        }
    }
}

/// Appends a trailing boolean field to a row.
fn push_flag(format: CopyFormat, out: &mut Vec<u8>, flag: bool) {
    let text: &[u8] = if flag { b"t" } else { b"f" };
    match format {
        CopyFormat::Text => push_field(format, out, Some(text)),
        CopyFormat::Binary => push_field(format, out, Some(&[u8::from(flag)])),
    }
}

/// Appends a NULL field.
fn push_null(format: CopyFormat, out: &mut Vec<u8>) {
    match format {
        CopyFormat::Text => out.extend_from_slice(b"\\N"),
        CopyFormat::Binary => out.extend_from_slice(&(-1i32).to_be_bytes()),
    }
}

/// Appends `s` escaped for COPY text format.
pub(crate) fn push_escaped(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // Copied in runs: most text needs no escape.
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        out.extend_from_slice(escape);
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
}

impl ColumnType {
    /// The reason code for a value of this type that does not parse.
    fn bad_value_code(self) -> ReasonCode {
        match self {
            ColumnType::Timestamptz | ColumnType::Date => ReasonCode::BadTimestamp,
            ColumnType::Interval => ReasonCode::BadInterval,
            ColumnType::Inet => ReasonCode::BadIp,
            _ => ReasonCode::BadValue,
        }
    }
}

// The integration tests read the fixtures' payloads too.
#[cfg(test)]
#[allow(dead_code)]
mod fixture;
#[cfg(test)]
mod invariants;
#[cfg(test)]
mod tests;
