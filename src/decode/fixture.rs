//! The Avro fixture Confluent's own serializer made (`tests/fixtures/confluent-avro.json`,
//! see `scripts/avro-fixtures`), parsed. The unit tests, the integration tests and the
//! fuzz target include this file, so all read it one way; plain types only.

use std::collections::HashMap;

/// The fixture: writer schemas by id, and framed values with what each holds.
pub struct ConfluentAvro {
    pub schemas: HashMap<u32, String>,
    pub records: Vec<(Vec<u8>, serde_json::Value)>,
}

pub fn confluent_avro() -> ConfluentAvro {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/fixtures/confluent-avro.json"))
            .expect("the fixture is JSON");
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
    ConfluentAvro { schemas, records }
}
