//! Time-partitioned target tables: declarative range partitions and pg_partman. Every
//! offset ends as one row (in whichever partition, attached or not) or one dead letter.

use std::time::Duration;

use kafka_pg_ingest::ops;
use kafka_pg_ingest::pipeline::Pipeline;
use kafka_pg_ingest::store::admin::DeadLetterFilter;
use sqlx::PgPool;

use crate::helpers::*;

/// The default table re-created partitioned by `time_stamp`, without partitions, with
/// the unique index Postgres allows there: the coordinates plus the partition key.
const PARTITIONED: &str = "DROP TABLE web_metrics.metrics; \
    CREATE TABLE web_metrics.metrics ( \
      id bigserial, time_stamp timestamptz NOT NULL, url text NOT NULL, agent text, \
      response_time interval, status_code integer, ip inet, content_validation boolean, \
      comment text, kafka_topic text NOT NULL, kafka_partition integer NOT NULL, \
      kafka_offset bigint NOT NULL, \
      UNIQUE (kafka_topic, kafka_partition, kafka_offset, time_stamp) \
    ) PARTITION BY RANGE (time_stamp)";

/// `CREATE TABLE` of the daily partition `web_metrics.metrics_<day>` (`day` as `MMDD`
/// of 2026).
fn daily_partition(month: u32, day: u32) -> String {
    let from = chrono::NaiveDate::from_ymd_opt(2026, month, day).expect("a date");
    let to = from.succ_opt().expect("a next day");
    format!(
        "CREATE TABLE web_metrics.metrics_{month:02}{day:02} PARTITION OF web_metrics.metrics \
         FOR VALUES FROM ('{from} 00:00:00+00') TO ('{to} 00:00:00+00')"
    )
}

/// A probe result of `comment` `id`, taken on 2026-`month`-`day` UTC.
fn probe(id: u64, month: u32, day: u32) -> Option<Vec<u8>> {
    let json = format!(
        r#"{{"request_timestamp": "2026-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", "url": "https://www.example.com/", "resp_status_code": 200, "comment": "{id}"}}"#,
        id % 24,
        id / 24 % 60,
        id % 60
    );
    Some(json.into_bytes())
}

/// `(sqlstate, count)` of the dead letters of a topic.
async fn dead_letter_states(pool: &PgPool, topic: &str) -> Vec<(Option<String>, String, i64)> {
    sqlx::query_as(
        "SELECT sqlstate, reason_code, count(*) FROM ingest.dead_letters WHERE topic = $1 \
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(topic)
    .fetch_all(pool)
    .await
    .expect("dead letters")
}

/// Ingests 6,000 probes of days 1 and 2 (each partition of 2 holding both, in batches
/// of 200), running `change` once more than 1,000 have landed. Then every offset must be
/// one row of day 2, one row of day 1 in `elsewhere` (a table with the coordinates of
/// what day 1's partition held), or one `db_rejected` dead letter with SQLSTATE 23514;
/// day 1 must have records on both sides of the change, and the stored offsets be at
/// the ends.
async fn day_one_changed_mid_stream(db: &TestDb, change: &str, elsewhere: &str) {
    let kafka = TestKafka::new(2);
    let total = 6_000u64;
    kafka.produce(
        (0..total)
            // Both days in each Kafka partition (records go round-robin over the two),
            // so the first 1,000 to land hold some of day 1 whichever partition leads.
            .map(|id| probe(id, 12, 1 + (id / 2 % 2) as u32))
            .collect(),
    );
    let mut config = kafka.config(db);
    config.batch.max_records = 200;
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    let token = tokio_util::sync::CancellationToken::new();
    let mut changed = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while stored_total(&db.pool, &kafka.group, &kafka.topic).await < total as i64 {
        assert!(std::time::Instant::now() < deadline, "not caught up");
        pipeline.step(&token).await.expect("step succeeds");
        if !changed && stored_total(&db.pool, &kafka.group, &kafka.topic).await > 1_000 {
            exec(&db.pool, change).await;
            changed = true;
        }
    }
    pipeline.close().await;
    assert!(changed, "day 1 changed while ingesting");

    let coordinates: Vec<(i32, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT kafka_partition, kafka_offset, to_char(time_stamp AT TIME ZONE 'UTC', 'DD') \
           FROM web_metrics.metrics WHERE kafka_topic = $1 \
         UNION ALL SELECT kafka_partition, kafka_offset, 'elsewhere' FROM {elsewhere} \
         UNION ALL SELECT partition, \"offset\", 'dead' FROM ingest.dead_letters WHERE topic = $1"
    )))
    .bind(&kafka.topic)
    .fetch_all(&db.pool)
    .await
    .expect("where every offset went");
    let distinct: std::collections::HashSet<(i32, i64)> =
        coordinates.iter().map(|(p, o, _)| (*p, *o)).collect();
    assert_eq!(coordinates.len() as u64, total, "each offset once");
    assert_eq!(distinct.len() as u64, total, "each offset once");
    let count = |what: &str| coordinates.iter().filter(|(_, _, w)| w == what).count();
    assert_eq!(count("02"), (total / 2) as usize, "day 2 all landed");
    assert_eq!(count("01"), 0, "day 1 has no attached partition");
    assert_eq!(count("elsewhere") + count("dead"), (total / 2) as usize);
    assert!(
        count("elsewhere") > 0 && count("dead") > 0,
        "changed mid-stream: {} before, {} after",
        count("elsewhere"),
        count("dead")
    );
    assert_eq!(
        dead_letter_states(&db.pool, &kafka.topic).await,
        vec![(
            Some("23514".into()),
            "db_rejected".into(),
            count("dead") as i64
        )]
    );
    assert_offsets_at_end(&db.pool, &kafka, total as i64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daily_partitions_take_100000_records_exactly_once_and_rows_without_a_partition_land_after_dlq_retry()
 {
    let db = TestDb::new().await;
    exec(&db.pool, PARTITIONED).await;
    for day in 1..=3 {
        exec(&db.pool, &daily_partition(12, day)).await;
    }
    let kafka = TestKafka::new(4);
    // 100,000 records over three days; every 4,000th is dated a day no partition takes.
    let mut payloads = Vec::new();
    let mut outside = 0;
    let mut per_day = [0i64; 3];
    for id in 0..100_025u64 {
        if id % 4_000 == 17 && outside < 25 {
            outside += 1;
            payloads.push(probe(id, 11, 15));
        } else {
            per_day[(id % 3) as usize] += 1;
            payloads.push(probe(id, 12, 1 + (id % 3) as u32));
        }
    }
    assert_eq!(outside, 25);
    let total = payloads.len() as i64;
    kafka.produce(payloads);

    let mut pipeline = Pipeline::connect(kafka.config(&db))
        .await
        .expect("a table partitioned by a mapped column with the coordinates' index is accepted");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        total,
        Duration::from_secs(240),
    )
    .await;
    let scrape = pipeline.observers().metrics.encode();
    pipeline.close().await;
    assert!(
        scrape.contains("kafka_pg_ingest_rows_without_partition_total 25"),
        "{scrape}"
    );
    assert_landed_once(&db, &kafka, total - 25, 25).await;
    assert_eq!(
        dead_letter_states(&db.pool, &kafka.topic).await,
        vec![(Some("23514".into()), "db_rejected".into(), 25)]
    );
    let landed: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tableoid::regclass::text, count(*) FROM web_metrics.metrics GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .expect("rows per partition");
    assert_eq!(
        landed,
        vec![
            ("web_metrics.metrics_1201".into(), per_day[0]),
            ("web_metrics.metrics_1202".into(), per_day[1]),
            ("web_metrics.metrics_1203".into(), per_day[2]),
        ],
        "each row in its day's partition"
    );

    // Once the day has a partition, the dead letters land.
    exec(&db.pool, &daily_partition(11, 15)).await;
    let done = ops::retry_dead_letters(&kafka.config(&db), &DeadLetterFilter::default())
        .await
        .expect("re-drive");
    assert_eq!((done.moved, done.still_failing), (25, 0));
    assert_landed_once(&db, &kafka, total, 0).await;
    let late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM web_metrics.metrics_1115 WHERE comment IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .expect("rows of the new partition");
    assert_eq!(late, 25);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_without_a_fitting_unique_index_is_refused_naming_the_columns() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    let cases = [
        (
            // No unique index at all.
            PARTITIONED.replace(
                ", UNIQUE (kafka_topic, kafka_partition, kafka_offset, time_stamp)",
                "",
            ),
            vec![
                r#"needs a unique index on ("kafka_topic", "kafka_partition", "kafka_offset", "time_stamp")"#,
                r#"plus the partition key columns ("time_stamp")"#,
            ],
        ),
        (
            // Partitioned by a column the route does not map: its default would differ
            // for a record read again.
            PARTITIONED
                .replace(
                    "kafka_offset bigint NOT NULL,",
                    "kafka_offset bigint NOT NULL, day date NOT NULL DEFAULT current_date,",
                )
                .replace("time_stamp)", "day)")
                .replace("RANGE (time_stamp)", "RANGE (day)"),
            vec![
                r#"plus the partition key columns ("day")"#,
                r#"map "day" from the record"#,
            ],
        ),
    ];
    for (ddl, expected) in cases {
        exec(&db.pool, &ddl).await;
        assert_refused(kafka.config(&db), &ddl, &expected).await;
    }
    assert_nothing_claimed(&db.pool).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pg_partman_table_takes_records_through_maintenance_and_a_partition_detached_mid_stream()
{
    let db = TestDb::new().await;
    exec(&db.pool, PARTITIONED).await;
    // pg_partman 4 (Debian's postgresql-15-partman): daily partitions from 2026-12-01 on,
    // four made ahead of today; without the default partition it also makes, a row of a
    // day no partition holds is refused, as on a plain partitioned table.
    exec(
        &db.pool,
        "CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman; \
         SELECT partman.create_parent('web_metrics.metrics', 'time_stamp', 'native', 'daily', \
           p_premake := 4, p_start_partition := '2026-12-01'); \
         DROP TABLE IF EXISTS web_metrics.metrics_default",
    )
    .await;
    // Maintenance as the background worker would run it, then day 1 detached while
    // batches are in flight.
    let detached = "web_metrics.metrics_p2026_12_01";
    let change = format!(
        "SELECT partman.run_maintenance(); \
         ALTER TABLE web_metrics.metrics DETACH PARTITION {detached}"
    );
    day_one_changed_mid_stream(&db, &change, detached).await;
    // Maintenance made the partitions ahead of today.
    let ahead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_partition_tree('web_metrics.metrics') t \
         JOIN pg_class c ON c.oid = t.relid \
         WHERE t.isleaf AND c.relname > 'metrics_p' || to_char(now(), 'YYYY_MM_DD')",
    )
    .fetch_one(&db.pool)
    .await
    .expect("partitions ahead");
    assert!(ahead >= 4, "{ahead} partitions ahead of today");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_of_source_coordinates_in_a_partition_made_after_start_stops_the_worker() {
    let db = TestDb::new().await;
    exec(&db.pool, PARTITIONED).await;
    exec(&db.pool, &daily_partition(12, 1)).await;
    let kafka = TestKafka::new(1);
    let mut pipeline = Pipeline::connect(kafka.config(&db)).await.expect("starts");
    // A partition made once the worker runs (as pg_partman's maintenance does), holding
    // the row that offset 0 would write: the offsets and the table disagree.
    exec(&db.pool, &daily_partition(12, 2)).await;
    exec(
        &db.pool,
        &format!(
            "INSERT INTO web_metrics.metrics (time_stamp, url, kafka_topic, kafka_partition, kafka_offset) \
             VALUES ('2026-12-02T00:00:00Z', 'u', '{}', 0, 0)",
            kafka.topic
        ),
    )
    .await;
    kafka.produce(vec![probe(0, 12, 2), probe(1, 12, 1)]);
    let error = crate::edges::step_until_error(&mut pipeline, Duration::from_secs(60)).await;
    pipeline.close().await;
    let text = error.to_string();
    assert!(text.contains("protocol violation"), "{text}");
    let (rows, dead): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM web_metrics.metrics), (SELECT count(*) FROM ingest.dead_letters)",
    )
    .fetch_one(&db.pool)
    .await
    .expect("counts");
    assert_eq!((rows, dead), (1, 0), "nothing of the batch committed");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upsert_into_a_table_partitioned_by_day_updates_each_key_within_its_day() {
    use crate::routes::{Msg, send};
    let db = TestDb::new().await;
    exec(
        &db.pool,
        "CREATE SCHEMA shop; CREATE TABLE shop.readings (sensor int8 NOT NULL, day date NOT NULL, \
           value int4, PRIMARY KEY (sensor, day)) PARTITION BY RANGE (day); \
         CREATE TABLE shop.readings_1 PARTITION OF shop.readings FOR VALUES FROM ('2026-12-01') TO ('2026-12-02'); \
         CREATE TABLE shop.readings_2 PARTITION OF shop.readings FOR VALUES FROM ('2026-12-02') TO ('2026-12-03')",
    )
    .await;
    let kafka = TestKafka::new(1);
    let route = |delete_on_tombstone: bool| {
        format!(
            "routes:\n  - topic: {}\n    table: shop.readings\n    mode: upsert\n    key: [sensor]\n    \
             delete_on_tombstone: {delete_on_tombstone}\n    columns:\n      \
             - {{ column: sensor, field: \"@key\", type: int8, coerce: true }}\n      \
             - {{ column: day, field: day, type: date }}\n      \
             - {{ column: value, field: value, type: int4 }}\n",
            kafka.topic
        )
    };
    // A tombstone carries no day to find the key's row by: refused, naming the way out.
    let config = kafka
        .config_with_yaml(&db, &route(true))
        .expect("route loads");
    assert_refused(
        config,
        "delete_on_tombstone on a key without the partition column",
        &["set delete_on_tombstone: false"],
    )
    .await;

    let reading = |sensor: &str, day: u32, value: i32| Msg {
        key: Some(sensor.as_bytes().to_vec()),
        value: Some(format!(r#"{{"day": "2026-12-{day:02}", "value": {value}}}"#).into_bytes()),
        ..Msg::default()
    };
    send(
        &kafka,
        &kafka.topic,
        &[
            reading("1", 1, 10),
            reading("2", 1, 20),
            reading("1", 1, 11),
            reading("1", 2, 12),
            reading("2", 2, 21),
            reading("2", 2, 22),
        ],
    );
    let config = kafka
        .config_with_yaml(&db, &route(false))
        .expect("route loads");
    let pipeline = Pipeline::connect(config).await.expect("starts");
    let mut pipeline = pipeline;
    drive_until_caught_up(&mut pipeline, &db.pool, &kafka, 6, Duration::from_secs(60)).await;
    // A later batch updates a day's row in place.
    send(&kafka, &kafka.topic, &[reading("1", 1, 13)]);
    drive_until_caught_up(&mut pipeline, &db.pool, &kafka, 7, Duration::from_secs(60)).await;
    pipeline.close().await;
    let rows: Vec<(i64, String, i32)> =
        sqlx::query_as("SELECT sensor, day::text, value FROM shop.readings ORDER BY sensor, day")
            .fetch_all(&db.pool)
            .await
            .expect("rows");
    assert_eq!(
        rows,
        vec![
            (1, "2026-12-01".into(), 13),
            (1, "2026-12-02".into(), 12),
            (2, "2026-12-01".into(), 20),
            (2, "2026-12-02".into(), 22),
        ],
        "the last value of each key and day"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_partitioned_tables_schema_prints_plain_and_for_pg_partman_take_todays_records() {
    use kafka_pg_ingest::store::schema::{PartitionBy, PartitionInterval, create_statements};
    let now = chrono::Utc::now();
    for partman in [false, true] {
        let db = TestDb::new().await;
        exec(&db.pool, "DROP TABLE web_metrics.metrics").await;
        let by = PartitionBy {
            column: "time_stamp".into(),
            interval: PartitionInterval::Day,
            partman,
        };
        let ddl = create_statements(default_routes().iter(), Some(&by), now.naive_utc())
            .expect("the default route maps time_stamp as timestamptz");
        assert!(ddl.contains("PARTITION BY RANGE (\"time_stamp\")"), "{ddl}");
        assert_eq!(ddl.contains("partman.create_parent"), partman, "{ddl}");
        exec(&db.pool, &ddl).await;
        if partman {
            exec(&db.pool, "DROP TABLE IF EXISTS web_metrics.metrics_default").await;
        }
        let kafka = TestKafka::new(2);
        let stamp = now.format("%Y-%m-%dT%H:%M:%SZ");
        kafka.produce(
            (0..500)
                .map(|id| {
                    let json = format!(
                        r#"{{"request_timestamp": "{stamp}", "url": "https://www.example.com/", "comment": "{id}"}}"#
                    );
                    Some(json.into_bytes())
                })
                .collect(),
        );
        let pipeline = Pipeline::connect(kafka.config(&db))
            .await
            .unwrap_or_else(|e| {
                panic!("the printed table is accepted (partman: {partman}): {e}\n{ddl}")
            });
        ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 500, 0).await;
        db.drop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rewinds_on_a_partitioned_table_replace_and_keep_by_coordinates_across_partitions() {
    use kafka_pg_ingest::ops::{self, RewindTarget};
    let db = TestDb::new().await;
    exec(&db.pool, PARTITIONED).await;
    for day in 1..=3 {
        exec(&db.pool, &daily_partition(12, day)).await;
    }
    let kafka = TestKafka::new(1);
    let total = 600u64;
    kafka.produce(
        (0..total)
            .map(|id| probe(id, 12, 1 + (id % 2) as u32))
            .collect(),
    );
    let config = kafka.config(&db);
    let mut pipeline = Pipeline::connect(config.clone()).await.expect("starts");
    let limit = Duration::from_secs(60);
    drive_until_caught_up(&mut pipeline, &db.pool, &kafka, total as i64, limit).await;
    // Rows moved by hand to another day's partition (day 3, which no record has), and
    // rows deleted: a rewind finds rows by coordinates, wherever they are.
    exec(
        &db.pool,
        "UPDATE web_metrics.metrics SET url = 'moved', time_stamp = time_stamp + \
           (CASE WHEN time_stamp < '2026-12-02T00:00:00Z' THEN 2 ELSE 1 END) * interval '1 day' \
           WHERE kafka_offset % 10 = 0; \
         DELETE FROM web_metrics.metrics WHERE kafka_offset % 10 = 5",
    )
    .await;
    let rows = |sql| scalar(&db.pool, sql);
    assert_eq!(
        rows("SELECT count(*) FROM web_metrics.metrics_1203 WHERE url = 'moved'").await,
        60
    );

    // Keep: the deleted rows come back; the moved ones stay where they are, once.
    ops::rewind(
        &config,
        &kafka.topic,
        &[],
        RewindTarget::Offset(0),
        true,
        true,
    )
    .await
    .expect("rewind keeping rows");
    drive_until_caught_up(&mut pipeline, &db.pool, &kafka, total as i64, limit).await;
    assert_landed_once(&db, &kafka, total as i64, 0).await;
    assert_eq!(
        rows("SELECT count(*) FROM web_metrics.metrics_1203 WHERE url = 'moved'").await,
        60,
        "keep leaves rows in another partition alone"
    );

    // Replace: every re-read row is deleted by its coordinates, from whichever partition
    // holds it, and written where its record's day goes.
    ops::rewind(
        &config,
        &kafka.topic,
        &[],
        RewindTarget::Offset(0),
        false,
        true,
    )
    .await
    .expect("rewind replacing rows");
    drive_until_caught_up(&mut pipeline, &db.pool, &kafka, total as i64, limit).await;
    pipeline.close().await;
    assert_landed_once(&db, &kafka, total as i64, 0).await;
    assert_eq!(
        rows("SELECT count(*) FROM web_metrics.metrics WHERE url = 'moved'").await,
        0
    );
    assert_eq!(
        rows("SELECT count(*) FROM web_metrics.metrics_1203").await,
        0,
        "each row back in its record's day"
    );
    assert_eq!(
        rows("SELECT count(*) FROM ingest.offsets WHERE replay_until IS NOT NULL").await,
        0
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_partitioned_by_day_then_by_url_needs_both_keys_in_its_index_and_lands_each_record_once()
 {
    let db = TestDb::new().await;
    // Days, each hashed by URL into two: the unique index needs the keys of both levels.
    let unindexed = PARTITIONED.replace(
        ", UNIQUE (kafka_topic, kafka_partition, kafka_offset, time_stamp)",
        "",
    );
    exec(&db.pool, &unindexed).await;
    for day in 1..=2 {
        exec(
            &db.pool,
            &format!("{} PARTITION BY HASH (url)", daily_partition(12, day)),
        )
        .await;
        for remainder in 0..2 {
            exec(
                &db.pool,
                &format!(
                    "CREATE TABLE web_metrics.metrics_12{day:02}_{remainder} \
                     PARTITION OF web_metrics.metrics_12{day:02} \
                     FOR VALUES WITH (MODULUS 2, REMAINDER {remainder})"
                ),
            )
            .await;
        }
    }
    let kafka = TestKafka::new(2);
    assert_refused(
        kafka.config(&db),
        "no unique index on a two-level table",
        &[r#"plus the partition key columns ("time_stamp", "url")"#],
    )
    .await;
    exec(
        &db.pool,
        "ALTER TABLE web_metrics.metrics \
         ADD UNIQUE (kafka_topic, kafka_partition, kafka_offset, time_stamp, url)",
    )
    .await;

    let total = 4_000u64;
    kafka.produce(
        (0..total)
            .map(|id| {
                let json = format!(
                    r#"{{"request_timestamp": "2026-12-{:02}T10:00:00Z", "url": "https://site{}.example/", "comment": "{id}"}}"#,
                    1 + id % 2,
                    id % 7
                );
                Some(json.into_bytes())
            })
            .collect(),
    );
    let pipeline = Pipeline::connect(kafka.config(&db))
        .await
        .expect("an index holding both levels' keys is accepted");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, total as i64, 0).await;
    let leaves: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tableoid::regclass::text, count(*) FROM web_metrics.metrics GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .expect("rows per leaf");
    assert_eq!(leaves.len(), 4, "every leaf takes rows: {leaves:?}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_dropped_mid_stream_turns_its_later_records_into_dead_letters_and_the_rest_land()
 {
    let db = TestDb::new().await;
    exec(&db.pool, PARTITIONED).await;
    for day in 1..=2 {
        exec(&db.pool, &daily_partition(12, day)).await;
    }
    // What day 1 held is noted under the lock that waits for commits in flight, then
    // the partition is dropped with its rows, as retention does.
    let change = "BEGIN; LOCK TABLE web_metrics.metrics IN ACCESS EXCLUSIVE MODE; \
         CREATE TABLE public.dropped AS \
           SELECT kafka_partition, kafka_offset FROM web_metrics.metrics_1201; \
         DROP TABLE web_metrics.metrics_1201; COMMIT";
    day_one_changed_mid_stream(&db, change, "public.dropped").await;
    db.drop().await;
}
