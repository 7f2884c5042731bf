//! A worker frozen (SIGSTOP) inside a commit transaction, holding its offset rows'
//! locks: the group moves on within seconds, and the frozen worker's commit is fenced
//! when it thaws.

use std::time::{Duration, Instant};

use kafka_pg_ingest::dev::freeze::{client_ports, freeze_in_transaction};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// Stored next offsets per partition.
async fn positions(pool: &PgPool, kafka: &TestKafka) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT coalesce(next_offset, 0) FROM ingest.offsets \
         WHERE consumer_group = $1 AND topic = $2 ORDER BY partition",
    )
    .bind(&kafka.group)
    .bind(&kafka.topic)
    .fetch_all(pool)
    .await
    .expect("read offsets")
}

async fn owners(pool: &PgPool, kafka: &TestKafka) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT owner) FROM ingest.offsets WHERE consumer_group = $1")
        .bind(&kafka.group)
        .fetch_one(pool)
        .await
        .expect("read owners")
}

/// A worker of the real binary, its log in `log`.
fn spawn(kafka: &TestKafka, db: &TestDb, log: &std::path::Path) -> Reaped {
    let mut command = worker_command(kafka, db);
    command
        .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    Reaped(command.spawn().expect("worker starts"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_frozen_inside_a_commit_loses_its_partitions_within_seconds_and_is_fenced_after_it_thaws()
 {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(8);
    let stop = CancellationToken::new();
    let producer = produce_until(&kafka, stop.clone());
    let logs = std::env::temp_dir().join(format!("kpi-freeze-{}", db.name));
    std::fs::create_dir_all(&logs).expect("log directory");
    let frozen = spawn(&kafka, &db, &logs.join("frozen.log"));
    let other = spawn(&kafka, &db, &logs.join("other.log"));
    wait_for(
        "both workers owning partitions",
        Duration::from_secs(60),
        || async { owners(&db.pool, &kafka).await == 2 },
    )
    .await;
    let server_port: u16 = admin_url()
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next()?.parse().ok())
        .expect("the admin URL has a port");
    assert!(
        freeze_in_transaction(
            &frozen,
            &db.pool,
            &db.name,
            || client_ports(frozen.id(), server_port),
            500
        )
        .await
        .expect("signals"),
        "the worker was never caught inside a transaction"
    );
    let at_freeze = positions(&db.pool, &kafka).await;
    let frozen_at = Instant::now();
    // Every partition moves on, the frozen worker's too: the other worker claims them.
    wait_for(
        "every partition to move after the freeze",
        Duration::from_secs(30),
        || async {
            let now = positions(&db.pool, &kafka).await;
            now.len() == at_freeze.len() && now.iter().zip(&at_freeze).all(|(n, f)| n > f)
        },
    )
    .await;
    eprintln!(
        "every partition moved {:?} after the freeze",
        frozen_at.elapsed()
    );

    frozen.signal("CONT").expect("thaw");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let produced = producer.await.expect("producer") as i64;
    wait_for("the group to catch up", Duration::from_secs(90), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await == produced
    })
    .await;
    for mut worker in [frozen, other] {
        assert!(
            terminate(&mut worker).success(),
            "a worker left with an error"
        );
    }
    // Stored offsets summing to what was produced, and every record once.
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(produced, 0);
    // The other worker's claim ended the frozen one's transaction, and the frozen
    // worker's batch did not commit after it thawed.
    let log = std::fs::read_to_string(logs.join("other.log")).expect("log");
    assert!(
        log.contains("ended another worker's transaction that blocked the claim"),
        "{log}"
    );
    let log = std::fs::read_to_string(logs.join("frozen.log")).expect("log");
    assert!(log.contains("they did not commit"), "{log}");
    let _ = std::fs::remove_dir_all(&logs);
    db.drop().await;
}
