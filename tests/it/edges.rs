//! Exactly once at the edges: steady state without replay work, duplicates that stop the
//! worker, where a first claim starts, offsets the broker no longer has, and a table
//! whose column types change under COPY BINARY.

use std::time::Duration;

use kafka_pg_ingest::decode::CopyFormat;
use kafka_pg_ingest::pipeline::{Pipeline, PipelineError};
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// Counts every DELETE statement run on the target table and the dead letters (a
/// statement-level trigger fires even when no row matches).
async fn count_deletes(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE public.deletes (tbl text NOT NULL); \
         CREATE FUNCTION public.note_delete() RETURNS trigger LANGUAGE plpgsql AS \
           $$BEGIN INSERT INTO public.deletes VALUES (TG_TABLE_NAME); RETURN NULL; END$$; \
         CREATE TRIGGER note_delete AFTER DELETE ON web_metrics.metrics \
           FOR EACH STATEMENT EXECUTE FUNCTION public.note_delete(); \
         CREATE TRIGGER note_delete AFTER DELETE ON ingest.dead_letters \
           FOR EACH STATEMENT EXECUTE FUNCTION public.note_delete();",
    )
    .execute(pool)
    .await
    .expect("delete triggers");
}

/// Steps until a step fails; the error, or a panic after `limit`.
pub(crate) async fn step_until_error(pipeline: &mut Pipeline, limit: Duration) -> PipelineError {
    let token = CancellationToken::new();
    let deadline = std::time::Instant::now() + limit;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no error within {limit:?}"
        );
        if let Err(e) = pipeline.step(&token).await {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steady_state_batches_take_no_replay_path_and_issue_no_delete() {
    let db = TestDb::new().await;
    count_deletes(&db.pool).await;
    let kafka = TestKafka::new(2);
    let mut payloads = valid_messages(0, 3_000);
    for i in (0..3_000).step_by(100) {
        payloads[i] = Some(b"not json".to_vec());
    }
    kafka.produce(payloads);
    let mut config = kafka.config(&db);
    config.batch.max_records = 250;
    let pipeline = Pipeline::connect(config).await.expect("starts");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 2_970, 30).await;
    let batches = scalar(
        &db.pool,
        "SELECT count(DISTINCT xmin::text)::int8 FROM ingest.dead_letters",
    )
    .await;
    assert!(
        batches > 2,
        "several batches committed ({batches} with dead letters)"
    );
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM public.deletes").await,
        0,
        "no batch outside a rewind deletes anything"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_of_source_coordinates_outside_a_replay_stops_the_worker_and_commits_nothing() {
    let db = TestDb::new().await;
    count_deletes(&db.pool).await;
    let kafka = TestKafka::new(1);
    kafka.produce(valid_messages(0, 100));
    let config = kafka.config(&db);
    let pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 100, 0).await;

    // Moved back by hand, not by `offsets rewind`: no replay is recorded, so re-reading
    // offsets 90..100 can only mean the protocol broke.
    sqlx::query("UPDATE ingest.offsets SET next_offset = 90 WHERE consumer_group = $1")
        .bind(&kafka.group)
        .execute(&db.pool)
        .await
        .expect("move the offset");
    let mut pipeline = Pipeline::connect(config).await.expect("restarts");
    let error = step_until_error(&mut pipeline, Duration::from_secs(60)).await;
    pipeline.close().await;
    let text = error.to_string();
    assert!(text.contains("protocol violation"), "{text}");
    assert!(text.contains("same source coordinates"), "{text}");
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM web_metrics.metrics").await,
        100
    );
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM public.deletes").await,
        0,
        "no row was deleted and rewritten"
    );
    assert_eq!(stored_total(&db.pool, &kafka.group, &kafka.topic).await, 90);
    db.drop().await;
}

/// The group's stored offset rows: (partition, next_offset).
async fn stored(pool: &PgPool, kafka: &TestKafka) -> Vec<(i32, Option<i64>)> {
    sqlx::query_as(
        "SELECT partition, next_offset FROM ingest.offsets \
         WHERE consumer_group = $1 AND topic = $2 ORDER BY partition",
    )
    .bind(&kafka.group)
    .bind(&kafka.topic)
    .fetch_all(pool)
    .await
    .expect("read offsets")
}

/// Steps until the pipeline has claimed every partition of the topic.
async fn step_until_claimed(pipeline: &mut Pipeline, db: &TestDb, kafka: &TestKafka) {
    let token = CancellationToken::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let owned: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM ingest.offsets WHERE consumer_group = $1 AND owner = $2",
        )
        .bind(&kafka.group)
        .bind(pipeline.owner())
        .fetch_one(&db.pool)
        .await
        .expect("read owners");
        if owned == i64::from(kafka.partitions) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "never claimed");
        pipeline.step(&token).await.expect("step");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_claim_under_latest_stores_where_it_starts_so_the_next_owner_resumes_there() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(2);
    kafka.produce(valid_messages(0, 100));
    let mut config = kafka.config(&db);
    config.kafka.auto_offset_reset = kafka_pg_ingest::config::OffsetReset::Latest;

    // The first owner claims and dies before its first commit.
    let mut first = Pipeline::connect(config.clone()).await.expect("starts");
    step_until_claimed(&mut first, &db, &kafka).await;
    assert_eq!(
        stored(&db.pool, &kafka).await,
        vec![(0, Some(50)), (1, Some(50))],
        "the claim stored the end it starts at"
    );
    first.close().await;

    // Records produced meanwhile are after that start: the next owner lands them all.
    kafka.produce(valid_messages(100, 1_000));
    let mut second = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(
        &mut second,
        &db.pool,
        &kafka,
        1_100,
        Duration::from_secs(30),
    )
    .await;
    second.close().await;
    let rows = Landed::read(&db.pool, &kafka.topic).await;
    rows.assert_exactly_once(1_000, 0);
    db.drop().await;
}

/// Sets the group's stored offset of partition 0 by hand.
async fn set_stored(pool: &PgPool, kafka: &TestKafka, next_offset: i64) {
    sqlx::query(
        "UPDATE ingest.offsets SET next_offset = $2 WHERE consumer_group = $1 AND partition = 0",
    )
    .bind(&kafka.group)
    .bind(next_offset)
    .execute(pool)
    .await
    .expect("set the stored offset");
}

/// Partition 0's watermarks on the test broker.
fn watermarks(kafka: &TestKafka) -> (i64, i64) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()
        .expect("metadata client");
    client
        .fetch_watermarks(&kafka.topic, 0, Duration::from_secs(10))
        .expect("watermarks")
}

/// Produces 100 KB records until the broker (which keeps about 5 MB per partition) has
/// deleted the oldest ones past offset `past`. Each becomes a `too_long_string` dead
/// letter. Returns how many were produced.
fn produce_until_retention_passes(kafka: &TestKafka, past: i64) -> i64 {
    let big = format!(
        r#"{{"request_timestamp": "2021-01-01T00:00:00Z", "url": "u", "comment": "{}"}}"#,
        "x".repeat(100_000)
    );
    let mut produced = 0;
    while watermarks(kafka).0 <= past {
        produced += kafka.produce(vec![Some(big.clone().into_bytes()); 10]) as i64;
        assert!(produced < 1_000, "the broker never deleted old records");
    }
    produced
}

/// Offsets of partition 0 below `end` that are not exactly once a row, a dead letter or
/// inside a gap below the log start: `(none, more than once)`.
async fn unaccounted(pool: &PgPool, end: i64) -> (i64, i64) {
    sqlx::query_as(
        "WITH held AS ( \
           SELECT kafka_offset AS o FROM web_metrics.metrics \
           UNION ALL SELECT \"offset\" FROM ingest.dead_letters \
           UNION ALL SELECT generate_series(from_offset, to_offset - 1) FROM ingest.offset_gaps \
             WHERE reason = 'below_log_start'), \
         counted AS (SELECT o, count(*) AS n FROM held GROUP BY o) \
         SELECT count(*) FILTER (WHERE c.n IS NULL), count(*) FILTER (WHERE c.n > 1) \
         FROM generate_series(0, $1 - 1) AS s(o) LEFT JOIN counted c USING (o)",
    )
    .bind(end)
    .fetch_one(pool)
    .await
    .expect("account for offsets")
}

/// `(from, to, reason, low, high)` of every recorded gap.
async fn gaps(pool: &PgPool) -> Vec<(i64, i64, String, i64, i64)> {
    sqlx::query_as(
        "SELECT from_offset, to_offset, reason, low_watermark, high_watermark \
         FROM ingest.offset_gaps ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("read gaps")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_offset_beyond_the_log_end_stops_the_worker_naming_the_offsets_and_the_fix() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    kafka.produce(valid_messages(0, 100));
    let config = kafka.config(&db);
    let pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 100, 0).await;
    // As if the topic had been deleted and re-created: the broker's log ends below the
    // stored offset.
    set_stored(&db.pool, &kafka, 500).await;
    let mut pipeline = Pipeline::connect(config).await.expect("restarts");
    let error = step_until_error(&mut pipeline, Duration::from_secs(30)).await;
    pipeline.close().await;
    let text = error.to_string();
    for part in [
        &format!("{}/0", kafka.topic),
        &format!("group {}", kafka.group),
        "stored offset 500",
        "low watermark 0",
        "high watermark 100",
        "re-created",
        &format!(
            "offsets rewind --group {} --topic {} --partition 0 --to-earliest --yes",
            kafka.group, kafka.topic
        ),
        "kafka.on_data_loss: skip",
    ] {
        assert!(text.contains(part), "{part} not in: {text}");
    }
    assert_eq!(stored(&db.pool, &kafka).await, vec![(0, Some(500))]);
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM web_metrics.metrics").await,
        100
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_skip_a_stored_offset_beyond_the_log_end_skips_the_new_log_below_it_and_records_the_gap()
 {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    kafka.produce(valid_messages(0, 100));
    let mut config = kafka.config(&db);
    config.kafka.on_data_loss = kafka_pg_ingest::config::OnDataLoss::Skip;
    let pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 100, 0).await;
    set_stored(&db.pool, &kafka, 500).await;

    let mut pipeline = Pipeline::connect(config).await.expect("restarts");
    step_until_claimed(&mut pipeline, &db, &kafka).await;
    // The log grows past the stored offset: records from 500 on land, those below are
    // the gap.
    kafka.produce(valid_messages(100, 500));
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        600,
        Duration::from_secs(30),
    )
    .await;
    pipeline.close().await;
    let coordinates: (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE kafka_offset >= 500), \
           count(*) FILTER (WHERE kafka_offset BETWEEN 100 AND 499) FROM web_metrics.metrics",
    )
    .fetch_one(&db.pool)
    .await
    .expect("count");
    assert_eq!(
        coordinates,
        (200, 100, 0),
        "the first 100 and the 100 from offset 500 on"
    );
    assert_eq!(
        gaps(&db.pool).await,
        vec![(0, 500, "beyond_log_end".to_owned(), 0, 100)]
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_offset_below_the_log_start_after_retention_stops_the_worker() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    kafka.produce(valid_messages(0, 100));
    let config = kafka.config(&db);
    let pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 100, 0).await;
    // While no worker runs, retention overtakes the group.
    produce_until_retention_passes(&kafka, 100);
    let (low, high) = watermarks(&kafka);

    let mut pipeline = Pipeline::connect(config).await.expect("restarts");
    let error = step_until_error(&mut pipeline, Duration::from_secs(30)).await;
    pipeline.close().await;
    let text = error.to_string();
    for part in [
        "stored offset 100 is below the oldest offset".to_owned(),
        format!("low watermark {low}, high watermark {high}"),
        format!("records 100..{low} were deleted"),
        "--to-earliest --yes".to_owned(),
    ] {
        assert!(text.contains(&part), "{part} not in: {text}");
    }
    assert_eq!(stored(&db.pool, &kafka).await, vec![(0, Some(100))]);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_skip_retention_overtaking_the_group_is_recorded_and_every_offset_accounted_for() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    kafka.produce(valid_messages(0, 100));
    let mut config = kafka.config(&db);
    config.kafka.on_data_loss = kafka_pg_ingest::config::OnDataLoss::Skip;
    let pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 100, 0).await;
    produce_until_retention_passes(&kafka, 100);
    let (low, high) = watermarks(&kafka);

    let mut pipeline = Pipeline::connect(config).await.expect("restarts");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        high,
        Duration::from_secs(60),
    )
    .await;
    pipeline.close().await;
    assert_eq!(
        gaps(&db.pool).await,
        vec![(100, low, "below_log_start".to_owned(), low, high)]
    );
    // Every offset below the end is a row, a dead letter or in the gap, once.
    assert_eq!(
        unaccounted(&db.pool, high).await,
        (0, 0),
        "every offset once: a row, a dead letter or the gap"
    );
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT count(*) FROM ingest.dead_letters WHERE \"offset\" < 100"
        )
        .await,
        0
    );
    db.drop().await;
}

/// Starts a worker on `kafka`'s 100 records, then produces until retention has passed
/// them and lets the worker catch up: `(the worker, log start, log end)`.
async fn caught_up_past_retention(
    config: kafka_pg_ingest::config::Config,
    db: &TestDb,
    kafka: &TestKafka,
) -> (Pipeline, i64, i64) {
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(&mut pipeline, &db.pool, kafka, 100, Duration::from_secs(30)).await;
    produce_until_retention_passes(kafka, 100);
    let (low, high) = watermarks(kafka);
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        kafka,
        high,
        Duration::from_secs(60),
    )
    .await;
    (pipeline, low, high)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_position_moved_below_the_log_start_on_a_live_worker_stops_it_instead_of_jumping() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    kafka.produce(valid_messages(0, 100));
    let config = kafka.config(&db);
    let (mut pipeline, low, _) = caught_up_past_retention(config, &db, &kafka).await;
    // Moved by hand below what the broker still has: the live worker follows the row,
    // and librdkafka finds the position out of range.
    set_stored(&db.pool, &kafka, 10).await;
    let error = step_until_error(&mut pipeline, Duration::from_secs(30)).await;
    pipeline.close().await;
    let text = error.to_string();
    assert!(
        text.contains(&format!(
            "stored offset 10 is below the oldest offset the broker still has (low watermark {low}"
        )),
        "{text}"
    );
    assert_eq!(stored(&db.pool, &kafka).await, vec![(0, Some(10))]);
    db.drop().await;
}

/// Under `skip`, moves a live worker's position below the log start (librdkafka stops
/// the partition's fetch) and checks it goes on from the log start with the gap
/// recorded, the group assigning by `strategy`.
async fn moved_below_the_log_start_under_skip(strategy: &str) {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    kafka.produce(valid_messages(0, 100));
    let mut config = kafka.config(&db);
    config.kafka.on_data_loss = kafka_pg_ingest::config::OnDataLoss::Skip;
    config
        .kafka
        .options
        .insert("partition.assignment.strategy".into(), strategy.into());
    let (mut pipeline, low, high) = caught_up_past_retention(config, &db, &kafka).await;
    // The rows below the log start go, as if never ingested; the live worker follows the
    // moved row, librdkafka stops the partition's fetch, and the worker restarts it at
    // the log start, recording the gap.
    sqlx::raw_sql(
        "DELETE FROM web_metrics.metrics WHERE kafka_offset >= 10; DELETE FROM ingest.dead_letters",
    )
    .execute(&db.pool)
    .await
    .expect("forget the rows");
    set_stored(&db.pool, &kafka, 10).await;
    kafka.produce(valid_messages(100, 50));
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        high + 50,
        Duration::from_secs(30),
    )
    .await;
    pipeline.close().await;
    assert_eq!(
        gaps(&db.pool).await,
        vec![(10, low, "below_log_start".to_owned(), low, high + 50)]
    );
    assert_eq!(
        unaccounted(&db.pool, high + 50).await,
        (0, 0),
        "every offset once: a row, a dead letter or the gap"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_skip_a_position_moved_below_the_log_start_goes_on_from_it_eager() {
    moved_below_the_log_start_under_skip("range").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_skip_a_position_moved_below_the_log_start_goes_on_from_it_cooperative() {
    moved_below_the_log_start_under_skip("cooperative-sticky").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_column_type_changed_under_copy_binary_stops_the_worker_before_it_writes_and_a_restart_lands_the_rest_once()
 {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    kafka.produce(valid_messages(0, 100));
    let config = kafka.config(&db);
    let format = |p: &Pipeline| p.store().routes().decoders()[0].format();
    let mut pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    assert_eq!(format(&pipeline), CopyFormat::Binary);
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        100,
        Duration::from_secs(30),
    )
    .await;
    // Accepted for an int4 mapping, but its binary form is 8 bytes, not 4.
    sqlx::raw_sql("ALTER TABLE web_metrics.metrics ALTER COLUMN status_code TYPE int8")
        .execute(&db.pool)
        .await
        .expect("alter");
    kafka.produce(valid_messages(100, 100));
    let error = step_until_error(&mut pipeline, Duration::from_secs(30)).await;
    pipeline.close().await;
    let text = error.to_string();
    assert!(
        text.contains("column types of \"web_metrics\".\"metrics\" changed"),
        "{text}"
    );
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM web_metrics.metrics").await,
        100,
        "nothing of the batch after the change was written"
    );
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM ingest.dead_letters").await,
        0
    );
    assert_eq!(stored(&db.pool, &kafka).await, vec![(0, Some(100))]);

    // Restarted, the worker reads the table again: COPY text, which Postgres converts.
    let mut pipeline = Pipeline::connect(config).await.expect("restarts");
    assert_eq!(format(&pipeline), CopyFormat::Text);
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        200,
        Duration::from_secs(30),
    )
    .await;
    pipeline.close().await;
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(200, 0);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sessions_read_committed_whatever_the_database_default() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    // Under REPEATABLE READ a batch's snapshot, taken by its compare-and-set, would hide
    // a column type change committed before the COPY BINARY's lock from the type check.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "ALTER DATABASE {} SET default_transaction_isolation = 'repeatable read'",
        db.name
    )))
    .execute(&db.pool)
    .await
    .expect("alter database");
    let pool = kafka_pg_ingest::store::connect_pool(&kafka.config(&db))
        .await
        .expect("connects");
    let level: String = sqlx::query_scalar("SHOW transaction_isolation")
        .fetch_one(&pool)
        .await
        .expect("show");
    assert_eq!(level, "read committed");
    pool.close().await;
    db.drop().await;
}
