//! Sample website-metrics messages, valid and malformed, for the demo and for tests.

use rand::Rng;

use crate::config::ValueFormat;

/// The kinds of malformed message the generator makes, each landing as the named
/// dead-letter reason.
pub const MALFORMED_KINDS: [(&str, &[u8]); 6] = [
    ("not_json", b"<html>502 Bad Gateway</html>"),
    ("not_utf8", &[0xc3, 0x28, 0xa0, 0xa1]),
    ("empty", b""),
    ("missing_field", br#"{"url": "https://www.example.com/", "resp_status_code": 200}"#),
    ("bad_timestamp", br#"{"request_timestamp": "yesterday", "url": "https://www.example.com/"}"#),
    ("bad_ip", br#"{"request_timestamp": "2021-01-01 00:00:00", "url": "https://www.example.com/", "ip_address": "999.1.1.1"}"#),
];

/// The days of January 2021 that sample probes are dated on (UTC).
pub const DAYS: u64 = 28;

/// DDL of `table`, shaped like `like` (a table with the website-metrics columns),
/// partitioned by day on `time_stamp` over the sample's [`DAYS`], one partition each. Its
/// unique indexes hold `time_stamp`, as Postgres requires of a partitioned table: the
/// coordinates' and `id`'s, and one on `time_stamp` alone as the default table has.
pub fn partitioned_by_day(table: &str, like: &str) -> String {
    let mut ddl = format!(
        "CREATE TABLE {table} (LIKE {like} INCLUDING DEFAULTS, \
           PRIMARY KEY (id, time_stamp), \
           UNIQUE (kafka_topic, kafka_partition, kafka_offset, time_stamp)) \
         PARTITION BY RANGE (time_stamp); \
         CREATE INDEX ON {table} (time_stamp);"
    );
    for day in 1..=DAYS {
        ddl.push_str(&format!(
            " CREATE TABLE {table}_p202101{day:02} PARTITION OF {table} \
              FOR VALUES FROM ('2021-01-{day:02} 00:00+00') TO ('2021-01-{next:02} 00:00+00');",
            next = day + 1
        ));
    }
    ddl
}

/// The website-metrics record in Avro: schema id 1 of the tests' fixture
/// (`tests/fixtures/confluent-avro.json`, as Confluent's serializer registered it).
pub const WEBSITE_METRIC_AVRO: &str = r#"{"type": "record", "name": "WebsiteMetric", "namespace": "com.example.monitoring", "fields": [{"name": "request_timestamp", "type": {"type": "long", "logicalType": "timestamp-micros"}}, {"name": "url", "type": "string"}, {"name": "ip_address", "type": ["null", "string"], "default": null}, {"name": "resp_time", "type": ["null", "string"], "default": null}, {"name": "resp_status_code", "type": "int"}, {"name": "pattern_found", "type": "boolean"}, {"name": "service_name", "type": ["null", "string"], "default": null}, {"name": "comment", "type": "string"}]}"#;

/// A sample JSON message ([`website_metric`]) as the same probe in Avro under
/// [`WEBSITE_METRIC_AVRO`] (`schema`, parsed), framed in the Confluent wire format
/// under schema id `id`.
pub fn website_metric_avro(
    json: &[u8],
    schema: &apache_avro::Schema,
    id: u32,
) -> anyhow::Result<Vec<u8>> {
    use apache_avro::types::Value as Avro;
    let v: serde_json::Value = serde_json::from_slice(json)?;
    let text = |key: &str| v[key].as_str().unwrap_or_default().to_owned();
    let optional = |key: &str| Avro::Union(1, Box::new(Avro::String(text(key))));
    let at = chrono::NaiveDateTime::parse_from_str(&text("request_timestamp"), "%Y-%m-%d %H:%M:%S")?
        .and_utc();
    let status = v["resp_status_code"].as_i64().unwrap_or(0);
    let record = Avro::Record(vec![
        ("request_timestamp".into(), Avro::TimestampMicros(at.timestamp_micros())),
        ("url".into(), Avro::String(text("url"))),
        ("ip_address".into(), optional("ip_address")),
        ("resp_time".into(), optional("resp_time")),
        ("resp_status_code".into(), Avro::Int(i32::try_from(status)?)),
        ("pattern_found".into(), Avro::Boolean(v["pattern_found"].as_bool().unwrap_or(false))),
        ("service_name".into(), optional("service_name")),
        ("comment".into(), Avro::String(text("comment"))),
    ]);
    let datum = apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()?
        .write_value_to_vec(record)?;
    let mut framed = frame(id);
    framed.extend_from_slice(&datum);
    Ok(framed)
}

/// The website-metrics record as Protobuf (`tests/fixtures/proto/website_metric_v1.proto`):
/// its serialized descriptor in base64, schema id 1 of the tests' fixture
/// (`tests/fixtures/confluent-protobuf.json`, as Confluent's serializer registered it).
pub const WEBSITE_METRIC_PROTOBUF: &str = "Chd3ZWJzaXRlX21ldHJpY192MS5wcm90bxINbW9uaXRvcmluZy52MRofZ29vZ2xlL3Byb3RvYnVmL3RpbWVzdGFtcC5wcm90bxoeZ29vZ2xlL3Byb3RvYnVmL3dyYXBwZXJzLnByb3RvIqwCCg1XZWJzaXRlTWV0cmljEjUKEXJlcXVlc3RfdGltZXN0YW1wGAEgASgLMhouZ29vZ2xlLnByb3RvYnVmLlRpbWVzdGFtcBILCgN1cmwYAiABKAkSMAoKaXBfYWRkcmVzcxgDIAEoCzIcLmdvb2dsZS5wcm90b2J1Zi5TdHJpbmdWYWx1ZRIvCglyZXNwX3RpbWUYBCABKAsyHC5nb29nbGUucHJvdG9idWYuU3RyaW5nVmFsdWUSGAoQcmVzcF9zdGF0dXNfY29kZRgFIAEoBRIVCg1wYXR0ZXJuX2ZvdW5kGAYgASgIEjIKDHNlcnZpY2VfbmFtZRgHIAEoCzIcLmdvb2dsZS5wcm90b2J1Zi5TdHJpbmdWYWx1ZRIPCgdjb21tZW50GAggASgJYgZwcm90bzM=";

/// The website-metrics record's JSON Schema: schema id 1 of the tests' fixture
/// (`tests/fixtures/confluent-json-schema.json`, as Confluent's serializer registered it).
pub const WEBSITE_METRIC_JSON_SCHEMA: &str = r#"{"$schema": "http://json-schema.org/draft-07/schema#", "title": "WebsiteMetric", "type": "object", "required": ["request_timestamp", "url", "resp_status_code", "pattern_found", "comment"], "properties": {"request_timestamp": {"type": "string"}, "url": {"type": "string"}, "ip_address": {"type": ["null", "string"]}, "resp_time": {"type": ["null", "string"]}, "resp_status_code": {"type": "integer", "minimum": 100, "maximum": 599}, "pattern_found": {"type": "boolean"}, "service_name": {"type": ["null", "string"]}, "comment": {"type": "string"}}}"#;

/// The schema of [`WEBSITE_METRIC_PROTOBUF`]'s one message.
pub fn website_metric_message() -> anyhow::Result<prost_reflect::MessageDescriptor> {
    use prost_reflect::prost::Message as _;
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(WEBSITE_METRIC_PROTOBUF)?;
    let file = prost_reflect::prost_types::FileDescriptorProto::decode(bytes.as_slice())?;
    let mut pool = prost_reflect::DescriptorPool::global();
    pool.add_file_descriptor_proto(file)?;
    pool.get_message_by_name("monitoring.v1.WebsiteMetric")
        .ok_or_else(|| anyhow::anyhow!("the website-metrics descriptor has no WebsiteMetric"))
}

/// A sample JSON message ([`website_metric`]) as the same probe in Protobuf (`message`,
/// from [`website_metric_message`]), framed in the Confluent wire format under schema id
/// `id` (message index 0).
pub fn website_metric_protobuf(
    json: &[u8],
    message: &prost_reflect::MessageDescriptor,
    id: u32,
) -> anyhow::Result<Vec<u8>> {
    use prost_reflect::prost::Message as _;
    use prost_reflect::{DynamicMessage, Value};
    let v: serde_json::Value = serde_json::from_slice(json)?;
    let text = |key: &str| v[key].as_str().unwrap_or_default().to_owned();
    let at = chrono::NaiveDateTime::parse_from_str(&text("request_timestamp"), "%Y-%m-%d %H:%M:%S")?
        .and_utc();
    let mut probe = DynamicMessage::new(message.clone());
    let sub = |name: &str| -> anyhow::Result<DynamicMessage> {
        let field = message
            .get_field_by_name(name)
            .ok_or_else(|| anyhow::anyhow!("no field {name}"))?;
        match field.kind() {
            prost_reflect::Kind::Message(m) => Ok(DynamicMessage::new(m)),
            _ => anyhow::bail!("{name} is no message"),
        }
    };
    let mut timestamp = sub("request_timestamp")?;
    timestamp.set_field_by_name("seconds", Value::I64(at.timestamp()));
    probe.set_field_by_name("request_timestamp", Value::Message(timestamp));
    for name in ["ip_address", "resp_time", "service_name"] {
        let mut wrapped = sub(name)?;
        wrapped.set_field_by_name("value", Value::String(text(name)));
        probe.set_field_by_name(name, Value::Message(wrapped));
    }
    probe.set_field_by_name("url", Value::String(text("url")));
    let status = i32::try_from(v["resp_status_code"].as_i64().unwrap_or(0))?;
    probe.set_field_by_name("resp_status_code", Value::I32(status));
    let found = v["pattern_found"].as_bool().unwrap_or(false);
    probe.set_field_by_name("pattern_found", Value::Bool(found));
    probe.set_field_by_name("comment", Value::String(text("comment")));
    // Message index 0 is written as the single byte 0.
    let mut framed = frame(id);
    framed.push(0);
    probe.encode(&mut framed)?;
    Ok(framed)
}

/// A sample JSON message framed in the Confluent wire format under JSON Schema id `id`.
pub fn website_metric_json_schema(json: &[u8], id: u32) -> Vec<u8> {
    let mut framed = frame(id);
    framed.extend_from_slice(json);
    framed
}

/// The Confluent wire format's start: byte 0, then schema id `id` (big-endian).
fn frame(id: u32) -> Vec<u8> {
    let mut framed = vec![0];
    framed.extend_from_slice(&id.to_be_bytes());
    framed
}

/// Encodes sample probes ([`website_metric`]) in a registry format under a schema id.
pub struct Framer {
    id: u32,
    encoding: Encoding,
}

enum Encoding {
    Avro(apache_avro::Schema),
    Protobuf(prost_reflect::MessageDescriptor),
    JsonSchema,
}

impl Framer {
    /// The website-metrics schema of `format` as a registry takes it: its type and text.
    pub fn schema(format: ValueFormat) -> Option<(&'static str, &'static str)> {
        match format {
            ValueFormat::Json => None,
            ValueFormat::Avro => Some(("AVRO", WEBSITE_METRIC_AVRO)),
            ValueFormat::Protobuf => Some(("PROTOBUF", WEBSITE_METRIC_PROTOBUF)),
            ValueFormat::JsonSchema => Some(("JSON", WEBSITE_METRIC_JSON_SCHEMA)),
        }
    }

    /// Probes in `format` under schema id `id` ([`Framer::schema`] registered);
    /// `None` for plain JSON.
    pub fn new(format: ValueFormat, id: u32) -> anyhow::Result<Option<Self>> {
        let encoding = match format {
            ValueFormat::Json => return Ok(None),
            ValueFormat::Avro => {
                Encoding::Avro(apache_avro::Schema::parse_str(WEBSITE_METRIC_AVRO)?)
            }
            ValueFormat::Protobuf => Encoding::Protobuf(website_metric_message()?),
            ValueFormat::JsonSchema => Encoding::JsonSchema,
        };
        Ok(Some(Self { id, encoding }))
    }

    /// A probe (JSON bytes from [`website_metric`]) framed.
    pub fn encode(&self, json: &[u8]) -> anyhow::Result<Vec<u8>> {
        match &self.encoding {
            Encoding::Avro(schema) => website_metric_avro(json, schema, self.id),
            Encoding::Protobuf(message) => website_metric_protobuf(json, message, self.id),
            Encoding::JsonSchema => Ok(website_metric_json_schema(json, self.id)),
        }
    }

    /// The dead-letter reason of a framed probe cut short by a byte.
    pub fn cut_short_reason(&self) -> &'static str {
        match self.encoding {
            Encoding::Avro(_) => "bad_avro",
            Encoding::Protobuf(_) => "bad_protobuf",
            Encoding::JsonSchema => "bad_json_schema",
        }
    }
}

/// A valid probe message whose `comment` is `id`, so each message is unique and
/// traceable in the target table.
pub fn website_metric(id: u64, rng: &mut impl Rng) -> Vec<u8> {
    const SITES: [&str; 4] = [
        "https://www.example.com/",
        "https://status.example.org/health",
        "https://shop.example.net/cart",
        "https://api.example.io/v1/ping",
    ];
    const STATUS: [u16; 4] = [200, 200, 301, 503];
    let micros: u32 = rng.random_range(5_000..2_000_000);
    serde_json::json!({
        "request_timestamp": format!("2021-01-{:02} {:02}:{:02}:{:02}", 1 + id % DAYS, id % 24, id % 60, (id / 60) % 60),
        "url": SITES[rng.random_range(0..SITES.len())],
        "ip_address": format!("104.18.{}.{}", rng.random_range(0..256), rng.random_range(1..255)),
        "resp_time": format!("0:00:{:02}.{:06}", micros / 1_000_000, micros % 1_000_000),
        "resp_status_code": STATUS[rng.random_range(0..STATUS.len())],
        "pattern_found": rng.random_bool(0.9),
        "service_name": "Web metric collection service",
        "comment": id.to_string(),
    })
    .to_string()
    .into_bytes()
}

/// Message `id` of a stream where a `malformed_ratio` share is malformed: `None` for a
/// valid one, else the dead-letter reason it must end with and its bytes.
pub fn message(
    id: u64,
    malformed_ratio: f64,
    rng: &mut impl Rng,
) -> (Option<&'static str>, Vec<u8>) {
    if rng.random_bool(malformed_ratio.clamp(0.0, 1.0)) {
        let (reason, bytes) = MALFORMED_KINDS[(id % MALFORMED_KINDS.len() as u64) as usize];
        (Some(reason), bytes.to_vec())
    } else {
        (None, website_metric(id, rng))
    }
}

/// A producer of sample messages spreading them round-robin over a topic's
/// partitions: message `i` of its life goes to partition `i % partitions`.
pub struct SampleProducer {
    producer: rdkafka::producer::BaseProducer,
    topic: String,
    partitions: i32,
    sent: u64,
}

impl SampleProducer {
    pub fn new(brokers: &str, topic: &str, partitions: i32) -> rdkafka::error::KafkaResult<Self> {
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("message.max.bytes", "10000000")
            .set("linger.ms", "5")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            partitions: partitions.max(1),
            sent: 0,
        })
    }

    /// Sends `payloads` (`None` = tombstone) and waits until all are acknowledged.
    /// Blocking.
    pub fn send<P: AsRef<[u8]>>(
        &mut self,
        payloads: impl IntoIterator<Item = Option<P>>,
    ) -> rdkafka::error::KafkaResult<u64> {
        use rdkafka::error::KafkaError;
        use rdkafka::producer::{BaseRecord, Producer};
        use rdkafka::types::RDKafkaErrorCode;
        use std::time::Duration;

        let mut count = 0;
        for payload in payloads {
            let partition = (self.sent % self.partitions as u64) as i32;
            let key = self.sent.to_string();
            loop {
                let mut record = BaseRecord::<String, [u8]>::to(&self.topic)
                    .key(&key)
                    .partition(partition);
                if let Some(p) = &payload {
                    record = record.payload(p.as_ref());
                }
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        self.producer.poll(Duration::from_millis(50));
                    }
                    Err((e, _)) => return Err(e),
                }
            }
            self.sent += 1;
            count += 1;
            self.producer.poll(Duration::ZERO);
        }
        self.producer.flush(Duration::from_secs(60))?;
        Ok(count)
    }
}

/// Produces `payloads` (`None` = tombstone) round-robin over `partitions` and waits until
/// all are acknowledged. Blocking.
pub fn produce<P: AsRef<[u8]>>(
    brokers: &str,
    topic: &str,
    partitions: i32,
    payloads: impl IntoIterator<Item = Option<P>>,
) -> rdkafka::error::KafkaResult<u64> {
    SampleProducer::new(brokers, topic, partitions)?.send(payloads)
}
