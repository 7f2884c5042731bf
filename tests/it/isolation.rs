//! Rows Postgres rejects inside a batch: isolated at a cost that grows with the batch,
//! while the worker keeps its place in the group.

use std::time::Duration;

use kafka_pg_ingest::pipeline::Pipeline;

use crate::helpers::*;

/// `count` website-metrics messages whose `comment` is their id; every `every`-th has
/// status code 503.
fn with_server_errors(count: u64, every: u64) -> Vec<Option<Vec<u8>>> {
    (0..count)
        .map(|i| {
            let code = if i % every == 0 { 503 } else { 200 };
            Some(
                format!(
                    r#"{{"request_timestamp": "2021-01-01T00:00:00Z", "url": "https://example.com/{i}", "resp_status_code": {code}, "comment": "{i}"}}"#
                )
                .into_bytes(),
            )
        })
        .collect()
}

/// The value of an unlabelled sample in an OpenMetrics scrape.
fn sample(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the scrape:\n{scrape}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_with_a_quarter_of_its_rows_rejected_lands_the_rest_and_dead_letters_each_reject() {
    let db = TestDb::new().await;
    sqlx::raw_sql("ALTER TABLE web_metrics.metrics ADD CONSTRAINT ok CHECK (status_code < 500)")
        .execute(&db.pool)
        .await
        .expect("constraint");
    let kafka = TestKafka::new(1);
    kafka.produce(with_server_errors(5_000, 4));
    let mut config = kafka.config(&db);
    config.batch.max_records = 5_000;
    config.batch.max_wait_ms = 4_000;
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        5_000,
        Duration::from_secs(120),
    )
    .await;
    let scrape = pipeline.observers().metrics.encode();
    let stats = pipeline.close().await;
    assert_landed_once(&db, &kafka, 3_750, 1_250).await;
    let rejected: (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE reason_code = 'db_rejected' AND sqlstate = '23514'), \
           count(*) FILTER (WHERE \"offset\" % 4 = 0), \
           count(DISTINCT xmin::text) FROM ingest.dead_letters",
    )
    .fetch_one(&db.pool)
    .await
    .expect("dead letters");
    assert_eq!(
        rejected,
        (1_250, 1_250, 1),
        "every 503 and only those, in one commit"
    );
    assert_eq!(stats.batches, 1, "one batch, one transaction");
    assert_eq!(
        sample(&scrape, "kafka_pg_ingest_isolation_duration_seconds_count"),
        1.0
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_longer_than_the_poll_interval_keeps_the_group_membership() {
    let db = TestDb::new().await;
    // The first COPY into the table sleeps past max.poll.interval.ms (10 s in tests).
    sqlx::raw_sql(
        "CREATE TABLE public.slow_once (pending bool NOT NULL); \
         INSERT INTO public.slow_once VALUES (true); \
         CREATE FUNCTION public.slow_once() RETURNS trigger LANGUAGE plpgsql AS $$ \
           BEGIN IF (SELECT pending FROM public.slow_once) THEN \
             UPDATE public.slow_once SET pending = false; PERFORM pg_sleep(12); END IF; \
           RETURN NULL; END $$; \
         CREATE TRIGGER slow_once AFTER INSERT ON web_metrics.metrics \
           FOR EACH STATEMENT EXECUTE FUNCTION public.slow_once();",
    )
    .execute(&db.pool)
    .await
    .expect("slow trigger");
    let kafka = TestKafka::new(2);
    kafka.produce(valid_messages(0, 2_000));
    let mut config = kafka.config(&db);
    config.batch.max_records = 500;
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        2_000,
        Duration::from_secs(90),
    )
    .await;
    let stats = pipeline.close().await;
    assert_landed_once(&db, &kafka, 2_000, 0).await;
    let epochs: Vec<i64> =
        sqlx::query_scalar("SELECT epoch FROM ingest.offsets ORDER BY partition")
            .fetch_all(&db.pool)
            .await
            .expect("epochs");
    assert_eq!(
        epochs,
        vec![1, 1],
        "claimed once: the group never took the partitions away"
    );
    assert_eq!(stats.fenced, 0);
    assert!(
        stats.commit_latency.percentile(100.0) > Some(Duration::from_secs(10)),
        "the slow commit happened"
    );
    db.drop().await;
}
