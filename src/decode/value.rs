//! One JSON value -> one COPY text field of a given column type.
//!
//! Each type is validated here, before Postgres sees it, so that a bad field becomes a
//! precise dead letter instead of a failed COPY that has to be bisected.

use std::io::Write;
use std::net::IpAddr;

use base64::Engine;
use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};
use serde_json::Value;

use super::{ReasonCode, Rejection, push_escaped};
use crate::config::ColumnType;
use crate::route::{Column, TimeFormat};

/// A column's value as found in the record.
#[derive(Debug, Clone, Copy)]
pub(super) enum Input<'a> {
    /// A part of the JSON value or key.
    Json(&'a Value),
    /// Text of the record (its topic).
    Str(&'a str),
    /// A number of the record (partition, offset, timestamp).
    Int(i64),
    /// Raw bytes (the key, a header).
    Bytes(&'a [u8]),
}

impl Input<'_> {
    pub(super) fn is_null(&self) -> bool {
        matches!(self, Self::Json(Value::Null))
    }
}

/// Appends the COPY text of `input` for `column`, or says why it does not fit.
pub(super) fn encode(column: &Column, input: Input, out: &mut Vec<u8>) -> Result<(), Rejection> {
    match input {
        Input::Json(v) => encode_value(column, v, out),
        Input::Str(s) if column.kind == ColumnType::Text => push_text(column, s, out),
        Input::Str(s) => encode_value(column, &Value::String(s.to_owned()), out),
        Input::Int(n) => encode_value(column, &Value::from(n), out),
        Input::Bytes(b) if column.kind == ColumnType::Bytea => {
            push_bytea(out, b);
            Ok(())
        }
        Input::Bytes(b) => match std::str::from_utf8(b) {
            Ok(text) => encode(column, Input::Str(text), out),
            Err(e) => Err(bad(column, &format!("bytes are not UTF-8 text: {e}"))),
        },
    }
}

fn bad(column: &Column, what: &str) -> Rejection {
    Rejection::new(
        column.kind.bad_value_code(),
        format!(
            "field `{}` for column `{}` ({:?}): {what}",
            column.field, column.name, column.kind
        ),
    )
}

/// Appends the COPY text of a JSON value for `column`, or says why it does not fit.
pub(crate) fn encode_value(column: &Column, v: &Value, out: &mut Vec<u8>) -> Result<(), Rejection> {
    let bad = |what: &str| bad(column, what);
    // With `coerce`, a string may stand for a number or a boolean.
    let coerced = || column.coerce.then(|| v.as_str().map(str::trim)).flatten();
    match column.kind {
        ColumnType::Text => match v {
            Value::String(s) => push_text(column, s, out)?,
            Value::Number(n) => write_display(out, n),
            Value::Bool(b) => write_display(out, b),
            Value::Array(_) | Value::Object(_) if column.coerce => {
                push_text(column, &v.to_string(), out)?;
            }
            _ => return Err(bad("expected a string")),
        },
        ColumnType::Int2 | ColumnType::Int4 | ColumnType::Int8 => {
            let (lo, hi) = match column.kind {
                ColumnType::Int2 => (i16::MIN as i64, i16::MAX as i64),
                ColumnType::Int4 => (i32::MIN as i64, i32::MAX as i64),
                _ => (i64::MIN, i64::MAX),
            };
            let n = v
                .as_i64()
                .or_else(|| coerced()?.parse().ok())
                .filter(|n| (lo..=hi).contains(n))
                .ok_or_else(|| bad(&format!("expected an integer in {lo}..={hi}, got {v}")))?;
            write_display(out, n);
        }
        ColumnType::Float4 | ColumnType::Float8 => {
            let max = if column.kind == ColumnType::Float4 {
                f64::from(f32::MAX)
            } else {
                f64::MAX
            };
            let n = v
                .as_f64()
                .or_else(|| coerced()?.parse().ok())
                .filter(|n: &f64| n.is_finite() && n.abs() <= max)
                .ok_or_else(|| bad(&format!("expected a finite number, got {v}")))?;
            write_display(out, n);
        }
        ColumnType::Numeric => match v {
            Value::Number(n) => write_display(out, n),
            _ => match coerced().filter(|s| is_decimal(s)) {
                Some(text) => out.extend_from_slice(text.as_bytes()),
                None => return Err(bad(&format!("expected a number, got {v}"))),
            },
        },
        ColumnType::Bool => {
            let b = v
                .as_bool()
                .or_else(|| match coerced()?.to_ascii_lowercase().as_str() {
                    "true" | "t" | "yes" | "y" | "1" => Some(true),
                    "false" | "f" | "no" | "n" | "0" => Some(false),
                    _ => None,
                })
                .ok_or_else(|| bad(&format!("expected true or false, got {v}")))?;
            out.push(if b { b't' } else { b'f' });
        }
        ColumnType::Timestamptz => {
            let ts = timestamp(column, v).ok_or_else(|| {
                bad(&format!(
                    "`{v}` is not a timestamp in format {:?}",
                    column.format
                ))
            })?;
            let _ = write!(
                out,
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
                ts.year(),
                ts.month(),
                ts.day(),
                ts.hour(),
                ts.minute(),
                ts.second(),
                ts.timestamp_subsec_micros().min(999_999)
            );
        }
        ColumnType::Date => {
            let pattern = match &column.format {
                TimeFormat::Pattern(p) => p.as_str(),
                _ => "%Y-%m-%d",
            };
            let date = v
                .as_str()
                .and_then(|s| NaiveDate::parse_from_str(s.trim(), pattern).ok())
                .filter(|d| (1..=9999).contains(&d.year()))
                .ok_or_else(|| bad(&format!("`{v}` is not a date in format {pattern}")))?;
            let _ = write!(out, "{}", date.format("%Y-%m-%d"));
        }
        ColumnType::Interval => {
            let micros = match v {
                Value::String(s) => parse_hms(s),
                Value::Number(n) => n.as_f64().and_then(seconds_to_micros),
                _ => None,
            }
            .ok_or_else(|| {
                bad(&format!(
                    "`{v}` is not H:MM:SS[.ffffff] or a number of seconds"
                ))
            })?;
            let (secs, frac) = (micros / 1_000_000, micros % 1_000_000);
            let _ = write!(
                out,
                "{}:{:02}:{:02}.{frac:06}",
                secs / 3600,
                secs / 60 % 60,
                secs % 60
            );
        }
        ColumnType::Inet => {
            let text = v
                .as_str()
                .ok_or_else(|| bad("expected an IP address string"))?;
            let (ip, prefix) =
                parse_inet(text).ok_or_else(|| bad(&format!("`{text}` is not an IP address")))?;
            match prefix {
                Some(len) => write_display(out, format_args!("{ip}/{len}")),
                None => write_display(out, ip),
            }
        }
        ColumnType::Uuid => {
            let uuid = v
                .as_str()
                .and_then(|s| uuid::Uuid::try_parse(s.trim()).ok())
                .ok_or_else(|| bad(&format!("`{v}` is not a UUID")))?;
            write_display(out, uuid.hyphenated());
        }
        ColumnType::Jsonb => {
            let text = v.to_string();
            // Postgres jsonb cannot hold \u0000 either.
            if text.contains("\\u0000") {
                return Err(nul(column));
            }
            push_text(column, &text, out)?;
        }
        ColumnType::Bytea => {
            let bytes = v
                .as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .ok_or_else(|| bad(&format!("`{v}` is not base64 text")))?;
            push_bytea(out, &bytes);
        }
    }
    Ok(())
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
fn is_decimal(text: &str) -> bool {
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

fn push_text(column: &Column, text: &str, out: &mut Vec<u8>) -> Result<(), Rejection> {
    if text.contains('\0') {
        return Err(nul(column));
    }
    push_escaped(out, text);
    Ok(())
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
    let frac_micros: i64 = format!("{frac:0<6}").parse().ok()?;
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

/// Appends `value`'s text without an intermediate `String`.
fn write_display(out: &mut Vec<u8>, value: impl std::fmt::Display) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{value}");
}
