//! The protocol in small cases: exactly once, restarts, dead letters, fencing.

use std::time::Duration;

use kafka_pg_ingest::pipeline::Pipeline;
use kafka_pg_ingest::record::Record;
use kafka_pg_ingest::store::{Batch, CommitOutcome, PartitionRange, Store};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_messages_over_four_partitions_land_exactly_once() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(4);
    kafka.produce(valid_messages(0, 10_000));
    let pipeline = Pipeline::connect(kafka.config(&db))
        .await
        .expect("pipeline starts");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 10_000, 0).await;
    db.drop().await;
}

/// Commits offsets for the group in Kafka itself, as a stale or foreign tool might.
fn commit_in_kafka(kafka: &TestKafka, offset: i64) {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group);
    for (k, v) in fast_group_options() {
        client.set(k, v);
    }
    let consumer: BaseConsumer = client.create().expect("consumer");
    // The broker accepts commits from a group member only: join first.
    consumer.subscribe(&[&kafka.topic]).expect("subscribe");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while consumer.assignment().expect("assignment").count() == 0 {
        assert!(std::time::Instant::now() < deadline, "never assigned");
        consumer.poll(Duration::from_millis(100));
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..kafka.partitions {
        tpl.add_partition_offset(&kafka.topic, p, Offset::Offset(offset))
            .expect("tpl");
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("commit in Kafka");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_resumes_from_offsets_stored_in_postgres_with_kafka_offsets_absent_ahead_or_behind()
{
    let db = TestDb::new().await;
    let kafka = TestKafka::new(4);
    kafka.produce(valid_messages(0, 6_000));
    let mut config = kafka.config(&db);
    // Each life commits at most two lanes' batches per step and those in flight when it
    // closes: small batches keep every life short of the stream's end.
    config.batch.max_records = 250;
    // First life: Kafka holds no committed offset for the group at all.
    config.kafka.mirror_offsets = false;
    let token = tokio_util::sync::CancellationToken::new();

    let mut first = Pipeline::connect(config.clone()).await.expect("starts");
    wait_for_progress(&mut first, &db, &kafka, 1_000, &token).await;
    first.close().await;
    let after_first = stored_total(&db.pool, &kafka.group, &kafka.topic).await;
    assert!(after_first < 6_000, "stopped mid-stream");

    // Second life: starts from Postgres, not from Kafka's (absent) offsets.
    let mut second = Pipeline::connect(config.clone()).await.expect("restarts");
    wait_for_progress(&mut second, &db, &kafka, after_first + 1_000, &token).await;
    second.close().await;
    let after_second = stored_total(&db.pool, &kafka.group, &kafka.topic).await;
    assert!(after_second < 6_000, "stopped mid-stream again");

    // Third life: Kafka holds an offset ahead of Postgres (which would skip records).
    tokio::task::block_in_place(|| commit_in_kafka(&kafka, 5_000));
    let mut third = Pipeline::connect(config.clone()).await.expect("restarts");
    wait_for_progress(&mut third, &db, &kafka, after_second + 500, &token).await;
    third.close().await;
    let after_third = stored_total(&db.pool, &kafka.group, &kafka.topic).await;
    assert!(after_third < 6_000, "stopped mid-stream once more");
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(after_third, 0);

    // Fourth life: Kafka now holds a wrong offset (0, which would re-read everything).
    tokio::task::block_in_place(|| commit_in_kafka(&kafka, 0));
    config.kafka.mirror_offsets = true;
    let fourth = Pipeline::connect(config).await.expect("restarts");
    ingest_all_and_assert_exactly_once(fourth, &db, &kafka, 6_000, 0).await;
    db.drop().await;
}

async fn wait_for_progress(
    pipeline: &mut Pipeline,
    db: &TestDb,
    kafka: &TestKafka,
    at_least: i64,
    token: &tokio_util::sync::CancellationToken,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stored_total(&db.pool, &kafka.group, &kafka.topic).await < at_least {
        assert!(std::time::Instant::now() < deadline, "no progress");
        pipeline.step(token).await.expect("step");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_mixing_valid_and_every_kind_of_bad_record_commits_all_in_one_transaction() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    let ok = r#""request_timestamp": "2021-01-01 00:00:00", "url": "https://www.example.com/""#;
    let bad: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("tombstone", None),
        ("empty", Some(Vec::new())),
        ("not_utf8", Some(vec![b'{', 0xff, 0xfe, b'}'])),
        ("not_json", Some(b"{\"url\": ".to_vec())),
        ("not_object", Some(b"[1, 2, 3]".to_vec())),
        (
            "missing_field",
            Some(br#"{"url": "https://www.example.com/"}"#.to_vec()),
        ),
        (
            "bad_timestamp",
            Some(br#"{"request_timestamp": "31/12/2021", "url": "u"}"#.to_vec()),
        ),
        (
            "bad_ip",
            Some(format!(r#"{{{ok}, "ip_address": "1.2.3"}}"#).into_bytes()),
        ),
        (
            "bad_interval",
            Some(format!(r#"{{{ok}, "resp_time": "soon"}}"#).into_bytes()),
        ),
        (
            "bad_value",
            Some(format!(r#"{{{ok}, "resp_status_code": "two hundred"}}"#).into_bytes()),
        ),
        (
            "too_large",
            Some(format!(r#"{{{ok}, "comment": "{}"}}"#, "x".repeat(2 * 1024 * 1024)).into_bytes()),
        ),
        ("too_deep", Some(vec![b'['; 100_000])),
        (
            "nul_in_text",
            Some(format!(r#"{{{ok}, "comment": "a\u0000b"}}"#).into_bytes()),
        ),
    ];
    let mut payloads = valid_messages(0, 20);
    // An unknown extra field is not an error: producers may add fields before we map them.
    payloads.push(Some(
        format!(r#"{{{ok}, "comment": "extra", "new_field": {{"a": 1}}}}"#).into_bytes(),
    ));
    for (i, (_, payload)) in bad.iter().enumerate() {
        payloads.insert(2 + i * 2, payload.clone());
    }
    let total = payloads.len();
    kafka.produce(payloads);

    let mut config = kafka.config(&db);
    config.batch.max_records = total;
    config.batch.max_wait_ms = 3000;
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        total as i64,
        Duration::from_secs(60),
    )
    .await;

    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT reason_code FROM ingest.dead_letters ORDER BY \"offset\"")
            .fetch_all(&db.pool)
            .await
            .expect("dead letters");
    let expected: Vec<&str> = bad.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        reasons, expected,
        "one dead letter per bad record, in offset order"
    );
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(21, bad.len() as i64);
    let tombstone_value: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT value FROM ingest.dead_letters WHERE reason_code = 'tombstone'")
            .fetch_one(&db.pool)
            .await
            .expect("tombstone row");
    assert_eq!(tombstone_value, None);
    let kept_bytes: Vec<u8> =
        sqlx::query_scalar("SELECT value FROM ingest.dead_letters WHERE reason_code = 'not_utf8'")
            .fetch_one(&db.pool)
            .await
            .expect("not_utf8 row");
    assert_eq!(
        kept_bytes,
        vec![b'{', 0xff, 0xfe, b'}'],
        "the raw bytes are kept"
    );

    // xmin is the id of the transaction that wrote a row version.
    let transactions: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT xmin::text FROM ( \
           SELECT xmin FROM web_metrics.metrics UNION ALL \
           SELECT xmin FROM ingest.dead_letters UNION ALL \
           SELECT xmin FROM ingest.offsets) t",
    )
    .fetch_all(&db.pool)
    .await
    .expect("xmins");
    if transactions.len() != 1 {
        let detail: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT 'rows', xmin::text, count(*) FROM web_metrics.metrics GROUP BY 2 UNION ALL \
             SELECT 'dead', xmin::text, count(*) FROM ingest.dead_letters GROUP BY 2 UNION ALL \
             SELECT 'offsets', xmin::text, count(*) FROM ingest.offsets GROUP BY 2",
        )
        .fetch_all(&db.pool)
        .await
        .expect("detail");
        eprintln!("transactions: {detail:?}");
    }
    assert_eq!(
        transactions.len(),
        1,
        "rows, dead letters and offset advance share one transaction"
    );
    // Closed after: a clean exit clears the owner from the offset rows, in a transaction
    // of its own.
    pipeline.close().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn record_postgres_rejects_becomes_db_rejected_dead_letter_with_sqlstate() {
    let db = TestDb::new().await;
    sqlx::query(
        "ALTER TABLE web_metrics.metrics ADD CONSTRAINT plausible_status CHECK (status_code < 600)",
    )
    .execute(&db.pool)
    .await
    .expect("add constraint");
    let kafka = TestKafka::new(2);
    let mut payloads = valid_messages(0, 200);
    let rejected_ids = [17u64, 101, 102, 199];
    for id in rejected_ids {
        payloads[id as usize] = Some(
            format!(
                r#"{{"request_timestamp": "2021-01-01 00:00:00", "url": "u", "resp_status_code": 700, "comment": "{id}"}}"#
            )
            .into_bytes(),
        );
    }
    kafka.produce(payloads);
    let mut pipeline = Pipeline::connect(kafka.config(&db)).await.expect("starts");
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        200,
        Duration::from_secs(60),
    )
    .await;
    pipeline.close().await;

    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(196, 4);
    let dead: Vec<(String, Option<String>, Vec<u8>)> =
        sqlx::query_as("SELECT reason_code, sqlstate, value FROM ingest.dead_letters ORDER BY partition, \"offset\"")
            .fetch_all(&db.pool)
            .await
            .expect("dead letters");
    let mut comments: Vec<String> = Vec::new();
    for (code, sqlstate, value) in dead {
        assert_eq!(code, "db_rejected");
        assert_eq!(sqlstate.as_deref(), Some("23514"), "check_violation");
        let json: serde_json::Value = serde_json::from_slice(&value).expect("value kept");
        comments.push(json["comment"].as_str().expect("comment").to_owned());
    }
    comments.sort();
    let mut expected: Vec<String> = rejected_ids.iter().map(u64::to_string).collect();
    expected.sort();
    assert_eq!(
        comments, expected,
        "exactly the rejected records are dead letters"
    );
    db.drop().await;
}

fn record(topic: &str, offset: i64, id: u64) -> Record {
    Record {
        topic: topic.into(),
        partition: 0,
        offset,
        key: None,
        value: valid_messages(id, 1).remove(0),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_clears_the_owner_only_of_rows_still_held_at_its_epoch() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(2);
    let config = kafka.config(&db);
    let store = Store::for_pool(db.pool.clone(), &config)
        .await
        .expect("store");
    let (p0, p1) = ((kafka.topic.clone(), 0), (kafka.topic.clone(), 1));
    let a = store
        .claim("worker-a", &[(p0.clone(), 0), (p1.clone(), 0)])
        .await
        .expect("a claims both");
    assert_eq!(a.iter().map(|c| c.epoch).collect::<Vec<_>>(), vec![1, 1]);
    // Partition 1 moves to b before a's revoke is handled.
    store
        .claim("worker-b", &[(p1.clone(), 0)])
        .await
        .expect("b claims");

    let released = store
        .release_revoked("worker-a", &[(p0, 1), (p1, 1)])
        .await
        .expect("release runs");
    assert_eq!(released, 1, "only the row a still held");
    let owners: Vec<(i32, String, i64)> = sqlx::query_as(
        "SELECT partition, owner, epoch FROM ingest.offsets WHERE topic = $1 ORDER BY partition",
    )
    .bind(&kafka.topic)
    .fetch_all(&db.pool)
    .await
    .expect("rows");
    assert_eq!(
        owners,
        vec![(0, String::new(), 1), (1, "worker-b".to_owned(), 2)],
        "a's row is cleared, its epoch kept; b's claim untouched"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_with_stale_epoch_cannot_commit_and_its_transaction_rolls_back() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    let config = kafka.config(&db);
    let store = Store::for_pool(db.pool.clone(), &config)
        .await
        .expect("store");
    let routes = store.routes();
    let tp = vec![(kafka.topic.clone(), 0)];
    let claim = vec![((kafka.topic.clone(), 0), 0)];

    let old = store
        .claim("worker-a", &claim)
        .await
        .expect("a claims")
        .remove(0);
    let new = store
        .claim("worker-b", &claim)
        .await
        .expect("b claims")
        .remove(0);
    assert_eq!((old.epoch, new.epoch), (1, 2));
    // A first claim stores where it starts; only the current claim can.
    let start = async |epoch| {
        store
            .store_starts(&[(kafka.topic.as_str(), 0, epoch, 0)])
            .await
            .expect("store")
    };
    assert_eq!(start(old.epoch).await, vec![]);
    assert_eq!(start(new.epoch).await, vec![(kafka.topic.clone(), 0)]);

    let range = |epoch| PartitionRange {
        topic: kafka.topic.clone(),
        partition: 0,
        epoch,
        start: 0,
        end: 3,
        gap: None,
    };
    let records = || {
        (0..3)
            .map(|o| record(&kafka.topic, o, o as u64))
            .collect::<Vec<_>>()
    };
    let stale = Batch::decode(records(), routes, vec![range(old.epoch)]);
    match store.commit(&stale).await.expect("commit runs") {
        CommitOutcome::Fenced(fenced) => assert_eq!(fenced, vec![range(old.epoch)]),
        other => panic!("stale worker committed: {other:?}"),
    }
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(0, 0);
    let stored = store.stored_offsets(&tp).await.expect("offsets").remove(0);
    assert_eq!(
        (stored.next_offset, stored.epoch, stored.owner.as_str()),
        (Some(0), 2, "worker-b")
    );

    let current = Batch::decode(records(), routes, vec![range(new.epoch)]);
    assert_eq!(
        store.commit(&current).await.expect("commit runs"),
        CommitOutcome::Committed {
            rows: 3,
            dead_letters: 0,
            isolation: None,
        }
    );
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(3, 0);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_inserts_write_method_lands_the_same_rows_exactly_once() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(2);
    let mut payloads = valid_messages(0, 300);
    // Text that needs COPY escaping must survive the split back into fields.
    payloads.push(Some(
        br#"{"request_timestamp": "2021-01-01 00:00:00", "url": "a\tb\\c\nd", "comment": "300"}"#
            .to_vec(),
    ));
    payloads.push(Some(b"not json".to_vec()));
    kafka.produce(payloads);
    let mut config = kafka.config(&db);
    config.sink.write_method = kafka_pg_ingest::config::WriteMethod::RowInserts;
    let pipeline = Pipeline::connect(config).await.expect("starts");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 301, 1).await;
    let url: String =
        sqlx::query_scalar("SELECT url FROM web_metrics.metrics WHERE comment = '300'")
            .fetch_one(&db.pool)
            .await
            .expect("escaped row");
    assert_eq!(url, "a\tb\\c\nd");
    db.drop().await;
}
