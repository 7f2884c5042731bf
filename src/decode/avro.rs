//! Avro record values in the Confluent wire format: byte 0, the writer schema's id (4
//! bytes, big-endian), then the datum.
//!
//! Writer schemas come from a [`SchemaCache`] that the pipeline fills from the registry
//! before it decodes a batch: decoding never waits on the network, and an id the cache
//! does not hold is one the registry does not know.
//!
//! A column's `field` addresses the decoded record as it addresses JSON (a field name,
//! or a JSON pointer through records, maps and arrays), so a mapping moves from JSON to
//! Avro unchanged. Logical types keep their meaning: a decimal is exact at its scale, a
//! timestamp is an instant, a date a date, a uuid a uuid.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{NamesRef, ResolvedSchema};
use apache_avro::types::Value as Avro;
use base64::Engine;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use super::value::Input;

/// The magic byte that starts a value in the Confluent wire format.
const MAGIC: u8 = 0;

/// A writer schema as the registry gave it, ready to decode with.
pub struct WriterSchema {
    pub id: u32,
    schema: &'static Schema,
    names: NamesRef<'static>,
    reader: GenericDatumReader<'static>,
}

impl fmt::Debug for WriterSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriterSchema").field("id", &self.id).finish()
    }
}

impl WriterSchema {
    /// Parses schema `id` from its text and the texts of the schemas it references
    /// (dependencies first).
    pub fn parse(id: u32, text: &str, references: &[String]) -> Result<Self, String> {
        let mut texts: Vec<&str> = references.iter().map(String::as_str).collect();
        texts.push(text);
        let parsed = Schema::parse_list(texts).map_err(|e| e.to_string())?;
        // A reader borrows its schemas; they live as long as the process, as the cache
        // entry holding them does (one per schema id the stream carries).
        let schemata: &'static [Schema] = Box::leak(parsed.into_boxed_slice());
        let schema = schemata.last().ok_or("no schema")?;
        let all: Vec<&'static Schema> = schemata.iter().collect();
        let names = ResolvedSchema::new_with_schemata(all.clone())
            .map_err(|e| e.to_string())?
            .get_names()
            .clone();
        let reader = GenericDatumReader::builder(schema)
            .writer_schemata(all)
            .map_err(|e| e.to_string())?
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            id,
            schema,
            names,
            reader,
        })
    }

    /// Decodes one datum; every byte must belong to it.
    fn decode(&self, datum: &[u8]) -> Result<Avro, String> {
        let mut rest = datum;
        let value = self.reader.read_value(&mut rest).map_err(|e| e.to_string())?;
        match rest.len() {
            0 => Ok(value),
            n => Err(format!("{n} bytes left over after the datum")),
        }
    }

    /// `schema` itself, or the named schema it refers to.
    fn resolve<'a>(&'a self, schema: &'a Schema) -> &'a Schema {
        match schema {
            Schema::Ref { name } => self.names.get(name).copied().unwrap_or(schema),
            other => other,
        }
    }

    /// A value with its schema, unions unwrapped to the branch written.
    fn part<'a>(&'a self, value: &'a Avro, schema: &'a Schema) -> Part<'a> {
        let (mut value, mut schema) = (value, self.resolve(schema));
        while let (Avro::Union(branch, inner), Schema::Union(union)) = (value, schema) {
            match union.variants().get(*branch as usize) {
                Some(variant) => (value, schema) = (inner, self.resolve(variant)),
                None => break,
            }
        }
        Part { value, schema }
    }
}

/// A decoded value and the writer schema it was read with.
#[derive(Debug)]
pub(super) struct Decoded {
    value: Avro,
    schema: Arc<WriterSchema>,
}

/// A part of a decoded value and the schema it was written with.
#[derive(Clone, Copy)]
pub(super) struct Part<'a> {
    value: &'a Avro,
    schema: &'a Schema,
}

impl Decoded {
    fn root(&self) -> Part<'_> {
        self.schema.part(&self.value, self.schema.schema)
    }

    /// The top-level field `name` of a record value.
    pub(super) fn field(&self, name: &str) -> Option<Part<'_>> {
        self.child(self.root(), name)
    }

    /// The part a JSON pointer (`/a/b/0`) leads to.
    pub(super) fn pointer(&self, pointer: &str) -> Option<Part<'_>> {
        let mut part = self.root();
        if pointer.is_empty() {
            return Some(part);
        }
        for token in pointer.strip_prefix('/')?.split('/') {
            let token = token.replace("~1", "/").replace("~0", "~");
            part = self.child(part, &token)?;
        }
        Some(part)
    }

    /// The whole value.
    pub(super) fn whole(&self) -> Part<'_> {
        self.root()
    }

    fn child<'a>(&'a self, part: Part<'a>, token: &str) -> Option<Part<'a>> {
        let schema = &self.schema;
        match (part.value, part.schema) {
            (Avro::Record(fields), Schema::Record(record)) => {
                let i = *record.lookup.get(token)?;
                let (_, value) = fields.get(i)?;
                Some(schema.part(value, &record.fields.get(i)?.schema))
            }
            (Avro::Map(entries), Schema::Map(map)) => {
                Some(schema.part(entries.get(token)?, &map.types))
            }
            (Avro::Array(items), Schema::Array(array)) => {
                let i: usize = token.parse().ok()?;
                Some(schema.part(items.get(i)?, &array.items))
            }
            _ => None,
        }
    }

    /// A part as a column's input.
    pub(super) fn input<'a>(&'a self, part: Part<'a>) -> Input<'a> {
        match part.value {
            Avro::Int(n) => Input::Int(i64::from(*n)),
            Avro::Long(n) => Input::Int(*n),
            Avro::Bytes(b) | Avro::Fixed(_, b) => Input::Bytes(b),
            Avro::String(s) | Avro::Enum(_, s) => Input::Str(s),
            Avro::Date(days) => {
                date(*days).map_or_else(|| Input::Owned(Value::from(*days)), Input::Date)
            }
            Avro::Uuid(u) => Input::Uuid(*u),
            Avro::Decimal(_) | Avro::BigDecimal(_) => {
                decimal(part).map_or(Input::Owned(Value::Null), Input::Decimal)
            }
            other => instant(other).map_or_else(|| Input::Owned(self.json(part)), Input::Timestamp),
        }
    }

    /// A part as JSON: records and maps as objects, decimals as exact decimal text,
    /// instants as RFC 3339 text, bytes as base64.
    pub(super) fn json(&self, part: Part<'_>) -> Value {
        match part.value {
            Avro::Null => Value::Null,
            Avro::Boolean(b) => Value::Bool(*b),
            Avro::Int(n) => Value::from(*n),
            Avro::Long(n) => Value::from(*n),
            Avro::TimeMillis(ms) => time_of_day(i64::from(*ms) * 1_000),
            Avro::TimeMicros(us) => time_of_day(*us),
            Avro::Float(f) => float(f64::from(*f)),
            Avro::Double(f) => float(*f),
            Avro::Bytes(b) | Avro::Fixed(_, b) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
            Avro::String(s) | Avro::Enum(_, s) => Value::String(s.clone()),
            Avro::Uuid(u) => Value::String(u.to_string()),
            Avro::Date(days) => match date(*days) {
                Some(d) => Value::String(d.to_string()),
                None => Value::from(*days),
            },
            Avro::Decimal(_) | Avro::BigDecimal(_) => decimal(part).map_or(Value::Null, Value::String),
            Avro::Duration(d) => serde_json::json!({
                "months": u32::from(d.months()),
                "days": u32::from(d.days()),
                "millis": u32::from(d.millis()),
            }),
            Avro::Array(_) | Avro::Map(_) | Avro::Record(_) => {
                let children: Vec<(String, Part<'_>)> = match (part.value, part.schema) {
                    (Avro::Record(fields), Schema::Record(record)) => fields
                        .iter()
                        .zip(&record.fields)
                        .map(|((name, v), f)| (name.clone(), self.schema.part(v, &f.schema)))
                        .collect(),
                    (Avro::Map(entries), Schema::Map(map)) => entries
                        .iter()
                        .map(|(k, v)| (k.clone(), self.schema.part(v, &map.types)))
                        .collect(),
                    (Avro::Array(items), Schema::Array(array)) => {
                        return Value::Array(
                            items
                                .iter()
                                .map(|v| self.json(self.schema.part(v, &array.items)))
                                .collect(),
                        );
                    }
                    _ => Vec::new(),
                };
                Value::Object(
                    children
                        .into_iter()
                        .map(|(k, p)| (k, self.json(p)))
                        .collect(),
                )
            }
            Avro::Union(_, inner) => self.json(Part {
                value: inner,
                schema: part.schema,
            }),
            other => match instant(other) {
                Some(ts) => Value::String(ts.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
                None => Value::Null,
            },
        }
    }
}

/// A JSON number, or the text of a float JSON cannot hold (`NaN`, `inf`), which no
/// numeric column takes.
fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

/// A time of day as `H:MM:SS.ffffff` (what an `interval` or `text` column takes).
fn time_of_day(micros: i64) -> Value {
    let (secs, us) = (micros.div_euclid(1_000_000), micros.rem_euclid(1_000_000));
    Value::String(format!(
        "{}:{:02}:{:02}.{us:06}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    ))
}

/// Avro's days since the Unix epoch as a date.
fn date(days: i32) -> Option<NaiveDate> {
    DateTime::from_timestamp(i64::from(days) * 86_400, 0).map(|t| t.date_naive())
}

/// The instant of a timestamp logical type (local timestamps taken as UTC: they carry no
/// zone).
fn instant(value: &Avro) -> Option<DateTime<Utc>> {
    match *value {
        Avro::TimestampMillis(ms) | Avro::LocalTimestampMillis(ms) => {
            DateTime::from_timestamp_millis(ms)
        }
        Avro::TimestampMicros(us) | Avro::LocalTimestampMicros(us) => {
            DateTime::from_timestamp_micros(us)
        }
        Avro::TimestampNanos(ns) | Avro::LocalTimestampNanos(ns) => {
            Some(DateTime::from_timestamp_nanos(ns))
        }
        _ => None,
    }
}

/// Exact decimal text of a decimal at its schema's scale.
fn decimal(part: Part<'_>) -> Option<String> {
    match (part.value, part.schema) {
        (Avro::Decimal(d), Schema::Decimal(schema)) => {
            let unscaled = num_bigint::BigInt::from(d.clone()).to_string();
            Some(with_scale(&unscaled, schema.scale))
        }
        (Avro::BigDecimal(d), _) => Some(d.to_plain_string()),
        _ => None,
    }
}

/// `unscaled` (an integer's text, maybe signed) with its last `scale` digits after the
/// decimal point.
fn with_scale(unscaled: &str, scale: usize) -> String {
    let (sign, digits) = match unscaled.strip_prefix('-') {
        Some(digits) => ("-", digits),
        None => ("", unscaled),
    };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

/// Writer schemas by id, as the registry answered.
#[derive(Debug, Default)]
pub struct SchemaCache {
    entries: RwLock<HashMap<u32, Lookup>>,
}

/// What the registry said of a schema id.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Arc<WriterSchema>),
    /// The registry does not know the id, or its schema is not Avro or does not parse:
    /// why.
    Unknown(String),
}

impl SchemaCache {
    pub fn get(&self, id: u32) -> Option<Lookup> {
        self.entries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&id)
            .cloned()
    }

    pub fn insert(&self, id: u32, lookup: Lookup) {
        self.entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(id, lookup);
    }
}

/// The schema id of a value in the Confluent wire format, if it is framed so.
pub fn schema_id(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Why a framed value cannot be read.
pub(super) enum Failure {
    NotFramed(String),
    UnknownSchema(String),
    BadAvro(String),
}

/// Decodes a framed value with its writer schema from `cache`.
pub(super) fn decode(cache: &SchemaCache, bytes: &[u8]) -> Result<Decoded, Failure> {
    let Some(id) = schema_id(bytes) else {
        return Err(Failure::NotFramed(match bytes.first() {
            Some(&MAGIC) => format!(
                "value is {} bytes, too short for the Confluent wire format (byte 0 and a 4-byte schema id)",
                bytes.len()
            ),
            Some(b) => format!(
                "value starts with byte {b:#04x}, not the Confluent wire format's magic byte 0"
            ),
            None => "value is empty".to_owned(),
        }));
    };
    let schema = match cache.get(id) {
        Some(Lookup::Found(schema)) => schema,
        Some(Lookup::Unknown(why)) => return Err(Failure::UnknownSchema(why)),
        None => {
            return Err(Failure::UnknownSchema(format!(
                "schema id {id} was not fetched from the registry"
            )));
        }
    };
    let value = schema
        .decode(&bytes[5..])
        .map_err(|e| Failure::BadAvro(format!("value does not decode under schema id {id}: {e}")))?;
    Ok(Decoded { value, schema })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_text_keeps_every_digit_at_its_scale() {
        for (unscaled, scale, text) in [
            ("12345", 2, "123.45"),
            ("-5", 3, "-0.005"),
            ("0", 2, "0.00"),
            ("7", 0, "7"),
            ("123456789012345678901234567890", 10, "12345678901234567890.1234567890"),
        ] {
            assert_eq!(with_scale(unscaled, scale), text);
        }
    }

    #[test]
    fn only_magic_byte_zero_with_a_full_id_is_framed() {
        assert_eq!(schema_id(&[0, 0, 0, 1, 7, 2]), Some(263));
        assert_eq!(schema_id(&[0, 0, 0, 1]), None);
        assert_eq!(schema_id(b"{\"a\": 1}"), None);
        assert_eq!(schema_id(&[]), None);
    }
}
