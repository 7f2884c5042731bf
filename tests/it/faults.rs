//! Database faults and group changes: the worker retries, keeps its partitions, and the
//! result is still exactly once.

use std::sync::atomic::Ordering;
use std::time::Duration;

use kafka_pg_ingest::config::Config;
use kafka_pg_ingest::dev::proxy::Proxy;
use kafka_pg_ingest::pipeline::{Pipeline, Stats};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// A fresh database reached through a proxy, a topic holding `messages` valid messages
/// over `partitions`, and a worker configuration connecting through the proxy.
async fn behind_proxy(partitions: i32, messages: u64) -> (TestDb, Proxy, TestKafka, Config) {
    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().expect("addr"))
        .await
        .expect("proxy starts");
    let kafka = TestKafka::new(partitions);
    kafka.produce(valid_messages(0, messages));
    // In plaintext: the proxy finds COMMITs by their bytes.
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/{}?sslmode=disable",
        proxy.port, db.name
    );
    let config = kafka.config_for_url(&url);
    (db, proxy, kafka, config)
}

/// A pipeline stepping on its own task until the stored offsets reach `until` or it is
/// stopped.
struct Worker {
    owner: String,
    stop: CancellationToken,
    task: JoinHandle<Stats>,
}

impl Worker {
    async fn start(config: Config, db: &TestDb, kafka: &TestKafka, until: i64) -> Self {
        let pipeline = Pipeline::connect(config).await.expect("worker starts");
        let owner = pipeline.owner().to_owned();
        let stop = CancellationToken::new();
        let task = drive(pipeline, db, kafka, until, stop.clone());
        Self { owner, stop, task }
    }

    /// Waits for the worker to reach `until` by itself.
    async fn finish(self) -> Stats {
        tokio::time::timeout(Duration::from_secs(120), self.task)
            .await
            .expect("catches up")
            .expect("worker task")
    }

    /// Stops the worker now; it leaves the group.
    async fn stop(self) -> Stats {
        self.stop.cancel();
        self.task.await.expect("worker task")
    }
}

/// One column of the group's offset rows (a trusted expression), in partition order.
async fn offset_rows<T>(pool: &PgPool, kafka: &TestKafka, column: &str) -> Vec<T>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {column} FROM ingest.offsets WHERE consumer_group = $1 ORDER BY partition"
    )))
    .bind(&kafka.group)
    .fetch_all(pool)
    .await
    .expect("offset rows")
}

async fn epochs(pool: &PgPool, kafka: &TestKafka) -> Vec<i64> {
    offset_rows(pool, kafka, "epoch").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_backends_are_retried_partitions_kept_and_result_exactly_once() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(4);
    kafka.produce(valid_messages(0, 20_000));
    // In plaintext: a TLS handshake per reconnection stretches each attempt past the
    // 20 ms between terminations, and no batch would ever get through.
    let mut config = kafka.config_for_url(&format!("{}?sslmode=disable", db.url));
    config.batch.max_records = 500;
    let worker = Worker::start(config, &db, &kafka, 20_000).await;
    // From the first commit on: a start interrupted before it is stored is claimed again
    // (a new epoch, by design), which is not what this test asks about.
    wait_for("first commits", Duration::from_secs(60), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await >= 500
    })
    .await;

    let mut terminated = 0i64;
    while !worker.task.is_finished() {
        terminated += sqlx::query_scalar::<_, i64>(
            // Only backends inside a transaction: killing an idle pooled connection is
            // healed by the pool before anyone notices, so it would prove nothing.
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name LIKE $2 \
               AND state IN ('active', 'idle in transaction')) t",
        )
        .bind(&db.name)
        .bind(format!("{} %", kafka_pg_ingest::store::APPLICATION_NAME))
        .fetch_one(&db.pool)
        .await
        .expect("terminate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = worker.finish().await;

    assert_landed_once(&db, &kafka, 20_000, 0).await;
    assert!(
        terminated >= 5,
        "the fault was injected ({terminated} backends terminated)"
    );
    assert_eq!(
        epochs(&db.pool, &kafka).await,
        vec![1; 4],
        "no partition was re-claimed"
    );
    assert!(
        stats.retries + stats.ambiguous_commits >= 1,
        "transactions cut by the terminations were retried or read back: {stats:?}"
    );
    eprintln!("terminated {terminated} backends; {stats:?}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_refusing_connections_is_retried_with_backoff_and_ends_exactly_once() {
    let (db, proxy, kafka, mut config) = behind_proxy(4, 10_000).await;
    config.batch.max_records = 200;
    config.postgres.acquire_timeout_ms = 300;
    let worker = Worker::start(config, &db, &kafka, 10_000).await;

    wait_for("first commits", Duration::from_secs(60), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await >= 1_000
    })
    .await;
    proxy.set_up(false);
    // A COMMIT relayed just before the cut still completes on the server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = stored_total(&db.pool, &kafka.group, &kafka.topic).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // the outage itself
    assert_eq!(
        stored_total(&db.pool, &kafka.group, &kafka.topic).await,
        during,
        "nothing commits while down"
    );
    assert!(during < 10_000, "the outage hit mid-stream");
    proxy.set_up(true);
    let stats = worker.finish().await;

    assert_landed_once(&db, &kafka, 10_000, 0).await;
    assert!(
        stats.retries >= 3,
        "retried with backoff through the outage: {stats:?}"
    );
    assert_eq!(
        epochs(&db.pool, &kafka).await,
        vec![1; 4],
        "partitions kept through the outage"
    );
    db.drop().await;
}

/// Ingests 5,000 records through the proxy with three COMMITs cut (`applied`: after the
/// server got them; otherwise before) and checks each was read back from the offset
/// rows and the stream landed once.
async fn commits_cut(applied: bool) -> Stats {
    let (db, proxy, kafka, mut config) = behind_proxy(4, 5_000).await;
    let cuts = if applied {
        &proxy.commits_to_cut.applied
    } else {
        &proxy.commits_to_cut.dropped
    };
    config.batch.max_records = 250;
    config.postgres.migrate_on_start = false;
    let worker = Worker::start(config, &db, &kafka, 5_000).await;
    // Armed once the partitions are claimed (a claim commits too): every COMMIT through
    // the proxy is then a batch's.
    wait_for("the first batch", Duration::from_secs(60), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await > 0
    })
    .await;
    cuts.store(3, Ordering::SeqCst);
    let stats = worker.finish().await;

    assert_eq!(
        cuts.load(Ordering::SeqCst),
        0,
        "three COMMITs lost their answer"
    );
    assert_eq!(
        stats.ambiguous_commits, 3,
        "each was read back from the offset rows: {stats:?}"
    );
    assert_landed_once(&db, &kafka, 5_000, 0).await;
    db.drop().await;
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_lost_during_commit_is_resolved_from_the_offset_rows_and_ends_exactly_once() {
    let stats = commits_cut(true).await;
    assert_eq!(
        stats.retries, 0,
        "applied commits are not retried: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_lost_before_it_reached_the_server_is_read_back_as_not_applied_and_retried() {
    let stats = commits_cut(false).await;
    assert!(stats.retries >= 3, "each was retried: {stats:?}");
}

async fn owners(pool: &PgPool, kafka: &TestKafka) -> Vec<String> {
    let mut owners: Vec<String> = offset_rows(pool, kafka, "owner").await;
    owners.sort();
    owners.dedup();
    owners
}

/// Waits until `progress` reaches `at_least`.
async fn advance<F, Fut>(progress: &F, what: &str, at_least: i64)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    wait_for(what, Duration::from_secs(60), || async {
        progress().await >= at_least
    })
    .await;
}

async fn second_joins_first_leaves(assignment_strategy: &str) {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(4);
    let stop_producing = CancellationToken::new();
    let producer = produce_until(&kafka, stop_producing.clone());
    let mut config: Config = kafka.config(&db);
    config.batch.max_records = 250;
    config.kafka.options.insert(
        "partition.assignment.strategy".into(),
        assignment_strategy.into(),
    );
    let progress = || stored_total(&db.pool, &kafka.group, &kafka.topic);

    let first = Worker::start(config.clone(), &db, &kafka, i64::MAX).await;
    let first_owner = first.owner.clone();
    advance(&progress, "first worker's progress", 2_000).await;

    let second = Worker::start(config, &db, &kafka, i64::MAX).await;
    let second_owner = second.owner.clone();
    wait_for(
        "both workers owning partitions",
        Duration::from_secs(60),
        || async { owners(&db.pool, &kafka).await.len() == 2 },
    )
    .await;
    let shared_at = progress().await;
    advance(&progress, "both workers' progress", shared_at + 2_000).await;

    first.stop().await;
    let left_at = progress().await;
    advance(
        &progress,
        "the second worker alone making progress",
        left_at + 2_000,
    )
    .await;
    stop_producing.cancel();
    let produced = producer.await.expect("producer") as i64;
    wait_for(
        "the second worker catching up",
        Duration::from_secs(120),
        || async { progress().await >= produced },
    )
    .await;
    assert_eq!(
        owners(&db.pool, &kafka).await,
        vec![second_owner.clone()],
        "the second worker took over every partition"
    );
    second.stop().await;
    assert_eq!(
        owners(&db.pool, &kafka).await,
        vec![String::new()],
        "its clean exit left no partition owned"
    );

    assert_landed_once(&db, &kafka, produced, 0).await;
    let first_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ingest.offsets WHERE owner = $1")
            .bind(&first_owner)
            .fetch_one(&db.pool)
            .await
            .expect("count");
    assert_eq!(first_rows, 0);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_worker_joining_and_first_leaving_is_exactly_once_with_eager_rebalancing() {
    second_joins_first_leaves("range").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_worker_joining_and_first_leaving_is_exactly_once_with_cooperative_rebalancing() {
    second_joins_first_leaves("cooperative-sticky").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_answers_503_while_the_database_is_down_and_200_after() {
    let (db, proxy, kafka, mut config) = behind_proxy(2, 100).await;
    config.run.metrics_addr = Some("127.0.0.1:0".into());
    config.postgres.acquire_timeout_ms = 300;
    let pipeline = Pipeline::connect(config).await.expect("starts");
    let stop_http = CancellationToken::new();
    let addr = serve_endpoints(&pipeline, stop_http.clone()).await;
    // Keep the loop polling so the consumer joins and reports its group state.
    let stop = CancellationToken::new();
    let task = drive(pipeline, &db, &kafka, i64::MAX, stop.clone());
    let ready = || async { http_get(addr, "/readyz").await.0 };

    wait_for(
        "ready with the database up",
        Duration::from_secs(60),
        || async { ready().await == 200 },
    )
    .await;
    proxy.set_up(false);
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database down"), "{body}");
    proxy.set_up(true);
    wait_for(
        "ready again with the database back",
        Duration::from_secs(60),
        || async { ready().await == 200 },
    )
    .await;

    stop.cancel();
    task.await.expect("worker task");
    stop_http.cancel();
    db.drop().await;
}
