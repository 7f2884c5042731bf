//! Debezium change events into upsert routes (`envelope: debezium`), and version-ordered
//! writes.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use kafka_pg_ingest::dev::registry::DevRegistry;
use kafka_pg_ingest::ops::{self, RewindTarget};
use kafka_pg_ingest::pipeline::Pipeline;
use kafka_pg_ingest::store::admin::DeadLetterFilter;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::*;
use crate::routes::{Msg, send};

const MIRROR: &str = "CREATE SCHEMA mirror; CREATE TABLE mirror.customers (
    id int4 PRIMARY KEY, first_name text NOT NULL, last_name text NOT NULL,
    email text NOT NULL, balance numeric(12,2), born date, updated_at timestamptz,
    seen_at timestamptz, profile jsonb, notes text, avatar bytea, ratio numeric,
    token uuid, lsn int8, op text)";

/// The mirror's route; `extra` adds keys to it (indented as route keys).
fn mirror_route(topic: &str, extra: &str) -> String {
    format!(
        r#"
routes:
  - topic: {topic}
    table: mirror.customers
    mode: upsert
    key: [id]
    envelope: debezium
{extra}
    columns:
      - {{ column: id, field: id, type: int4 }}
      - {{ column: first_name, field: first_name, type: text }}
      - {{ column: last_name, field: last_name, type: text }}
      - {{ column: email, field: email, type: text }}
      - {{ column: balance, field: balance, type: numeric }}
      - {{ column: born, field: born, type: date }}
      - {{ column: updated_at, field: updated_at, type: timestamptz, format: epoch_us }}
      - {{ column: seen_at, field: seen_at, type: timestamptz }}
      - {{ column: profile, field: profile, type: jsonb }}
      - {{ column: notes, field: notes, type: text }}
      - {{ column: avatar, field: avatar, type: bytea }}
      - {{ column: ratio, field: ratio, type: numeric }}
      - {{ column: token, field: token, type: uuid }}
      - {{ column: lsn, field: "@source:/lsn", type: int8 }}
      - {{ column: op, field: "@op", type: text }}
"#
    )
}

/// The source table after the fixture's stream (a truncate wipes rows 901 and 902).
const EXPECTED: &str = r#"INSERT INTO expected VALUES
 (1001, 'Sally', 'Thomas', 'sally@acme.com', -99999999.99, '1990-03-14',
  '2024-03-01 00:00:00+00', '2024-01-02 03:04:05.123456+00', '{"tier":"gold","tags":["a","b"]}',
  repeat('A note long enough to be TOASTed. ', 120), '\x00ff10', 3.14159,
  '4f0c7a1e-8a47-4b0e-9b8e-0c6a1d2f3e4b', 24024152, 'u'),
 (1003, 'Ed', 'Walker', 'ed@walker.com', 10.10, '2000-02-29', '2020-02-29 12:00:00+00',
  '2020-02-29 12:00:00+00', '[1,2,3]', '', '\x', -12345678901234567890.5,
  '00000000-0000-0000-0000-000000000000', 24024664, 'u'),
 (1004, 'Anne', 'Kretchmar', 'annek@noanswer.org', 9999999999.99, '1970-01-01',
  '1970-01-01 00:00:00+00', '1970-01-01 00:00:00+00', '{"quote":"tab\there\nnewline \\ slash"}',
  E'line one\nline two\tand a tab', '\x5c0a09', 0.000001, NULL, 24023896, 'c'),
 (1005, 'Carl', 'Jung', 'carl@example.org', 42.00, NULL, NULL, '2024-05-04 23:35:05.5+00',
  '{"nested":{"deep":[true,null]}}', NULL, NULL, 7, NULL, 24024536, 'c')"#;

/// The rows `on_truncate: ignore` keeps besides.
const TRUNCATED: &str = "INSERT INTO expected (id, first_name, last_name, email, balance, lsn, op) \
     VALUES (901, 'Temp', 'One', 't1@example.org', 1.00, 24023128, 'c'), \
            (902, 'Temp', 'Two', 't2@example.org', 2.00, 24023256, 'c')";

/// The fixture's records, in order.
pub fn fixture(name: &str) -> Vec<Msg> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("fixture");
    let bytes = |v: &Value| (!v.is_null()).then(|| v.to_string().into_bytes());
    text.lines()
        .map(|line| {
            let event: Value = serde_json::from_str(line).expect("fixture line is JSON");
            Msg {
                key: bytes(&event["key"]),
                value: bytes(&event["value"]),
                ..Msg::default()
            }
        })
        .collect()
}

/// Rows of `mirror.customers` not in `expected`, and the other way round.
async fn differences(pool: &PgPool) -> (Vec<String>, Vec<String>) {
    let one_way = |a: &str, b: &str| {
        format!("SELECT x::text FROM (SELECT * FROM {a} EXCEPT SELECT * FROM {b}) x ORDER BY 1")
    };
    let read = async |sql: String| -> Vec<String> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_all(pool)
            .await
            .expect("compare")
    };
    (
        read(one_way("mirror.customers", "expected")).await,
        read(one_way("expected", "mirror.customers")).await,
    )
}

/// Lands `file` through a Debezium route with `extra` route keys and `batch` records per
/// batch; asserts the mirror holds the expected table (plus rows 901 and 902 when
/// `truncated` is false), every offset is stored and no dead letter was written.
async fn mirror_fixture(file: &str, extra: &str, batch: usize, truncated: bool) {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    exec(&db.pool, MIRROR).await;
    exec(&db.pool, "CREATE TABLE expected (LIKE mirror.customers)").await;
    exec(&db.pool, EXPECTED).await;
    if !truncated {
        exec(&db.pool, TRUNCATED).await;
    }
    let yaml = format!(
        "batch: {{ max_records: {batch} }}\n{}",
        mirror_route(&kafka.topic, extra)
    );
    let config = kafka.config_with_yaml(&db, &yaml).expect("route loads");
    let records = fixture(file);
    send(&kafka, &kafka.topic, &records);
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        records.len() as i64,
        Duration::from_secs(60),
    )
    .await;
    pipeline.close().await;

    assert_eq!(
        differences(&db.pool).await,
        (Vec::new(), Vec::new()),
        "{file}: the mirror equals the source table (rows only in the mirror, only expected)"
    );
    let letters = scalar(&db.pool, "SELECT count(*) FROM ingest.dead_letters").await;
    assert_eq!(letters, 0, "{file}: no dead letters");
    assert_offsets_at_end(&db.pool, &kafka, records.len() as i64).await;
    db.drop().await;
}

/// Truncates (which need the version: the LSN).
const TRUNCATES: &str = "    version: lsn\n    on_truncate: truncate";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_events_with_schemas_mirror_the_source_table_with_exact_types_and_toast_kept() {
    mirror_fixture("debezium-postgres.jsonl", TRUNCATES, 1000, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_events_without_schemas_one_per_batch_mirror_the_same_table() {
    // One event per batch: each TOAST placeholder is resolved from the stored row, not
    // from an earlier line of its batch.
    mirror_fixture("debezium-postgres-plain.jsonl", TRUNCATES, 1, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debezium_truncate_is_ignored_by_default() {
    mirror_fixture("debezium-postgres.jsonl", "    version: lsn", 3, false).await;
}

/// Rows of `mirror.accounts` by id: name, amount, note, lsn.
type Accounts = BTreeMap<i32, (String, String, String, i64)>;

/// A synthetic change stream: `steps` changes to 300 keys over 4 partitions (a key stays
/// in one), creates, updates (some with the TOAST placeholder for `note`), deletes with
/// their tombstones; `lsn` grows by one per event. Hands back the records per partition
/// and the final table.
fn change_stream(steps: usize, seed: u64) -> (Vec<Msg>, Accounts) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows: Accounts = BTreeMap::new();
    let mut msgs = Vec::new();
    for step in 0..steps {
        let id: i32 = rng.random_range(0..300);
        let lsn = 1_000 + step as i64;
        let key = json!({"id": id}).to_string().into_bytes();
        let source = json!({"connector": "postgresql", "lsn": lsn, "ts_ms": lsn});
        let partition = id % 4;
        let event = match rows.get(&id) {
            Some(_) if rng.random_bool(0.2) => {
                rows.remove(&id);
                msgs.push(Msg {
                    partition,
                    key: Some(key.clone()),
                    value: Some(
                        json!({"before": {"id": id}, "after": null, "op": "d", "source": source})
                            .to_string()
                            .into_bytes(),
                    ),
                    ..Msg::default()
                });
                None
            }
            existing => {
                let name = format!("n{step}");
                let amount = format!("{}.{:02}", step, step % 100);
                let keep_note = existing.is_some() && rng.random_bool(0.3);
                let note = match existing {
                    Some(row) if keep_note => row.2.clone(),
                    _ => format!("note {step} ").repeat(rng.random_range(1..50)),
                };
                let op = if existing.is_some() { "u" } else { "c" };
                let shown = if keep_note {
                    "__debezium_unavailable_value".to_owned()
                } else {
                    note.clone()
                };
                rows.insert(id, (name.clone(), amount.clone(), note, lsn));
                Some(json!({"before": null, "after": {"id": id, "name": name,
                    "amount": amount, "note": shown}, "op": op, "source": source}))
            }
        };
        match event {
            Some(value) => msgs.push(Msg {
                partition,
                key: Some(key),
                value: Some(value.to_string().into_bytes()),
                ..Msg::default()
            }),
            None => msgs.push(Msg {
                partition,
                key: Some(key),
                ..Msg::default()
            }),
        }
    }
    (msgs, rows)
}

const ACCOUNTS: &str = "CREATE SCHEMA mirror; CREATE TABLE mirror.accounts (id int4 PRIMARY KEY, \
     name text NOT NULL, amount numeric(12,2), note text, lsn int8 NOT NULL)";

fn accounts_route(topic: &str, version: bool) -> String {
    format!(
        r#"
routes:
  - topic: {topic}
    table: mirror.accounts
    mode: upsert
    key: [id]
    envelope: debezium
{}
    columns:
      - {{ column: id, field: id, type: int4 }}
      - {{ column: name, field: name, type: text }}
      - {{ column: amount, field: amount, type: numeric }}
      - {{ column: note, field: note, type: text }}
      - {{ column: lsn, field: "@source:/lsn", type: int8 }}
"#,
        if version { "    version: lsn" } else { "" }
    )
}

async fn accounts(pool: &PgPool) -> Accounts {
    let rows: Vec<(i32, String, String, String, i64)> =
        sqlx::query_as("SELECT id, name, amount::text, note, lsn FROM mirror.accounts ORDER BY id")
            .fetch_all(pool)
            .await
            .expect("read accounts");
    rows.into_iter()
        .map(|(id, name, amount, note, lsn)| (id, (name, amount, note, lsn)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_debezium_mirror_stays_exact_through_sigkills_and_a_rewind_to_earliest_on_a_live_worker()
{
    let db = TestDb::new().await;
    let kafka = TestKafka::new(4);
    exec(&db.pool, ACCOUNTS).await;
    let seed: u64 = std::env::var("KPI_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (KPI_TEST_SEED reproduces the stream and the kill moments)");
    let (msgs, expected) = change_stream(6_000, seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 1);
    let yaml = format!(
        "batch: {{ max_records: 150 }}\n{}",
        accounts_route(&kafka.topic, true)
    );
    let path = std::env::temp_dir().join(format!("{}.yaml", kafka.group));
    std::fs::write(&path, &yaml).expect("config written");
    let log = std::env::temp_dir().join(format!("{}.log", kafka.group));
    let start = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut command = worker_command(&kafka, &db);
        command
            .args(["--config", path.to_str().expect("UTF-8 path")])
            .env("RUST_LOG", "info,librdkafka=warn")
            .stdout(Stdio::null())
            .stderr(log);
        Reaped(command.spawn().expect("worker starts"))
    };
    let progress = || stored_total(&db.pool, &kafka.group, &kafka.topic);

    // Three waves of 2,000, each killed at a random moment once it is being ingested.
    let mut child = start();
    let mut mid_stream_kills = 0;
    let mut produced = 0;
    for wave in msgs.chunks(2_000) {
        send(&kafka, &kafka.topic, wave);
        produced += wave.len() as i64;
        let before = progress().await;
        wait_for("the worker committing", Duration::from_secs(90), || async {
            progress().await > before
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
        let at_kill = progress().await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        if at_kill < produced {
            mid_stream_kills += 1;
        }
        child = start();
    }
    let total = msgs.len() as i64;
    wait_for(
        "the last worker catching up",
        Duration::from_secs(120),
        || async { progress().await == total },
    )
    .await;
    assert_eq!(accounts(&db.pool).await, expected, "after the kills");

    // Every record again, on the live worker: older versions never win.
    let config = kafka.config_with_yaml(&db, &yaml).expect("route loads");
    let plan = ops::rewind(
        &config,
        &kafka.topic,
        &[0, 1, 2, 3],
        RewindTarget::Earliest,
        false,
        true,
    )
    .await
    .expect("rewind");
    let reread: i64 = plan.moves.iter().map(|m| m.reread).sum();
    assert_eq!(reread, total, "every record is read again");
    wait_for("the replay", Duration::from_secs(120), || async {
        let replaying = scalar(
            &db.pool,
            "SELECT count(*) FROM ingest.offsets WHERE replay_until IS NOT NULL",
        )
        .await;
        replaying == 0 && progress().await == total
    })
    .await;
    let status = terminate(&mut child);
    assert!(
        status.success(),
        "SIGTERM exits 0: {status}; log in {}",
        log.display()
    );
    assert!(
        mid_stream_kills >= 2,
        "kills mid-stream: {mid_stream_kills}"
    );
    assert_eq!(accounts(&db.pool).await, expected, "after the replay");
    let letters = scalar(&db.pool, "SELECT count(*) FROM ingest.dead_letters").await;
    assert_eq!(letters, 0);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&log);
    db.drop().await;
}

/// One event for key 1 of `mirror.accounts`.
fn account(op: &str, lsn: i64, name: &str) -> Msg {
    let after = (op != "d").then(|| json!({"id": 1, "name": name, "amount": "1.00", "note": name}));
    Msg {
        key: Some(br#"{"id":1}"#.to_vec()),
        value: Some(
            json!({"before": null, "after": after, "op": op, "source": {"lsn": lsn}})
                .to_string()
                .into_bytes(),
        ),
        ..Msg::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_version_never_replaces_a_newer_one_with_version_set_and_does_without() {
    for version in [true, false] {
        let db = TestDb::new().await;
        let kafka = TestKafka::new(1);
        exec(&db.pool, ACCOUNTS).await;
        // Rejects one record for now, to be re-driven once it is dropped.
        exec(
            &db.pool,
            "ALTER TABLE mirror.accounts ADD CONSTRAINT later CHECK (name <> 'redriven')",
        )
        .await;
        let yaml = format!(
            "batch: {{ max_records: 1 }}\n{}",
            accounts_route(&kafka.topic, version)
        );
        let config = kafka.config_with_yaml(&db, &yaml).expect("route loads");
        // A producer out of order: lsn 300, then 200 (older) for the same key, then a
        // delete from lsn 100 (older still); and lsn 250, rejected by the constraint.
        let msgs = [
            account("c", 300, "newest"),
            account("u", 250, "redriven"),
            account("u", 200, "older"),
            account("d", 100, ""),
        ];
        send(&kafka, &kafka.topic, &msgs);
        let mut pipeline = Pipeline::connect(config.clone()).await.expect("starts");
        drive_until_caught_up(&mut pipeline, &db.pool, &kafka, 4, Duration::from_secs(60)).await;
        pipeline.close().await;
        let rejected = scalar(
            &db.pool,
            "SELECT count(*) FROM ingest.dead_letters WHERE reason_code = 'db_rejected'",
        )
        .await;
        assert_eq!(rejected, 1, "version: {version}");
        exec(
            &db.pool,
            "ALTER TABLE mirror.accounts DROP CONSTRAINT later",
        )
        .await;
        let redriven = ops::retry_dead_letters(&config, &DeadLetterFilter::default()).await;
        if version {
            // Re-driven, lsn 250 is older than the row's 300: it stays, superseded.
            let done = redriven.expect("re-drive");
            assert_eq!((done.moved, done.still_failing), (0, 1));
            let reason: String =
                sqlx::query_scalar("SELECT reason_code || ': ' || reason FROM ingest.dead_letters")
                    .fetch_one(&db.pool)
                    .await
                    .expect("letter");
            assert!(reason.starts_with("superseded: "), "{reason}");
            assert!(reason.contains("(version 300)"), "{reason}");
        } else {
            // Nothing orders this route's versions: a re-drive is refused.
            let err = redriven.expect_err("refused").to_string();
            assert!(err.contains("Set `version:`"), "{err}");
        }
        let rows = accounts(&db.pool).await;
        let want: Accounts = if version {
            [(1, ("newest".into(), "1.00".into(), "newest".into(), 300))].into()
        } else {
            // Without `version`, the last record of a partition wins: the delete.
            BTreeMap::new()
        };
        assert_eq!(rows, want, "version: {version}");
        db.drop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_debezium_envelopes_are_dead_letters_naming_what_is_wrong() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    exec(&db.pool, ACCOUNTS).await;
    let config = kafka
        .config_with_yaml(&db, &accounts_route(&kafka.topic, true))
        .expect("route loads");
    let record = |key: Option<&str>, value: &str| Msg {
        key: key.map(|k| k.as_bytes().to_vec()),
        value: Some(value.as_bytes().to_vec()),
        ..Msg::default()
    };
    let msgs = [
        record(
            Some(r#"{"id":1}"#),
            r#"{"op":"x","after":{"id":1},"source":{"lsn":1}}"#,
        ),
        record(
            Some(r#"{"id":2}"#),
            r#"{"op":"c","after":null,"source":{"lsn":2}}"#,
        ),
        record(None, r#"{"op":"d","before":null,"source":{"lsn":3}}"#),
        record(
            Some(r#"{"id":4}"#),
            r#"{"after":{"id":4},"source":{"lsn":4}}"#,
        ),
        record(Some(r#"{"id":5}"#), r#"[1, 2]"#),
        record(
            Some(r#"{"id":6}"#),
            r#"{"op":"u","after":"nope","source":{"lsn":6}}"#,
        ),
        // Valid: lands.
        record(
            Some(r#"{"id":7}"#),
            r#"{"op":"c","after":{"id":7,"name":"ok","amount":"7.00","note":"n"},"source":{"lsn":7}}"#,
        ),
    ];
    send(&kafka, &kafka.topic, &msgs);
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(&mut pipeline, &db.pool, &kafka, 7, Duration::from_secs(60)).await;
    pipeline.close().await;
    let letters: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT \"offset\", reason_code, reason FROM ingest.dead_letters ORDER BY \"offset\"",
    )
    .fetch_all(&db.pool)
    .await
    .expect("dead letters");
    let expected = [
        (0, "bad_envelope", "`op` is `x`"),
        (1, "bad_envelope", "op `c` has no `after` row image"),
        (2, "missing_field", "`id`"),
        (3, "bad_envelope", "the event has no `op`"),
        (4, "not_object", "not an object"),
        (
            5,
            "bad_envelope",
            "op `u` has `after` \"nope\", not an object",
        ),
    ];
    assert_eq!(letters.len(), expected.len(), "{letters:?}");
    for ((offset, code, reason), (want_offset, want_code, part)) in letters.iter().zip(expected) {
        assert_eq!(
            (*offset, code.as_str()),
            (want_offset, want_code),
            "{reason}"
        );
        assert!(reason.contains(part), "`{part}` in: {reason}");
    }
    let rows = accounts(&db.pool).await;
    assert_eq!(rows.keys().copied().collect::<Vec<_>>(), vec![7]);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_partitioned_outside_its_key_is_refused_at_startup() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    exec(
        &db.pool,
        "CREATE SCHEMA mirror; CREATE TABLE mirror.accounts (id int4, name text NOT NULL, \
         amount numeric(12,2), note text, lsn int8 NOT NULL, PRIMARY KEY (id, lsn)) \
         PARTITION BY RANGE (lsn); \
         CREATE TABLE mirror.accounts_all PARTITION OF mirror.accounts DEFAULT",
    )
    .await;
    let config = kafka
        .config_with_yaml(&db, &accounts_route(&kafka.topic, true))
        .expect("route loads");
    assert_refused(
        config,
        "a delete could not find its row by key alone",
        &["partitioned by a column outside the upsert key: a Debezium delete carries only the key"],
    )
    .await;
    assert_nothing_claimed(&db.pool).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_sharing_its_version_with_the_reload_after_it_keeps_the_reload() {
    // `BEGIN; TRUNCATE; INSERT ..; COMMIT` at the source: one `ts_ms` for all its events.
    for batch in [1, 100] {
        let db = TestDb::new().await;
        let kafka = TestKafka::new(1);
        exec(&db.pool, ACCOUNTS).await;
        let route = accounts_route(&kafka.topic, true)
            .replace("\"@source:/lsn\"", "\"@source:/ts_ms\"")
            .replace(
                "    version: lsn",
                "    version: lsn\n    on_truncate: truncate",
            );
        let yaml = format!("batch: {{ max_records: {batch} }}\n{route}");
        let config = kafka.config_with_yaml(&db, &yaml).expect("route loads");
        let event = |id: i32, ts: i64| {
            let after = json!({"id": id, "name": format!("n{id}"), "amount": "1.00", "note": ""});
            Msg {
                key: Some(json!({"id": id}).to_string().into_bytes()),
                value: Some(
                    json!({"op": "c", "after": after, "source": {"ts_ms": ts}})
                        .to_string()
                        .into_bytes(),
                ),
                ..Msg::default()
            }
        };
        let truncate = Msg {
            value: Some(br#"{"op": "t", "source": {"ts_ms": 300}}"#.to_vec()),
            ..Msg::default()
        };
        let msgs = [
            event(1, 100),
            event(2, 200),
            truncate,
            event(3, 300),
            event(4, 300),
        ];
        send(&kafka, &kafka.topic, &msgs);
        let mut pipeline = Pipeline::connect(config).await.expect("starts");
        drive_until_caught_up(&mut pipeline, &db.pool, &kafka, 5, Duration::from_secs(60)).await;
        pipeline.close().await;
        let ids: Vec<i32> = accounts(&db.pool).await.into_keys().collect();
        assert_eq!(ids, vec![3, 4], "batches of {batch}");
        db.drop().await;
    }
}

/// The envelope of `mirror.accounts` events as Debezium's AvroConverter writes it: the
/// row image a record in a union with null, `source` a record, Connect's Decimal an Avro
/// decimal.
const ACCOUNTS_AVRO: &str = r#"{"type": "record", "name": "Envelope",
 "namespace": "dbserver1.mirror.accounts", "fields": [
  {"name": "before", "type": ["null", {"type": "record", "name": "Value", "fields": [
    {"name": "id", "type": "int"},
    {"name": "name", "type": ["null", "string"], "default": null},
    {"name": "amount", "type": ["null", {"type": "bytes", "logicalType": "decimal",
      "precision": 12, "scale": 2}], "default": null},
    {"name": "note", "type": ["null", "string"], "default": null}]}], "default": null},
  {"name": "after", "type": ["null", "Value"], "default": null},
  {"name": "source", "type": {"type": "record", "name": "Source",
    "namespace": "io.debezium.connector.postgresql", "fields": [
      {"name": "lsn", "type": ["null", "long"], "default": null}]}},
  {"name": "op", "type": "string"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_debezium_events_mirror_through_the_registry() {
    use apache_avro::types::Value as Avro;
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    exec(&db.pool, ACCOUNTS).await;
    let key_schema =
        r#"{"type": "record", "name": "Key", "fields": [{"name": "id", "type": "int"}]}"#;
    let registry = DevRegistry::start(
        "AVRO",
        [(9, ACCOUNTS_AVRO.to_owned()), (10, key_schema.to_owned())].into(),
    )
    .await
    .expect("the registry serves");
    let route = accounts_route(&kafka.topic, true).replace(
        "    envelope: debezium",
        "    envelope: debezium\n    format: avro\n    key_format: avro",
    );
    let yaml = format!("schema_registry: {{ url: {} }}\n{route}", registry.url);
    let config = kafka.config_with_yaml(&db, &yaml).expect("route loads");
    let schema = apache_avro::Schema::parse_str(ACCOUNTS_AVRO).expect("schema");
    let image = |id: i32, name: &str, cents: i64, note: Option<&str>| {
        let amount =
            apache_avro::Decimal::from(num_bigint::BigInt::from(cents).to_signed_bytes_be());
        Avro::Union(
            1,
            Box::new(Avro::Record(vec![
                ("id".into(), Avro::Int(id)),
                (
                    "name".into(),
                    Avro::Union(1, Box::new(Avro::String(name.into()))),
                ),
                (
                    "amount".into(),
                    Avro::Union(1, Box::new(Avro::Decimal(amount))),
                ),
                (
                    "note".into(),
                    match note {
                        Some(n) => Avro::Union(1, Box::new(Avro::String(n.into()))),
                        None => Avro::Union(0, Box::new(Avro::Null)),
                    },
                ),
            ])),
        )
    };
    let null = || Avro::Union(0, Box::new(Avro::Null));
    let event = |op: &str, before: Avro, after: Avro, lsn: i64| {
        let value = Avro::Record(vec![
            ("before".into(), before),
            ("after".into(), after),
            (
                "source".into(),
                Avro::Record(vec![(
                    "lsn".into(),
                    Avro::Union(1, Box::new(Avro::Long(lsn))),
                )]),
            ),
            ("op".into(), Avro::String(op.into())),
        ]);
        // The Confluent wire format: magic byte 0, schema id 9.
        let mut bytes = vec![0, 0, 0, 0, 9];
        let datum = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .expect("writer")
            .write_value_to_vec(value)
            .expect("encodes");
        bytes.extend(datum);
        Msg {
            key: Some(b"k".to_vec()),
            value: Some(bytes),
            ..Msg::default()
        }
    };
    let msgs = [
        event("r", null(), image(1, "one", 150, Some("long note")), 10),
        event("c", null(), image(2, "two", -7, None), 11),
        event(
            "u",
            null(),
            image(1, "uno", 12345, Some("__debezium_unavailable_value")),
            12,
        ),
        // A delete: `before` holds the key only; the record key is not JSON.
        event("d", image(2, "", 0, None), null(), 13),
        event("c", null(), image(3, "three", 300, None), 14),
        // A delete without `before`: the key comes from the Avro record key.
        Msg {
            key: Some({
                let key = apache_avro::Schema::parse_str(key_schema).expect("key schema");
                let mut framed = vec![0, 0, 0, 0, 10];
                framed.extend(
                    apache_avro::writer::datum::GenericDatumWriter::builder(&key)
                        .build()
                        .expect("writer")
                        .write_value_to_vec(Avro::Record(vec![("id".into(), Avro::Int(3))]))
                        .expect("encodes"),
                );
                framed
            }),
            ..event("d", null(), null(), 15)
        },
    ];
    send(&kafka, &kafka.topic, &msgs);
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(&mut pipeline, &db.pool, &kafka, 6, Duration::from_secs(60)).await;
    pipeline.close().await;
    let letters: Vec<String> =
        sqlx::query_scalar("SELECT reason_code || ': ' || reason FROM ingest.dead_letters")
            .fetch_all(&db.pool)
            .await
            .expect("letters");
    assert!(letters.is_empty(), "{letters:?}");
    let want: Accounts = [(1, ("uno".into(), "123.45".into(), "long note".into(), 12))].into();
    assert_eq!(accounts(&db.pool).await, want);
    let letters = scalar(&db.pool, "SELECT count(*) FROM ingest.dead_letters").await;
    assert_eq!(letters, 0);
    db.drop().await;
}
