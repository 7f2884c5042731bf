//! Protobuf messages: the payload of a framed value (see [`super::framed`]) is the
//! message indexes (which message of the schema's file, as a path through nested
//! messages) and then the message.
//!
//! Schemas come from the registry as serialized descriptors (`?format=serialized`, a
//! base64 `FileDescriptorProto`), with the well-known types built in. A column's `field`
//! addresses the message as it addresses JSON (a field name, or a JSON pointer through
//! messages, maps and repeated fields). Well-known types keep their meaning: a
//! `Timestamp` is an instant, a `Duration` an interval, a wrapper its value. A field
//! that tracks presence (a message, `optional`, a oneof member) and is unset is null; a
//! proto3 scalar without presence that is unset holds its default, as on the wire.

use std::borrow::Cow;
use std::fmt;

use base64::Engine;
use chrono::DateTime;
use prost_reflect::prost::Message as _;
use prost_reflect::prost_types::FileDescriptorProto;
use prost_reflect::{
    DescriptorPool, DynamicMessage, Kind, MapKey, MessageDescriptor, ReflectMessage as _, Value,
};
use serde_json::Value as Json;

use super::Addressed;
use super::framed::{Field, Referenced, float, in_years, pointer_tokens};
use crate::config::ColumnType;
use super::value::Input;

/// The most message indexes a value may carry: a path deeper than any schema nests.
const MAX_INDEXES: u64 = 64;

/// A Protobuf schema: one file, its dependencies resolved.
pub struct ProtoSchema {
    /// The file's top-level messages.
    messages: Vec<MessageDescriptor>,
}

impl fmt::Debug for ProtoSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtoSchema").finish_non_exhaustive()
    }
}

/// A serialized `FileDescriptorProto` from its base64 text.
fn descriptor(text: &str) -> Result<FileDescriptorProto, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| {
            "the registry answered the schema as .proto text, not a serialized descriptor: \
             it must serve ?format=serialized (Confluent Schema Registry does)"
                .to_owned()
        })?;
    FileDescriptorProto::decode(bytes.as_slice())
        .map_err(|e| format!("the serialized descriptor does not decode: {e}"))
}

impl ProtoSchema {
    /// Builds schema `id` from its serialized descriptor and those of the files it
    /// imports (dependencies first, each named as it is imported).
    pub fn parse(id: u32, text: &str, references: &[Referenced]) -> Result<Self, String> {
        let mut pool = DescriptorPool::global();
        for reference in references {
            if pool.get_file_by_name(&reference.name).is_some() {
                continue;
            }
            let mut file = descriptor(&reference.text)
                .map_err(|e| format!("its reference {}: {e}", reference.name))?;
            file.name = Some(reference.name.clone());
            pool.add_file_descriptor_proto(file)
                .map_err(|e| format!("its reference {}: {e}", reference.name))?;
        }
        let mut file = descriptor(text)?;
        // Nothing imports the schema itself: a name of its own keeps it from clashing
        // with one of its references or a well-known type.
        let name = format!("schema-registry/{id}.proto");
        file.name = Some(name.clone());
        pool.add_file_descriptor_proto(file)
            .map_err(|e| e.to_string())?;
        check_map_entries(&pool)?;
        check_names(&pool)?;
        let file = pool.get_file_by_name(&name).ok_or("the schema's file is missing")?;
        let messages: Vec<MessageDescriptor> = file.messages().collect();
        if messages.is_empty() {
            return Err("the schema defines no message".to_owned());
        }
        Ok(Self { messages })
    }

    /// The fields of the schema's first message.
    pub(super) fn fields(&self) -> Vec<Field> {
        self.messages[0]
            .fields()
            .map(|field| {
                let kind = field.kind();
                let wrapped = match &kind {
                    Kind::Message(m) => m.full_name().strip_prefix("google.protobuf."),
                    _ => None,
                };
                let column = match (field.is_list() || field.is_map(), &kind, wrapped) {
                    (true, ..) => ColumnType::Jsonb,
                    (_, _, Some("Timestamp")) => ColumnType::Timestamptz,
                    (_, _, Some("Duration")) => ColumnType::Interval,
                    (_, _, Some("DoubleValue")) => ColumnType::Float8,
                    (_, _, Some("FloatValue")) => ColumnType::Float4,
                    (_, _, Some("Int64Value" | "UInt32Value")) => ColumnType::Int8,
                    (_, _, Some("Int32Value")) => ColumnType::Int4,
                    (_, _, Some("UInt64Value")) => ColumnType::Numeric,
                    (_, _, Some("BoolValue")) => ColumnType::Bool,
                    (_, _, Some("StringValue")) => ColumnType::Text,
                    (_, _, Some("BytesValue")) => ColumnType::Bytea,
                    (_, Kind::Double, _) => ColumnType::Float8,
                    (_, Kind::Float, _) => ColumnType::Float4,
                    (_, Kind::Int32 | Kind::Sint32 | Kind::Sfixed32, _) => ColumnType::Int4,
                    (_, Kind::Int64 | Kind::Sint64 | Kind::Sfixed64, _) => ColumnType::Int8,
                    (_, Kind::Uint32 | Kind::Fixed32, _) => ColumnType::Int8,
                    (_, Kind::Uint64 | Kind::Fixed64, _) => ColumnType::Numeric,
                    (_, Kind::Bool, _) => ColumnType::Bool,
                    (_, Kind::String | Kind::Enum(_), _) => ColumnType::Text,
                    (_, Kind::Bytes, _) => ColumnType::Bytea,
                    (_, Kind::Message(_), _) => ColumnType::Jsonb,
                };
                Field {
                    name: field.name().to_owned(),
                    json_name: Some(field.json_name().to_owned()),
                    kind: column,
                    // Unset, a field with presence is NULL; a proto3 scalar its default.
                    required: !field.supports_presence(),
                }
            })
            .collect()
    }

    /// Decodes a payload: message indexes, then the message they name.
    fn decode(&self, payload: &[u8]) -> Result<DynamicMessage, String> {
        let mut rest = payload;
        let indexes = message_indexes(&mut rest)?;
        let mut message = self
            .messages
            .get(indexes[0])
            .ok_or_else(|| {
                format!(
                    "message index {} is beyond the schema's {} top-level messages",
                    indexes[0],
                    self.messages.len()
                )
            })?
            .clone();
        for &index in &indexes[1..] {
            let child = message.child_messages().nth(index).ok_or_else(|| {
                format!(
                    "message index {index} is beyond the nested messages of {}",
                    message.full_name()
                )
            })?;
            message = child;
        }
        DynamicMessage::decode(message.clone(), rest)
            .map_err(|e| format!("not a {} message: {e}", message.full_name()))
    }
}

/// Refuses a map entry message without its key (field 1, of a kind a map key may have) and
/// value (field 2), each singular: the descriptor pool does not check them, and decoding
/// a map of such an entry would panic.
fn check_map_entries(pool: &DescriptorPool) -> Result<(), String> {
    for entry in pool.all_messages().filter(MessageDescriptor::is_map_entry) {
        let key = entry.get_field(1).filter(|k| {
            !k.is_list()
                && matches!(
                    k.kind(),
                    Kind::Int32
                        | Kind::Int64
                        | Kind::Uint32
                        | Kind::Uint64
                        | Kind::Sint32
                        | Kind::Sint64
                        | Kind::Fixed32
                        | Kind::Fixed64
                        | Kind::Sfixed32
                        | Kind::Sfixed64
                        | Kind::Bool
                        | Kind::String
                )
        });
        let value = entry.get_field(2).filter(|v| !v.is_list());
        if key.is_none() || value.is_none() || entry.fields().len() != 2 {
            return Err(format!(
                "map entry {} does not have a key (field 1, an integer, bool or string) and a \
                 value (field 2) alone",
                entry.full_name()
            ));
        }
    }
    Ok(())
}

/// Refuses a field or enum value name longer than [`MAX_NAME_BYTES`].
fn check_names(pool: &DescriptorPool) -> Result<(), String> {
    let fields = pool
        .all_messages()
        .flat_map(|m| m.fields().map(|f| f.name().len()).collect::<Vec<_>>());
    let values = pool
        .all_enums()
        .flat_map(|e| e.values().map(|v| v.name().len()).collect::<Vec<_>>());
    match fields.chain(values).max() {
        Some(longest) if longest > MAX_NAME_BYTES => Err(format!(
            "a name of {longest} bytes, above {MAX_NAME_BYTES}"
        )),
        _ => Ok(()),
    }
}

/// Reads the message indexes that start a payload: a count, then that many indexes, each
/// a zigzag varint; a count of 0 stands for the one index 0 (the first message).
fn message_indexes(rest: &mut &[u8]) -> Result<Vec<usize>, String> {
    let mut next = |what: &str| -> Result<i64, String> {
        let raw = prost_reflect::prost::encoding::decode_varint(rest)
            .map_err(|_| format!("the message indexes end early or are corrupt ({what})"))?;
        Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
    };
    let count = next("their count")?;
    if count == 0 {
        return Ok(vec![0]);
    }
    if !(1..=MAX_INDEXES as i64).contains(&count) {
        return Err(format!(
            "{count} message indexes, outside 1 to {MAX_INDEXES}"
        ));
    }
    (0..count)
        .map(|_| {
            let index = next("an index")?;
            usize::try_from(index).map_err(|_| format!("message index {index} is negative"))
        })
        .collect()
}

/// A decoded message.
#[derive(Debug)]
pub(super) struct Decoded {
    message: DynamicMessage,
    /// The payload's length, which bounds the JSON made of it.
    payload_bytes: usize,
}

/// The longest field or enum value name a schema may have: with a 1-byte enum item, the
/// JSON of a message grows by its name per byte of the wire.
const MAX_NAME_BYTES: usize = 256;

/// How much JSON a message may still become: 64 bytes per byte of its payload (a field
/// name of tens of bytes per two-byte field; proto3 defaults left out), and 64 KiB more.
struct Budget(std::cell::Cell<usize>);

impl Budget {
    fn new(payload_bytes: usize) -> Self {
        Self(std::cell::Cell::new(payload_bytes.saturating_mul(64) + (64 << 10)))
    }

    fn spend(&self, bytes: usize) -> Result<(), String> {
        let left = self.0.get().checked_sub(bytes).ok_or_else(|| {
            "its JSON would be over 64 times the message's size, which is not written".to_owned()
        })?;
        self.0.set(left);
        Ok(())
    }
}

/// A part of a decoded message.
pub(super) enum Part<'a> {
    /// A message: the whole value, or one within it.
    Message(&'a DynamicMessage),
    /// A field's value (borrowed when set, a default otherwise), and its type: for a map
    /// its entry message, for a repeated field its items'.
    Field(Cow<'a, Value>, Kind),
}

/// Decodes a payload with schema `id`.
pub(super) fn decode(schema: &ProtoSchema, id: u32, payload: &[u8]) -> Result<Decoded, String> {
    let message = schema
        .decode(payload)
        .map_err(|e| format!("value does not decode under schema id {id}: {e}"))?;
    Ok(Decoded {
        message,
        payload_bytes: payload.len(),
    })
}

impl Addressed for Decoded {
    type Part<'a> = Part<'a>;

    fn field(&self, name: &str) -> Option<Part<'_>> {
        child(Part::Message(&self.message), name)
    }

    fn pointer(&self, pointer: &str) -> Option<Part<'_>> {
        let mut part = Part::Message(&self.message);
        for token in pointer_tokens(pointer)? {
            part = child(part, &token)?;
        }
        Some(part)
    }

    fn whole(&self) -> Part<'_> {
        Part::Message(&self.message)
    }

    /// Also refuses a `Timestamp` outside years 1 to 9999.
    fn input<'a>(&'a self, part: Part<'a>) -> Result<Input<'a>, String> {
        input(part, &Budget::new(self.payload_bytes))
    }
}

fn input<'a>(part: Part<'a>, budget: &Budget) -> Result<Input<'a>, String> {
    Ok(match part {
        Part::Message(message) => message_input(message, budget)?,
        Part::Field(Cow::Borrowed(value), kind) => match value {
            Value::String(s) => Input::Str(s),
            Value::Bytes(b) => Input::Bytes(b),
            Value::Message(message) => message_input(message, budget)?,
            other => scalar_input(other, &kind, budget)?,
        },
        Part::Field(Cow::Owned(value), kind) => scalar_input(&value, &kind, budget)?,
    })
}

/// The field or entry `token` of `part`; `None` where there is none, or where a field
/// that tracks presence is unset.
fn child<'a>(part: Part<'a>, token: &str) -> Option<Part<'a>> {
    let message = match part {
        Part::Message(message) | Part::Field(Cow::Borrowed(Value::Message(message)), _) => {
            message
        }
        Part::Field(Cow::Borrowed(Value::List(items)), kind) => {
            let i: usize = token.parse().ok()?;
            return Some(Part::Field(Cow::Borrowed(items.get(i)?), kind));
        }
        Part::Field(Cow::Borrowed(Value::Map(entries)), Kind::Message(entry)) => {
            let key = entry.map_entry_key_field();
            let key = match key.kind() {
                Kind::String => MapKey::String(token.to_owned()),
                Kind::Bool => MapKey::Bool(token.parse().ok()?),
                Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => MapKey::I32(token.parse().ok()?),
                Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => MapKey::I64(token.parse().ok()?),
                Kind::Uint32 | Kind::Fixed32 => MapKey::U32(token.parse().ok()?),
                Kind::Uint64 | Kind::Fixed64 => MapKey::U64(token.parse().ok()?),
                _ => return None,
            };
            let value = entries.get(&key)?;
            return Some(Part::Field(
                Cow::Borrowed(value),
                entry.map_entry_value_field().kind(),
            ));
        }
        // A default (unset) scalar, list or map has nothing within.
        Part::Field(..) => return None,
    };
    let descriptor = message.descriptor();
    let field = descriptor
        .get_field_by_name(token)
        .or_else(|| descriptor.get_field_by_json_name(token))?;
    if field.supports_presence() && !message.has_field(&field) {
        return None;
    }
    Some(Part::Field(message.get_field(&field), field.kind()))
}

/// A message as a column's input: well-known types as what they stand for, any other
/// as JSON.
fn message_input<'a>(message: &'a DynamicMessage, budget: &Budget) -> Result<Input<'a>, String> {
    well_known(message, budget).unwrap_or_else(|| message_json(message, budget).map(Input::Owned))
}

/// A well-known type as what it stands for; `None` for another message.
fn well_known<'a>(
    message: &'a DynamicMessage,
    budget: &Budget,
) -> Option<Result<Input<'a>, String>> {
    let descriptor = message.descriptor();
    let name = descriptor.full_name();
    let seconds_nanos = || match (
        message.get_field_by_number(1).as_deref(),
        message.get_field_by_number(2).as_deref(),
    ) {
        // Both hold the same sign (a Timestamp's nanos never negative), below a second.
        (Some(&Value::I64(seconds)), Some(&Value::I32(nanos)))
            if nanos.abs() < 1_000_000_000 && (seconds.signum() * i64::from(nanos.signum())) >= 0 =>
        {
            Ok((seconds, nanos))
        }
        _ => Err(format!("a {name} without seconds and nanos in range")),
    };
    Some(Ok(match name {
        "google.protobuf.Timestamp" => {
            let (seconds, nanos) = match seconds_nanos() {
                Ok(both) => both,
                Err(e) => return Some(Err(e)),
            };
            match u32::try_from(nanos)
                .ok()
                .and_then(|nanos| DateTime::from_timestamp(seconds, nanos))
                .filter(|t| in_years(t.date_naive()))
            {
                Some(ts) => Input::Timestamp(ts),
                None => {
                    return Some(Err(format!(
                        "Timestamp {seconds} s {nanos} ns is outside years 1 to 9999"
                    )));
                }
            }
        }
        // A number of seconds, which an interval column takes (to the microsecond).
        "google.protobuf.Duration" => match seconds_nanos() {
            Ok((seconds, nanos)) => Input::Owned(float(seconds as f64 + f64::from(nanos) / 1e9)),
            Err(e) => return Some(Err(e)),
        },
        "google.protobuf.DoubleValue"
        | "google.protobuf.FloatValue"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.Int32Value"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.BoolValue"
        | "google.protobuf.StringValue"
        | "google.protobuf.BytesValue" => {
            let Some(field) = descriptor.get_field(1) else {
                return Some(Err(format!("a {name} without its value")));
            };
            return Some(input(Part::Field(message.get_field(&field), field.kind()), budget));
        }
        _ => return None,
    }))
}



/// A value that borrows nothing as a column's input.
fn scalar_input(value: &Value, kind: &Kind, budget: &Budget) -> Result<Input<'static>, String> {
    Ok(match value {
        Value::I32(n) => Input::Int(i64::from(*n)),
        Value::I64(n) => Input::Int(*n),
        Value::U32(n) => Input::Int(i64::from(*n)),
        Value::U64(n) => i64::try_from(*n).map_or(Input::Owned(Json::from(*n)), Input::Int),
        other => Input::Owned(json(other, kind, budget)?),
    })
}

/// A message as JSON: an object of the fields it holds (by their names as written; a
/// proto3 scalar at its default is left out, as the proto3 JSON mapping does), well-known
/// types as what they stand for (a `Timestamp` as RFC 3339 text, a `Duration` as
/// seconds, a wrapper as its value). An `Any` stays a message of a type URL and bytes:
/// expanding it would decode bytes no depth limit has seen. Its size follows the
/// message's, as every field written costs bytes on the wire.
fn message_json(message: &DynamicMessage, budget: &Budget) -> Result<Json, String> {
    Ok(match well_known(message, budget).transpose()? {
        Some(Input::Timestamp(ts)) => {
            Json::String(ts.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        }
        Some(Input::Str(s)) => Json::String(s.to_owned()),
        Some(Input::Bytes(b)) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Some(Input::Int(n)) => Json::from(n),
        Some(Input::Json(json)) => json.clone(),
        Some(Input::Owned(json)) => json,
        Some(other) => return Err(format!("a well-known type read as {other:?}")),
        None => Json::Object(
            message
                .fields()
                .map(|(field, value)| {
                    budget.spend(field.name().len() + 4)?;
                    Ok((field.name().to_owned(), json(value, &field.kind(), budget)?))
                })
                .collect::<Result<_, String>>()?,
        ),
    })
}

/// A value of type `kind` as JSON: enums by name, bytes as base64, maps as objects.
fn json(value: &Value, kind: &Kind, budget: &Budget) -> Result<Json, String> {
    budget.spend(match value {
        Value::String(s) => s.len() + 2,
        Value::Bytes(b) => b.len() * 4 / 3 + 4,
        Value::EnumNumber(n) => match kind {
            Kind::Enum(e) => e.get_value(*n).map_or(12, |v| v.name().len() + 2),
            _ => 12,
        },
        _ => 8,
    })?;
    Ok(match value {
        Value::Bool(b) => Json::Bool(*b),
        Value::I32(n) => Json::from(*n),
        Value::I64(n) => Json::from(*n),
        Value::U32(n) => Json::from(*n),
        Value::U64(n) => Json::from(*n),
        Value::F32(f) => float(f64::from(*f)),
        Value::F64(f) => float(*f),
        Value::String(s) => Json::String(s.clone()),
        Value::Bytes(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::EnumNumber(n) => match kind {
            Kind::Enum(e) => e
                .get_value(*n)
                .map_or_else(|| Json::from(*n), |v| Json::String(v.name().to_owned())),
            _ => Json::from(*n),
        },
        Value::Message(message) => message_json(message, budget)?,
        Value::List(items) => Json::Array(
            items
                .iter()
                .map(|item| json(item, kind, budget))
                .collect::<Result<_, _>>()?,
        ),
        Value::Map(entries) => {
            let value_kind = match kind {
                Kind::Message(entry) => entry.map_entry_value_field().kind(),
                other => other.clone(),
            };
            Json::Object(
                entries
                    .iter()
                    .map(|(key, value)| {
                        let key = match key {
                            MapKey::String(s) => s.clone(),
                            MapKey::Bool(b) => b.to_string(),
                            MapKey::I32(n) => n.to_string(),
                            MapKey::I64(n) => n.to_string(),
                            MapKey::U32(n) => n.to_string(),
                            MapKey::U64(n) => n.to_string(),
                        };
                        budget.spend(key.len() + 4)?;
                        Ok((key, json(value, &value_kind, budget)?))
                    })
                    .collect::<Result<_, String>>()?,
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use prost_reflect::prost_types::{DescriptorProto, FieldDescriptorProto, field_descriptor_proto};

    use super::*;

    /// A base64 descriptor of a file with messages `A { string s = 1; B b = 2; }`,
    /// `A.Inner { int64 n = 1; }` and `B { B next = 1; }` (recursive).
    fn schema_text() -> String {
        let field = |name: &str, number: i32, kind: field_descriptor_proto::Type, type_name: Option<&str>| {
            FieldDescriptorProto {
                name: Some(name.to_owned()),
                number: Some(number),
                label: Some(field_descriptor_proto::Label::Optional as i32),
                r#type: Some(kind as i32),
                type_name: type_name.map(str::to_owned),
                ..Default::default()
            }
        };
        use field_descriptor_proto::Type;
        let file = FileDescriptorProto {
            name: Some("t.proto".to_owned()),
            package: Some("t".to_owned()),
            syntax: Some("proto3".to_owned()),
            message_type: vec![
                DescriptorProto {
                    name: Some("A".to_owned()),
                    field: vec![
                        field("s", 1, Type::String, None),
                        field("b", 2, Type::Message, Some(".t.B")),
                    ],
                    nested_type: vec![DescriptorProto {
                        name: Some("Inner".to_owned()),
                        field: vec![field("n", 1, Type::Int64, None)],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                DescriptorProto {
                    name: Some("B".to_owned()),
                    field: vec![field("next", 1, Type::Message, Some(".t.B"))],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        base64::engine::general_purpose::STANDARD.encode(file.encode_to_vec())
    }

    /// A base64 descriptor of `t.proto` (importing the well-known types) with `messages`.
    fn file_text(messages: Vec<DescriptorProto>) -> String {
        let file = FileDescriptorProto {
            name: Some("t.proto".to_owned()),
            package: Some("t".to_owned()),
            syntax: Some("proto3".to_owned()),
            dependency: vec![
                "google/protobuf/any.proto".to_owned(),
                "google/protobuf/timestamp.proto".to_owned(),
                "google/protobuf/wrappers.proto".to_owned(),
            ],
            message_type: messages,
            ..Default::default()
        };
        base64::engine::general_purpose::STANDARD.encode(file.encode_to_vec())
    }

    fn message_field(name: &str, number: i32, type_name: &str) -> FieldDescriptorProto {
        FieldDescriptorProto {
            name: Some(name.to_owned()),
            number: Some(number),
            label: Some(field_descriptor_proto::Label::Optional as i32),
            r#type: Some(field_descriptor_proto::Type::Message as i32),
            type_name: Some(type_name.to_owned()),
            ..Default::default()
        }
    }

    /// `bytes` as a length-delimited field `number`.
    fn delimited(number: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost_reflect::prost::encoding::encode_varint(number << 3 | 2, &mut out);
        prost_reflect::prost::encoding::encode_varint(bytes.len() as u64, &mut out);
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn a_map_entry_without_a_proper_key_refuses_the_schema() {
        let mut key = message_field("key", 1, "");
        key.r#type = Some(field_descriptor_proto::Type::Float as i32);
        key.type_name = None;
        let mut value = key.clone();
        value.name = Some("value".to_owned());
        value.number = Some(2);
        let mut map = message_field("m", 1, ".t.M.E");
        map.label = Some(field_descriptor_proto::Label::Repeated as i32);
        let text = file_text(vec![DescriptorProto {
            name: Some("M".to_owned()),
            field: vec![map],
            nested_type: vec![DescriptorProto {
                name: Some("E".to_owned()),
                field: vec![key, value],
                options: Some(prost_reflect::prost_types::MessageOptions {
                    map_entry: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }]);
        let err = ProtoSchema::parse(4, &text, &[]).expect_err("a float map key");
        assert!(err.contains("map entry t.M.E"), "{err}");
    }

    #[test]
    fn well_known_types_read_as_what_they_stand_for_and_any_is_not_expanded() {
        let text = file_text(vec![DescriptorProto {
            name: Some("W".to_owned()),
            field: vec![
                message_field("any", 1, ".google.protobuf.Any"),
                message_field("d", 2, ".google.protobuf.DoubleValue"),
                message_field("at", 3, ".google.protobuf.Timestamp"),
            ],
            ..Default::default()
        }]);
        let schema = ProtoSchema::parse(5, &text, &[]).expect("parses");
        // An Any holding Anys 20,000 deep: its bytes are kept, not decoded again.
        let mut nested: Vec<u8> = Vec::new();
        for _ in 0..20_000 {
            let mut any = delimited(1, b"type.googleapis.com/google.protobuf.Any");
            any.extend(delimited(2, &nested));
            nested = any;
        }
        let nan = [0x09, 0, 0, 0, 0, 0, 0, 0xf8, 0x7f];
        let mut payload = vec![0];
        payload.extend(delimited(1, &nested));
        payload.extend(delimited(2, &nan));
        let decoded = decode(&schema, 5, &payload).expect("decodes");
        let Ok(Input::Owned(whole)) = decoded.input(decoded.whole()) else {
            panic!("the whole message is JSON")
        };
        assert_eq!(whole["any"]["type_url"], "type.googleapis.com/google.protobuf.Any");
        assert!(whole["any"]["value"].is_string(), "bytes stay base64");
        // NaN reads the same whole or alone: text, which no numeric column takes.
        assert_eq!(whole["d"], "NaN");
        let Ok(Input::Owned(d)) = decoded.input(decoded.field("d").expect("d")) else {
            panic!("a double")
        };
        assert_eq!(d, "NaN");
        // A Timestamp's nanos must be below a second.
        for (seconds, nanos) in [(59_i64, 1_500_000_000_i32), (1, -5)] {
            let mut at = Vec::new();
            at.push(0x08);
            prost_reflect::prost::encoding::encode_varint(seconds as u64, &mut at);
            at.push(0x10);
            prost_reflect::prost::encoding::encode_varint(nanos as i64 as u64, &mut at);
            let mut payload = vec![0];
            payload.extend(delimited(3, &at));
            let decoded = decode(&schema, 5, &payload).expect("decodes");
            let err = decoded
                .input(decoded.field("at").expect("at"))
                .expect_err("nanos out of range");
            assert!(err.contains("in range"), "{err}");
        }
    }

    #[test]
    fn long_names_are_refused_and_json_stays_within_its_budget() {
        use prost_reflect::prost_types::{EnumDescriptorProto, EnumValueDescriptorProto};
        let schema = |name_bytes: usize| {
            let mut codes = message_field("codes", 1, ".t.E");
            codes.r#type = Some(field_descriptor_proto::Type::Enum as i32);
            codes.label = Some(field_descriptor_proto::Label::Repeated as i32);
            let file = FileDescriptorProto {
                name: Some("t.proto".to_owned()),
                package: Some("t".to_owned()),
                syntax: Some("proto3".to_owned()),
                message_type: vec![DescriptorProto {
                    name: Some("M".to_owned()),
                    field: vec![codes],
                    ..Default::default()
                }],
                enum_type: vec![EnumDescriptorProto {
                    name: Some("E".to_owned()),
                    value: vec![EnumValueDescriptorProto {
                        name: Some("E".repeat(name_bytes)),
                        number: Some(0),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
            let text = base64::engine::general_purpose::STANDARD.encode(file.encode_to_vec());
            ProtoSchema::parse(6, &text, &[])
        };
        let err = schema(1 << 20).expect_err("a 1 MiB name");
        assert!(err.contains("above 256"), "{err}");
        let schema = schema(200).expect("a 200-byte name");
        // 200,000 packed items of one byte each: 40 MB of names from 200 kB.
        let mut payload = vec![0];
        payload.extend(delimited(1, &vec![0; 200_000]));
        let decoded = decode(&schema, 6, &payload).expect("decodes");
        let err = decoded.input(decoded.whole()).expect_err("over budget");
        assert!(err.contains("64 times"), "{err}");
        // A few such items are fine.
        let mut payload = vec![0];
        payload.extend(delimited(1, &[0; 10]));
        let decoded = decode(&schema, 6, &payload).expect("decodes");
        assert!(decoded.input(decoded.whole()).is_ok());
    }

    fn decoded(schema: &ProtoSchema, payload: &[u8]) -> Result<Decoded, String> {
        decode(schema, 9, payload)
    }

    #[test]
    fn message_indexes_pick_the_message_and_nested_ones() {
        let schema = ProtoSchema::parse(9, &schema_text(), &[]).expect("parses");
        // [0] as the single byte 0: A { s: "hi" }.
        let a = decoded(&schema, &[0, 0x0a, 2, b'h', b'i']).expect("an A");
        let Ok(Input::Str("hi")) = a.input(a.field("s").expect("s")) else {
            panic!("s is hi")
        };
        // The same message as the explicit index list [0] (count 1, index 0).
        assert!(decoded(&schema, &[2, 0, 0x0a, 2, b'h', b'i']).is_ok());
        // [0, 0]: A.Inner { n: 150 }.
        let inner = decoded(&schema, &[4, 0, 0, 0x08, 0x96, 0x01]).expect("an A.Inner");
        let Ok(Input::Int(150)) = inner.input(inner.field("n").expect("n")) else {
            panic!("n is 150")
        };
        for (payload, why) in [
            (&[2, 4][..], "beyond the schema's 2 top-level messages"),
            (&[4, 0, 2], "beyond the nested messages of t.A"),
            (&[2, 1], "negative"),
            (&[0x81, 0x01], "outside 1 to 64"),
            (&[0x80], "end early"),
            (&[0, 0x0a, 5, b'h'], "not a t.A message"),
        ] {
            let err = decoded(&schema, payload).expect_err(why);
            assert!(err.contains(why) && err.contains("schema id 9"), "{payload:?}: {err}");
        }
    }

    #[test]
    fn a_message_nested_past_the_recursion_limit_is_refused_not_a_stack_overflow() {
        let schema = ProtoSchema::parse(9, &schema_text(), &[]).expect("parses");
        // B { next: B { next: ... } } 1,000 deep, built from the inside out.
        let mut message: Vec<u8> = Vec::new();
        for _ in 0..1000 {
            let mut outer = vec![0x0a];
            prost_reflect::prost::encoding::encode_varint(message.len() as u64, &mut outer);
            outer.extend_from_slice(&message);
            message = outer;
        }
        let mut payload = vec![2, 2];
        payload.extend_from_slice(&message);
        assert!(decoded(&schema, &payload).is_err());
    }

    #[test]
    fn proto_text_and_garbage_are_refused_as_schemas() {
        for text in ["syntax = \"proto3\"; message A {}", "AAAA", ""] {
            assert!(ProtoSchema::parse(1, text, &[]).is_err(), "{text}");
        }
    }
}
