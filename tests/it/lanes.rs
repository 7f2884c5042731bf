//! Commit lanes: batches of different partitions commit side by side, each on its own
//! connection, while each partition's batches still commit strictly in order.

use std::collections::BTreeMap;
use std::time::Duration;

use kafka_pg_ingest::pipeline::Pipeline;

use crate::helpers::*;

/// One transaction's share of one partition, with when the transaction began and when
/// its last COPY ended.
#[derive(Debug, sqlx::FromRow)]
struct Share {
    tx: i64,
    partition: i32,
    first: i64,
    last: i64,
    began: f64,
    ended: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lanes_commit_side_by_side_and_each_partition_in_order() {
    let db = TestDb::new().await;
    // Every COPY into the table takes 0.3 s and logs its transaction: when it began, and
    // when its (last) COPY ended, which is before it commits.
    sqlx::raw_sql(
        "CREATE TABLE public.commits (tx int8 PRIMARY KEY, began timestamptz NOT NULL, \
           ended timestamptz NOT NULL); \
         CREATE FUNCTION public.log_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
           BEGIN PERFORM pg_sleep(0.3); \
             INSERT INTO public.commits \
               VALUES (pg_current_xact_id()::text::int8 % 4294967296, now(), clock_timestamp()) \
               ON CONFLICT (tx) DO UPDATE SET ended = excluded.ended; \
             RETURN NULL; END $$; \
         CREATE TRIGGER log_commit AFTER INSERT ON web_metrics.metrics \
           FOR EACH STATEMENT EXECUTE FUNCTION public.log_commit();",
    )
    .execute(&db.pool)
    .await
    .expect("logging trigger");
    let kafka = TestKafka::new(4);
    // Small record batches, fetched one per partition at a time: the consumer's queue
    // holds every partition's records interleaved, as a busy topic's does.
    for round in 0..40 {
        kafka.produce(valid_messages(round * 200, 200));
    }
    let mut config = kafka.config(&db);
    config.batch.max_records = 1_000;
    config
        .kafka
        .options
        .insert("max.partition.fetch.bytes".into(), "8192".into());
    assert_eq!(config.lanes(), 2, "tests run two lanes");
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        8_000,
        Duration::from_secs(120),
    )
    .await;
    pipeline.close().await;
    assert_landed_once(&db, &kafka, 8_000, 0).await;

    // The rows' xmin is the transaction that wrote them.
    let shares: Vec<Share> = sqlx::query_as(
        "SELECT m.tx, m.partition, m.first, m.last, \
           extract(epoch FROM c.began)::float8 AS began, extract(epoch FROM c.ended)::float8 AS ended \
         FROM (SELECT xmin::text::int8 AS tx, kafka_partition AS partition, \
                 min(kafka_offset) AS first, max(kafka_offset) AS last \
               FROM web_metrics.metrics GROUP BY 1, 2) m \
         LEFT JOIN public.commits c USING (tx) ORDER BY m.partition, m.first",
    )
    .fetch_all(&db.pool)
    .await
    .expect("shares");
    let mut by_partition: BTreeMap<i32, Vec<&Share>> = BTreeMap::new();
    for share in &shares {
        by_partition.entry(share.partition).or_default().push(share);
    }
    assert_eq!(by_partition.len(), 4);
    for (partition, shares) in &by_partition {
        assert_eq!(shares[0].first, 0, "partition {partition} starts at 0");
        for pair in shares.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            assert_eq!(
                after.first,
                before.last + 1,
                "partition {partition}: each transaction continues its predecessor"
            );
            assert!(
                after.began >= before.ended,
                "partition {partition}: transaction {} began before {} (its predecessor) was done: {before:?} {after:?}",
                after.tx,
                before.tx
            );
        }
    }
    let mut spans: BTreeMap<i64, (f64, f64)> = BTreeMap::new();
    for share in &shares {
        spans.insert(share.tx, (share.began, share.ended));
    }
    let overlapping = spans.iter().any(|(a, (a_began, a_ended))| {
        spans
            .iter()
            .any(|(b, (b_began, b_ended))| a != b && a_began < b_ended && b_began < a_ended)
    });
    assert!(overlapping, "no two transactions ran at once: {spans:?}");
    db.drop().await;
}
