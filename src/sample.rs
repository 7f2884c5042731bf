//! Sample website-metrics messages, valid and malformed, for the demo and for tests.

use rand::Rng;

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
    let mut framed = vec![0];
    framed.extend_from_slice(&id.to_be_bytes());
    framed.extend_from_slice(&datum);
    Ok(framed)
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
