//! Values in the Confluent wire format: byte 0, the writer schema's id (4 bytes,
//! big-endian), then the payload in the schema's format (an Avro datum; Protobuf message
//! indexes and a message; JSON text).
//!
//! Writer schemas come from a [`SchemaCache`] that the pipeline fills from the registry
//! before it decodes a batch: decoding never waits on the network, and an id the cache
//! does not hold is one the registry does not know.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{Datelike, NaiveDate};
use serde_json::Value;

use super::avro::AvroSchema;
use crate::config::ColumnType;
use super::json_schema::JsonSchema;
use super::protobuf::ProtoSchema;
use crate::config::ValueFormat;

/// The magic byte that starts a value in the Confluent wire format.
const MAGIC: u8 = 0;

/// A writer schema as the registry gave it, ready to decode with.
pub enum WriterSchema {
    Avro(Arc<AvroSchema>),
    Protobuf(Arc<ProtoSchema>),
    JsonSchema(Arc<JsonSchema>),
}

impl fmt::Debug for WriterSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WriterSchema({})", self.kind())
    }
}

/// A schema reference as the registry names it (the name a schema imports it by) and
/// its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referenced {
    pub name: String,
    pub text: String,
}

impl WriterSchema {
    /// Parses schema `id` of the registry's `kind` (`AVRO`, `PROTOBUF` or `JSON`) from
    /// its text and the schemas it references (dependencies first).
    pub fn parse(
        id: u32,
        kind: &str,
        text: &str,
        references: &[Referenced],
    ) -> Result<Self, String> {
        match kind.to_ascii_uppercase().as_str() {
            "AVRO" => AvroSchema::parse(text, references).map(|s| Self::Avro(Arc::new(s))),
            "PROTOBUF" => {
                ProtoSchema::parse(id, text, references).map(|s| Self::Protobuf(Arc::new(s)))
            }
            "JSON" => JsonSchema::parse(text, references).map(|s| Self::JsonSchema(Arc::new(s))),
            other => Err(format!("a schema of type {other} is not read")),
        }
    }

    /// The top-level fields of the schema's record (for Protobuf, of its first
    /// message; for JSON Schema, the properties of its object), each with the column type
    /// that holds it, as `schema --from-registry` prints them.
    pub fn fields(&self) -> Result<Vec<Field>, String> {
        match self {
            Self::Avro(schema) => schema.fields(),
            Self::Protobuf(schema) => Ok(schema.fields()),
            Self::JsonSchema(schema) => schema.fields(),
        }
    }

    /// The registry's name of its type.
    fn kind(&self) -> &'static str {
        match self {
            Self::Avro(_) => "AVRO",
            Self::Protobuf(_) => "PROTOBUF",
            Self::JsonSchema(_) => "JSON",
        }
    }

    fn format(&self) -> ValueFormat {
        match self {
            Self::Avro(_) => ValueFormat::Avro,
            Self::Protobuf(_) => ValueFormat::Protobuf,
            Self::JsonSchema(_) => ValueFormat::JsonSchema,
        }
    }
}

/// A top-level field of a schema and the column type that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// Another name a column may read it by (a Protobuf field's JSON name).
    pub json_name: Option<String>,
    pub kind: ColumnType,
    /// Whether every value has it (not nullable, not optional).
    pub required: bool,
}

/// Writer schemas by id and the format they were asked for in (a Protobuf one is
/// fetched as a serialized descriptor, the others as text: a route of another format
/// carrying the same id gets its own answer), as the registry answered.
#[derive(Debug, Default)]
pub struct SchemaCache {
    entries: RwLock<HashMap<(u32, ValueFormat), Lookup>>,
}

/// What the registry said of a schema id.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Arc<WriterSchema>),
    /// The registry does not know the id, or its schema is not read: why, and when it
    /// said so.
    Unknown(String, Instant),
}

impl Lookup {
    pub fn unknown(why: String) -> Self {
        Self::Unknown(why, Instant::now())
    }
}

/// How long an unknown id stays unknown before the registry is asked again: a schema
/// registered after a record that uses it reached a lagging replica first.
const UNKNOWN_FOR: Duration = Duration::from_secs(30);

impl SchemaCache {
    /// What the registry said of `id` asked for in `format`, unless it said "unknown"
    /// too long ago.
    pub fn get(&self, id: u32, format: ValueFormat) -> Option<Lookup> {
        self.entries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&(id, format))
            .filter(|l| !matches!(l, Lookup::Unknown(_, at) if at.elapsed() > UNKNOWN_FOR))
            .cloned()
    }

    pub fn insert(&self, id: u32, format: ValueFormat, lookup: Lookup) {
        self.entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert((id, format), lookup);
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
}

/// The writer schema of a framed value, which must be of `format`, and its payload.
pub(super) fn writer<'a>(
    cache: &SchemaCache,
    format: ValueFormat,
    bytes: &'a [u8],
) -> Result<(u32, Arc<WriterSchema>, &'a [u8]), Failure> {
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
    match cache.get(id, format) {
        Some(Lookup::Found(schema)) if schema.format() == format => Ok((id, schema, &bytes[5..])),
        Some(Lookup::Found(schema)) => Err(Failure::UnknownSchema(format!(
            "schema id {id} is a {} schema, and the route reads {}",
            schema.kind(),
            format.name()
        ))),
        Some(Lookup::Unknown(why, _)) => Err(Failure::UnknownSchema(why)),
        None => Err(Failure::UnknownSchema(format!(
            "schema id {id} was not fetched from the registry"
        ))),
    }
}

/// The tokens of a JSON pointer (`/a/b~1c/0` -> `a`, `b/c`, `0`); `None` for text that
/// is not one. The empty pointer has no tokens: it is the whole value.
pub(crate) fn pointer_tokens(pointer: &str) -> Option<Vec<String>> {
    if pointer.is_empty() {
        return Some(Vec::new());
    }
    Some(
        pointer
            .strip_prefix('/')?
            .split('/')
            .map(|token| token.replace("~1", "/").replace("~0", "~"))
            .collect(),
    )
}

/// A JSON number, or the text of a float JSON cannot hold (`NaN`, `inf`), which no
/// numeric column takes.
pub(super) fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

/// Within years 1 to 9999, which Postgres' text form and the JSON path take.
pub(super) fn in_years(date: NaiveDate) -> bool {
    (1..=9999).contains(&date.year())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_magic_byte_zero_with_a_full_id_is_framed() {
        assert_eq!(schema_id(&[0, 0, 0, 1, 7, 2]), Some(263));
        assert_eq!(schema_id(&[0, 0, 0, 1]), None);
        assert_eq!(schema_id(b"{\"a\": 1}"), None);
        assert_eq!(schema_id(&[]), None);
    }

    #[test]
    fn a_schema_of_another_format_than_the_routes_is_unknown() {
        let cache = SchemaCache::default();
        let schema = WriterSchema::parse(3, "JSON", r#"{"type": "object"}"#, &[]).expect("parses");
        let schema = Arc::new(schema);
        // The registry's answer to either route: the JSON schema.
        cache.insert(3, ValueFormat::JsonSchema, Lookup::Found(schema.clone()));
        cache.insert(3, ValueFormat::Avro, Lookup::Found(schema));
        let framed = [0, 0, 0, 0, 3, b'{', b'}'];
        assert!(writer(&cache, ValueFormat::JsonSchema, &framed).is_ok());
        let Err(Failure::UnknownSchema(why)) = writer(&cache, ValueFormat::Avro, &framed) else {
            panic!("a JSON schema read as avro is unknown")
        };
        assert_eq!(why, "schema id 3 is a JSON schema, and the route reads avro");
    }

    #[test]
    fn pointer_tokens_unescape_and_refuse_relative_text() {
        assert_eq!(pointer_tokens(""), Some(vec![]));
        assert_eq!(
            pointer_tokens("/a/b~1c/~01"),
            Some(vec!["a".to_owned(), "b/c".to_owned(), "~1".to_owned()])
        );
        assert_eq!(pointer_tokens("a/b"), None);
    }
}
