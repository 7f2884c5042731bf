//! Shared test fixtures: a fresh database per test, a mock Kafka cluster with a fresh
//! topic, and checks of what Postgres holds.

use std::time::{Duration, Instant};

use kafka_pg_ingest::config::{Config, Overrides};
pub use kafka_pg_ingest::dev::reaped::Reaped;
use kafka_pg_ingest::pipeline::{Pipeline, Stats};
use kafka_pg_ingest::sample;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The server tests create their databases on.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own for one test, migrated; dropped by [`TestDb::drop`].
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

/// Worker logs in test output, filtered by `RUST_LOG` (default: warnings).
fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

impl TestDb {
    pub async fn new() -> Self {
        let db = Self::empty().await;
        kafka_pg_ingest::store::migrate(&db.pool, &default_routes())
            .await
            .expect("migrations apply");
        db
    }

    /// A database without the schema (to restore a dump into).
    pub async fn empty() -> Self {
        init_logs();
        let name = format!("kpi_it_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("admin connection");
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let base = admin_url();
        let url = format!(
            "{}/{name}",
            &base[..base.rfind('/').expect("URL has a database part")]
        );
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .expect("test database connection");
        Self { name, url, pool }
    }

    /// Drops the database (after a passing test; a failing one leaves it to inspect).
    pub async fn drop(self) {
        self.pool.close().await;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("admin connection");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&admin)
        .await
        .expect("drop database");
    }
}

/// An in-process Kafka-protocol broker with one fresh topic.
pub struct TestKafka {
    /// Kept alive for the test; dropping it stops the broker.
    pub _cluster: MockCluster<'static, DefaultProducerContext>,
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub partitions: i32,
}

impl TestKafka {
    pub fn new(partitions: i32) -> Self {
        let cluster = MockCluster::new(1).expect("mock cluster starts");
        let brokers = cluster.bootstrap_servers();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let topic = format!("it-{}", &suffix[..12]);
        cluster
            .create_topic(&topic, partitions, 1)
            .expect("topic created");
        Self {
            _cluster: cluster,
            brokers,
            group: format!("group-{}", &suffix[..12]),
            topic,
            partitions,
        }
    }

    /// Produces payloads round-robin over the partitions (blocking the calling thread).
    pub fn produce(&self, payloads: Vec<Option<Vec<u8>>>) -> u64 {
        sample::produce(&self.brokers, &self.topic, self.partitions, payloads).expect("produce")
    }

    /// A worker configuration for this topic and the given database, tuned for tests:
    /// short waits, fast group joins, quick retries.
    pub fn config(&self, db: &TestDb) -> Config {
        self.config_for_url(&db.url)
    }

    pub fn config_for_url(&self, url: &str) -> Config {
        self.load_config(None, url).expect("test config is valid")
    }

    /// A test configuration with `yaml` layered over the defaults (for routes).
    pub fn config_with_yaml(
        &self,
        db: &TestDb,
        yaml: &str,
    ) -> Result<Config, kafka_pg_ingest::config::ConfigError> {
        let path = std::env::temp_dir().join(format!("kpi-it-{}.yaml", uuid::Uuid::new_v4()));
        std::fs::write(&path, yaml).expect("temp file is writable");
        let config = self.load_config(Some(&path), &db.url);
        let _ = std::fs::remove_file(&path);
        config
    }

    fn load_config(
        &self,
        file: Option<&std::path::Path>,
        url: &str,
    ) -> Result<Config, kafka_pg_ingest::config::ConfigError> {
        let mut config = kafka_pg_ingest::load_config(
            file,
            test_env(),
            &Overrides {
                brokers: Some(self.brokers.clone()),
                database_url: Some(url.to_owned()),
                group: Some(self.group.clone()),
                topics: vec![self.topic.clone()],
                kafka_options: fast_group_options(),
                ..Overrides::default()
            },
        )?;
        config.batch.max_wait_ms = 100;
        config.retry.initial_delay_ms = 50;
        config.retry.max_delay_ms = 1000;
        Ok(config)
    }
}

/// Environment layer of test workers: claims give up well within the short poll interval,
/// and two commit lanes run whatever the machine, so every guarantee is tested with lanes on.
pub fn test_env() -> Vec<(String, String)> {
    vec![
        (
            "KAFKA_PG_INGEST__RETRY__CLAIM_LIMIT_SECS".into(),
            "5".into(),
        ),
        ("KAFKA_PG_INGEST__BATCH__LANES".into(), "2".into()),
    ]
}

/// librdkafka options that make joins and rebalances take seconds, not minutes.
pub fn fast_group_options() -> Vec<(String, String)> {
    [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
        ("max.poll.interval.ms", "10000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Produces valid messages in rounds of 500 on a blocking thread until `stop` is
/// cancelled; yields how many it produced. Keeps a stream flowing while a test changes
/// the group.
pub fn produce_until(
    kafka: &TestKafka,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    let (brokers, topic, partitions) =
        (kafka.brokers.clone(), kafka.topic.clone(), kafka.partitions);
    tokio::task::spawn_blocking(move || {
        let mut produced = 0;
        while !stop.is_cancelled() {
            produced +=
                sample::produce(&brokers, &topic, partitions, valid_messages(produced, 500))
                    .expect("produce");
            std::thread::sleep(Duration::from_millis(100));
        }
        produced
    })
}

/// `count` valid website-metrics messages whose `comment` is their id, starting at `first`.
pub fn valid_messages(first: u64, count: u64) -> Vec<Option<Vec<u8>>> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(first);
    (first..first + count)
        .map(|id| Some(sample::website_metric(id, &mut rng)))
        .collect()
}

/// Sum of the group's stored next offsets over every topic.
pub async fn stored_group_total(pool: &PgPool, group: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(next_offset), 0)::int8 FROM ingest.offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(pool)
    .await
    .expect("read offsets")
}

/// Runs `sql` (statements from the test itself), panicking with it and the error.
pub async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The one integer `sql` selects.
pub async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("query")
}

/// Sum of the group's stored next offsets for the topic.
pub async fn stored_total(pool: &PgPool, group: &str, topic: &str) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(next_offset), 0)::int8 FROM ingest.offsets WHERE consumer_group = $1 AND topic = $2")
        .bind(group)
        .bind(topic)
        .fetch_one(pool)
        .await
        .expect("read offsets")
}

/// Steps the pipeline until the stored offsets cover `total` records, or panics after
/// `limit`.
pub async fn drive_until_caught_up(
    pipeline: &mut Pipeline,
    pool: &PgPool,
    kafka: &TestKafka,
    total: i64,
    limit: Duration,
) {
    let token = CancellationToken::new();
    let deadline = Instant::now() + limit;
    while stored_total(pool, &kafka.group, &kafka.topic).await < total {
        assert!(Instant::now() < deadline, "not caught up within {limit:?}");
        pipeline.step(&token).await.expect("step succeeds");
    }
}

/// Asserts the worker refuses to start with `config` (`what` says why it must), its
/// error holding every one of `expected`.
pub async fn assert_refused(config: Config, what: &str, expected: &[&str]) {
    let err = match Pipeline::connect(config).await {
        Ok(_) => panic!("the worker must not start with:\n{what}"),
        Err(e) => e.to_string(),
    };
    for part in expected {
        assert!(err.contains(part), "expected `{part}` in:\n{err}");
    }
}

/// Asserts no worker claimed any partition in this database.
pub async fn assert_nothing_claimed(pool: &PgPool) {
    let claims: i64 = sqlx::query_scalar("SELECT count(*) FROM ingest.offsets")
        .fetch_one(pool)
        .await
        .expect("read offsets");
    assert_eq!(claims, 0, "no partition was claimed");
}

/// Waits for `condition` to hold, polling, or panics after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the target table and dead letters hold for a topic.
#[derive(Debug, PartialEq, Eq)]
pub struct Landed {
    pub rows: i64,
    pub distinct_coordinates: i64,
    pub distinct_comments: i64,
    pub dead_letters: i64,
    pub distinct_dead_offsets: i64,
}

impl Landed {
    pub async fn read(pool: &PgPool, topic: &str) -> Self {
        let (rows, distinct_coordinates, distinct_comments): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT (kafka_partition, kafka_offset)), count(DISTINCT comment) \
             FROM web_metrics.metrics WHERE kafka_topic = $1",
        )
        .bind(topic)
        .fetch_one(pool)
        .await
        .expect("count rows");
        let (dead_letters, distinct_dead_offsets): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT (partition, \"offset\")) FROM ingest.dead_letters WHERE topic = $1",
        )
        .bind(topic)
        .fetch_one(pool)
        .await
        .expect("count dead letters");
        Self {
            rows,
            distinct_coordinates,
            distinct_comments,
            dead_letters,
            distinct_dead_offsets,
        }
    }

    /// Asserts every one of `valid` messages landed once and `dead` dead letters exist once.
    pub fn assert_exactly_once(&self, valid: i64, dead: i64) {
        assert_eq!(
            self,
            &Landed {
                rows: valid,
                distinct_coordinates: valid,
                distinct_comments: valid,
                dead_letters: dead,
                distinct_dead_offsets: dead,
            }
        );
    }
}

/// Steps the pipeline until it has ingested all `total` records, closes it, and asserts
/// the stream landed exactly once with every offset at its partition's end.
pub async fn ingest_all_and_assert_exactly_once(
    mut pipeline: Pipeline,
    db: &TestDb,
    kafka: &TestKafka,
    valid: i64,
    dead: i64,
) {
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        kafka,
        valid + dead,
        Duration::from_secs(120),
    )
    .await;
    let owner = pipeline.owner().to_owned();
    let owned = || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM ingest.offsets WHERE owner = $1")
            .bind(&owner)
            .fetch_one(&db.pool)
    };
    assert!(
        owned().await.expect("owners") > 0,
        "the worker owned its partitions"
    );
    pipeline.close().await;
    assert_eq!(
        owned().await.expect("owners"),
        0,
        "a clean exit leaves no partition owned"
    );
    assert_landed_once(db, kafka, valid, dead).await;
}

/// Asserts `valid` rows and `dead` dead letters, each once, and every stored offset at its
/// partition's end.
pub async fn assert_landed_once(db: &TestDb, kafka: &TestKafka, valid: i64, dead: i64) {
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(valid, dead);
    assert_offsets_at_end(&db.pool, kafka, valid + dead).await;
}

/// Asserts the stored next offset of every partition equals its end offset.
pub async fn assert_offsets_at_end(pool: &PgPool, kafka: &TestKafka, total: i64) {
    let rows: Vec<(i32, Option<i64>)> = sqlx::query_as(
        "SELECT partition, next_offset FROM ingest.offsets WHERE consumer_group = $1 AND topic = $2 ORDER BY 1",
    )
    .bind(&kafka.group)
    .bind(&kafka.topic)
    .fetch_all(pool)
    .await
    .expect("read offsets");
    let per_partition = total / i64::from(kafka.partitions);
    let expected: Vec<(i32, Option<i64>)> = (0..kafka.partitions)
        .map(|p| {
            (
                p,
                Some(per_partition + i64::from(i64::from(p) < total % i64::from(kafka.partitions))),
            )
        })
        .collect();
    assert_eq!(
        rows, expected,
        "stored offsets equal each partition's end offset"
    );
}

/// `GET path` over plain HTTP/1.1; the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Serves the pipeline's endpoints on an ephemeral port; the address.
pub async fn serve_endpoints(
    pipeline: &Pipeline,
    stop: tokio_util::sync::CancellationToken,
) -> std::net::SocketAddr {
    use kafka_pg_ingest::telemetry::http::{Endpoints, serve};
    let endpoints = Endpoints {
        metrics: pipeline.observers().metrics.clone(),
        health: pipeline.observers().health.clone(),
        pool: pipeline.store().pool().clone(),
        stuck_after: Duration::from_secs(20),
    };
    serve("127.0.0.1:0", endpoints, stop)
        .await
        .expect("endpoints bind")
        .0
}

pub const BINARY: &str = env!("CARGO_BIN_EXE_kafka-pg-ingest");

/// `run` of the real binary against this test's broker, topic, group and database, with
/// the test's fast group options.
pub fn worker_command(kafka: &TestKafka, db: &TestDb) -> std::process::Command {
    worker_command_for(&kafka.brokers, &kafka.topic, &kafka.group, &db.url)
}

/// `run` of the real binary against any brokers, topic, group and database URL.
pub fn worker_command_for(
    brokers: &str,
    topic: &str,
    group: &str,
    database_url: &str,
) -> std::process::Command {
    let mut command = std::process::Command::new(BINARY);
    command.args([
        "run",
        "--brokers",
        brokers,
        "--database-url",
        database_url,
        "--group",
        group,
        "--topic",
        topic,
    ]);
    for (key, value) in fast_group_options() {
        command.args(["--kafka-option", &format!("{key}={value}")]);
    }
    command.envs(test_env());
    command
}

/// Runs `command` until it exits by itself, within a minute (a run still going then
/// fails the test with what it printed); hands back its status and stderr.
pub async fn run_to_exit(mut command: std::process::Command) -> (std::process::ExitStatus, String) {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = Reaped(command.spawn().expect("binary starts"));
    let stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    for _ in 0..600 {
        if let Ok(Some(status)) = child.try_wait() {
            return (status, reader.join().expect("stderr read"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    terminate(&mut child);
    panic!(
        "still running after a minute: {}",
        reader.join().unwrap_or_default()
    );
}

/// The error line a failed run of the binary ends with (`error: ...`), or "" without one.
pub fn final_error(stderr: &str) -> &str {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or("")
}

/// The valid and malformed counts of a `dev produce` summary ("produced V valid and M
/// malformed messages", then one line per reason).
pub fn produced_counts(stdout: &str) -> (i64, i64) {
    let counts: Vec<i64> = stdout
        .lines()
        .next()
        .expect("a summary")
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (counts[0], counts[1])
}

/// The first line `child` printed on its piped stdout, trimmed (what `dev broker` and
/// `dev registry` print: their address).
pub fn first_line(child: &mut Reaped) -> String {
    use std::io::BufRead;
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut first)
        .expect("first line");
    first.trim().to_owned()
}

/// Sends SIGTERM to `child` and waits for it to exit.
pub fn terminate(child: &mut Reaped) -> std::process::ExitStatus {
    child.signal("TERM").expect("kill runs");
    child.wait().expect("reaped")
}

/// Steps a pipeline on its own task until the stored offsets reach `total` or `stop`
/// is cancelled; hands back the stats.
pub fn drive(
    mut pipeline: Pipeline,
    db: &TestDb,
    kafka: &TestKafka,
    total: i64,
    stop: CancellationToken,
) -> JoinHandle<Stats> {
    let (pool, group, topic) = (db.pool.clone(), kafka.group.clone(), kafka.topic.clone());
    tokio::spawn(async move {
        let token = CancellationToken::new();
        while !stop.is_cancelled() && stored_total(&pool, &group, &topic).await < total {
            pipeline.step(&token).await.expect("step succeeds");
        }
        pipeline.close().await
    })
}

/// The routes of the built-in defaults (the website-metrics table).
pub fn default_routes() -> kafka_pg_ingest::routes::Routes {
    let config = kafka_pg_ingest::load_config(None, Vec::new(), &Overrides::default())
        .expect("defaults load");
    kafka_pg_ingest::routes::Routes::new(&config).expect("the default route is valid")
}
