//! One JSON value -> one COPY field (text or binary) of a given column type.
//!
//! Each type is validated here, before Postgres sees it, so that a bad field becomes a
//! precise dead letter instead of a failed COPY that has to be bisected.

use std::borrow::Cow;
use std::io::Write;
use std::net::IpAddr;

use base64::Engine;
use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};
use serde_json::Value;

use super::{ReasonCode, Rejection, push_escaped};
use crate::config::ColumnType;
use crate::route::{Column, TimeFormat};

/// A column's value as found in the record.
#[derive(Debug, Clone)]
pub(super) enum Input<'a> {
    /// A part of the JSON value or key.
    Json(&'a Value),
    /// Text of the record (its topic, an Avro string).
    Str(&'a str),
    /// A number of the record (partition, offset, timestamp, an Avro int).
    Int(i64),
    /// Raw bytes (the key, a header, Avro bytes).
    Bytes(&'a [u8]),
    /// An instant (an Avro timestamp).
    Timestamp(DateTime<Utc>),
    /// A calendar date (an Avro date).
    Date(NaiveDate),
    /// Exact decimal text (an Avro decimal).
    Decimal(String),
    Uuid(uuid::Uuid),
    /// A value made for the column (an Avro record as JSON, say).
    Owned(Value),
    /// Bytes made for the column (decoded from base64, say).
    ByteVec(Vec<u8>),
}

impl Input<'_> {
    pub(super) fn is_null(&self) -> bool {
        matches!(self, Self::Json(Value::Null) | Self::Owned(Value::Null))
    }
}

/// How rows are written: COPY text lines, or COPY BINARY tuples (the server parses
/// nothing; see [`crate::store`] for when a route can use it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyFormat {
    #[default]
    Text,
    Binary,
}

/// A column's value, validated, before it is written in either format.
enum Typed<'a> {
    Text(Cow<'a, str>),
    /// An integer and its width in bytes (2, 4 or 8).
    Int(i64, usize),
    Float4(f32),
    Float8(f64),
    /// Decimal text as Postgres `numeric` reads it (text format only).
    Numeric(Cow<'a, str>),
    Bool(bool),
    Timestamp(DateTime<Utc>),
    Date(NaiveDate),
    /// Microseconds.
    Interval(i64),
    Inet(IpAddr, Option<u8>),
    Uuid(uuid::Uuid),
    Jsonb(String),
    Bytea(Cow<'a, [u8]>),
}

/// Appends `input` for `column` in `format`, or says why it does not fit.
pub(super) fn encode(
    column: &Column,
    input: Input,
    format: CopyFormat,
    out: &mut Vec<u8>,
) -> Result<(), Rejection> {
    let typed = match input {
        Input::Json(v) => typed(column, v)?,
        Input::Str(s) if column.kind == ColumnType::Text => {
            Typed::Text(Cow::Borrowed(text(column, s)?))
        }
        Input::Str(s) => return encode_value(column, &Value::String(s.to_owned()), format, out),
        Input::Int(n) => return encode_value(column, &Value::from(n), format, out),
        Input::Bytes(b) if column.kind == ColumnType::Bytea => Typed::Bytea(Cow::Borrowed(b)),
        Input::Bytes(b) => match std::str::from_utf8(b) {
            Ok(text) => return encode(column, Input::Str(text), format, out),
            Err(e) => return Err(bad(column, &format!("bytes are not UTF-8 text: {e}"))),
        },
        Input::Timestamp(ts) => match column.kind {
            ColumnType::Timestamptz => Typed::Timestamp(ts),
            ColumnType::Date => Typed::Date(ts.date_naive()),
            _ => {
                let text = ts.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                return encode_value(column, &Value::String(text), format, out);
            }
        },
        Input::Date(date) => match column.kind {
            ColumnType::Date => Typed::Date(date),
            ColumnType::Timestamptz => Typed::Timestamp(date.and_time(NaiveTime::MIN).and_utc()),
            _ => return encode_value(column, &Value::String(date.to_string()), format, out),
        },
        Input::Decimal(text) => match column.kind {
            ColumnType::Numeric => Typed::Numeric(Cow::Owned(text)),
            ColumnType::Text => Typed::Text(Cow::Owned(text)),
            // Decimal text is a JSON number, which jsonb keeps exactly.
            ColumnType::Jsonb => Typed::Jsonb(text),
            // An integer column takes a decimal without a fraction; a float column any.
            _ => {
                let integral = match text.split_once('.') {
                    Some((int, frac)) if frac.bytes().all(|b| b == b'0') => int,
                    Some(_) => text.as_str(),
                    None => text.as_str(),
                };
                let number = integral
                    .parse::<i64>()
                    .map(Value::from)
                    .or_else(|_| serde_json::from_str::<Value>(&text))
                    .map_err(|_| bad(column, &format!("`{text}` is not a number")))?;
                return encode_value(column, &number, format, out);
            }
        },
        Input::Uuid(uuid) => match column.kind {
            ColumnType::Uuid => Typed::Uuid(uuid),
            _ => return encode_value(column, &Value::String(uuid.to_string()), format, out),
        },
        Input::Owned(v) => return encode_value(column, &v, format, out),
        Input::ByteVec(b) => return encode(column, Input::Bytes(&b), format, out),
    };
    typed.write(format, out);
    Ok(())
}

pub(super) fn bad(column: &Column, what: &str) -> Rejection {
    Rejection::new(
        column.kind.bad_value_code(),
        format!(
            "field `{}` for column `{}` ({}): {what}",
            column.field,
            column.name,
            column.kind.sql_name()
        ),
    )
}

/// Appends a JSON value for `column` in `format`, or says why it does not fit.
pub(crate) fn encode_value(
    column: &Column,
    v: &Value,
    format: CopyFormat,
    out: &mut Vec<u8>,
) -> Result<(), Rejection> {
    typed(column, v)?.write(format, out);
    Ok(())
}

/// A JSON value for `column`, validated, or why it does not fit.
fn typed<'a>(column: &Column, v: &'a Value) -> Result<Typed<'a>, Rejection> {
    let bad = |what: &str| bad(column, what);
    // With `coerce`, a string may stand for a number or a boolean.
    let coerced = || column.coerce.then(|| v.as_str().map(str::trim)).flatten();
    Ok(match column.kind {
        ColumnType::Text => match v {
            Value::String(s) => Typed::Text(Cow::Borrowed(text(column, s)?)),
            Value::Number(n) => Typed::Text(Cow::Owned(n.to_string())),
            Value::Bool(b) => Typed::Text(Cow::Owned(b.to_string())),
            Value::Array(_) | Value::Object(_) if column.coerce => {
                let whole = v.to_string();
                text(column, &whole)?;
                Typed::Text(Cow::Owned(whole))
            }
            _ => return Err(bad("expected a string")),
        },
        ColumnType::Int2 | ColumnType::Int4 | ColumnType::Int8 => {
            let (lo, hi, width) = match column.kind {
                ColumnType::Int2 => (i16::MIN as i64, i16::MAX as i64, 2),
                ColumnType::Int4 => (i32::MIN as i64, i32::MAX as i64, 4),
                _ => (i64::MIN, i64::MAX, 8),
            };
            let n = v
                .as_i64()
                .or_else(|| coerced()?.parse().ok())
                .filter(|n| (lo..=hi).contains(n))
                .ok_or_else(|| bad(&format!("expected an integer in {lo}..={hi}, got {v}")))?;
            Typed::Int(n, width)
        }
        ColumnType::Float4 | ColumnType::Float8 => {
            let n = v
                .as_f64()
                .or_else(|| coerced()?.parse().ok())
                .filter(|n: &f64| n.is_finite())
                .ok_or_else(|| bad(&format!("expected a finite number, got {v}")))?;
            if column.kind == ColumnType::Float4 {
                // From the number's shortest decimal, rounded once, as Postgres' float4in
                // reads it; like float4in, refuse what overflows or underflows to zero.
                let single = n
                    .to_string()
                    .parse::<f32>()
                    .ok()
                    .filter(|f| f.is_finite() && (*f != 0.0 || n == 0.0))
                    .ok_or_else(|| bad(&format!("{v} is out of range for float4")))?;
                Typed::Float4(single)
            } else {
                Typed::Float8(n)
            }
        }
        ColumnType::Numeric => match v {
            Value::Number(n) => Typed::Numeric(Cow::Owned(n.to_string())),
            _ => match coerced().filter(|s| is_decimal(s)) {
                Some(text) => Typed::Numeric(Cow::Borrowed(text)),
                None => return Err(bad(&format!("expected a number, got {v}"))),
            },
        },
        ColumnType::Bool => Typed::Bool(
            v.as_bool()
                .or_else(|| match coerced()?.to_ascii_lowercase().as_str() {
                    "true" | "t" | "yes" | "y" | "1" => Some(true),
                    "false" | "f" | "no" | "n" | "0" => Some(false),
                    _ => None,
                })
                .ok_or_else(|| bad(&format!("expected true or false, got {v}")))?,
        ),
        ColumnType::Timestamptz => Typed::Timestamp(timestamp(column, v).ok_or_else(|| {
            bad(&format!(
                "`{v}` is not a timestamp in format {}",
                column.format
            ))
        })?),
        ColumnType::Date => {
            let pattern = match &column.format {
                TimeFormat::Pattern(p) => p.as_str(),
                _ => "%Y-%m-%d",
            };
            Typed::Date(
                v.as_str()
                    .and_then(|s| NaiveDate::parse_from_str(s.trim(), pattern).ok())
                    .filter(|d| (1..=9999).contains(&d.year()))
                    .ok_or_else(|| bad(&format!("`{v}` is not a date in format {pattern}")))?,
            )
        }
        ColumnType::Interval => Typed::Interval(
            match v {
                Value::String(s) => parse_hms(s),
                Value::Number(n) => n.as_f64().and_then(seconds_to_micros),
                _ => None,
            }
            .ok_or_else(|| {
                bad(&format!(
                    "`{v}` is not H:MM:SS[.ffffff] or a number of seconds"
                ))
            })?,
        ),
        ColumnType::Inet => {
            let text = v
                .as_str()
                .ok_or_else(|| bad("expected an IP address string"))?;
            let (ip, prefix) =
                parse_inet(text).ok_or_else(|| bad(&format!("`{text}` is not an IP address")))?;
            Typed::Inet(ip, prefix)
        }
        ColumnType::Uuid => Typed::Uuid(
            v.as_str()
                .and_then(|s| uuid::Uuid::try_parse(s.trim()).ok())
                .ok_or_else(|| bad(&format!("`{v}` is not a UUID")))?,
        ),
        ColumnType::Jsonb => {
            let whole = v.to_string();
            // Postgres jsonb cannot hold \u0000 either.
            if whole.contains("\\u0000") {
                return Err(nul(column));
            }
            text(column, &whole)?;
            Typed::Jsonb(whole)
        }
        ColumnType::Bytea => Typed::Bytea(Cow::Owned(
            v.as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .ok_or_else(|| bad(&format!("`{v}` is not base64 text")))?,
        )),
    })
}

/// The microseconds within the second; a leap second (`:60`, which chrono holds as a
/// fraction of 1 s or more) stays within its second, as `23:59:59.999999`.
fn subsec_micros(ts: &DateTime<Utc>) -> u32 {
    ts.timestamp_subsec_micros().min(999_999)
}

/// Microseconds from the Unix epoch to Postgres' (2000-01-01 UTC).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl Typed<'_> {
    /// Appends the value in `format`.
    fn write(&self, format: CopyFormat, out: &mut Vec<u8>) {
        match format {
            CopyFormat::Text => self.write_text(out),
            CopyFormat::Binary => self.write_binary(out),
        }
    }

    /// Appends the value's COPY text.
    fn write_text(&self, out: &mut Vec<u8>) {
        match self {
            Self::Text(s) | Self::Numeric(s) => push_escaped(out, s),
            Self::Jsonb(s) => push_escaped(out, s),
            Self::Int(n, _) => push_int(out, *n, 0),
            Self::Float4(n) => write_display(out, n),
            Self::Float8(n) => write_display(out, n),
            Self::Bool(b) => out.push(if *b { b't' } else { b'f' }),
            Self::Timestamp(ts) => {
                let parts = [
                    (i64::from(ts.year()), 4, b'-'),
                    (ts.month().into(), 2, b'-'),
                    (ts.day().into(), 2, b' '),
                    (ts.hour().into(), 2, b':'),
                    (ts.minute().into(), 2, b':'),
                    (ts.second().into(), 2, b'.'),
                ];
                for (n, width, separator) in parts {
                    push_int(out, n, width);
                    out.push(separator);
                }
                push_int(out, subsec_micros(ts).into(), 6);
                out.extend_from_slice(b"+00");
            }
            Self::Date(date) => {
                let _ = write!(out, "{}", date.format("%Y-%m-%d"));
            }
            Self::Interval(micros) => {
                let (secs, frac) = (micros / 1_000_000, micros % 1_000_000);
                push_int(out, secs / 3600, 0);
                out.push(b':');
                push_int(out, secs / 60 % 60, 2);
                out.push(b':');
                push_int(out, secs % 60, 2);
                out.push(b'.');
                push_int(out, frac, 6);
            }
            Self::Inet(ip, prefix) => {
                match ip {
                    IpAddr::V4(v4) => {
                        for (i, octet) in v4.octets().into_iter().enumerate() {
                            if i > 0 {
                                out.push(b'.');
                            }
                            push_int(out, octet.into(), 0);
                        }
                    }
                    IpAddr::V6(v6) => write_display(out, v6),
                }
                if let Some(len) = prefix {
                    out.push(b'/');
                    push_int(out, (*len).into(), 0);
                }
            }
            Self::Uuid(uuid) => write_display(out, uuid.hyphenated()),
            Self::Bytea(bytes) => push_bytea(out, bytes),
        }
    }

    /// Appends the value as one COPY BINARY field: its length, then its bytes in the
    /// type's binary form.
    fn write_binary(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Self::Text(s) | Self::Numeric(s) => out.extend_from_slice(s.as_bytes()),
            Self::Jsonb(s) => {
                // jsonb's binary form: a version byte, then the text.
                out.push(1);
                out.extend_from_slice(s.as_bytes());
            }
            Self::Int(n, 2) => out.extend_from_slice(&(*n as i16).to_be_bytes()),
            Self::Int(n, 4) => out.extend_from_slice(&(*n as i32).to_be_bytes()),
            Self::Int(n, _) => out.extend_from_slice(&n.to_be_bytes()),
            Self::Float4(n) => out.extend_from_slice(&n.to_be_bytes()),
            Self::Float8(n) => out.extend_from_slice(&n.to_be_bytes()),
            Self::Bool(b) => out.push(u8::from(*b)),
            Self::Timestamp(ts) => {
                let micros = ts.timestamp() * 1_000_000 + i64::from(subsec_micros(ts));
                out.extend_from_slice(&(micros - POSTGRES_EPOCH_MICROS).to_be_bytes());
            }
            Self::Date(date) => {
                let days = date.num_days_from_ce()
                    - NaiveDate::from_ymd_opt(2000, 1, 1).map_or(0, |d| d.num_days_from_ce());
                out.extend_from_slice(&days.to_be_bytes());
            }
            Self::Interval(micros) => {
                // Microseconds, days, months: durations stay in the first, as text does.
                out.extend_from_slice(&micros.to_be_bytes());
                out.extend_from_slice(&[0; 8]);
            }
            Self::Inet(ip, prefix) => {
                // Family (2 for IPv4, 3 for IPv6 in Postgres' numbering), prefix bits,
                // not a cidr, address length, address.
                let (family, bits, octets): (u8, u8, Vec<u8>) = match ip {
                    IpAddr::V4(v4) => (2, 32, v4.octets().to_vec()),
                    IpAddr::V6(v6) => (3, 128, v6.octets().to_vec()),
                };
                out.extend_from_slice(&[family, prefix.unwrap_or(bits), 0, octets.len() as u8]);
                out.extend_from_slice(&octets);
            }
            Self::Uuid(uuid) => out.extend_from_slice(uuid.as_bytes()),
            Self::Bytea(bytes) => out.extend_from_slice(bytes),
        }
        let len = (out.len() - at - 4) as i32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
}

/// A `timestamptz` value read in `column`'s format.
fn timestamp(column: &Column, v: &Value) -> Option<DateTime<Utc>> {
    let scale = match &column.format {
        TimeFormat::Iso8601 => return parse_timestamp(v.as_str()?),
        TimeFormat::Pattern(p) => {
            let text = v.as_str()?.trim();
            let parsed = DateTime::parse_from_str(text, p)
                .map(|dt| dt.to_utc())
                .or_else(|_| NaiveDateTime::parse_from_str(text, p).map(|n| n.and_utc()))
                .ok()?;
            return (1..=9999).contains(&parsed.year()).then_some(parsed);
        }
        TimeFormat::EpochS => 1e6,
        TimeFormat::EpochMs => 1e3,
        TimeFormat::EpochUs => 1.0,
    };
    let n = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) if column.coerce => s.trim().parse().ok()?,
        _ => return None,
    };
    let micros = n * scale;
    // Within chrono's and Postgres' range (years 1..=9999).
    if !(micros.is_finite() && micros.abs() < 2.5e17) {
        return None;
    }
    let parsed = DateTime::from_timestamp_micros(micros.round() as i64)?;
    (1..=9999).contains(&parsed.year()).then_some(parsed)
}

/// Whether `text` is a plain decimal number, as Postgres `numeric` reads it.
pub(super) fn is_decimal(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match digits.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['-', '+']).unwrap_or(e))),
        None => (digits, None),
    };
    let (whole, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    !(whole.is_empty() && frac.is_empty())
        && all_digits(whole)
        && all_digits(frac)
        && exponent.is_none_or(|e| !e.is_empty() && e.len() <= 4 && all_digits(e))
}

/// Appends bytes as COPY text of a `bytea` (`\x` hex, its backslash escaped).
fn push_bytea(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"\\\\x");
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 15)]);
    }
}

fn nul(column: &Column) -> Rejection {
    Rejection::new(
        ReasonCode::NulInText,
        format!(
            "field `{}` for column `{}` holds a NUL character",
            column.field, column.name
        ),
    )
}

/// `text`, if Postgres text can hold it (no NUL).
fn text<'a>(column: &Column, text: &'a str) -> Result<&'a str, Rejection> {
    if text.contains('\0') {
        return Err(nul(column));
    }
    Ok(text)
}

/// ISO 8601 with or without an offset (none means UTC); `T` or a space between date and time.
pub(crate) fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    let parsed = parse_common_timestamp(text)
        .or_else(|| {
            DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|dt| dt.to_utc())
        })
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z"]
                .iter()
                .find_map(|f| DateTime::parse_from_str(text, f).ok())
                .map(|dt| dt.to_utc())
        })
        .or_else(|| {
            ["%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
                .map(|naive| naive.and_utc())
        })?;
    // Years outside 1..=9999 parse here but are not what a probe timestamp can mean.
    (1..=9999).contains(&parsed.year()).then_some(parsed)
}

/// The common shape, `YYYY-MM-DD[T ]HH:MM:SS[.fraction][Z|+HH:MM|+HHMM|+HH]`, parsed by
/// hand: chrono's format-driven parsers cost several times more, and every probe
/// message carries a timestamp.
fn parse_common_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    let num = |from: usize, to: usize| -> Option<u32> {
        let digits = b.get(from..to)?;
        digits.iter().try_fold(0u32, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if b.len() < 19
        || separators.iter().any(|(i, c)| b[*i] != *c)
        || !matches!(b[10], b'T' | b't' | b' ')
    {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(num(0, 4)? as i32, num(5, 7)?, num(8, 10)?)?;
    let mut i = 19;
    let mut nanos = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start + b[start..].iter().take_while(|d| d.is_ascii_digit()).count();
        let digits = i - start;
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = num(start, i)? * 10u32.pow(9 - digits as u32);
    }
    let time = NaiveTime::from_hms_nano_opt(num(11, 13)?, num(14, 16)?, num(17, 19)?, nanos)?;
    let offset_minutes = match &b[i..] {
        [] | [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (h, m) = match rest {
                [_, _] => (num(i + 1, i + 3)?, 0),
                [_, _, b':', _, _] => (num(i + 1, i + 3)?, num(i + 4, i + 6)?),
                [_, _, _, _] => (num(i + 1, i + 3)?, num(i + 3, i + 5)?),
                _ => return None,
            };
            let minutes = i64::from(h * 60 + m);
            if *sign == b'-' { -minutes } else { minutes }
        }
        _ => return None,
    };
    let utc = NaiveDateTime::new(date, time) - chrono::TimeDelta::try_minutes(offset_minutes)?;
    Some(utc.and_utc())
}

/// `H:MM:SS[.ffffff]` (Python's `str(timedelta)` for durations under a day) -> microseconds.
fn parse_hms(text: &str) -> Option<i64> {
    let mut parts = text.trim().split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || m.len() != 2 {
        return None;
    }
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if !digits(h) || !digits(m) || whole.len() != 2 || !digits(whole) {
        return None;
    }
    if !frac.is_empty() && (!digits(frac) || frac.len() > 6) {
        return None;
    }
    let (h, m, whole): (i64, i64, i64) = (h.parse().ok()?, m.parse().ok()?, whole.parse().ok()?);
    if m > 59 || whole > 59 || h > 1_000_000 {
        return None;
    }
    // The fraction's digits, padded with zeros to six.
    let frac_micros = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(6)
        .fold(0, |n, d| n * 10 + i64::from(d - b'0'));
    Some(((h * 60 + m) * 60 + whole) * 1_000_000 + frac_micros)
}

fn seconds_to_micros(secs: f64) -> Option<i64> {
    // Bounded far below i64 microseconds and Postgres' interval range.
    (secs.is_finite() && (0.0..1e12).contains(&secs)).then(|| (secs * 1e6).round() as i64)
}

/// An IP address, optionally with a prefix length, as Postgres `inet` accepts it.
fn parse_inet(text: &str) -> Option<(IpAddr, Option<u8>)> {
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let ip: IpAddr = addr.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix {
        None => Some((ip, None)),
        Some(p) => {
            let len: u8 = p.parse().ok().filter(|l| *l <= max)?;
            Some((ip, Some(len)))
        }
    }
}

/// Appends `n` as `{n:0width$}` formats it. Writing the digits directly costs a fraction of
/// `fmt`'s machinery, which took most of a timestamp's decoding.
fn push_int(out: &mut Vec<u8>, n: i64, width: usize) {
    let mut digits = [0; 20];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    // Like `fmt`, the sign counts in the width.
    let zeros = width.saturating_sub(usize::from(n < 0) + digits.len() - at);
    out.extend(std::iter::repeat_n(b'0', zeros));
    out.extend_from_slice(&digits[at..]);
}

/// Appends `value`'s text without an intermediate `String`.
fn write_display(out: &mut Vec<u8>, value: impl std::fmt::Display) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{value}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Source;

    fn column(kind: ColumnType) -> Column {
        Column {
            name: "c".into(),
            field: "c".into(),
            source: Source::Field("c".into()),
            kind,
            required: false,
            default: None,
            coerce: false,
            format: TimeFormat::Iso8601,
        }
    }

    /// `(text, binary)` of `v` in `column`.
    fn both(column: &Column, v: &Value) -> Result<(String, Vec<u8>), Rejection> {
        let (mut text, mut binary) = (Vec::new(), Vec::new());
        encode_value(column, v, CopyFormat::Text, &mut text)?;
        encode_value(column, v, CopyFormat::Binary, &mut binary)?;
        Ok((String::from_utf8(text).expect("text"), binary[4..].to_vec()))
    }

    #[test]
    fn float4_rounds_once_from_the_decimal_and_refuses_what_float4in_refuses() {
        let float4 = column(ColumnType::Float4);
        // Just above the tie between 1 and the next float: rounding through f64 first
        // would give 1.
        let (text, binary) =
            both(&float4, &serde_json::json!(1.000_000_059_604_644_8)).expect("fits");
        assert_eq!(text, "1.0000001");
        assert_eq!(binary, 1.000_000_1_f32.to_be_bytes());
        let (_, binary) =
            both(&float4, &serde_json::json!(3.402_823_5e38)).expect("rounds to the largest");
        assert_eq!(binary, f32::MAX.to_be_bytes());
        for out_of_range in [serde_json::json!(1e-46), serde_json::json!(1e39)] {
            assert!(both(&float4, &out_of_range).is_err(), "{out_of_range}");
        }
        assert!(both(&float4, &serde_json::json!(0.0)).is_ok());
    }

    #[test]
    fn push_int_formats_as_fmt_pads_with_zeros() {
        for n in [
            0,
            1,
            9,
            10,
            59,
            999_999,
            -1,
            -5,
            -123_456,
            i64::MAX,
            i64::MIN,
        ] {
            for width in [0, 1, 2, 4, 6, 20, 21] {
                let mut out = Vec::new();
                push_int(&mut out, n, width);
                assert_eq!(out, format!("{n:0width$}").into_bytes(), "{n} {width}");
            }
        }
    }

    #[test]
    fn a_leap_second_is_the_last_microsecond_of_its_minute_in_both_formats() {
        let ts = column(ColumnType::Timestamptz);
        let (text, binary) = both(&ts, &serde_json::json!("2016-12-31T23:59:60.5Z")).expect("fits");
        assert_eq!(text, "2016-12-31 23:59:59.999999+00");
        let last = DateTime::parse_from_rfc3339("2016-12-31T23:59:59.999999Z")
            .expect("valid")
            .timestamp_micros();
        assert_eq!(binary, (last - POSTGRES_EPOCH_MICROS).to_be_bytes());
    }
}
