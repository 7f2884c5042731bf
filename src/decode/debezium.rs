//! Debezium change events (`envelope: debezium`): what an event does to its key, the row
//! image its columns read, and Debezium's logical types read as the column types they
//! stand for.
//!
//! An event is the envelope `{before, after, source, op, ts_ms}`, or the same wrapped as
//! `{schema, payload}` when the producer's JSON converter writes schemas
//! (`schemas.enable=true`); that is decided per record. With the schema, a field's
//! logical type (`io.debezium.time.MicroTimestamp`, a Connect `Decimal` and its scale)
//! says how to read it; without, the column's type does.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

use super::avro::{EpochUnit, date, decimal_text, epoch_instant, time_of_day};
use super::value::{Input, is_decimal};
use crate::config::ColumnType;
use crate::route::{Column, Source};

/// What Debezium writes for a value it did not read (an unchanged TOASTed column), as
/// text, as base64 bytes and as hex bytes.
const UNAVAILABLE: &str = "__debezium_unavailable_value";
const UNAVAILABLE_BASE64: &str = "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==";
const UNAVAILABLE_HEX: &str = "5f5f646562657a69756d5f756e617661696c61626c655f76616c7565";

/// Unscaled decimal bytes beyond this are refused: printing them costs quadratic time,
/// and 4 KiB is near 10,000 digits, far above any column's precision.
const MAX_DECIMAL_BYTES: usize = 4096;
/// Postgres `numeric` keeps at most this many digits after the point.
const MAX_SCALE: u64 = 16_383;

/// What a change event does to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// `c` (create), `r` (snapshot read), `u` (update): upsert the `after` image.
    Write,
    /// `d`: delete the key of the `before` image (or of the record key).
    Delete,
    /// `t`: the source table was truncated.
    Truncate,
}

/// One change event, read from its envelope.
#[derive(Debug)]
pub(super) struct Change<'a> {
    pub(super) action: Action,
    op: &'a str,
    envelope: &'a Map<String, Value>,
    /// The row image columns read: `after` for a write, `before` for a delete (may be
    /// null: the key then comes from the record key).
    image: Option<&'a Value>,
    /// The field schemas of that image, when the event carries its schema.
    fields: &'a [Value],
}

/// A column's value in a change event.
#[derive(Debug)]
pub(super) enum Read<'a> {
    Input(Input<'a>),
    /// Debezium's placeholder: the column keeps what the row holds.
    Unavailable,
}

/// The `payload` of a `{schema, payload}` wrapper, with the schema; else `value` itself.
pub(super) fn unwrap(value: &Value) -> (&Value, Option<&Value>) {
    match value.as_object() {
        Some(o) if o.len() == 2 && o.contains_key("schema") && o.contains_key("payload") => {
            (&o["payload"], o.get("schema").filter(|s| s.is_object()))
        }
        _ => (value, None),
    }
}

impl<'a> Change<'a> {
    /// Reads the envelope of a record value; says what is wrong with it otherwise.
    pub(super) fn read(value: &'a Value) -> Result<Self, String> {
        let (payload, schema) = unwrap(value);
        let Some(envelope) = payload.as_object() else {
            return Err("a Debezium event must be a JSON object (or {schema, payload})".into());
        };
        let op = match envelope.get("op") {
            Some(Value::String(op)) => op.as_str(),
            Some(other) => return Err(format!("`op` is {other}, not a string")),
            None => return Err("the event has no `op`".into()),
        };
        let (action, side) = match op {
            "c" | "r" | "u" => (Action::Write, "after"),
            "d" => (Action::Delete, "before"),
            "t" => (Action::Truncate, "before"),
            other => {
                return Err(format!(
                    "`op` is `{other}`: a change event's op is c, r, u, d or t"
                ));
            }
        };
        let image = envelope.get(side).filter(|v| !v.is_null());
        match image {
            Some(v) if !v.is_object() => {
                return Err(format!("op `{op}` has `{side}` {v}, not an object"));
            }
            None if action == Action::Write => {
                return Err(format!("op `{op}` has no `after` row image"));
            }
            _ => {}
        }
        let fields = schema
            .and_then(|s| s.get("fields"))
            .and_then(Value::as_array)
            .and_then(|fields| fields.iter().find(|f| f["field"] == side))
            .and_then(|image| image.get("fields"))
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        Ok(Self {
            action,
            op,
            envelope,
            image,
            fields,
        })
    }

    /// The value of `column` (a source that reads the value) in this event; `None` when
    /// absent. A delete's key columns missing from `before` are read from `key`, the
    /// record key as JSON (unwrapped).
    pub(super) fn input(
        &self,
        column: &Column,
        key: Option<&'a Value>,
    ) -> Result<Option<Read<'a>>, String> {
        let image = self.image;
        let from_key = |found: Option<&'a Value>, look: &dyn Fn(&'a Value) -> Option<&'a Value>| {
            match found {
                Some(v) if !v.is_null() => Some(v),
                _ if self.action == Action::Delete => key.and_then(look),
                _ => found,
            }
        };
        let raw = |found: &'a Value| {
            if unavailable(found) {
                Read::Unavailable
            } else {
                Read::Input(Input::Json(found))
            }
        };
        Ok(match &column.source {
            Source::Field(name) => {
                let Some(found) = from_key(image.and_then(|i| i.get(name)), &|k| k.get(name))
                else {
                    return Ok(None);
                };
                if unavailable(found) {
                    return Ok(Some(Read::Unavailable));
                }
                let schema = self.fields.iter().find(|f| f["field"] == name.as_str());
                Some(Read::Input(convert(column, found, schema)?))
            }
            Source::Pointer(pointer) => {
                from_key(image.and_then(|i| i.pointer(pointer)), &|k| k.pointer(pointer)).map(raw)
            }
            Source::Value => image.map(raw),
            Source::Op => Some(Read::Input(Input::Str(self.op))),
            Source::EventMeta(pointer) => self
                .envelope
                .get("source")
                .and_then(|s| s.pointer(pointer))
                .map(|v| Read::Input(Input::Json(v))),
            _ => None,
        })
    }
}

/// Whether `v` is Debezium's placeholder for a value it did not read.
fn unavailable(v: &Value) -> bool {
    match v {
        Value::String(s) => s == UNAVAILABLE || s == UNAVAILABLE_BASE64 || s == UNAVAILABLE_HEX,
        Value::Array(items) => matches!(items.as_slice(), [only] if unavailable(only)),
        _ => false,
    }
}

/// `v` read by its field schema's logical type, or by the column's type without one.
fn convert<'a>(
    column: &Column,
    v: &'a Value,
    schema: Option<&'a Value>,
) -> Result<Input<'a>, String> {
    if v.is_null() {
        return Ok(Input::Json(v));
    }
    let int = || {
        v.as_i64()
            .ok_or_else(|| format!("{v} is not an integer, as its logical type needs"))
    };
    let Some(schema) = schema else {
        return by_column(column, v, true);
    };
    let name = schema.get("name").and_then(Value::as_str).unwrap_or("");
    Ok(match name {
        "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => {
            Input::Date(date(days(int()?)?)?)
        }
        "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time" => {
            Input::Owned(time_of_day(int()?.saturating_mul(1000))?)
        }
        "io.debezium.time.MicroTime" => Input::Owned(time_of_day(int()?)?),
        "io.debezium.time.NanoTime" => Input::Owned(time_of_day(int()? / 1000)?),
        "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
            Input::Timestamp(epoch_instant(int()?, EpochUnit::Millis)?)
        }
        "io.debezium.time.MicroTimestamp" => {
            Input::Timestamp(epoch_instant(int()?, EpochUnit::Micros)?)
        }
        "io.debezium.time.NanoTimestamp" => {
            Input::Timestamp(epoch_instant(int()?, EpochUnit::Nanos)?)
        }
        // Debezium counts a month as 30.4375 days.
        "io.debezium.time.MicroDuration" => seconds(int()?),
        "org.apache.kafka.connect.data.Decimal" => {
            let scale = schema
                .pointer("/parameters/scale")
                .and_then(|s| s.as_str().map(str::parse).and_then(Result::ok).or(s.as_u64()))
                .ok_or("a Decimal without a `scale` parameter in its schema")?;
            Input::Decimal(decimal(v, scale)?)
        }
        "io.debezium.data.VariableScaleDecimal" => {
            let scale = v
                .get("scale")
                .and_then(Value::as_u64)
                .ok_or("a VariableScaleDecimal without its `scale`")?;
            let value = v
                .get("value")
                .ok_or("a VariableScaleDecimal without its `value`")?;
            Input::Decimal(decimal(value, scale)?)
        }
        "io.debezium.data.Json" if column.kind == ColumnType::Jsonb => json_text(v),
        "io.debezium.data.geometry.Geometry"
        | "io.debezium.data.geometry.Geography"
        | "io.debezium.data.geometry.Point" => {
            let wkb = v
                .get("wkb")
                .and_then(Value::as_str)
                .ok_or("a geometry without its `wkb`")?;
            Input::ByteVec(base64(wkb)?)
        }
        _ if schema["type"] == "bytes" => match v.as_str() {
            Some(text) => Input::ByteVec(base64(text)?),
            None => return Err(format!("{v} is not base64 text, as a bytes field is")),
        },
        _ => by_column(column, v, false)?,
    })
}

/// A value without a logical type, read as its column's type needs: a `date` takes days
/// since the epoch, a `numeric` decimal text (`decimal.handling.mode=string`); in an
/// event without schema, a `jsonb` column the JSON a text holds (Debezium's `Json`) and
/// an `interval` column microseconds (`MicroDuration`, `MicroTime`). Anything else is
/// read as on any route (a `bytea` takes base64 text).
fn by_column<'a>(column: &Column, v: &'a Value, schema_less: bool) -> Result<Input<'a>, String> {
    Ok(match (column.kind, v) {
        (ColumnType::Date, Value::Number(n)) => match n.as_i64() {
            Some(n) => Input::Date(date(days(n)?)?),
            None => Input::Json(v),
        },
        (ColumnType::Numeric, Value::String(text)) if is_decimal(text) => {
            Input::Decimal(text.clone())
        }
        // A VariableScaleDecimal of an event without Connect schema (Avro's record).
        (ColumnType::Numeric, Value::Object(o)) if o.len() == 2 => {
            match (o.get("scale").and_then(Value::as_u64), o.get("value")) {
                (Some(scale), Some(value)) => Input::Decimal(decimal(value, scale)?),
                _ => Input::Json(v),
            }
        }
        (ColumnType::Jsonb, Value::String(_)) if schema_less => json_text(v),
        // Debezium's durations and times of day are microseconds.
        (ColumnType::Interval, Value::Number(n)) if schema_less => match n.as_i64() {
            Some(micros) => seconds(micros),
            None => Input::Json(v),
        },
        _ => Input::Json(v),
    })
}

/// Microseconds as the seconds an interval column takes.
fn seconds(micros: i64) -> Input<'static> {
    Input::Owned(super::framed::float(micros as f64 / 1_000_000.0))
}

fn days(n: i64) -> Result<i32, String> {
    i32::try_from(n).map_err(|_| format!("date {n} days from 1970-01-01 is out of range"))
}

fn base64(text: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(text)
        .map_err(|e| format!("bytes are not base64 (as Debezium writes them): {e}"))
}

/// The text of Debezium's `Json` type as the JSON it holds; text that does not parse
/// stays a JSON string.
fn json_text(v: &Value) -> Input<'_> {
    match v.as_str().map(serde_json::from_str::<Value>) {
        Some(Ok(parsed)) => Input::Owned(parsed),
        _ => Input::Json(v),
    }
}

/// Exact decimal text of Connect's `Decimal`: base64 big-endian two's complement
/// unscaled bytes at `scale`.
fn decimal(v: &Value, scale: u64) -> Result<String, String> {
    let text = v
        .as_str()
        .ok_or_else(|| format!("decimal {v} is not base64 text"))?;
    if scale > MAX_SCALE {
        return Err(format!("decimal scale {scale} is above {MAX_SCALE}"));
    }
    let bytes = base64(text)?;
    if bytes.len() > MAX_DECIMAL_BYTES {
        return Err(format!(
            "a decimal of {} bytes is above {MAX_DECIMAL_BYTES}",
            bytes.len()
        ));
    }
    Ok(decimal_text(&bytes, scale as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placeholder_is_known_in_each_form_debezium_writes() {
        assert_eq!(STANDARD.encode(UNAVAILABLE), UNAVAILABLE_BASE64);
        let hex: String = UNAVAILABLE.bytes().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, UNAVAILABLE_HEX);
        for v in [
            serde_json::json!(UNAVAILABLE),
            serde_json::json!(UNAVAILABLE_BASE64),
            serde_json::json!([UNAVAILABLE]),
        ] {
            assert!(unavailable(&v), "{v}");
        }
        assert!(!unavailable(&serde_json::json!("__debezium")));
        assert!(!unavailable(&serde_json::json!([UNAVAILABLE, "x"])));
    }

    #[test]
    fn connect_decimals_are_exact_at_their_scale() {
        // 0x04d2 = 1234; 0xfb2e = -1234 in two's complement.
        assert_eq!(decimal(&serde_json::json!("BNI="), 2).unwrap(), "12.34");
        assert_eq!(decimal(&serde_json::json!("+y4="), 3).unwrap(), "-1.234");
        assert_eq!(decimal(&serde_json::json!("AA=="), 0).unwrap(), "0");
        assert!(decimal(&serde_json::json!("not base64!"), 2).is_err());
        assert!(decimal(&serde_json::json!("BNI="), MAX_SCALE + 1).is_err());
    }
}
