//! Re-driving dead letters and replaying: never an older version over a newer one, and
//! nothing changed when the configuration cannot judge a letter.

use std::time::Duration;

use kafka_pg_ingest::ops::{self, RewindTarget};
use kafka_pg_ingest::pipeline::Pipeline;
use kafka_pg_ingest::store::admin::DeadLetterFilter;
use sqlx::PgPool;

use crate::helpers::*;
use crate::routes::{Msg, send};

/// `(offset, reason_code, attempts)` of every dead letter.
async fn letters(pool: &PgPool) -> Vec<(i64, String, i32)> {
    sqlx::query_as("SELECT \"offset\", reason_code, attempts FROM ingest.dead_letters ORDER BY 1")
        .fetch_all(pool)
        .await
        .expect("dead letters")
}

fn item(key: &str, value: Option<&str>) -> Msg {
    Msg {
        key: Some(key.as_bytes().to_vec()),
        value: value.map(|v| v.as_bytes().to_vec()),
        ..Msg::default()
    }
}

fn items_route(topic: &str, delete_on_tombstone: bool, with_offsets: bool) -> String {
    let offsets = if with_offsets {
        "\n      - { column: part, field: \"@partition\", type: int4 }\n      - { column: off, field: \"@offset\", type: int8 }"
    } else {
        ""
    };
    // One record per batch: an upsert batch keeps only the last record of each key.
    format!(
        "batch: {{ max_records: 1 }}\nroutes:\n  - topic: {topic}\n    table: shop.items\n    mode: upsert\n    key: [id]\n    \
         delete_on_tombstone: {delete_on_tombstone}\n    columns:\n      \
         - {{ column: id, field: \"@key\", type: int8, coerce: true }}\n      \
         - {{ column: amount, field: amount, type: int4 }}{offsets}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_re_driven_upsert_record_older_than_its_row_stays_a_superseded_dead_letter() {
    let db = TestDb::new().await;
    exec(
        &db.pool,
        "CREATE SCHEMA shop; CREATE TABLE shop.items (id int8 PRIMARY KEY, \
           amount int4 CONSTRAINT small CHECK (amount < 100), part int4, off int8)",
    )
    .await;
    let kafka = TestKafka::new(1);
    send(
        &kafka,
        &kafka.topic,
        &[
            item("1", Some(r#"{"amount": 500}"#)), // 0: rejected by the check
            item("1", Some(r#"{"amount": 7}"#)),   // 1: the newer version of key 1
            item("2", None),                       // 2: a tombstone, dead-lettered
            item("2", Some(r#"{"amount": 9}"#)),   // 3: key 2 written after it
            item("3", Some(r#"{"amount": 600}"#)), // 4: rejected, nothing newer
        ],
    );
    let config = kafka
        .config_with_yaml(&db, &items_route(&kafka.topic, false, true))
        .expect("route loads");
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(&mut pipeline, &db.pool, &kafka, 5, Duration::from_secs(30)).await;
    pipeline.close().await;
    assert_eq!(
        letters(&db.pool).await,
        vec![
            (0, "db_rejected".into(), 1),
            (2, "tombstone".into(), 1),
            (4, "db_rejected".into(), 1)
        ]
    );

    exec(&db.pool, "ALTER TABLE shop.items DROP CONSTRAINT small").await;
    let fixed = kafka
        .config_with_yaml(&db, &items_route(&kafka.topic, true, true))
        .expect("route loads");
    let done = ops::retry_dead_letters(&fixed, &DeadLetterFilter::default())
        .await
        .expect("re-drive");
    assert_eq!((done.moved, done.still_failing), (1, 2));
    let rows: Vec<(i64, i32, i64)> =
        sqlx::query_as("SELECT id, amount, off FROM shop.items ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("rows");
    assert_eq!(
        rows,
        vec![(1, 7, 1), (2, 9, 3), (3, 600, 4)],
        "the newer versions stay; only key 3 lands"
    );
    assert_eq!(
        letters(&db.pool).await,
        vec![(0, "superseded".into(), 2), (2, "superseded".into(), 2)]
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upsert_route_that_cannot_order_versions_refuses_re_drives_and_rewinds_changing_nothing()
{
    let db = TestDb::new().await;
    exec(
        &db.pool,
        "CREATE SCHEMA shop; CREATE TABLE shop.items (id int8 PRIMARY KEY, \
           amount int4 CONSTRAINT small CHECK (amount < 100))",
    )
    .await;
    let kafka = TestKafka::new(1);
    send(
        &kafka,
        &kafka.topic,
        &[
            item("1", Some(r#"{"amount": 500}"#)),
            item("1", Some(r#"{"amount": 7}"#)),
        ],
    );
    let config = kafka
        .config_with_yaml(&db, &items_route(&kafka.topic, false, false))
        .expect("route loads");
    let mut pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    drive_until_caught_up(&mut pipeline, &db.pool, &kafka, 2, Duration::from_secs(30)).await;
    pipeline.close().await;
    exec(&db.pool, "ALTER TABLE shop.items DROP CONSTRAINT small").await;

    let error = ops::retry_dead_letters(&config, &DeadLetterFilter::default())
        .await
        .expect_err("refused")
        .to_string();
    assert!(error.contains("@partition and @offset"), "{error}");
    assert!(error.contains("nothing was changed"), "{error}");
    let error = ops::rewind(
        &config,
        &kafka.topic,
        &[],
        RewindTarget::Offset(0),
        false,
        true,
    )
    .await
    .expect_err("refused")
    .to_string();
    assert!(error.contains("@partition and @offset"), "{error}");
    assert_eq!(letters(&db.pool).await, vec![(0, "db_rejected".into(), 1)]);
    let amount: i32 = sqlx::query_scalar("SELECT amount FROM shop.items WHERE id = 1")
        .fetch_one(&db.pool)
        .await
        .expect("row");
    assert_eq!(amount, 7);
    assert_eq!(stored_total(&db.pool, &kafka.group, &kafka.topic).await, 2);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_without_the_topic_the_worker_ran_with_refuses_then_succeeds_with_it() {
    let db = TestDb::new().await;
    exec(
        &db.pool,
        "ALTER TABLE web_metrics.metrics ADD CONSTRAINT ok CHECK (url <> 'u')",
    )
    .await;
    let kafka = TestKafka::new(1);
    let bad = r#"{"request_timestamp": "2021-01-01T00:00:00Z", "url": "u", "comment": "bad"}"#;
    let mut payloads = valid_messages(0, 10);
    payloads.push(Some(bad.as_bytes().to_vec()));
    kafka.produce(payloads);
    let mut run = worker_command(&kafka, &db);
    run.args(["--cycles", "40"]);
    let (status, stderr) = run_to_exit(run).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(letters(&db.pool).await, vec![(10, "db_rejected".into(), 1)]);
    exec(
        &db.pool,
        "ALTER TABLE web_metrics.metrics DROP CONSTRAINT ok",
    )
    .await;

    // The obvious next command, without the worker's --topic: refused, nothing changed.
    let retry = |topic: Option<&str>| {
        let mut command = std::process::Command::new(BINARY);
        command
            .args(["dlq", "retry", "--all", "--group", &kafka.group])
            .args(["--database-url", &db.url]);
        command.args(topic.map(|t| vec!["--topic", t]).unwrap_or_default());
        command
    };
    let (status, stderr) = run_to_exit(retry(None)).await;
    assert!(!status.success());
    let error = final_error(&stderr);
    assert!(
        error.contains(&format!("--topic {}", kafka.topic)),
        "{error}"
    );
    assert!(error.contains("nothing was changed"), "{error}");
    assert_eq!(letters(&db.pool).await, vec![(10, "db_rejected".into(), 1)]);

    let (status, stderr) = run_to_exit(retry(Some(&kafka.topic))).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(letters(&db.pool).await, vec![]);
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(11, 0);
    db.drop().await;
}

/// A route of `shop.items` reading `amount` as text digits only with `coerce`.
fn coerced_items_route(topic: &str, coerce: bool) -> String {
    format!(
        "routes:\n  - topic: {topic}\n    table: shop.items\n    mode: upsert\n    key: [id]\n    \
         columns:\n      \
         - {{ column: id, field: \"@key\", type: int8, coerce: true }}\n      \
         - {{ column: amount, field: amount, type: int4, coerce: {coerce} }}\n      \
         - {{ column: part, field: \"@partition\", type: int4 }}\n      \
         - {{ column: off, field: \"@offset\", type: int8 }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_re_drive_longer_than_one_chunk_lands_every_keys_latest_record() {
    let db = TestDb::new().await;
    exec(
        &db.pool,
        "CREATE SCHEMA shop; CREATE TABLE shop.items (id int8 PRIMARY KEY, amount int4, \
           part int4, off int8)",
    )
    .await;
    let kafka = TestKafka::new(1);
    // 12,000 records of 1,000 keys: each key's versions lie in every chunk of the re-drive.
    let (total, keys) = (12_000, 1_000);
    let records: Vec<Msg> = (0..total)
        .map(|i| {
            let amount = format!(r#"{{"amount": "{i}"}}"#);
            item(&(i % keys).to_string(), Some(&amount))
        })
        .collect();
    send(&kafka, &kafka.topic, &records);
    let strict = kafka
        .config_with_yaml(&db, &coerced_items_route(&kafka.topic, false))
        .expect("route loads");
    let mut pipeline = Pipeline::connect(strict).await.expect("starts");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        total,
        Duration::from_secs(60),
    )
    .await;
    pipeline.close().await;
    let dead = scalar(&db.pool, "SELECT count(*) FROM ingest.dead_letters").await;
    assert_eq!(dead, total, "text amounts are dead letters without coerce");

    let coerced = kafka
        .config_with_yaml(&db, &coerced_items_route(&kafka.topic, true))
        .expect("route loads");
    let done = ops::retry_dead_letters(&coerced, &DeadLetterFilter::default())
        .await
        .expect("re-drive");
    assert_eq!((done.moved, done.still_failing), (total as u64, 0));
    let rows: Vec<(i64, i32, i64)> =
        sqlx::query_as("SELECT id, amount, off FROM shop.items ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("rows");
    let expected: Vec<(i64, i32, i64)> = (0..keys)
        .map(|k| {
            let last = k + total - keys;
            (k, last as i32, last)
        })
        .collect();
    assert_eq!(rows, expected, "each key holds its last record");
    let dead = scalar(&db.pool, "SELECT count(*) FROM ingest.dead_letters").await;
    assert_eq!(dead, 0);
    db.drop().await;
}
