//! One JSON value -> one COPY text field of a given column type.
//!
//! Each type is validated here, before Postgres sees it, so that a bad field becomes a
//! precise dead letter instead of a failed COPY that has to be bisected.

use std::net::IpAddr;

use std::io::Write;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};
use serde_json::Value;

use super::{ReasonCode, Rejection, push_escaped};
use crate::config::{ColumnMapping, ColumnType};

/// Appends the COPY text of `v` for `mapping`'s column, or says why it does not fit.
pub(super) fn encode(
    mapping: &ColumnMapping,
    v: &Value,
    out: &mut Vec<u8>,
) -> Result<(), Rejection> {
    let bad = |what: &str| {
        Rejection::new(
            mapping.kind.bad_value_code(),
            format!(
                "field `{}` for column `{}` ({:?}): {what}",
                mapping.field, mapping.column, mapping.kind
            ),
        )
    };
    match mapping.kind {
        ColumnType::Text => match v {
            Value::String(s) => push_text(mapping, s, out)?,
            Value::Number(n) => write_display(out, n),
            Value::Bool(b) => write_display(out, b),
            _ => return Err(bad("expected a string")),
        },
        ColumnType::Int2 | ColumnType::Int4 | ColumnType::Int8 => {
            let (lo, hi) = match mapping.kind {
                ColumnType::Int2 => (i16::MIN as i64, i16::MAX as i64),
                ColumnType::Int4 => (i32::MIN as i64, i32::MAX as i64),
                _ => (i64::MIN, i64::MAX),
            };
            let n = v
                .as_i64()
                .filter(|n| (lo..=hi).contains(n))
                .ok_or_else(|| bad(&format!("expected an integer in {lo}..={hi}, got {v}")))?;
            write_display(out, n);
        }
        ColumnType::Float8 => {
            let n = v.as_f64().ok_or_else(|| bad("expected a number"))?;
            write_display(out, n);
        }
        ColumnType::Bool => {
            let b = v.as_bool().ok_or_else(|| bad("expected true or false"))?;
            out.push(if b { b't' } else { b'f' });
        }
        ColumnType::Timestamptz => {
            let text = v
                .as_str()
                .ok_or_else(|| bad("expected an ISO 8601 string"))?;
            let ts = parse_timestamp(text)
                .ok_or_else(|| bad(&format!("`{text}` is not an ISO 8601 timestamp")))?;
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
        ColumnType::Jsonb => {
            let text = v.to_string();
            // Postgres jsonb cannot hold \u0000 either.
            if text.contains("\\u0000") {
                return Err(nul(mapping));
            }
            push_text(mapping, &text, out)?;
        }
    }
    Ok(())
}

fn nul(mapping: &ColumnMapping) -> Rejection {
    Rejection::new(
        ReasonCode::NulInText,
        format!(
            "field `{}` for column `{}` holds a NUL character",
            mapping.field, mapping.column
        ),
    )
}

fn push_text(mapping: &ColumnMapping, text: &str, out: &mut Vec<u8>) -> Result<(), Rejection> {
    if text.contains('\0') {
        return Err(nul(mapping));
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
