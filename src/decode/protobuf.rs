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
    DescriptorPool, DynamicMessage, Kind, MapKey, MessageDescriptor, ReflectMessage as _,
    SerializeOptions, Value,
};
use serde_json::Value as Json;

use super::Addressed;
use super::framed::{Referenced, float, in_years, pointer_tokens};
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
        let file = pool.get_file_by_name(&name).ok_or("the schema's file is missing")?;
        let messages: Vec<MessageDescriptor> = file.messages().collect();
        if messages.is_empty() {
            return Err("the schema defines no message".to_owned());
        }
        Ok(Self { messages })
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
    Ok(Decoded { message })
}

/// The proto3 JSON mapping with field names as written, 64-bit integers as numbers and
/// every field present (a default is a value, as on the wire).
const JSON: SerializeOptions = SerializeOptions::new()
    .use_proto_field_name(true)
    .stringify_64_bit_integers(false)
    .skip_default_fields(false);

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
        input(part)
    }
}

fn input(part: Part<'_>) -> Result<Input<'_>, String> {
    Ok(match part {
        Part::Message(message) => message_input(message)?,
        Part::Field(Cow::Borrowed(value), kind) => match value {
            Value::String(s) => Input::Str(s),
            Value::Bytes(b) => Input::Bytes(b),
            Value::Message(message) => message_input(message)?,
            other => scalar_input(other, &kind)?,
        },
        Part::Field(Cow::Owned(value), kind) => scalar_input(&value, &kind)?,
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
fn message_input(message: &DynamicMessage) -> Result<Input<'_>, String> {
    let descriptor = message.descriptor();
    let name = descriptor.full_name();
    let seconds_nanos = || match (
        message.get_field_by_number(1).as_deref(),
        message.get_field_by_number(2).as_deref(),
    ) {
        (Some(&Value::I64(seconds)), Some(&Value::I32(nanos))) => Ok((seconds, nanos)),
        _ => Err(format!("a {name} without seconds and nanos")),
    };
    Ok(match name {
        "google.protobuf.Timestamp" => {
            let (seconds, nanos) = seconds_nanos()?;
            Input::Timestamp(
                u32::try_from(nanos)
                    .ok()
                    .and_then(|nanos| DateTime::from_timestamp(seconds, nanos))
                    .filter(|t| in_years(t.date_naive()))
                    .ok_or_else(|| {
                        format!("Timestamp {seconds} s {nanos} ns is outside years 1 to 9999")
                    })?,
            )
        }
        // A number of seconds, which an interval column takes (to the microsecond).
        "google.protobuf.Duration" => {
            let (seconds, nanos) = seconds_nanos()?;
            Input::Owned(float(seconds as f64 + f64::from(nanos) / 1e9))
        }
        "google.protobuf.DoubleValue"
        | "google.protobuf.FloatValue"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.Int32Value"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.BoolValue"
        | "google.protobuf.StringValue"
        | "google.protobuf.BytesValue" => {
            let field = descriptor
                .get_field(1)
                .ok_or_else(|| format!("a {name} without its value"))?;
            input(Part::Field(message.get_field(&field), field.kind()))?
        }
        _ => Input::Owned(message_json(message)?),
    })
}

/// A value that borrows nothing as a column's input.
fn scalar_input(value: &Value, kind: &Kind) -> Result<Input<'static>, String> {
    Ok(match value {
        Value::I32(n) => Input::Int(i64::from(*n)),
        Value::I64(n) => Input::Int(*n),
        Value::U32(n) => Input::Int(i64::from(*n)),
        Value::U64(n) => i64::try_from(*n).map_or(Input::Owned(Json::from(*n)), Input::Int),
        other => Input::Owned(json(other, kind)?),
    })
}

/// A message in the proto3 JSON mapping (see [`JSON`]).
fn message_json(message: &DynamicMessage) -> Result<Json, String> {
    message
        .serialize_with_options(serde_json::value::Serializer, &JSON)
        .map_err(|e| e.to_string())
}

/// A value of type `kind` as JSON: enums by name, bytes as base64, maps as objects.
fn json(value: &Value, kind: &Kind) -> Result<Json, String> {
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
        Value::Message(message) => message_json(message)?,
        Value::List(items) => Json::Array(
            items
                .iter()
                .map(|item| json(item, kind))
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
                        Ok((key, json(value, &value_kind)?))
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
