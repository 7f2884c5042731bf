//! The fixtures Confluent's own serializers made (`tests/fixtures/confluent-*.json`, see
//! `scripts/registry-fixtures`), parsed. The unit tests, the integration tests and the
//! fuzz target include this file, so all read them one way; plain types only.

use std::collections::HashMap;

/// A fixture: its schemas' registry type, the writer schemas by id, and framed values
/// with what each holds.
pub struct Confluent {
    pub schema_type: String,
    pub schemas: HashMap<u32, String>,
    pub records: Vec<(Vec<u8>, serde_json::Value)>,
}

impl Confluent {
    /// The framed values, as Kafka record values.
    pub fn payloads(&self) -> Vec<Option<Vec<u8>>> {
        self.records.iter().map(|(b, _)| Some(b.clone())).collect()
    }
}

/// Avro by `AvroSerializer`, under two versions of a schema.
pub fn confluent_avro() -> Confluent {
    parse(include_str!("../../tests/fixtures/confluent-avro.json"))
}

/// Protobuf by `ProtobufSerializer`, under two versions of a schema (base64 serialized
/// descriptors); version 2's values carry message index 1.
#[allow(dead_code)]
pub fn confluent_protobuf() -> Confluent {
    parse(include_str!("../../tests/fixtures/confluent-protobuf.json"))
}

/// JSON by `JSONSerializer`, under two versions of a JSON Schema.
#[allow(dead_code)]
pub fn confluent_json_schema() -> Confluent {
    parse(include_str!(
        "../../tests/fixtures/confluent-json-schema.json"
    ))
}

fn parse(text: &str) -> Confluent {
    let doc: serde_json::Value = serde_json::from_str(text).expect("the fixture is JSON");
    let schemas = doc["schemas"]
        .as_object()
        .expect("schemas")
        .iter()
        .map(|(id, s)| {
            let text = s.as_str().expect("a schema's text").to_owned();
            (id.parse().expect("a schema id"), text)
        })
        .collect();
    let records = doc["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            let hex = r["value_hex"].as_str().expect("hex");
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("a hex digit"))
                .collect();
            (bytes, r["expected"].clone())
        })
        .collect();
    Confluent {
        schema_type: doc["schema_type"].as_str().unwrap_or("AVRO").to_owned(),
        schemas,
        records,
    }
}
