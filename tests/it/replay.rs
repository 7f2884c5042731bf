//! Operator tooling: rewinds on a live worker, a restored dump, re-driven dead letters.

use std::process::Command;
use std::time::Duration;

use kafka_pg_ingest::ops::{self, PlannedMove, RewindTarget};
use kafka_pg_ingest::pipeline::{Pipeline, Stats};
use kafka_pg_ingest::store::admin::DeadLetterFilter;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::helpers::*;

/// A pipeline stepping on its own task (with [`drive`]); stopped when dropped, so a
/// failing test does not leave it running.
struct Background {
    task: JoinHandle<Stats>,
    _stop: DropGuard,
}

impl Background {
    fn start(pipeline: Pipeline, db: &TestDb, kafka: &TestKafka) -> Self {
        let stop = CancellationToken::new();
        let task = drive(pipeline, db, kafka, i64::MAX, stop.clone());
        Self {
            task,
            _stop: stop.drop_guard(),
        }
    }

    /// Stops stepping and closes the pipeline.
    async fn close(self) {
        let Self { task, _stop } = self;
        drop(_stop);
        task.await.expect("worker task");
    }
}

async fn tamper(pool: &PgPool, where_clause: &'static str) -> u64 {
    let sql = format!("UPDATE web_metrics.metrics SET url = 'tampered' WHERE {where_clause}");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .expect("tamper")
        .rows_affected()
}

/// Whether every partition of the topic has caught up to `total` records and left its
/// replay.
async fn replayed(db: &TestDb, kafka: &TestKafka, total: i64) -> bool {
    let replaying = scalar(
        &db.pool,
        "SELECT count(*) FROM ingest.offsets WHERE replay_until IS NOT NULL",
    )
    .await;
    replaying == 0 && stored_total(&db.pool, &kafka.group, &kafka.topic).await == total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rewind_by_offset_on_a_live_worker_replaces_re_read_rows_and_lands_the_stream_once() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(2);
    kafka.produce(valid_messages(0, 1_000));
    let config = kafka.config(&db);
    let pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    let worker = Background::start(pipeline, &db, &kafka);
    wait_for("the first 1,000", Duration::from_secs(60), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await == 1_000
    })
    .await;
    // Offsets 100..300 of partition 0 are re-read and must come back; 0..100 must not.
    let tampered = tamper(&db.pool, "kafka_partition = 0 AND kafka_offset < 300").await;
    assert_eq!(tampered, 300);

    let plan = ops::rewind(
        &config,
        &kafka.topic,
        &[0],
        RewindTarget::Offset(100),
        false,
        false,
    )
    .await
    .expect("plan");
    let expected = PlannedMove {
        partition: 0,
        from: Some(500),
        to: 100,
        reread: 400,
        replay_until: None,
    };
    assert_eq!(plan.moves, vec![expected.clone()]);
    assert_eq!(
        stored_total(&db.pool, &kafka.group, &kafka.topic).await,
        1_000,
        "a plan changes nothing"
    );
    let applied = ops::rewind(
        &config,
        &kafka.topic,
        &[0],
        RewindTarget::Offset(100),
        false,
        true,
    )
    .await
    .expect("rewind");
    // Applied, it records where the replay ends: where the partition stood.
    let expected = PlannedMove {
        replay_until: Some(500),
        ..expected
    };
    assert_eq!(applied.moves, vec![expected]);
    // The stream goes on while the worker replays.
    kafka.produce(valid_messages(1_000, 200));
    wait_for(
        "the replay and the new records",
        Duration::from_secs(60),
        || replayed(&db, &kafka, 1_200),
    )
    .await;
    worker.close().await;

    assert_landed_once(&db, &kafka, 1_200, 0).await;
    let still_tampered: Vec<i64> = sqlx::query_scalar(
        "SELECT kafka_offset FROM web_metrics.metrics WHERE url = 'tampered' \
         AND kafka_partition = 0 ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .expect("tampered rows");
    assert_eq!(still_tampered, (0..100).collect::<Vec<i64>>());

    // The command line sees the same: no lag, and a plan that changes nothing.
    let target = [
        "--group",
        &kafka.group,
        "--brokers",
        &kafka.brokers,
        "--database-url",
        &db.url,
    ];
    let shown = cli(&[&["offsets", "show", "--json"], &target[..]].concat());
    let rows: Vec<serde_json::Value> = serde_json::from_str(&shown).expect("JSON rows");
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row["lag"], 0, "{row}");
        assert_eq!(row["next_offset"], row["high"], "{row}");
    }
    let topic = ["--topic", &kafka.topic, "--to-earliest"];
    let plan = cli(&[&["offsets", "rewind"], &target[..], &topic[..]].concat());
    assert!(
        plan.contains("1200 records will be read again") && plan.contains("nothing changed"),
        "{plan}"
    );
    // An offset beyond the end is moved to it, and the plan says so.
    let beyond = [
        "--topic",
        &kafka.topic,
        "--to-offset",
        "99999999",
        "--partition",
        "0",
    ];
    let plan = cli(&[&["offsets", "rewind"], &target[..], &beyond[..]].concat());
    assert!(
        plan.contains(
            "partition 0: offset 99999999 lies beyond the broker's high watermark: moving to 600"
        ),
        "{plan}"
    );
    // A time that is not RFC 3339 is refused with an example.
    let output = Command::new(BINARY)
        .args([&["offsets", "rewind"], &target[..]].concat())
        .args(["--topic", &kafka.topic, "--to-time", "yesterday"])
        .output()
        .expect("binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("e.g. 2026-11-29T14:00:00Z"), "{stderr}");
    assert_eq!(
        stored_total(&db.pool, &kafka.group, &kafka.topic).await,
        1_200
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rewind_by_time_with_keep_restores_missing_rows_and_leaves_existing_ones() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(2);
    kafka.produce(valid_messages(0, 400));
    let config = kafka.config(&db);
    let pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    let worker = Background::start(pipeline, &db, &kafka);
    wait_for("the first wave", Duration::from_secs(60), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await == 400
    })
    .await;
    // Record timestamps have millisecond resolution: keep the waves apart.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second_wave_at = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    kafka.produce(valid_messages(400, 400));
    wait_for("the second wave", Duration::from_secs(60), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await == 800
    })
    .await;
    assert_eq!(tamper(&db.pool, "true").await, 800);
    let lost = sqlx::query(
        "DELETE FROM web_metrics.metrics WHERE kafka_offset >= 200 AND kafka_offset < 225",
    )
    .execute(&db.pool)
    .await
    .expect("delete");
    assert_eq!(lost.rows_affected(), 50);

    let plan = ops::rewind(
        &config,
        &kafka.topic,
        &[],
        RewindTarget::Time(second_wave_at),
        true,
        true,
    )
    .await
    .expect("rewind");
    let to: Vec<(i32, i64)> = plan.moves.iter().map(|m| (m.partition, m.to)).collect();
    assert_eq!(
        to,
        vec![(0, 200), (1, 200)],
        "the second wave starts at 200"
    );
    wait_for("the replay", Duration::from_secs(60), || {
        replayed(&db, &kafka, 800)
    })
    .await;
    worker.close().await;

    assert_landed_once(&db, &kafka, 800, 0).await;
    let restored = scalar(
        &db.pool,
        "SELECT count(*) FROM web_metrics.metrics WHERE url <> 'tampered'",
    )
    .await;
    assert_eq!(restored, 50, "only the missing rows were written again");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dump_restored_into_a_fresh_database_resumes_from_its_offsets_and_ends_exactly_once() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(2);
    kafka.produce(valid_messages(0, 1_500));
    let mut config = kafka.config(&db);
    config.batch.max_records = 100;
    let pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    let worker = Background::start(pipeline, &db, &kafka);
    wait_for("the first half", Duration::from_secs(60), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await == 1_500
    })
    .await;
    let dump = std::env::temp_dir().join(format!("{}.dump", db.name));
    let dumped = tokio::task::spawn_blocking({
        let (url, dump) = (db.url.clone(), dump.clone());
        move || {
            Command::new("pg_dump")
                .args(["--format=custom", "--file"])
                .arg(&dump)
                .arg(&url)
                .status()
                .expect("pg_dump runs")
        }
    })
    .await
    .expect("joined");
    assert!(dumped.success(), "pg_dump: {dumped}");
    kafka.produce(valid_messages(1_500, 1_500));
    wait_for("the rest", Duration::from_secs(60), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await == 3_000
    })
    .await;
    worker.close().await;
    assert_landed_once(&db, &kafka, 3_000, 0).await;

    let restored = TestDb::empty().await;
    let status = Command::new("pg_restore")
        .args(["--no-owner", "--exit-on-error", "--dbname", &restored.url])
        .arg(&dump)
        .status()
        .expect("pg_restore runs");
    assert!(status.success(), "pg_restore: {status}");
    let _ = std::fs::remove_file(&dump);
    let at_dump = stored_total(&restored.pool, &kafka.group, &kafka.topic).await;
    let rows_at_dump = scalar(&restored.pool, "SELECT count(*) FROM web_metrics.metrics").await;
    assert_eq!(at_dump, 1_500, "dumped mid-stream");
    assert_eq!(rows_at_dump, at_dump, "the dump is one consistent snapshot");

    let pipeline = Pipeline::connect(kafka.config(&restored))
        .await
        .expect("starts on the restored database");
    ingest_all_and_assert_exactly_once(pipeline, &restored, &kafka, 3_000, 0).await;
    restored.drop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_of_a_too_strict_table_are_re_driven_after_the_constraint_is_relaxed_and_purged()
 {
    let db = TestDb::new().await;
    sqlx::query(
        "ALTER TABLE web_metrics.metrics ADD CONSTRAINT no_server_errors CHECK (status_code < 500)",
    )
    .execute(&db.pool)
    .await
    .expect("constraint");
    let kafka = TestKafka::new(1);
    let mut payloads = valid_messages(0, 200);
    payloads.extend([b"<html>".to_vec(), b"{".to_vec(), b"[1]".to_vec()].map(Some));
    kafka.produce(payloads);
    let config = kafka.config(&db);
    let mut pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        203,
        Duration::from_secs(60),
    )
    .await;
    pipeline.close().await;
    let rejected = scalar(
        &db.pool,
        "SELECT count(*) FROM ingest.dead_letters WHERE reason_code = 'db_rejected' AND sqlstate = '23514'",
    )
    .await;
    assert!(
        rejected > 10,
        "about a quarter of the sample is 503: {rejected}"
    );
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(200 - rejected, rejected + 3);

    sqlx::query("ALTER TABLE web_metrics.metrics DROP CONSTRAINT no_server_errors")
        .execute(&db.pool)
        .await
        .expect("relax");
    let done = ops::retry_dead_letters(&config, &DeadLetterFilter::default())
        .await
        .expect("retry");
    assert_eq!((done.moved, done.still_failing), (rejected as u64, 3));
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(200, 3);
    let left: Vec<(String, i32)> =
        sqlx::query_as("SELECT reason_code, attempts FROM ingest.dead_letters ORDER BY \"offset\"")
            .fetch_all(&db.pool)
            .await
            .expect("dead letters");
    let expected = ["not_json", "not_json", "not_object"].map(|c| (c.to_owned(), 2));
    assert_eq!(left, expected.to_vec());
    let server_errors = scalar(
        &db.pool,
        "SELECT count(*) FROM web_metrics.metrics WHERE status_code = 503",
    )
    .await;
    assert_eq!(server_errors, rejected);

    // The same through the command line: listing and showing what is left.
    let list = cli(&["dlq", "list", "--json", "--database-url", &db.url]);
    let listing: serde_json::Value = serde_json::from_str(&list).expect("JSON listing");
    assert_eq!(
        listing["counts"],
        serde_json::json!([["not_json", 2], ["not_object", 1]])
    );
    let id = listing["dead_letters"][0]["id"].as_i64().expect("an id");
    let shown = cli(&["dlq", "show", &id.to_string(), "--database-url", &db.url]);
    assert!(
        shown.contains("<html>") && shown.contains("attempts:        2"),
        "{shown}"
    );
    // JSON shows the value too: as text when UTF-8, always as base64.
    let shown = cli(&[
        "dlq",
        "show",
        &id.to_string(),
        "--json",
        "--database-url",
        &db.url,
    ]);
    let letter: serde_json::Value = serde_json::from_str(&shown).expect("JSON letter");
    let text = letter["value"]["utf8"].as_str().expect("UTF-8 value");
    assert!(text.contains("<html>"), "{shown}");
    assert!(letter["value"]["base64"].is_string(), "{shown}");
    // A listing cut by --limit says how many there are.
    let cut = cli(&["dlq", "list", "--limit", "1", "--database-url", &db.url]);
    assert!(cut.contains("showing the oldest 1 of 3"), "{cut}");
    let whole = cli(&["dlq", "list", "--database-url", &db.url]);
    assert!(!whole.contains("showing the oldest"), "{whole}");

    // Purging counts first, deletes only with --yes, and only what is old enough.
    let url = ["--database-url", db.url.as_str()];
    let dry = cli(&[&["dlq", "purge", "--older-than", "0s"], &url[..]].concat());
    assert!(dry.starts_with("3 dead letters would be deleted"), "{dry}");
    let young = cli(&[&["dlq", "purge", "--older-than", "1d", "--yes"], &url[..]].concat());
    assert!(young.starts_with("0 dead letters deleted"), "{young}");
    let purged = cli(&[&["dlq", "purge", "--older-than", "0s", "--yes"], &url[..]].concat());
    assert!(purged.starts_with("3 dead letters deleted"), "{purged}");
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM ingest.dead_letters").await,
        0
    );
    db.drop().await;
}

/// Runs the binary and returns its stdout, asserting it succeeded.
fn cli(args: &[&str]) -> String {
    let output = Command::new(BINARY)
        .args(args)
        .output()
        .expect("binary runs");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}
