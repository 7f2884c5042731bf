//! Positions kept true to the stored rows: rebalances that keep a partition while its
//! batch is in flight, a rewind of a quiet partition on a busy worker, offset rows
//! deleted, restored from an older dump, or claimed by a stranger.

use std::time::Duration;

use kafka_pg_ingest::ops::{self, RewindTarget};
use kafka_pg_ingest::pipeline::Pipeline;
use kafka_pg_ingest::sample;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// Produces to partition 0 only, `per_round` valid messages every 100 ms, ids from
/// `first`, until `stop`; yields how many.
fn produce_to_partition_zero(
    kafka: &TestKafka,
    first: u64,
    per_round: u64,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    let (brokers, topic) = (kafka.brokers.clone(), kafka.topic.clone());
    tokio::task::spawn_blocking(move || {
        let mut produced = 0;
        while !stop.is_cancelled() {
            let payloads = valid_messages(first + produced, per_round);
            produced += sample::produce(&brokers, &topic, 1, payloads).expect("produce");
            std::thread::sleep(Duration::from_millis(100));
        }
        produced
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalances_that_keep_a_partition_while_its_batch_is_in_flight_lose_nothing() {
    let db = TestDb::new().await;
    // The compare-and-set of every batch waits 6 s before it takes any lock, so a
    // claim at a rebalance overtakes the batch in flight, which then finds its
    // partition claimed anew (by this same worker) while the next batch already reads
    // under the new claim.
    exec(
        &db.pool,
        "CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN \
           IF current_query() LIKE 'UPDATE ingest.offsets AS o SET next_offset = u.end_offset%' \
           THEN PERFORM pg_sleep(6); END IF; RETURN NULL; END$$; \
         CREATE TRIGGER slow BEFORE UPDATE ON ingest.offsets \
           FOR EACH STATEMENT EXECUTE FUNCTION public.slow();",
    )
    .await;
    let kafka = TestKafka::new(1);
    let stop = CancellationToken::new();
    let producer = produce_to_partition_zero(&kafka, 0, 50, stop.clone());
    let mut config = kafka.config(&db);
    config.batch.max_records = 2_000;
    let worker_stop = CancellationToken::new();
    let worker = drive(
        Pipeline::connect(config).await.expect("starts"),
        &db,
        &kafka,
        i64::MAX,
        worker_stop.clone(),
    );
    // Members of the same group reading another topic: each join and leave rebalances
    // the group, and the worker (eager assignment) is handed its partition back.
    let other_topic = format!("{}-other", kafka.topic);
    kafka
        ._cluster
        .create_topic(&other_topic, 1, 1)
        .expect("topic");
    for _ in 0..4 {
        let (brokers, group, other) = (
            kafka.brokers.clone(),
            kafka.group.clone(),
            other_topic.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut client = rdkafka::ClientConfig::new();
            client
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group);
            for (k, v) in fast_group_options() {
                client.set(k, v);
            }
            let member: BaseConsumer = client.create().expect("member");
            member.subscribe(&[&other]).expect("subscribe");
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while member.assignment().expect("assignment").count() == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the member never joined"
                );
                member.poll(Duration::from_millis(100));
            }
            member.unsubscribe();
        })
        .await
        .expect("member");
    }
    stop.cancel();
    let produced = producer.await.expect("producer") as i64;
    wait_for(
        "the worker to catch up",
        Duration::from_secs(60),
        || async { stored_total(&db.pool, &kafka.group, &kafka.topic).await == produced },
    )
    .await;
    worker_stop.cancel();
    let stats = worker.await.expect("worker");
    let epoch = scalar(&db.pool, "SELECT max(epoch) FROM ingest.offsets").await;
    assert!(
        epoch >= 5,
        "the partition was claimed again at each rebalance (epoch {epoch})"
    );
    assert!(
        stats.fenced > 0,
        "some batch was in flight during a rebalance: {stats:?}"
    );
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(produced, 0);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rewind_of_a_quiet_partition_takes_effect_while_another_partition_keeps_the_worker_busy()
{
    let db = TestDb::new().await;
    let kafka = TestKafka::new(2);
    kafka.produce(valid_messages(0, 1_000));
    let mut config = kafka.config(&db);
    config.batch.max_records = 100;
    let stop = CancellationToken::new();
    let worker = drive(
        Pipeline::connect(config.clone()).await.expect("starts"),
        &db,
        &kafka,
        i64::MAX,
        stop.clone(),
    );
    wait_for("the first 1,000", Duration::from_secs(60), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await == 1_000
    })
    .await;
    // Partition 0 gets a backlog that keeps the worker busy for several seconds
    // (every COPY takes 50 ms); partition 1 gets nothing new and is rewound.
    exec(
        &db.pool,
        "CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS \
           $$BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END$$; \
         CREATE TRIGGER slow AFTER INSERT ON web_metrics.metrics \
           FOR EACH STATEMENT EXECUTE FUNCTION public.slow();",
    )
    .await;
    let backlog = tokio::task::block_in_place(|| {
        sample::produce(
            &kafka.brokers,
            &kafka.topic,
            1,
            valid_messages(1_000, 12_000),
        )
        .expect("produce")
    }) as i64;
    sqlx::query("UPDATE web_metrics.metrics SET url = 'tampered' WHERE kafka_partition = 1")
        .execute(&db.pool)
        .await
        .expect("tamper");
    ops::rewind(
        &config,
        &kafka.topic,
        &[1],
        RewindTarget::Offset(0),
        false,
        true,
    )
    .await
    .expect("rewind");
    wait_for(
        "the quiet partition's replay",
        Duration::from_secs(5),
        || async {
            scalar(
                &db.pool,
                "SELECT count(*) FROM web_metrics.metrics WHERE url = 'tampered'",
            )
            .await
                == 0
                && scalar(
                    &db.pool,
                    "SELECT count(*) FROM ingest.offsets WHERE replay_until IS NOT NULL",
                )
                .await
                    == 0
        },
    )
    .await;
    assert!(
        stored_total(&db.pool, &kafka.group, &kafka.topic).await < 1_000 + backlog,
        "the busy partition was still busy"
    );
    wait_for("the backlog", Duration::from_secs(120), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await == 1_000 + backlog
    })
    .await;
    stop.cancel();
    worker.await.expect("worker");
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(1_000 + backlog, 0);
    db.drop().await;
}

/// What became of partition 0 after tampering with its row under a live worker.
struct Tampered {
    db: TestDb,
    /// Partition 0's epoch before and after.
    epochs: (i64, i64),
    /// From the tampering to every record landed.
    took: Duration,
}

/// Starts a worker on its own task, waits until it has landed 1,000 records, runs
/// `tamper` on the offset rows, produces 1,000 more and waits for every record to land
/// exactly once.
async fn tamper_with_the_rows_of_a_live_worker(tamper: &'static str) -> Tampered {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(2);
    kafka.produce(valid_messages(0, 1_000));
    let stop = CancellationToken::new();
    let worker = drive(
        Pipeline::connect(kafka.config(&db)).await.expect("starts"),
        &db,
        &kafka,
        i64::MAX,
        stop.clone(),
    );
    wait_for("the first 1,000", Duration::from_secs(60), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await == 1_000
    })
    .await;
    let before = scalar(
        &db.pool,
        "SELECT epoch FROM ingest.offsets WHERE partition = 0",
    )
    .await;
    let tampered = std::time::Instant::now();
    exec(&db.pool, tamper).await;
    kafka.produce(valid_messages(1_000, 1_000));
    wait_for(
        "every record after the tampering",
        Duration::from_secs(30),
        || async { stored_total(&db.pool, &kafka.group, &kafka.topic).await == 2_000 },
    )
    .await;
    let took = tampered.elapsed();
    stop.cancel();
    worker.await.expect("worker");
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(2_000, 0);
    let after = scalar(
        &db.pool,
        "SELECT epoch FROM ingest.offsets WHERE partition = 0",
    )
    .await;
    Tampered {
        db,
        epochs: (before, after),
        took,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offset_row_deleted_under_a_live_worker_is_claimed_again_where_the_worker_stood() {
    let t = tamper_with_the_rows_of_a_live_worker("DELETE FROM ingest.offsets WHERE partition = 0")
        .await;
    assert!(
        t.epochs.1 > t.epochs.0,
        "claimed above the epoch it held: {:?}",
        t.epochs
    );
    t.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offset_row_restored_from_an_older_dump_is_claimed_again_and_resumes_from_it() {
    // As a restore of a dump taken at offset 300 would leave it: the row and the rows of
    // the table both back there, under an older epoch.
    let t = tamper_with_the_rows_of_a_live_worker(
        "UPDATE ingest.offsets SET epoch = 0, next_offset = 300, owner = 'restored' WHERE partition = 0; \
         DELETE FROM web_metrics.metrics WHERE kafka_partition = 0 AND kafka_offset >= 300",
    )
    .await;
    assert!(
        t.epochs.1 > t.epochs.0,
        "claimed above the epoch it held: {:?}",
        t.epochs
    );
    t.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_claimed_by_a_stranger_but_still_assigned_here_is_claimed_back_after_the_session_timeout()
 {
    let t = tamper_with_the_rows_of_a_live_worker(
        "UPDATE ingest.offsets SET epoch = epoch + 5, owner = 'stranger' WHERE partition = 0",
    )
    .await;
    let owner: String = sqlx::query_scalar("SELECT owner FROM ingest.offsets WHERE partition = 0")
        .fetch_one(&t.db.pool)
        .await
        .expect("owner");
    assert_ne!(owner, "stranger");
    assert!(
        t.epochs.1 > t.epochs.0 + 5,
        "claimed above the stranger: {:?}",
        t.epochs
    );
    // The stranger had the session timeout (6 s in tests) to be the owner Kafka meant.
    assert!(
        t.took >= Duration::from_secs(5),
        "claimed back after {:?}",
        t.took
    );
    t.db.drop().await;
}
