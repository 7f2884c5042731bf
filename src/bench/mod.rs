//! `kafka-pg-ingest bench`: end-to-end throughput of the real worker against the speed
//! of Postgres' own COPY, and against a naive one-INSERT-per-record consumer.
//!
//! Each run measures, on fresh tables with the target's indexes and fresh topics fed
//! while they are consumed (the in-process broker keeps only ~5 MB per partition):
//! - the worker: the real binary as a child process, from its claim of the partitions
//!   until the offsets stored in Postgres reach the end of the topic (joining the group
//!   is not ingest time), with its peak RSS and CPU seconds;
//! - the limit: the most Postgres absorbs of the same rows on one connection (COPY
//!   BINARY of rows encoded beforehand, one transaction per batch with the offsets'
//!   compare-and-set, the best of several batch sizes), cross-checked with `psql`
//!   (see the `limit` module);
//! - naive: the worker with `sink.write_method: row_inserts`, on a smaller topic.
//!
//! With `--mode upsert` the worker writes through a route in upsert mode keyed on the
//! source coordinates (staging COPY, then one INSERT .. ON CONFLICT per batch).
//!
//! Every worker run is checked for exactly once (rows = messages, distinct coordinates).
//! CPU per row is reported for the worker and for the Postgres backends serving it.

mod limit;
mod process;

use std::fmt;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rand::SeedableRng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, PgPool};

use crate::config::{Config, Overrides, ValueFormat, WriteMode};
use crate::dev::registry::DevRegistry;
use crate::dev::reaped::Reaped;
use crate::progress::Progress;
use crate::record::Record;
use crate::routes::Routes;
use crate::sample;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub messages: u64,
    pub naive_messages: u64,
    pub partitions: i32,
    pub runs: usize,
    pub batch_size: usize,
    /// Write mode of the measured worker.
    pub mode: WriteMode,
    /// Upsert mode only: every key is in the table before the worker runs.
    pub updates: bool,
    /// Every table (worker's, naive's, the limit's) partitioned by day.
    pub partitioned: bool,
    /// How the worker's messages are encoded (the limit's rows are the same).
    pub format: ValueFormat,
    /// External brokers; the in-process mock cluster when `None`.
    pub brokers: Option<String>,
    pub database_url: String,
}

/// One run's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub worker_rows_per_s: f64,
    /// The best of the limit's batch sizes (our client).
    pub limit_rows_per_s: f64,
    /// `psql` at that batch size.
    pub psql_rows_per_s: f64,
    pub limit_batch_size: usize,
    /// Every batch size of the limit.
    pub limit: Vec<limit::Measured>,
    pub naive_rows_per_s: f64,
    pub commit_p50_ms: f64,
    pub commit_p99_ms: f64,
    pub worker_peak_rss_mb: f64,
    pub worker_cpu_s: f64,
    pub worker_cpu_us_per_row: f64,
    /// CPU of the Postgres backends serving the worker, per row.
    pub worker_backend_cpu_us_per_row: f64,
    /// CPU of the Postgres backend serving the limit's client, per row, at its best size.
    pub limit_backend_cpu_us_per_row: f64,
}

/// Median, min and max of one measure over the runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(values: impl Iterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.collect();
        v.sort_by(f64::total_cmp);
        let median = match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Self {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// The bench's result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub messages: u64,
    pub naive_messages: u64,
    pub partitions: i32,
    pub batch_size: usize,
    pub mode: WriteMode,
    pub updates: bool,
    pub partitioned: bool,
    pub format: ValueFormat,
    pub runs: Vec<Run>,
    pub worker_rows_per_s: Spread,
    pub limit_rows_per_s: Spread,
    pub psql_rows_per_s: Spread,
    pub naive_rows_per_s: Spread,
    pub commit_p50_ms: Spread,
    pub commit_p99_ms: Spread,
    pub worker_peak_rss_mb: Spread,
    pub worker_cpu_s: Spread,
    pub worker_cpu_us_per_row: Spread,
    pub worker_backend_cpu_us_per_row: Spread,
    pub limit_backend_cpu_us_per_row: Spread,
    /// Median of the per-run ratios worker / limit.
    pub worker_over_limit: f64,
    /// Median of the per-run ratios naive / limit.
    pub naive_over_limit: f64,
}

impl BenchReport {
    fn new(options: &BenchOptions, runs: Vec<Run>) -> Self {
        let spread = |f: fn(&Run) -> f64| Spread::of(runs.iter().map(f));
        Self {
            messages: options.messages,
            naive_messages: options.naive_messages,
            partitions: options.partitions,
            batch_size: options.batch_size,
            mode: options.mode,
            updates: options.updates,
            partitioned: options.partitioned,
            format: options.format,
            worker_rows_per_s: spread(|r| r.worker_rows_per_s),
            limit_rows_per_s: spread(|r| r.limit_rows_per_s),
            psql_rows_per_s: spread(|r| r.psql_rows_per_s),
            naive_rows_per_s: spread(|r| r.naive_rows_per_s),
            commit_p50_ms: spread(|r| r.commit_p50_ms),
            commit_p99_ms: spread(|r| r.commit_p99_ms),
            worker_peak_rss_mb: spread(|r| r.worker_peak_rss_mb),
            worker_cpu_s: spread(|r| r.worker_cpu_s),
            worker_cpu_us_per_row: spread(|r| r.worker_cpu_us_per_row),
            worker_backend_cpu_us_per_row: spread(|r| r.worker_backend_cpu_us_per_row),
            limit_backend_cpu_us_per_row: spread(|r| r.limit_backend_cpu_us_per_row),
            worker_over_limit: spread(|r| r.worker_rows_per_s / r.limit_rows_per_s).median,
            naive_over_limit: spread(|r| r.naive_rows_per_s / r.limit_rows_per_s).median,
            runs,
        }
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} {} messages over {} partitions, batch size {}, worker mode {}{}, {}{} runs (naive: {} messages)",
            self.messages,
            self.format.name(),
            self.partitions,
            self.batch_size,
            self.mode.name(),
            if self.updates { " (updates)" } else { "" },
            if self.partitioned {
                "tables partitioned by day, "
            } else {
                ""
            },
            self.runs.len(),
            self.naive_messages
        )?;
        writeln!(f, "| measure | median | min | max |")?;
        writeln!(f, "|---|---:|---:|---:|")?;
        let rows: [(&str, Spread, usize); 11] = [
            ("worker rows/s", self.worker_rows_per_s, 0),
            (
                "limit rows/s (COPY BINARY, one connection)",
                self.limit_rows_per_s,
                0,
            ),
            (
                "psql \\copy rows/s (same rows and batches)",
                self.psql_rows_per_s,
                0,
            ),
            ("naive rows/s", self.naive_rows_per_s, 0),
            ("commit p50 ms", self.commit_p50_ms, 1),
            ("commit p99 ms", self.commit_p99_ms, 1),
            ("worker peak RSS MB", self.worker_peak_rss_mb, 1),
            ("worker CPU s", self.worker_cpu_s, 1),
            ("worker CPU us/row", self.worker_cpu_us_per_row, 2),
            (
                "its Postgres backends' CPU us/row",
                self.worker_backend_cpu_us_per_row,
                2,
            ),
            (
                "limit's Postgres backend CPU us/row",
                self.limit_backend_cpu_us_per_row,
                2,
            ),
        ];
        for (name, s, digits) in rows {
            writeln!(
                f,
                "| {name} | {:.digits$} | {:.digits$} | {:.digits$} |",
                s.median, s.min, s.max
            )?;
        }
        writeln!(f, "limit by batch size (rows/s, ours / psql):")?;
        for run in &self.runs {
            writeln!(f, "  {}", limit::by_size(&run.limit))?;
        }
        writeln!(f, "worker / limit: {:.2}", self.worker_over_limit)?;
        writeln!(f, "naive / limit: {:.2}", self.naive_over_limit)
    }
}

/// Runs the bench.
pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchReport> {
    ensure!(
        options.runs > 0 && options.messages > 0 && options.partitions > 0,
        "runs, messages and partitions must be above 0"
    );
    ensure!(
        !options.updates || options.mode == WriteMode::Upsert,
        "--updates measures upserts: add --mode upsert"
    );
    // The store's own connections: TCP_NODELAY set, as the worker's.
    let config = crate::load_config(
        None,
        Vec::new(),
        &Overrides {
            database_url: Some(options.database_url.clone()),
            ..Overrides::default()
        },
    )?;
    let pool = crate::store::connect_pool(&config)
        .await
        .context("failed to connect to Postgres")?;
    crate::store::migrate(&pool, &Routes::new(&config)?).await?;
    let cluster = match options.brokers {
        Some(_) => None,
        None => Some(MockCluster::new(1).context("failed to start the in-process broker")?),
    };
    let brokers = match (&options.brokers, &cluster) {
        (Some(b), _) => b.clone(),
        (None, Some(c)) => c.bootstrap_servers(),
        (None, None) => bail!("no broker"),
    };
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let source = Source {
        cluster: cluster.as_ref(),
        brokers,
        partitions: options.partitions,
    };

    eprintln!(
        "generating {} messages",
        options.messages.max(options.naive_messages)
    );
    let messages = generate(options.messages);
    let naive_messages = generate(options.naive_messages);
    let decoded = DecodedRows::new(options, &messages)?;
    // A registry format: the same probes, their schema served as id 1 by a registry of
    // this process.
    let registry = match sample::Framer::schema(options.format) {
        None => None,
        Some((kind, text)) => Some(DevRegistry::start(kind, [(1, text.to_owned())].into()).await?),
    };
    let (messages, naive_messages) = match sample::Framer::new(options.format, 1)? {
        None => (messages, naive_messages),
        Some(framer) => (framed(&framer, &messages)?, framed(&framer, &naive_messages)?),
    };
    let registry_url = registry.as_ref().map(|r| r.url.clone());
    eprintln!("encoding the limit's rows as COPY BINARY");
    let scratch = format!("bench_{id}_encoding");
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA {scratch}")))
        .execute(&pool)
        .await?;
    let encoded = limit::encode(&pool, &scratch, &decoded, options.partitions).await?;
    let mut schemas = vec![scratch];
    let mut runs = Vec::with_capacity(options.runs);
    // psql's best of each run, for the check of our own client below.
    let mut psql_best = Vec::with_capacity(options.runs);
    for run in 1..=options.runs {
        let schema = format!("bench_{id}_{run}");
        create_tables(&pool, &schema, options.partitioned).await?;
        schemas.push(schema.clone());
        eprintln!("run {run}: worker");
        let topic = source.topic(&format!("bench-{id}-{run}")).await?;
        let worker = measure_worker(
            options,
            &pool,
            &source,
            &topic,
            messages.clone(),
            &format!("{schema}.worker"),
            ("copy", registry_url.as_deref()),
        )
        .await?;
        eprintln!("run {run}: the limit (ours and psql's)");
        let limit = limit::measure(
            &pool,
            &options.database_url,
            &schema,
            &encoded,
            options.partitioned,
        )
        .await?;
        let best = limit
            .iter()
            .max_by(|a, b| a.rows_per_s.total_cmp(&b.rows_per_s))
            .context("no batch size measured")?;
        let best_psql = limit
            .iter()
            .map(|m| m.psql_rows_per_s)
            .fold(f64::NAN, f64::max);
        eprintln!(
            "run {run}: limit by batch size (ours / psql): {}",
            limit::by_size(&limit)
        );
        psql_best.push(best_psql);
        eprintln!("run {run}: naive");
        let topic = source.topic(&format!("bench-{id}-{run}-naive")).await?;
        let naive = measure_worker(
            options,
            &pool,
            &source,
            &topic,
            naive_messages.clone(),
            &format!("{schema}.naive"),
            ("row_inserts", registry_url.as_deref()),
        )
        .await?;
        let per_row = 1e6 / options.messages as f64;
        runs.push(Run {
            worker_rows_per_s: worker.rows_per_s,
            limit_rows_per_s: best.rows_per_s,
            psql_rows_per_s: best.psql_rows_per_s,
            limit_batch_size: best.batch_size,
            limit_backend_cpu_us_per_row: best.backend_cpu_us_per_row,
            naive_rows_per_s: naive.rows_per_s,
            commit_p50_ms: worker.commit_p50_ms,
            commit_p99_ms: worker.commit_p99_ms,
            worker_peak_rss_mb: worker.peak_rss as f64 / 1e6,
            worker_cpu_s: worker.cpu_s,
            worker_cpu_us_per_row: worker.cpu_s * per_row,
            worker_backend_cpu_us_per_row: worker.backend_cpu_s * per_row,
            limit,
        });
    }
    // Our client is the yardstick only if it is as fast as an independent one. Medians
    // over the runs: one pass of either client can fall behind on a shared machine.
    let ours = Spread::of(runs.iter().map(|r| r.limit_rows_per_s)).median;
    let psql = Spread::of(psql_best.into_iter()).median;
    for schema in schemas {
        sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await?;
    }
    sqlx::query("DELETE FROM ingest.offsets WHERE consumer_group LIKE $1")
        .bind(format!("bench-{id}-%"))
        .execute(&pool)
        .await?;
    drop(cluster);
    if let Some(registry) = &registry {
        // Each worker process (measured and naive, per run) asks once for schema id 1.
        let expected = 2 * options.runs as u64;
        ensure!(
            registry.requests() == expected,
            "the workers asked the schema registry {} times, not once each ({expected})",
            registry.requests()
        );
    }
    let report = BenchReport::new(options, runs);
    ensure!(
        ours >= 0.9 * psql,
        "{report}\nthe bench's own limit ({ours:.0} rows/s, median of the runs) is more than \
         10% below psql's ({psql:.0} rows/s): its client path, not Postgres, is the limit; \
         the worker's ratio to it would mislead"
    );
    Ok(report)
}

/// Messages are produced in chunks of this many (a multiple of any sensible partition
/// count, so message `i` always lands at partition `i % partitions`, offset
/// `i / partitions`).
const CHUNK: usize = 10_000;

/// The librdkafka mock cluster keeps about 5 MB per partition and deletes older records,
/// so against it the bench produces while the worker consumes, keeping at most this many
/// records per partition uncommitted (about 4.5 MB). Such feeding limits what is measured
/// once the worker catches up with the feeder: the mock answers a fetch that finds no data
/// only after the consumer's whole `fetch.wait.max.ms`, even if data arrives meanwhile.
/// With enough partitions to hold the whole stream (about 80 for 1,000,000 messages) the
/// topic is full before the worker starts. External brokers are always filled first.
const MOCK_BACKLOG_PER_PARTITION: i64 = 14_000;

/// The bench stream, generated once before any measurement so that making messages
/// never limits (or competes with) what is measured.
fn generate(count: u64) -> Arc<Vec<Vec<u8>>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    Arc::new(
        (0..count)
            .map(|id| sample::website_metric(id, &mut rng))
            .collect(),
    )
}

/// `messages` (sample JSON) as the same probes in Avro, framed under schema id 1.
fn framed(framer: &sample::Framer, messages: &[Vec<u8>]) -> anyhow::Result<Arc<Vec<Vec<u8>>>> {
    let framed = messages
        .iter()
        .map(|m| framer.encode(m))
        .collect::<anyhow::Result<_>>()?;
    Ok(Arc::new(framed))
}

/// Where bench messages go: the in-process broker or external brokers.
struct Source<'a> {
    cluster: Option<&'a MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
    brokers: String,
    partitions: i32,
}

impl Source<'_> {
    /// How far production may run ahead of the committed offsets.
    fn max_backlog(&self) -> i64 {
        match self.cluster {
            Some(_) => MOCK_BACKLOG_PER_PARTITION * i64::from(self.partitions),
            None => i64::MAX,
        }
    }

    /// Creates a fresh topic.
    async fn topic(&self, name: &str) -> anyhow::Result<String> {
        match self.cluster {
            Some(c) => c.create_topic(name, self.partitions, 1)?,
            None => create_topic(&self.brokers, name, self.partitions).await?,
        }
        Ok(name.to_owned())
    }

    /// Produces `messages` to `topic` on a blocking thread, never more than
    /// [`Source::max_backlog`] ahead of `consumed`.
    fn feed(
        &self,
        topic: &str,
        messages: Arc<Vec<Vec<u8>>>,
        consumed: Arc<AtomicI64>,
        produced: Arc<AtomicI64>,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let (brokers, topic, partitions) =
            (self.brokers.clone(), topic.to_owned(), self.partitions);
        let max_backlog = self.max_backlog();
        tokio::task::spawn_blocking(move || {
            let mut producer = sample::SampleProducer::new(&brokers, &topic, partitions)?;
            for chunk in messages.chunks(CHUNK) {
                while produced.load(Ordering::Relaxed) - consumed.load(Ordering::Relaxed)
                    > max_backlog
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let sent = producer.send(chunk.iter().map(Some))?;
                produced.fetch_add(sent as i64, Ordering::Relaxed);
            }
            Ok(())
        })
    }
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    for result in results {
        result.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
    }
    Ok(())
}

/// The worker's tables in a new `schema`.
async fn create_tables(pool: &PgPool, schema: &str, partitioned: bool) -> anyhow::Result<()> {
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(pool)
        .await?;
    for table in ["worker", "naive"] {
        create_table(pool, &format!("{schema}.{table}"), partitioned).await?;
    }
    Ok(())
}

/// A table shaped like the default target, indexes included; with `partitioned`, one
/// partition per day of the bench's dates and the unique indexes holding `time_stamp`.
async fn create_table(pool: &PgPool, table: &str, partitioned: bool) -> anyhow::Result<()> {
    let sql = match partitioned {
        true => sample::partitioned_by_day(table, "web_metrics.metrics"),
        false => format!("CREATE TABLE {table} (LIKE web_metrics.metrics INCLUDING ALL)"),
    };
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(pool).await?;
    Ok(())
}

struct WorkerRun {
    rows_per_s: f64,
    commit_p50_ms: f64,
    commit_p99_ms: f64,
    peak_rss: u64,
    cpu_s: f64,
    /// CPU of the Postgres backends connected to the worker when it finished.
    backend_cpu_s: f64,
}

/// Runs the real binary on `topic` into `table` until it has stored offsets for all
/// `messages`, then stops it with SIGTERM and checks the table holds each once.
async fn measure_worker(
    options: &BenchOptions,
    pool: &PgPool,
    source: &Source<'_>,
    topic: &str,
    messages: Arc<Vec<Vec<u8>>>,
    table: &str,
    (write_method, registry): (&str, Option<&str>),
) -> anyhow::Result<WorkerRun> {
    let total = messages.len() as i64;
    let consumed = Arc::new(AtomicI64::new(0));
    let produced = Arc::new(AtomicI64::new(0));
    let feeder = source.feed(topic, messages, consumed.clone(), produced.clone());
    // The worker starts on a full backlog, as after any outage or deploy.
    let backlog = total.min(source.max_backlog());
    while produced.load(Ordering::Relaxed) < backlog && !feeder.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let group = format!("{topic}-{}", table.replace('.', "-"));
    let mut command = Command::new(std::env::current_exe()?);
    // The naive run inserts row by row whatever the measured mode.
    let routed = options.mode == WriteMode::Upsert && write_method == "copy";
    if let Some(url) = registry {
        command.env("KAFKA_PG_INGEST__SCHEMA_REGISTRY__URL", url);
        if !routed {
            command.env("KAFKA_PG_INGEST__SINK__FORMAT", options.format.name());
        }
    }
    if routed {
        let route = upsert_route(topic, table, options.format)?;
        command.env("KAFKA_PG_INGEST__ROUTES", route);
        if options.updates {
            store_older_versions(pool, table, topic, total, source.partitions).await?;
        }
    }
    let mut child = Reaped(
        command
            .args([
                "run",
                "--brokers",
                &source.brokers,
                "--database-url",
                &options.database_url,
                "--group",
                &group,
                "--topic",
                topic,
                "--log-format",
                "json",
            ])
            .env("KAFKA_PG_INGEST__SINK__TABLE", table)
            .env("KAFKA_PG_INGEST__SINK__WRITE_METHOD", write_method)
            .env(
                "KAFKA_PG_INGEST__BATCH__MAX_RECORDS",
                options.batch_size.to_string(),
            )
            .env(
                "RUST_LOG",
                std::env::var("KPI_BENCH_WORKER_LOG")
                    .unwrap_or_else(|_| "info,librdkafka=error".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("failed to start the worker")?,
    );
    let pid = child.id();
    let stderr = child.stderr.take().context("worker stderr")?;
    let log = std::thread::spawn(move || {
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });

    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut claimed: Option<(Instant, i64)> = None;
    let mut peak_rss = 0;
    let mut progress = Progress::new("records ingested", total as u64);
    loop {
        let (partitions, stored, slowest): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(next_offset), 0)::int8, coalesce(min(next_offset), 0)::int8 \
             FROM ingest.offsets WHERE consumer_group = $1",
        )
        .bind(&group)
        .fetch_one(pool)
        .await?;
        // The feeder paces by the slowest partition: the broker's retention is per
        // partition, and one partition left behind must not lose records to it.
        let all_claimed = partitions == i64::from(source.partitions);
        let slowest = if all_claimed { slowest } else { 0 };
        consumed.store(slowest * i64::from(source.partitions), Ordering::Relaxed);
        if let Some((rss, _)) = process::memory(pid) {
            peak_rss = peak_rss.max(rss);
        }
        // Ingest time starts when the group has handed out the partitions (the claim
        // writes their rows); joining the group is not ingesting.
        if partitions > 0 && claimed.is_none() {
            claimed = Some((Instant::now(), stored));
        }
        progress.set(stored as u64);
        if stored >= total {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "worker exited early with {status}: {}",
                log.join().unwrap_or_default().join("\n")
            );
        }
        ensure!(
            Instant::now() < deadline,
            "worker did not catch up within an hour"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = Instant::now();
    progress.finish();
    feeder.await??;
    let cpu_s = process::cpu_seconds(pid).unwrap_or(f64::NAN);
    // Its backends, found by the ports of its connections (a backend its pool closed
    // during the run is not counted).
    let server_port = options
        .database_url
        .parse::<PgConnectOptions>()
        .context("the database URL")?
        .get_port();
    let ports = crate::dev::freeze::client_ports(pid, server_port);
    let backends: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1)")
            .bind(&ports)
            .fetch_all(pool)
            .await?;
    let backend_cpu_s = backends
        .iter()
        .filter_map(|b| process::cpu_seconds(*b as u32))
        .sum();
    if let Some((_, hwm)) = process::memory(pid) {
        peak_rss = peak_rss.max(hwm);
    }
    child.signal("TERM")?;
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    let lines = log
        .join()
        .map_err(|_| anyhow::anyhow!("log reader panicked"))?;
    ensure!(status.success(), "worker exited with {status}");
    let stopped = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "worker stopped")
        .context("worker logged no final stats")?;
    let field = |k: &str| stopped["fields"][k].as_f64().unwrap_or(f64::NAN);

    if std::env::var_os("KPI_BENCH_DEBUG").is_some() {
        for line in &lines {
            eprintln!("{line}");
        }
    }
    ensure_each_once(pool, table, total).await?;

    let (started, at_start) = claimed.context("no claim observed")?;
    let elapsed = done.duration_since(started).as_secs_f64().max(1e-3);
    Ok(WorkerRun {
        rows_per_s: (total - at_start) as f64 / elapsed,
        commit_p50_ms: field("commit_p50_ms"),
        commit_p99_ms: field("commit_p99_ms"),
        peak_rss,
        cpu_s,
        backend_cpu_s,
    })
}

/// Checks `table` holds `total` rows, each at its own source coordinates, and none of
/// them an older version left by [`store_older_versions`].
async fn ensure_each_once(pool: &PgPool, table: &str, total: i64) -> anyhow::Result<()> {
    let (rows, distinct, older): (i64, i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*), count(DISTINCT (kafka_partition, kafka_offset)), \
           count(*) FILTER (WHERE url = '{OLDER_URL}') FROM {table}"
    )))
    .fetch_one(pool)
    .await?;
    ensure!(
        rows == total && distinct == total && older == 0,
        "exactly once broken in {table}: {rows} rows, {distinct} distinct, {older} not \
         updated, {total} messages"
    );
    Ok(())
}

/// The URL of the rows [`store_older_versions`] writes (no bench message has it).
const OLDER_URL: &str = "https://older.example/";

/// Fills `table` with a row for each of the `total` records of `topic` (record `i` is at
/// partition `i % partitions`, offset `i / partitions`, see [`CHUNK`]), of an older
/// version than the record's, so that upserting the records updates every row. Each
/// has its record's time (see [`sample::website_metric`]): a table partitioned by it
/// holds the row where the record's version goes.
async fn store_older_versions(
    pool: &PgPool,
    table: &str,
    topic: &str,
    total: i64,
    partitions: i32,
) -> anyhow::Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (time_stamp, url, kafka_topic, kafka_partition, kafka_offset) \
         SELECT make_timestamptz(2021, 1, (1 + g % $4)::int, (g % 24)::int, (g % 60)::int, \
                                 (g / 60 % 60)::int, 'UTC'), \
                '{OLDER_URL}', $1, g % $2, g / $2 \
         FROM generate_series(0, $3 - 1) g"
    )))
    .bind(topic)
    .bind(i64::from(partitions))
    .bind(total)
    .bind(sample::DAYS as i64)
    .execute(pool)
    .await?;
    sqlx::raw_sql(AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
        .execute(pool)
        .await?;
    Ok(())
}

/// The default mapping as one route in upsert mode, keyed on the source coordinates,
/// as JSON for the `KAFKA_PG_INGEST__ROUTES` variable.
fn upsert_route(topic: &str, table: &str, format: ValueFormat) -> anyhow::Result<String> {
    let config = Config::load(None, Vec::new(), &Overrides::default())?;
    let routes = Routes::new(&config)?;
    let route = routes.iter().next().context("the default route")?;
    let columns: Vec<serde_json::Value> = route
        .columns
        .iter()
        .map(|c| {
            serde_json::json!({"column": c.name, "field": c.field,
                               "type": c.kind.sql_name(), "required": c.required})
        })
        .collect();
    let key = route
        .coordinates()
        .context("the default route's coordinates")?;
    let routes = serde_json::json!([{"topic": topic, "table": table, "mode": "upsert",
                                     "format": format,
                                     "key": key, "columns": columns}]);
    Ok(routes.to_string())
}

/// The bench's rows as the worker would write them: COPY text in batches of the bench's
/// size, and the column list they fill. Decoded once, before any measurement; the
/// limit's binary rows are encoded from them.
struct DecodedRows {
    batches: Vec<Vec<u8>>,
    rows: usize,
    columns: String,
}

impl DecodedRows {
    fn new(options: &BenchOptions, messages: &[Vec<u8>]) -> anyhow::Result<Self> {
        let config = Config::load(None, Vec::new(), &Overrides::default())?;
        let routes = Routes::new(&config)?;
        let decoder = &routes.decoders()[0];
        let partitions = options.partitions as u64;
        let mut batches: Vec<Vec<u8>> = Vec::new();
        let mut current = Vec::new();
        for (i, payload) in messages.iter().enumerate() {
            let i = i as u64;
            let record = Record {
                topic: "bench".into(),
                partition: (i % partitions) as i32,
                offset: (i / partitions) as i64,
                key: None,
                value: Some(payload.clone()),
                headers: Vec::new(),
                timestamp_ms: None,
            };
            decoder
                .decode_into(&record, &mut current)
                .map_err(|r| anyhow::anyhow!("bench message does not decode: {}", r.reason))?;
            if (i + 1).is_multiple_of(options.batch_size as u64) {
                batches.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            batches.push(current);
        }
        let columns: Vec<&str> = decoder.column_names().collect();
        Ok(Self {
            batches,
            rows: messages.len(),
            columns: columns.join(", "),
        })
    }
}
