//! The shape of a route: which topics go to which table, and where each column's value
//! comes from. Resolving a configuration into routes is `crate::routes`.

use regex::Regex;
use serde_json::Value;

use crate::config::{ColumnType, Envelope, KeyFormat, OnTruncate, ValueFormat, WriteMode};

/// Where a column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A top-level field of the JSON value.
    Field(String),
    /// A JSON pointer into the value.
    Pointer(String),
    /// The whole JSON value.
    Value,
    /// The record key: its bytes for `bytea`, else its UTF-8 text.
    Key,
    /// A JSON pointer into the record key parsed as JSON, or decoded in the route's
    /// registry `key_format` (`""`: the whole key).
    KeyJson(String),
    /// The value of the last header of this name.
    Header(String),
    /// The Kafka timestamp, in milliseconds since the epoch.
    Timestamp,
    Topic,
    Partition,
    Offset,
    /// A Debezium event's `op` (c, r, u, d).
    Op,
    /// A JSON pointer into a Debezium event's `source` block (`@source:/lsn`).
    EventMeta(String),
}

impl Source {
    /// Parses a column's `field`.
    pub fn parse(field: &str) -> Result<Self, String> {
        let Some(meta) = field.strip_prefix('@') else {
            return match field {
                "" => Err("is empty: give a field name, a JSON pointer (/a/b) or @metadata".into()),
                f if f.starts_with('/') => Ok(Self::Pointer(f.to_owned())),
                f => Ok(Self::Field(f.to_owned())),
            };
        };
        match meta.split_once(':') {
            None if meta == "value" => Ok(Self::Value),
            None if meta == "key" => Ok(Self::Key),
            None if meta == "timestamp" => Ok(Self::Timestamp),
            None if meta == "topic" => Ok(Self::Topic),
            None if meta == "partition" => Ok(Self::Partition),
            None if meta == "offset" => Ok(Self::Offset),
            None if meta == "op" => Ok(Self::Op),
            Some(("source", p)) if p.starts_with('/') => Ok(Self::EventMeta(p.to_owned())),
            Some(("key_json", p)) if p.is_empty() || p.starts_with('/') => {
                Ok(Self::KeyJson(p.to_owned()))
            }
            Some(("header", name)) if !name.is_empty() => Ok(Self::Header(name.to_owned())),
            _ => Err(format!(
                "`{field}` is not a source: give a field name, a JSON pointer (/a/b/0), @value, \
                 @key, @key_json:/pointer, @header:name, @timestamp, @topic, @partition, @offset, or \
                 with envelope: debezium @op or @source:/pointer"
            )),
        }
    }

    /// Whether the value comes from the record's value, which a tombstone lacks.
    pub fn reads_value(&self) -> bool {
        matches!(
            self,
            Self::Field(_) | Self::Pointer(_) | Self::Value | Self::Op | Self::EventMeta(_)
        )
    }

    /// The object keys this source reads from the value, outermost first.
    pub(crate) fn value_keys(&self) -> Vec<&str> {
        match self {
            Self::Field(f) => vec![f],
            Self::Pointer(p) => p[1..].split('/').collect(),
            _ => Vec::new(),
        }
    }
}

/// How `timestamptz` and `date` values are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeFormat {
    /// ISO 8601 / RFC 3339 text (no offset means UTC).
    Iso8601,
    /// A number of seconds, milliseconds or microseconds since the epoch.
    EpochS,
    EpochMs,
    EpochUs,
    /// A chrono strftime pattern.
    Pattern(String),
}

impl std::fmt::Display for TimeFormat {
    /// As a column's `format` names it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Iso8601 => f.write_str("iso8601"),
            Self::EpochS => f.write_str("epoch_s"),
            Self::EpochMs => f.write_str("epoch_ms"),
            Self::EpochUs => f.write_str("epoch_us"),
            Self::Pattern(p) => write!(f, "`{p}`"),
        }
    }
}

/// One mapped column, resolved.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// The `field` as configured, for messages.
    pub field: String,
    pub source: Source,
    pub kind: ColumnType,
    /// Absent or null without a default is a `missing_field` dead letter.
    pub required: bool,
    pub default: Option<Value>,
    pub coerce: bool,
    pub format: TimeFormat,
}

/// Which topics a route reads.
#[derive(Debug, Clone)]
pub(crate) enum Topics {
    Named(Vec<String>),
    /// The pattern as configured without anchors, and its anchored regex.
    Matching(String, Regex),
}

/// One topic (or set of topics) into one table.
#[derive(Debug, Clone)]
pub struct Route {
    /// The configuration key of the route: `routes[N]`, or `sink` for the implicit one.
    pub key: String,
    /// `schema.table` as configured.
    pub table: String,
    /// The schema and table names, taken literally.
    pub schema_name: String,
    pub table_name: String,
    pub mode: WriteMode,
    /// The unique key of an upsert.
    pub key_columns: Vec<String>,
    pub delete_on_tombstone: bool,
    /// How record values are encoded.
    pub format: ValueFormat,
    /// How record keys are encoded (what `@key_json:` reads).
    pub key_format: KeyFormat,
    pub envelope: Envelope,
    pub on_truncate: OnTruncate,
    /// The column ordering versions of a key, for an upsert.
    pub version: Option<String>,
    pub columns: Vec<Column>,
    pub(crate) topics: Topics,
}

impl Route {
    /// Whether records of `topic` go through this route.
    pub fn matches(&self, topic: &str) -> bool {
        match &self.topics {
            Topics::Named(names) => names.iter().any(|t| t == topic),
            Topics::Matching(_, regex) => regex.is_match(topic),
        }
    }

    /// The columns of the source coordinates (`@topic`, `@partition`, `@offset`).
    pub fn coordinates(&self) -> Option<[&str; 3]> {
        let find = |source: Source| {
            self.columns
                .iter()
                .find(|c| c.source == source)
                .map(|c| c.name.as_str())
        };
        Some([
            find(Source::Topic)?,
            find(Source::Partition)?,
            find(Source::Offset)?,
        ])
    }

    /// The columns recording where a row's record sat in Kafka (`@partition`, `@offset`,
    /// and `@topic`, which a route reading more than one topic needs): an upsert compares
    /// them to never put an older record of a partition over a newer one.
    pub fn source_version(&self) -> Option<SourceVersion<'_>> {
        let find = |source: Source| {
            self.columns
                .iter()
                .find(|c| c.source == source)
                .map(|c| c.name.as_str())
        };
        let topic = find(Source::Topic);
        // Offsets order records within one partition of one topic only.
        let one_topic = matches!(&self.topics, Topics::Named(names) if names.len() == 1);
        if topic.is_none() && !one_topic {
            return None;
        }
        Some(SourceVersion {
            topic,
            partition: find(Source::Partition)?,
            offset: find(Source::Offset)?,
        })
    }

    /// Whether an upsert can tell an older record of a key from a newer one: by its
    /// `version` column, or by the source coordinates within a partition. A replay or a
    /// re-drive into one that cannot would put older versions over newer ones.
    pub fn orders_versions(&self) -> bool {
        self.version.is_some() || self.source_version().is_some()
    }

    /// Whether `column` belongs to the upsert key.
    pub fn is_key(&self, column: &str) -> bool {
        self.key_columns.iter().any(|k| k == column)
    }

    /// Where the route reads from, for messages.
    /// The first topic the route names; `None` for a regex route.
    pub fn named_topic(&self) -> Option<&String> {
        match &self.topics {
            Topics::Named(names) => names.first(),
            Topics::Matching(..) => None,
        }
    }

    pub fn topics_label(&self) -> String {
        match &self.topics {
            Topics::Named(names) => names.join(","),
            Topics::Matching(pattern, _) => format!("/{pattern}/"),
        }
    }
}

/// The columns of a route that record a row's source position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceVersion<'a> {
    pub topic: Option<&'a str>,
    pub partition: &'a str,
    pub offset: &'a str,
}
