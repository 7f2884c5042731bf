//! Avro datums, the payload of a framed value (see [`super::framed`]) whose writer
//! schema is Avro.
//!
//! A column's `field` addresses the decoded record as it addresses JSON (a field name,
//! or a JSON pointer through records, maps and arrays), so a mapping moves from JSON to
//! Avro unchanged. Logical types keep their meaning: a decimal is exact at its scale, a
//! timestamp is an instant, a date a date, a uuid a uuid.

use std::fmt;
use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{NamesRef, ResolvedSchema};
use apache_avro::types::Value as Avro;
use base64::Engine;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use super::Addressed;
use super::framed::{Field, Referenced, float, in_years, pointer_tokens};
use crate::config::ColumnType;
use super::value::Input;

/// An Avro writer schema, ready to decode with.
pub struct AvroSchema {
    schema: &'static Schema,
    names: NamesRef<'static>,
    reader: GenericDatumReader<'static>,
}

impl fmt::Debug for AvroSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AvroSchema").finish_non_exhaustive()
    }
}

impl AvroSchema {
    /// Parses a schema from its text and the schemas it references (dependencies
    /// first).
    pub fn parse(text: &str, references: &[Referenced]) -> Result<Self, String> {
        // The schema itself may be unnamed (a bare "string", an array); those it
        // references are named.
        let texts: Vec<&str> = references.iter().map(|r| r.text.as_str()).collect();
        let (main, mut parsed) =
            Schema::parse_str_with_list(text, &texts).map_err(|e| e.to_string())?;
        parsed.push(main);
        // A reader borrows its schemas; they live as long as the process, as the cache
        // entry holding them does (one per schema id the stream carries).
        let schemata: &'static [Schema] = Box::leak(parsed.into_boxed_slice());
        let schema = schemata.last().ok_or("no schema")?;
        let all: Vec<&'static Schema> = schemata.iter().collect();
        let names = ResolvedSchema::new_with_schemata(all.clone())
            .map_err(|e| e.to_string())?
            .get_names()
            .clone();
        check(schema, &names, &mut Vec::new())?;
        let reader = GenericDatumReader::builder(schema)
            .writer_schemata(all)
            .map_err(|e| e.to_string())?
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            schema,
            names,
            reader,
        })
    }

    /// Decodes one datum; every byte must belong to it, and it must not end early
    /// (apache-avro takes a boolean, string or union cut off by the end for a null).
    fn decode(&self, datum: &[u8]) -> Result<Avro, String> {
        let mut input = Exact {
            rest: datum,
            short: false,
        };
        let value = self.reader.read_value(&mut input);
        if input.short {
            return Err("the datum ends early (truncated)".to_owned());
        }
        let value = value.map_err(|e| e.to_string())?;
        match input.rest.len() {
            0 => Ok(value),
            n => Err(format!("{n} bytes left over after the datum")),
        }
    }

    /// The fields of the record the schema is.
    pub(super) fn fields(&self) -> Result<Vec<Field>, String> {
        let Schema::Record(record) = self.resolve(self.schema) else {
            return Err("the schema is not a record".to_owned());
        };
        Ok(record
            .fields
            .iter()
            .map(|field| {
                // ["null", T] is T or NULL.
                let (schema, required) = match self.resolve(&field.schema) {
                    Schema::Union(union) if union.is_nullable() => {
                        match union.variants().iter().filter(|v| **v != Schema::Null).collect::<Vec<_>>()[..] {
                            [only] => (self.resolve(only), false),
                            _ => (&field.schema, false),
                        }
                    }
                    other => (other, true),
                };
                Field {
                    name: field.name.clone(),
                    json_name: None,
                    kind: column_type(schema),
                    required,
                }
            })
            .collect())
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
    schema: Arc<AvroSchema>,
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

    /// A part as JSON: records and maps as objects, decimals as exact decimal text,
    /// instants as RFC 3339 text, bytes as base64.
    pub(super) fn json(&self, part: Part<'_>) -> Result<Value, String> {
        Ok(match part.value {
            Avro::Null => Value::Null,
            Avro::Boolean(b) => Value::Bool(*b),
            Avro::Int(n) => Value::from(*n),
            Avro::Long(n) => Value::from(*n),
            Avro::TimeMillis(ms) => time_of_day(i64::from(*ms) * 1_000)?,
            Avro::TimeMicros(us) => time_of_day(*us)?,
            Avro::Float(f) => float(f64::from(*f)),
            Avro::Double(f) => float(*f),
            Avro::Bytes(b) | Avro::Fixed(_, b) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
            Avro::String(s) | Avro::Enum(_, s) => Value::String(s.clone()),
            Avro::Uuid(u) => Value::String(u.to_string()),
            Avro::Date(days) => Value::String(date(*days)?.to_string()),
            Avro::Decimal(_) | Avro::BigDecimal(_) => Value::String(decimal(part)?),
            Avro::Duration(d) => serde_json::json!({
                "months": u32::from(d.months()),
                "days": u32::from(d.days()),
                "millis": u32::from(d.millis()),
            }),
            Avro::Array(items) => match part.schema {
                Schema::Array(array) => Value::Array(
                    items
                        .iter()
                        .map(|v| self.json(self.schema.part(v, &array.items)))
                        .collect::<Result<_, _>>()?,
                ),
                _ => Value::Null,
            },
            Avro::Map(entries) => match part.schema {
                Schema::Map(map) => Value::Object(
                    entries
                        .iter()
                        .map(|(k, v)| Ok((k.clone(), self.json(self.schema.part(v, &map.types))?)))
                        .collect::<Result<_, String>>()?,
                ),
                _ => Value::Null,
            },
            Avro::Record(fields) => match part.schema {
                Schema::Record(record) => Value::Object(
                    fields
                        .iter()
                        .zip(&record.fields)
                        .map(|((name, v), f)| {
                            Ok((name.clone(), self.json(self.schema.part(v, &f.schema))?))
                        })
                        .collect::<Result<_, String>>()?,
                ),
                _ => Value::Null,
            },
            Avro::Union(_, inner) => self.json(Part {
                value: inner,
                schema: part.schema,
            })?,
            other => match instant(other)? {
                Some(ts) => Value::String(ts.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
                None => Value::Null,
            },
        })
    }
}

impl Addressed for Decoded {
    type Part<'a> = Part<'a>;

    fn field(&self, name: &str) -> Option<Part<'_>> {
        self.child(self.root(), name)
    }

    fn pointer(&self, pointer: &str) -> Option<Part<'_>> {
        let mut part = self.root();
        for token in pointer_tokens(pointer)? {
            part = self.child(part, &token)?;
        }
        Some(part)
    }

    fn whole(&self) -> Part<'_> {
        self.root()
    }

    /// A part as a column's input, or why its value cannot be one (an instant or a
    /// date outside years 1 to 9999, a time of day outside the day, a decimal longer
    /// than its precision allows).
    fn input<'a>(&'a self, part: Part<'a>) -> Result<Input<'a>, String> {
        Ok(match part.value {
            Avro::Int(n) => Input::Int(i64::from(*n)),
            Avro::Long(n) => Input::Int(*n),
            Avro::Bytes(b) | Avro::Fixed(_, b) => Input::Bytes(b),
            Avro::String(s) | Avro::Enum(_, s) => Input::Str(s),
            Avro::Date(days) => Input::Date(date(*days)?),
            Avro::Uuid(u) => Input::Uuid(*u),
            Avro::Decimal(_) | Avro::BigDecimal(_) => Input::Decimal(decimal(part)?),
            other => match instant(other)? {
                Some(ts) => Input::Timestamp(ts),
                None => Input::Owned(self.json(part)?),
            },
        })
    }

}

/// The column type that holds values of `schema` (named ones resolved).
fn column_type(schema: &Schema) -> ColumnType {
    match schema {
        Schema::Boolean => ColumnType::Bool,
        Schema::Int => ColumnType::Int4,
        Schema::Long => ColumnType::Int8,
        Schema::Float => ColumnType::Float4,
        Schema::Double => ColumnType::Float8,
        Schema::String | Schema::Enum(_) | Schema::Null => ColumnType::Text,
        Schema::Bytes | Schema::Fixed(_) => ColumnType::Bytea,
        Schema::Decimal(_) | Schema::BigDecimal => ColumnType::Numeric,
        Schema::Uuid(_) => ColumnType::Uuid,
        Schema::Date => ColumnType::Date,
        Schema::TimeMillis | Schema::TimeMicros => ColumnType::Interval,
        Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => ColumnType::Timestamptz,
        _ => ColumnType::Jsonb,
    }
}

/// A time of day as `H:MM:SS.ffffff` (what an `interval` or `text` column takes).
pub(super) fn time_of_day(micros: i64) -> Result<Value, String> {
    if !(0..86_400_000_000).contains(&micros) {
        return Err(format!("time of day {micros} µs is outside the day"));
    }
    let (secs, us) = (micros / 1_000_000, micros % 1_000_000);
    Ok(Value::String(format!(
        "{}:{:02}:{:02}.{us:06}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )))
}

/// Avro's days since the Unix epoch as a date.
pub(super) fn date(days: i32) -> Result<NaiveDate, String> {
    DateTime::from_timestamp(i64::from(days) * 86_400, 0)
        .map(|t| t.date_naive())
        .filter(|d| in_years(*d))
        .ok_or_else(|| format!("date {days} days from 1970-01-01 is outside years 1 to 9999"))
}

/// The instant of a timestamp logical type (local timestamps taken as UTC: they carry
/// no zone); `None` for a value of another type.
fn instant(value: &Avro) -> Result<Option<DateTime<Utc>>, String> {
    let (n, unit) = match *value {
        Avro::TimestampMillis(ms) | Avro::LocalTimestampMillis(ms) => (ms, EpochUnit::Millis),
        Avro::TimestampMicros(us) | Avro::LocalTimestampMicros(us) => (us, EpochUnit::Micros),
        Avro::TimestampNanos(ns) | Avro::LocalTimestampNanos(ns) => (ns, EpochUnit::Nanos),
        _ => return Ok(None),
    };
    epoch_instant(n, unit).map(Some)
}

/// The unit of a count since the Unix epoch.
#[derive(Debug, Clone, Copy)]
pub(super) enum EpochUnit {
    Millis,
    Micros,
    Nanos,
}

/// `n` `unit`s after the Unix epoch, within years 1 to 9999.
pub(super) fn epoch_instant(n: i64, unit: EpochUnit) -> Result<DateTime<Utc>, String> {
    let (ts, name) = match unit {
        EpochUnit::Millis => (DateTime::from_timestamp_millis(n), "ms"),
        EpochUnit::Micros => (DateTime::from_timestamp_micros(n), "µs"),
        EpochUnit::Nanos => (Some(DateTime::from_timestamp_nanos(n)), "ns"),
    };
    ts.filter(|t| in_years(t.date_naive()))
        .ok_or_else(|| format!("timestamp {n} {name} from the epoch is outside years 1 to 9999"))
}

/// Exact decimal text of a decimal at its schema's scale; its unscaled bytes may hold no
/// more than its precision's digits (a longer one would take long to print).
fn decimal(part: Part<'_>) -> Result<String, String> {
    let (Avro::Decimal(d), Schema::Decimal(schema)) = (part.value, part.schema) else {
        return Err("a decimal without its scale".to_owned());
    };
    let bytes = <Vec<u8>>::try_from(d).map_err(|e| e.to_string())?;
    // 10^p < 256^(p / 2.4 + 1): two's complement needs at most p / 2.4 + 1 bytes.
    if bytes.len() > schema.precision * 5 / 12 + 2 {
        return Err(format!(
            "a decimal of {} bytes is longer than precision {} allows",
            bytes.len(),
            schema.precision
        ));
    }
    Ok(decimal_text(&bytes, schema.scale))
}

/// Exact decimal text of big-endian two's complement unscaled `bytes` at `scale` (how
/// Avro and Kafka Connect write decimals).
pub(super) fn decimal_text(bytes: &[u8], scale: usize) -> String {
    let unscaled = num_bigint::BigInt::from_signed_bytes_be(bytes).to_string();
    with_scale(&unscaled, scale)
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

/// A datum's bytes, noting a read that wanted more than was left: no valid datum does.
struct Exact<'a> {
    rest: &'a [u8],
    short: bool,
}

impl std::io::Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.rest.is_empty() && !buf.is_empty() {
            self.short = true;
        }
        self.rest.read(buf)
    }
}

/// The largest `fixed` a schema may declare: apache-avro allocates it before reading.
const MAX_FIXED_BYTES: usize = 1 << 20;

/// The most digits a `decimal` may declare.
const MAX_DECIMAL_PRECISION: usize = 1000;

/// Refuses what a schema could make a small datum cost without bound: a record that
/// contains itself (decoding recursion as deep as the datum says, past any stack), an
/// array of items that take no bytes (as many as its count claims), a huge `fixed` or
/// decimal precision, and `big-decimal` (its scale is in the datum, unbounded).
fn check<'a>(
    schema: &'a Schema,
    names: &'a NamesRef<'static>,
    defining: &mut Vec<&'a apache_avro::schema::Name>,
) -> Result<(), String> {
    match schema {
        Schema::Ref { name } => {
            if defining.contains(&name) {
                return Err(format!(
                    "{name} contains itself (a recursive schema), which is not read"
                ));
            }
            match names.get(name) {
                Some(named) => check(named, names, defining),
                None => Err(format!("{name} is not defined")),
            }
        }
        Schema::Record(record) => {
            defining.push(&record.name);
            for field in &record.fields {
                check(&field.schema, names, defining)?;
            }
            defining.pop();
            Ok(())
        }
        Schema::Union(union) => union
            .variants()
            .iter()
            .try_for_each(|v| check(v, names, defining)),
        Schema::Array(array) => {
            if zero_width(&array.items, names, 0) {
                return Err("an array of items that take no bytes is not read".to_owned());
            }
            check(&array.items, names, defining)
        }
        Schema::Map(map) => check(&map.types, names, defining),
        Schema::Fixed(fixed) | Schema::Duration(fixed) if fixed.size > MAX_FIXED_BYTES => Err(
            format!("fixed {} of {} bytes is above {MAX_FIXED_BYTES}", fixed.name, fixed.size),
        ),
        Schema::Decimal(decimal) if decimal.precision > MAX_DECIMAL_PRECISION => Err(format!(
            "a decimal of precision {} is above {MAX_DECIMAL_PRECISION}",
            decimal.precision
        )),
        Schema::Decimal(decimal) => match &decimal.inner {
            apache_avro::schema::InnerDecimalSchema::Fixed(fixed)
                if fixed.size > MAX_FIXED_BYTES =>
            {
                Err(format!("fixed {} of {} bytes is too large", fixed.name, fixed.size))
            }
            _ => Ok(()),
        },
        Schema::BigDecimal => Err("big-decimal (scale in each value) is not read".to_owned()),
        _ => Ok(()),
    }
}

/// Whether a value of `schema` can take no bytes at all.
fn zero_width(schema: &Schema, names: &NamesRef<'static>, depth: usize) -> bool {
    match schema {
        _ if depth > 64 => false,
        Schema::Null => true,
        Schema::Fixed(fixed) => fixed.size == 0,
        Schema::Record(record) => record
            .fields
            .iter()
            .all(|f| zero_width(&f.schema, names, depth + 1)),
        Schema::Ref { name } => names
            .get(name)
            .is_some_and(|named| zero_width(named, names, depth + 1)),
        _ => false,
    }
}

/// Decodes a datum with its writer schema, schema `id`.
pub(super) fn decode(schema: &Arc<AvroSchema>, id: u32, datum: &[u8]) -> Result<Decoded, String> {
    let value = schema
        .decode(datum)
        .map_err(|e| format!("value does not decode under schema id {id}: {e}"))?;
    Ok(Decoded {
        value,
        schema: schema.clone(),
    })
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
    fn schemas_a_small_datum_could_make_costly_are_refused() {
        for (schema, refusal) in [
            (
                r#"{"type": "record", "name": "N", "fields": [{"name": "next", "type": ["null", "N"]}]}"#,
                "recursive",
            ),
            (r#"{"type": "array", "items": "null"}"#, "take no bytes"),
            (
                r#"{"type": "array", "items": {"type": "record", "name": "E", "fields": []}}"#,
                "take no bytes",
            ),
            (
                r#"{"type": "fixed", "name": "F", "size": 1099511627776}"#,
                "bytes is above",
            ),
            (r#"{"type": "bytes", "logicalType": "big-decimal"}"#, "big-decimal"),
        ] {
            let err = AvroSchema::parse(schema, &[]).expect_err(schema);
            assert!(err.contains(refusal), "{schema}: {err}");
        }
        let fine = r#"{"type": "record", "name": "R", "fields": [
            {"name": "a", "type": {"type": "array", "items": "long"}},
            {"name": "b", "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}]}]}"#;
        AvroSchema::parse(fine, &[]).expect("an ordinary schema parses");
    }

    /// `value` framed under schema `id` of `schema`, decoded back.
    fn round_trip(schema: &str, value: Avro) -> Decoded {
        let writer = Arc::new(AvroSchema::parse(schema, &[]).expect("schema"));
        let datum = apache_avro::writer::datum::GenericDatumWriter::builder(writer.schema)
            .build()
            .expect("writer")
            .write_value_to_vec(value)
            .expect("encodes");
        let decoded = decode(&writer, 1, &datum).expect("a datum just written decodes");
        // Every proper prefix of the datum is refused: none ends as a row with NULLs.
        for cut in 0..datum.len() {
            assert!(
                decode(&writer, 1, &datum[..cut]).is_err(),
                "a datum cut to {cut} of {} bytes",
                datum.len()
            );
        }
        decoded
    }

    #[test]
    fn values_outside_what_postgres_holds_are_refused_not_nulled() {
        let schema = r#"{"type": "record", "name": "R", "fields": [
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "time", "type": {"type": "long", "logicalType": "time-micros"}},
            {"name": "day", "type": {"type": "int", "logicalType": "date"}},
            {"name": "s", "type": "string"}]}"#;
        let record = |at: i64, time: i64, day: i32| {
            Avro::Record(vec![
                ("at".into(), Avro::TimestampMillis(at)),
                ("time".into(), Avro::TimeMicros(time)),
                ("day".into(), Avro::Date(day)),
                ("s".into(), Avro::String("last".into())),
            ])
        };
        let ok = round_trip(schema, record(1_764_547_200_123, 3_723_000_004, 20_000));
        let field = |d: &Decoded, name: &str| d.input(d.field(name).expect("field")).map(|_| ());
        assert!(field(&ok, "at").is_ok() && field(&ok, "day").is_ok());
        assert_eq!(
            ok.json(ok.field("time").expect("time")),
            Ok(Value::String("1:02:03.000004".into()))
        );
        let bad = round_trip(schema, record(i64::MIN, -1, -800_000));
        for name in ["at", "time", "day"] {
            let err = field(&bad, name).expect_err(name);
            assert!(err.contains("outside"), "{name}: {err}");
        }
    }
}
