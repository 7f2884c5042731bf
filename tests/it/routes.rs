//! Routes: many topics into many tables, column sources, types, write modes, and the
//! check of a configuration against the live schema.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kafka_pg_ingest::config::Config;
use kafka_pg_ingest::decode::CopyFormat;
use kafka_pg_ingest::pipeline::Pipeline;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// One record to produce.
#[derive(Debug, Clone, Default)]
pub struct Msg {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: Option<i64>,
}

impl Msg {
    fn json(partition: i32, key: Option<&str>, value: &Value) -> Self {
        Self {
            partition,
            key: key.map(|k| k.as_bytes().to_vec()),
            value: Some(value.to_string().into_bytes()),
            ..Self::default()
        }
    }
}

/// Produces `msgs` in order (blocking) and waits for every acknowledgement.
pub fn send(kafka: &TestKafka, topic: &str, msgs: &[Msg]) {
    send_to(&kafka.brokers, topic, msgs);
}

/// [`send`] to any brokers.
pub fn send_to(brokers: &str, topic: &str, msgs: &[Msg]) {
    tokio::task::block_in_place(|| {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .create()
            .expect("producer");
        for m in msgs {
            let mut headers = OwnedHeaders::new();
            for (key, value) in &m.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_slice()),
                });
            }
            let mut record = BaseRecord::<[u8], [u8]>::to(topic)
                .partition(m.partition)
                .headers(headers);
            if let Some(key) = &m.key {
                record = record.key(key.as_slice());
            }
            if let Some(value) = &m.value {
                record = record.payload(value.as_slice());
            }
            if let Some(ts) = m.timestamp {
                record = record.timestamp(ts);
            }
            producer.send(record).map_err(|(e, _)| e).expect("queued");
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(30)).expect("flushed");
    });
}

/// Steps a pipeline until the group's stored offsets sum to `total`.
async fn drive_group(config: Config, pool: &PgPool, total: i64) -> Pipeline {
    let group = config.kafka.group.clone();
    let mut pipeline = Pipeline::connect(config).await.expect("pipeline connects");
    let token = CancellationToken::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_group_total(pool, &group).await < total {
        assert!(Instant::now() < deadline, "not caught up within 60 s");
        pipeline.step(&token).await.expect("step succeeds");
    }
    pipeline
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("Postgres holds JSON")
}

/// `(topic, reason_code)` of every dead letter, sorted.
async fn dead_letter_codes(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT topic, reason_code FROM ingest.dead_letters ORDER BY topic, reason_code, \"offset\"",
    )
    .fetch_all(pool)
    .await
    .expect("read dead letters")
}

/// Each `(topic, partition)`'s stored next offset.
async fn stored_offsets(pool: &PgPool, group: &str) -> BTreeMap<(String, i32), i64> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM ingest.offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_all(pool)
    .await
    .expect("read offsets");
    rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_serves_an_upsert_route_with_tombstones_and_a_jsonb_route_exactly_once() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(2);
    let orders = kafka.topic.clone();
    let events = [format!("{orders}-events-a"), format!("{orders}-events-b")];
    for topic in &events {
        kafka
            ._cluster
            .create_topic(topic, 2, 1)
            .expect("topic created");
    }
    exec(
        &db.pool,
        "CREATE SCHEMA shop; CREATE TABLE shop.orders (order_id int8 PRIMARY KEY, \
           customer text NOT NULL, total numeric(12,2), status text, updated_at timestamptz, \
           src_offset int8); \
         CREATE SCHEMA raw; CREATE TABLE raw.events (topic text, part int4, off int8, \
           payload jsonb NOT NULL, UNIQUE (topic, part, off));",
    )
    .await;
    let yaml = format!(
        r#"
batch: {{ max_records: 37 }}
routes:
  - topic: {orders}
    table: shop.orders
    mode: upsert
    key: [order_id]
    delete_on_tombstone: true
    columns:
      - {{ column: order_id, field: "@key", type: int8, coerce: true }}
      - {{ column: customer, field: /customer/name, type: text, required: true }}
      - {{ column: total, field: total, type: numeric, coerce: true }}
      - {{ column: status, field: status, type: text }}
      - {{ column: updated_at, field: "@timestamp", type: timestamptz }}
      - {{ column: src_offset, field: "@offset", type: int8 }}
  - topic_regex: "{orders}-events-.*"
    table: raw.events
    columns:
      - {{ column: topic, field: "@topic", type: text }}
      - {{ column: part, field: "@partition", type: int4 }}
      - {{ column: off, field: "@offset", type: int8 }}
      - {{ column: payload, field: "@value", type: jsonb }}
"#
    );
    let config = kafka.config_with_yaml(&db, &yaml).expect("routes load");

    // Orders: three versions of 60 keys (a key stays in one partition), then tombstones
    // for keys 0..10, then key 5 written again; a malformed order and a keyless tombstone.
    let mut msgs = Vec::new();
    let mut next = [0i64; 2];
    let mut expected: BTreeMap<i64, (String, String, i64, i64)> = BTreeMap::new();
    let mut push = |msgs: &mut Vec<Msg>, id: i64, value: Option<Value>| {
        let partition = (id % 2) as i32;
        let (offset, ts) = (
            next[partition as usize],
            1_700_000_000_000 + msgs.len() as i64,
        );
        next[partition as usize] += 1;
        match &value {
            Some(v) => expected.insert(
                id,
                (
                    v["status"].as_str().unwrap_or_default().to_owned(),
                    v["total"].as_str().unwrap_or_default().to_owned(),
                    offset,
                    ts,
                ),
            ),
            None => expected.remove(&id),
        };
        msgs.push(Msg {
            partition,
            key: Some(id.to_string().into_bytes()),
            value: value.map(|v| v.to_string().into_bytes()),
            timestamp: Some(ts),
            ..Msg::default()
        });
    };
    for version in 0..3 {
        for id in 0..60 {
            let order = json!({"customer": {"name": format!("c{id}")},
                               "total": format!("{id}.{version}5"), "status": format!("v{version}")});
            push(&mut msgs, id, Some(order));
        }
    }
    for id in 0..10 {
        push(&mut msgs, id, None);
    }
    let again = json!({"customer": {"name": "c5"}, "total": "5.95", "status": "v9"});
    push(&mut msgs, 5, Some(again));
    msgs.push(Msg {
        partition: 0,
        key: Some(b"61".to_vec()),
        value: Some(b"{not json".to_vec()),
        ..Msg::default()
    });
    msgs.push(Msg {
        partition: 1,
        ..Msg::default()
    });
    next[0] += 1;
    next[1] += 1;
    send(&kafka, &orders, &msgs);

    // Events: objects, arrays and numbers, and one record that is not JSON, per topic.
    let mut payloads: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for topic in &events {
        let values: Vec<Value> = (0..50)
            .map(|i| match i % 3 {
                0 => json!({"event": i, "tags": ["a", "b"], "nested": {"x": null}}),
                1 => json!([i, "two", {"three": 3}]),
                _ => json!(i),
            })
            .collect();
        let mut batch: Vec<Msg> = values.iter().map(|v| Msg::json(0, None, v)).collect();
        batch.push(Msg {
            partition: 1,
            value: Some(b"\xff not json".to_vec()),
            ..Msg::default()
        });
        send(&kafka, topic, &batch);
        payloads.insert(topic.clone(), values);
    }

    let total = msgs.len() as i64 + 2 * 51;
    let pipeline = drive_group(config, &db.pool, total).await;
    pipeline.close().await;

    let rows: Vec<(i64, String, String, String, i64, i64)> = sqlx::query_as(
        "SELECT order_id, customer, status, total::text, src_offset, \
           (extract(epoch FROM updated_at) * 1000)::int8 FROM shop.orders ORDER BY order_id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("read orders");
    let want: Vec<(i64, String, String, String, i64, i64)> = expected
        .iter()
        .map(|(id, (status, total, offset, ts))| {
            (
                *id,
                format!("c{id}"),
                status.clone(),
                total.clone(),
                *offset,
                *ts,
            )
        })
        .collect();
    assert_eq!(rows, want, "the last record of each key decides its row");
    assert_eq!(rows.len(), 51, "keys 0..10 deleted except 5, written again");

    for (topic, values) in &payloads {
        let stored: Vec<String> = sqlx::query_scalar(
            "SELECT payload::text FROM raw.events WHERE topic = $1 AND part = 0 ORDER BY off",
        )
        .bind(topic)
        .fetch_all(&db.pool)
        .await
        .expect("read events");
        let stored: Vec<Value> = stored.iter().map(|t| parse(t)).collect();
        assert_eq!(&stored, values, "{topic}: every value once, in order");
    }
    let (events_rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT (topic, part, off)) FROM raw.events")
            .fetch_one(&db.pool)
            .await
            .expect("count events");
    assert_eq!((events_rows, distinct), (100, 100));

    let mut codes = vec![
        (orders.clone(), "missing_field".to_owned()),
        (orders.clone(), "not_json".to_owned()),
    ];
    codes.extend(events.iter().map(|t| (t.clone(), "not_utf8".to_owned())));
    codes.sort();
    assert_eq!(dead_letter_codes(&db.pool).await, codes);

    let mut ends = BTreeMap::new();
    ends.insert((orders.clone(), 0), next[0]);
    ends.insert((orders.clone(), 1), next[1]);
    for topic in &events {
        ends.insert((topic.clone(), 0), 50);
        ends.insert((topic.clone(), 1), 1);
    }
    assert_eq!(stored_offsets(&db.pool, &kafka.group).await, ends);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_batch_of_new_keys_is_copied_straight_in_and_one_touching_a_stored_key_is_merged()
{
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    // A statement trigger records how each write reached the table; a rolled-back try
    // leaves no record.
    exec(
        &db.pool,
        "CREATE SCHEMA shop; CREATE TABLE shop.items (id int8 PRIMARY KEY, name text, \
           src_offset int8); \
         CREATE TABLE shop.writes (n bigserial, how text); \
         CREATE FUNCTION shop.log_write() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO shop.writes (how) VALUES (split_part(current_query(), ' ', 1)); \
           RETURN NULL; END $$; \
         CREATE TRIGGER log_write AFTER INSERT ON shop.items FOR EACH STATEMENT \
           EXECUTE FUNCTION shop.log_write();",
    )
    .await;
    let topic = &kafka.topic;
    let yaml = format!(
        "batch: {{ max_records: 1000 }}\nroutes:\n  - topic: {topic}\n    table: shop.items\n    \
         mode: upsert\n    key: [id]\n    columns:\n      \
         - {{ column: id, field: id, type: int8 }}\n      \
         - {{ column: name, field: name, type: text }}\n      \
         - {{ column: src_offset, field: \"@offset\", type: int8 }}\n"
    );
    let config = kafka.config_with_yaml(&db, &yaml).expect("route loads");
    let item = |id: i64, name: &str| Msg::json(0, None, &json!({"id": id, "name": name}));
    let mut pipeline = Pipeline::connect(config).await.expect("pipeline connects");
    let token = CancellationToken::new();
    let mut produced = 0;
    let mut writes_seen = 0;
    // Produces `msgs`, steps until they are stored, and returns how the new writes
    // reached the table.
    let mut land = async |msgs: Vec<Msg>| {
        send(&kafka, topic, &msgs);
        produced += msgs.len() as i64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while stored_group_total(&db.pool, &kafka.group).await < produced {
            assert!(Instant::now() < deadline, "not caught up within 60 s");
            pipeline.step(&token).await.expect("step succeeds");
        }
        let mut hows: Vec<String> =
            sqlx::query_scalar("SELECT how FROM shop.writes WHERE n > $1 ORDER BY n")
                .bind(writes_seen)
                .fetch_all(&db.pool)
                .await
                .expect("read writes");
        writes_seen += hows.len() as i64;
        hows.dedup();
        hows
    };

    let hows = land((0..50).map(|id| item(id, "v1")).collect()).await;
    assert_eq!(
        hows,
        ["INSERT"],
        "the first batch proves the staging path works"
    );

    let hows = land((50..100).map(|id| item(id, "v1")).collect()).await;
    assert_eq!(hows, ["COPY"], "then new keys go straight in");

    let mut touching: Vec<Msg> = (100..150).map(|id| item(id, "v1")).collect();
    touching.push(item(3, "v2"));
    let hows = land(touching).await;
    assert_eq!(
        hows,
        ["INSERT"],
        "a stored key sends the batch through staging"
    );

    let hows = land((150..200).map(|id| item(id, "v1")).collect()).await;
    assert_eq!(
        hows,
        ["INSERT"],
        "the batch after a miss skips the direct try"
    );

    pipeline.close().await;
    let rows: Vec<(i64, String, i64)> =
        sqlx::query_as("SELECT id, name, src_offset FROM shop.items ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("read items");
    let want: Vec<(i64, String, i64)> = (0..200)
        .map(|id| match id {
            3 => (3, "v2".to_owned(), 150),
            id if id < 100 => (id, "v1".to_owned(), id),
            id => (id, "v1".to_owned(), id + i64::from(id >= 150)),
        })
        .collect();
    assert_eq!(rows, want, "each key once, with its last version");
    assert!(dead_letter_codes(&db.pool).await.is_empty());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_source_default_and_coercion_fills_its_column() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    exec(
        &db.pool,
        "CREATE SCHEMA s; CREATE TABLE s.t (k text, tenant text, src text, ts timestamptz, \
           topic text, part int4, off int8, first_tag text, region text, qty int8, ok bool, \
           whole jsonb, raw_key bytea, UNIQUE (topic, part, off));",
    )
    .await;
    let topic = &kafka.topic;
    let yaml = format!(
        r#"
routes:
  - topic: {topic}
    table: s.t
    columns:
      - {{ column: k, field: "@key", type: text }}
      - {{ column: tenant, field: "@key_json:/tenant", type: text }}
      - {{ column: src, field: "@header:source", type: text }}
      - {{ column: ts, field: "@timestamp", type: timestamptz }}
      - {{ column: topic, field: "@topic", type: text }}
      - {{ column: part, field: "@partition", type: int4 }}
      - {{ column: off, field: "@offset", type: int8 }}
      - {{ column: first_tag, field: /tags/0/name, type: text }}
      - {{ column: region, field: region, type: text, default: eu-west }}
      - {{ column: qty, field: qty, type: int8, coerce: true }}
      - {{ column: ok, field: ok, type: bool, coerce: true }}
      - {{ column: whole, field: "@value", type: jsonb }}
      - {{ column: raw_key, field: "@key", type: bytea }}
"#
    );
    let config = kafka.config_with_yaml(&db, &yaml).expect("routes load");
    let key = r#"{"tenant": "acme", "id": 7}"#;
    let value = json!({"tags": [{"name": "first"}, {"name": "second"}], "qty": "42", "ok": "yes"});
    let mut with_everything = Msg::json(0, Some(key), &value);
    with_everything.headers = vec![
        ("source".into(), b"old".to_vec()),
        ("source".into(), b"probe-7".to_vec()),
    ];
    with_everything.timestamp = Some(1_700_000_123_456);
    let sparse = json!({"region": "us-east", "qty": 3, "ok": false});
    let not_coercible = json!({"qty": "forty-two"});
    send(
        &kafka,
        topic,
        &[
            with_everything,
            Msg::json(0, None, &sparse),
            Msg::json(0, None, &not_coercible),
        ],
    );
    drive_group(config, &db.pool, 3).await.close().await;

    let row = sqlx::query(
        "SELECT k, tenant, src, (extract(epoch FROM ts) * 1000)::int8 AS ts_ms, topic, part, off, \
           first_tag, region, qty, ok, whole::text, raw_key FROM s.t ORDER BY off",
    )
    .fetch_all(&db.pool)
    .await
    .expect("read rows");
    assert_eq!(
        row.len(),
        2,
        "the record whose qty cannot be coerced is a dead letter"
    );
    let first = &row[0];
    assert_eq!(first.get::<String, _>("k"), key);
    assert_eq!(first.get::<String, _>("tenant"), "acme");
    assert_eq!(
        first.get::<String, _>("src"),
        "probe-7",
        "the last header wins"
    );
    assert_eq!(first.get::<i64, _>("ts_ms"), 1_700_000_123_456);
    assert_eq!(&first.get::<String, _>("topic"), topic);
    assert_eq!(
        (first.get::<i32, _>("part"), first.get::<i64, _>("off")),
        (0, 0)
    );
    assert_eq!(first.get::<String, _>("first_tag"), "first");
    assert_eq!(first.get::<String, _>("region"), "eu-west", "the default");
    assert_eq!(first.get::<i64, _>("qty"), 42, "coerced from \"42\"");
    assert!(first.get::<bool, _>("ok"), "coerced from \"yes\"");
    assert_eq!(parse(first.get::<&str, _>("whole")), value);
    assert_eq!(first.get::<Vec<u8>, _>("raw_key"), key.as_bytes());
    let second = &row[1];
    assert_eq!(second.get::<Option<String>, _>("k"), None);
    assert_eq!(second.get::<Option<String>, _>("tenant"), None);
    assert_eq!(second.get::<Option<String>, _>("src"), None);
    assert_eq!(second.get::<String, _>("region"), "us-east");
    assert_eq!(second.get::<i64, _>("qty"), 3);
    assert!(!second.get::<bool, _>("ok"));
    let reasons: Vec<(String, String)> =
        sqlx::query_as("SELECT reason_code, reason FROM ingest.dead_letters")
            .fetch_all(&db.pool)
            .await
            .expect("read dead letters");
    assert_eq!(reasons.len(), 1);
    assert_eq!(reasons[0].0, "bad_value");
    assert!(reasons[0].1.contains("column `qty`"), "{}", reasons[0].1);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_type_stores_valid_values_and_dead_letters_invalid_ones_naming_the_column_in_copy_text()
 {
    // numeric is written as text: the route writes COPY text.
    each_type_lands(true, CopyFormat::Text).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_type_stores_valid_values_and_dead_letters_invalid_ones_naming_the_column_in_copy_binary()
 {
    each_type_lands(false, CopyFormat::Binary).await;
}

/// Ingests a valid value and an invalid one of every column type (numeric only
/// `with_numeric`), checks Postgres' text of each stored value and a dead letter naming
/// each invalid one's column, and that the route wrote `format`.
async fn each_type_lands(with_numeric: bool, format: CopyFormat) {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    // (column, type, extra mapping keys, a valid value, Postgres' text of it, an invalid value)
    let all_types: [(&str, &str, &str, Value, &str, Value); 15] = [
        (
            "c_text",
            "text",
            "",
            json!("héllo\tworld"),
            "héllo\tworld",
            json!([1]),
        ),
        ("c_int2", "int2", "", json!(-32768), "-32768", json!(32768)),
        (
            "c_int4",
            "int4",
            "",
            json!(2147483647),
            "2147483647",
            json!(1.5),
        ),
        (
            "c_int8",
            "int8",
            "",
            json!(-9007199254740993i64),
            "-9007199254740993",
            json!("7"),
        ),
        ("c_float4", "float4", "", json!(1.5), "1.5", json!(1e39)),
        (
            "c_float8",
            "float8",
            "",
            json!(-2.25e-10),
            "-2.25e-10",
            json!("x"),
        ),
        (
            "c_numeric",
            "numeric",
            ", coerce: true",
            json!("12345678901234567890.123"),
            "12345678901234567890.123",
            json!("12a"),
        ),
        ("c_bool", "bool", "", json!(true), "true", json!("maybe")),
        (
            "c_ts",
            "timestamptz",
            ", format: \"%d/%m/%Y %H:%M:%S %z\"",
            json!("31/12/2023 23:59:58 +0100"),
            "2023-12-31 22:59:58",
            json!("2023-12-31T22:59:58Z"),
        ),
        (
            "c_date",
            "date",
            "",
            json!("2024-02-29"),
            "2024-02-29",
            json!("2023-02-29"),
        ),
        (
            "c_interval",
            "interval",
            "",
            json!(90.5),
            "00:01:30.5",
            json!("1 day"),
        ),
        (
            "c_inet",
            "inet",
            "",
            json!("2001:db8::1/64"),
            "2001:db8::1/64",
            json!("300.1.1.1"),
        ),
        (
            "c_uuid",
            "uuid",
            "",
            json!("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            json!("a0eebc99"),
        ),
        (
            "c_jsonb",
            "jsonb",
            "",
            json!({"a": [1, null]}),
            r#"{"a": [1, null]}"#,
            json!("\u{0}"),
        ),
        (
            "c_bytea",
            "bytea",
            "",
            json!("AP8Q"),
            "\\x00ff10",
            json!("***"),
        ),
    ];
    let types: Vec<_> = all_types
        .into_iter()
        .filter(|(_, t, ..)| with_numeric || *t != "numeric")
        .collect();
    let columns: Vec<String> = types
        .iter()
        .map(|(c, t, _, _, _, _)| format!("{c} {t}"))
        .collect();
    exec(
        &db.pool,
        &format!(
            "CREATE SCHEMA s; CREATE TABLE s.typed ({}, topic text, part int4, off int8, \
             UNIQUE (topic, part, off));",
            columns.join(", ")
        ),
    )
    .await;
    let mappings: String = types
        .iter()
        .map(|(c, t, extra, _, _, _)| {
            format!("      - {{ column: {c}, field: {c}, type: {t}{extra} }}\n")
        })
        .collect();
    let yaml = format!(
        "routes:\n  - topic: {}\n    table: s.typed\n    columns:\n{mappings}      - {{ column: topic, field: \"@topic\", type: text }}\n      - {{ column: part, field: \"@partition\", type: int4 }}\n      - {{ column: off, field: \"@offset\", type: int8 }}\n",
        kafka.topic
    );
    let config = kafka.config_with_yaml(&db, &yaml).expect("routes load");
    let valid: serde_json::Map<String, Value> = types
        .iter()
        .map(|(c, _, _, v, _, _)| (c.to_string(), v.clone()))
        .collect();
    let mut msgs = vec![Msg::json(0, None, &Value::Object(valid))];
    for (column, _, _, _, _, invalid) in &types {
        let mut only = serde_json::Map::new();
        only.insert(column.to_string(), invalid.clone());
        msgs.push(Msg::json(0, None, &Value::Object(only)));
    }
    send(&kafka, &kafka.topic, &msgs);
    let pipeline = drive_group(config, &db.pool, msgs.len() as i64).await;
    assert_eq!(
        pipeline.store().routes().decoders()[0].format(),
        format,
        "the route's COPY format"
    );
    pipeline.close().await;

    let texts: Vec<String> = types
        .iter()
        .map(|(c, t, _, _, _, _)| match *t {
            // Shown in UTC whatever the session's time zone.
            "timestamptz" => format!("({c} AT TIME ZONE 'UTC')::text"),
            _ => format!("{c}::text"),
        })
        .collect();
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {} FROM s.typed",
        texts.join(", ")
    )))
    .fetch_all(&db.pool)
    .await
    .expect("read the typed row");
    assert_eq!(row.len(), 1, "only the valid record is a row");
    for (i, (column, _, _, _, text, _)) in types.iter().enumerate() {
        assert_eq!(&row[0].get::<String, _>(i), text, "{column}");
    }
    let reasons: Vec<(i64, String)> =
        sqlx::query_as("SELECT \"offset\", reason FROM ingest.dead_letters ORDER BY \"offset\"")
            .fetch_all(&db.pool)
            .await
            .expect("read dead letters");
    assert_eq!(
        reasons.len(),
        types.len(),
        "every invalid value is a dead letter"
    );
    for ((offset, reason), (column, ..)) in reasons.iter().zip(&types) {
        assert!(
            reason.contains(&format!("column `{column}`")),
            "offset {offset}: {reason}"
        );
    }
    db.drop().await;
}

/// A route over hostile names: a schema and table with spaces and capitals, a column
/// named `select`, one with a quote, one that reads like an injection.
fn hostile_yaml(topic: &str) -> String {
    format!(
        r#"
routes:
  - topic: {topic}
    table: "Odd Schema.Weird Table"
    mode: upsert
    key: [select]
    columns:
      - {{ column: select, field: id, type: int4 }}
      - {{ column: "it\"s", field: quote, type: text }}
      - {{ column: "x\"); DROP TABLE ingest.offsets; --", field: evil, type: text }}
      - {{ column: Mixed Case, field: "@offset", type: int8 }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_identifiers_work_through_schema_check_and_ingest_without_injection() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    let path = std::env::temp_dir().join(format!("kpi-hostile-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&path, hostile_yaml(&kafka.topic)).expect("writable");
    let tool = |command: &str| {
        std::process::Command::new(BINARY)
            .args([command, "--config", path.to_str().expect("UTF-8 path")])
            .args(["--database-url", &db.url])
            .output()
            .expect("the binary runs")
    };

    let missing = tool("check");
    assert!(
        !missing.status.success(),
        "check fails before the table exists"
    );
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains(r#"table "Odd Schema"."Weird Table" does not exist"#),
        "{stderr}"
    );

    let schema = tool("schema");
    assert!(schema.status.success());
    let ddl = String::from_utf8(schema.stdout).expect("UTF-8");
    assert!(ddl.contains(r#"PRIMARY KEY ("select")"#), "{ddl}");
    exec(&db.pool, &ddl).await;
    let checked = tool("check");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    let config = kafka
        .config_with_yaml(&db, &hostile_yaml(&kafka.topic))
        .expect("routes load");
    let msgs: Vec<Msg> = (0..3)
        .map(|i| {
            Msg::json(
                0,
                None,
                &json!({"id": i % 2, "quote": format!("it's {i}"), "evil": "'; --"}),
            )
        })
        .collect();
    send(&kafka, &kafka.topic, &msgs);
    drive_group(config, &db.pool, 3).await.close().await;
    let rows: Vec<(i32, String, String, i64)> = sqlx::query_as(
        r#"SELECT "select", "it""s", "x""); DROP TABLE ingest.offsets; --", "Mixed Case"
           FROM "Odd Schema"."Weird Table" ORDER BY 1"#,
    )
    .fetch_all(&db.pool)
    .await
    .expect("read the weird table");
    assert_eq!(
        rows,
        vec![
            (0, "it's 2".into(), "'; --".into(), 2),
            (1, "it's 1".into(), "'; --".into(), 1)
        ]
    );
    let offsets: i64 = sqlx::query_scalar("SELECT count(*) FROM ingest.offsets")
        .fetch_one(&db.pool)
        .await
        .expect("ingest.offsets still exists");
    assert_eq!(offsets, 1);
    let _ = std::fs::remove_file(&path);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_does_not_match_the_table_stops_the_worker_before_it_consumes() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    exec(
        &db.pool,
        "CREATE SCHEMA s; CREATE TABLE s.orders (id int8 NOT NULL, amount numeric, \
           note varchar(20), created date NOT NULL, topic text, part int4, off int8);",
    )
    .await;
    send(
        &kafka,
        &kafka.topic,
        &[Msg::json(0, None, &json!({"id": 1}))],
    );
    let topic = &kafka.topic;
    let route = |mode: &str, columns: &str| {
        format!("routes:\n  - topic: {topic}\n    table: s.orders\n{mode}    columns:\n{columns}")
    };
    let coordinates = "      - { column: topic, field: \"@topic\", type: text }\n      \
                       - { column: part, field: \"@partition\", type: int4 }\n      \
                       - { column: off, field: \"@offset\", type: int8 }\n";
    let cases = [
        (
            route(
                "",
                &format!(
                    "      - {{ column: id, field: id, type: int8 }}\n      - {{ column: created, field: c, type: date }}\n      - {{ column: amount, field: a, type: float8 }}\n{coordinates}"
                ),
            ),
            vec![
                "routes[0]",
                r#"column "amount" is numeric in the table, but `type: float8` writes float8"#,
            ],
        ),
        (
            route(
                "",
                &format!(
                    "      - {{ column: id, field: id, type: int8 }}\n      - {{ column: created, field: c, type: date }}\n      - {{ column: amonut, field: a, type: numeric }}\n{coordinates}"
                ),
            ),
            vec![r#"column "amonut" does not exist in "s"."orders" (expected type numeric)"#],
        ),
        (
            route(
                "",
                &format!(
                    "      - {{ column: id, field: id, type: int8 }}\n      - {{ column: note, field: n, type: int4 }}\n{coordinates}"
                ),
            ),
            vec![
                r#"column "created" (date) is NOT NULL without a default, and no mapping fills it"#,
                r#"column "note" is character varying(20) in the table, but `type: int4` writes int4 or int8 or numeric"#,
                r#"needs a unique index on ("topic", "part", "off")"#,
            ],
        ),
        (
            route(
                "    mode: upsert\n    key: [id]\n",
                "      - { column: id, field: id, type: int8 }\n      - { column: created, field: c, type: date }\n",
            ),
            vec![r#"needs a unique index or primary key on exactly ("id") for mode: upsert"#],
        ),
    ];
    for (yaml, expected) in cases {
        let config = kafka
            .config_with_yaml(&db, &yaml)
            .expect("the YAML itself is valid");
        assert_refused(config, &yaml, &expected).await;
    }
    assert_nothing_claimed(&db.pool).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_examples_create_tables_their_check_accepts() {
    let db = TestDb::new().await;
    for file in ["examples/routes/orders.yaml", "examples/routes/events.yaml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let config = kafka_pg_ingest::load_config(
            Some(&path),
            Vec::new(),
            &kafka_pg_ingest::config::Overrides {
                database_url: Some(db.url.clone()),
                ..Default::default()
            },
        )
        .expect("the example loads");
        let routes = kafka_pg_ingest::routes::Routes::new(&config).expect("valid routes");
        let ddl = kafka_pg_ingest::store::schema::create_statements(
            routes.iter(),
            None,
            chrono::Utc::now().naive_utc(),
        )
        .expect("no partitioning asked");
        exec(&db.pool, &ddl).await;
        if let Err(e) = kafka_pg_ingest::store::Store::for_pool(db.pool.clone(), &config).await {
            panic!("{file}: the printed schema does not pass the check: {e}\n{ddl}");
        }
    }
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_binary_and_copy_text_store_the_same_edge_values_of_every_type() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    let text_topic = format!("{}-text", kafka.topic);
    kafka
        ._cluster
        .create_topic(&text_topic, 1, 1)
        .expect("topic created");
    // (column, type, extra mapping keys, edge values)
    let types: Vec<(&str, &str, &str, Vec<Value>)> = vec![
        (
            "c_text",
            "text",
            "",
            vec![
                json!(""),
                json!("tab\there\nnewline\\backslash \\N"),
                json!("ünïcødé ✓ 𝄞"),
            ],
        ),
        (
            "c_int2",
            "int2",
            "",
            vec![json!(-32768), json!(0), json!(32767)],
        ),
        (
            "c_int4",
            "int4",
            "",
            vec![json!(-2147483648i64), json!(-1), json!(2147483647)],
        ),
        (
            "c_int8",
            "int8",
            "",
            vec![json!(i64::MIN), json!(0), json!(i64::MAX)],
        ),
        (
            "c_float4",
            "float4",
            "",
            vec![json!(-0.0), json!(1.0e-40), json!(3.4028234e38), json!(0.1)],
        ),
        (
            "c_float8",
            "float8",
            "",
            vec![
                json!(-0.0),
                json!(5e-324),
                json!(1.7976931348623157e308),
                json!(0.1),
            ],
        ),
        ("c_bool", "bool", "", vec![json!(true), json!(false)]),
        (
            "c_ts",
            "timestamptz",
            "",
            vec![
                json!("0001-01-01T00:00:00Z"),
                json!("1969-12-31T23:59:59.999999Z"),
                json!("1999-12-31T23:59:59.5+05:30"),
                json!("2000-01-01T00:00:00Z"),
                json!("9999-12-31T23:59:59.999999999Z"),
            ],
        ),
        (
            "c_date",
            "date",
            "",
            vec![
                json!("0001-01-01"),
                json!("1999-12-31"),
                json!("9999-12-31"),
            ],
        ),
        (
            "c_interval",
            "interval",
            "",
            vec![
                json!(0),
                json!("0:00:00.000001"),
                json!("1000000:59:59.999999"),
                json!(86400.5),
            ],
        ),
        (
            "c_inet",
            "inet",
            "",
            vec![
                json!("0.0.0.0"),
                json!("10.1.2.3/8"),
                json!("::ffff:1.2.3.4"),
                json!("::"),
                json!("2001:db8::1/0"),
            ],
        ),
        (
            "c_uuid",
            "uuid",
            "",
            vec![
                json!("00000000-0000-0000-0000-000000000000"),
                json!("ffffffff-ffff-ffff-ffff-ffffffffffff"),
            ],
        ),
        (
            "c_jsonb",
            "jsonb",
            "",
            vec![json!({"é": ["\t", null, 1.5e300]}), json!([]), json!("s")],
        ),
        (
            "c_bytea",
            "bytea",
            "",
            vec![json!(""), json!("AP8Q"), json!("////")],
        ),
    ];
    let rows = types
        .iter()
        .map(|(.., values)| values.len())
        .max()
        .unwrap_or(0);
    let columns: Vec<String> = types.iter().map(|(c, t, ..)| format!("{c} {t}")).collect();
    // The text table has one more column, numeric, which makes its route COPY text.
    exec(
        &db.pool,
        &format!(
            "CREATE SCHEMA s; \
             CREATE TABLE s.bin ({cols}, topic text, part int4, off int8, UNIQUE (topic, part, off)); \
             CREATE TABLE s.txt ({cols}, topic text, part int4, off int8, n numeric, \
               UNIQUE (topic, part, off));",
            cols = columns.join(", ")
        ),
    )
    .await;
    let mappings: String = types
        .iter()
        .map(|(c, t, extra, _)| {
            format!("      - {{ column: {c}, field: {c}, type: {t}{extra} }}\n")
        })
        .collect();
    let coordinates = "      - { column: topic, field: \"@topic\", type: text }\n      \
                       - { column: part, field: \"@partition\", type: int4 }\n      \
                       - { column: off, field: \"@offset\", type: int8 }\n";
    let yaml = format!(
        "routes:\n  - topic: {bin}\n    table: s.bin\n    columns:\n{mappings}{coordinates}\
         \x20 - topic: {text_topic}\n    table: s.txt\n    columns:\n{mappings}{coordinates}\
         \x20     - {{ column: n, field: \"@offset\", type: numeric }}\n",
        bin = kafka.topic
    );
    let config = kafka.config_with_yaml(&db, &yaml).expect("routes load");
    // Row i holds each type's value i (the last value again when a type has fewer).
    let msgs: Vec<Msg> = (0..rows)
        .map(|i| {
            let row: serde_json::Map<String, Value> = types
                .iter()
                .map(|(c, _, _, values)| (c.to_string(), values[i.min(values.len() - 1)].clone()))
                .collect();
            Msg::json(0, None, &Value::Object(row))
        })
        .collect();
    send(&kafka, &kafka.topic, &msgs);
    send(&kafka, &text_topic, &msgs);
    let pipeline = drive_group(config, &db.pool, 2 * rows as i64).await;
    let formats: Vec<CopyFormat> = pipeline
        .store()
        .routes()
        .decoders()
        .iter()
        .map(|d| d.format())
        .collect();
    assert_eq!(formats, vec![CopyFormat::Binary, CopyFormat::Text]);
    pipeline.close().await;

    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM ingest.dead_letters")
            .fetch_one(&db.pool)
            .await
            .expect("count dead letters"),
        0,
        "every edge value is valid"
    );
    let texts: Vec<String> = types
        .iter()
        .map(|(c, t, ..)| match *t {
            "timestamptz" => format!("({c} AT TIME ZONE 'UTC')::text"),
            // float's text rounds; its bits must match.
            "float4" | "float8" => format!("float8send({c}::float8)::text"),
            _ => format!("{c}::text"),
        })
        .collect();
    let read = |table: &str| {
        let sql = format!(
            "SELECT off::text, {} FROM s.{table} ORDER BY off",
            texts.join(", ")
        );
        let pool = db.pool.clone();
        async move {
            sqlx::query(AssertSqlSafe(sql))
                .fetch_all(&pool)
                .await
                .expect("read rows")
                .iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| r.get::<Option<String>, _>(i).unwrap_or_default())
                        .collect::<Vec<String>>()
                })
                .collect::<Vec<_>>()
        }
    };
    let (bin, txt) = (read("bin").await, read("txt").await);
    assert_eq!(bin.len(), rows);
    assert_eq!(bin, txt, "COPY BINARY and COPY text stored the same values");
    db.drop().await;
}
