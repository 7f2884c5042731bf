//! `kafka-pg-ingest dev chaos`: a fault campaign against real worker processes.
//!
//! Starts a broker (`dev broker`, a child process), a database of its own reached
//! through a TCP proxy this harness controls, and several workers of this binary in one
//! group; produces website-metrics messages (some malformed) at a steady rate while it
//! injects faults at random moments; waits until the group has caught up; then checks
//! what Postgres holds: every valid message exactly once, every malformed one exactly
//! once as a dead letter, every stored offset at its partition's end.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};

use super::proxy::Proxy;
use super::reaped::Reaped;
use super::{ProduceOptions, produce};
use crate::cli::LocalDatabase;

/// Flags of `dev chaos`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosOptions {
    /// The Postgres server (an admin connection): the campaign creates and drops its own
    /// database there.
    #[command(flatten)]
    pub database: LocalDatabase,
    /// Messages to produce.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Share of malformed messages.
    #[arg(long, default_value_t = 0.01)]
    pub malformed_ratio: f64,
    /// Messages per second. The in-process broker keeps only ~5 MB per partition (about
    /// 20,000 messages), so the stream is fed while it is consumed, slowly enough that the
    /// group's longest stall (a rebalance waiting for killed members) loses nothing.
    #[arg(long, default_value_t = 2500.0)]
    pub rate: f64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 8)]
    pub partitions: i32,
    /// Worker processes in the group.
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// SIGKILLs of a worker, each followed by a restart.
    #[arg(long, default_value_t = 10)]
    pub kills: u32,
    /// Partition assignment strategy of the group.
    #[arg(long, value_enum, default_value = "range")]
    pub assignment: Assignment,
    /// Seed of the fault schedule and the message stream (random when absent; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the campaign's database (it is kept anyway when a check fails).
    #[arg(long)]
    pub keep_database: bool,
}

/// librdkafka's partition assignment strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Assignment {
    /// Eager: every partition is revoked on each rebalance.
    Range,
    /// Incremental: only partitions that move are revoked.
    CooperativeSticky,
}

impl Assignment {
    fn as_str(self) -> &'static str {
        match self {
            Self::Range => "range",
            Self::CooperativeSticky => "cooperative-sticky",
        }
    }
}

/// The faults of a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL of a worker, restarted after a moment.
    Kill,
    /// SIGTERM of a worker, restarted once it has left.
    Terminate,
    /// A fourth worker joining and leaving every few seconds.
    Storm,
    /// Every backend of the workers terminated by `pg_terminate_backend`.
    TerminateBackends,
    /// Postgres unreachable for 10 s (the proxy down).
    DatabaseOutage,
    /// The broker process stopped (SIGSTOP) for 5 s.
    BrokerPause,
}

/// What a campaign found.
#[derive(Debug, Default)]
pub struct Summary {
    pub seed: u64,
    pub assignment: &'static str,
    pub messages: u64,
    pub valid: u64,
    pub malformed: u64,
    pub rows: i64,
    pub dead_letters: i64,
    pub duplicates: i64,
    pub missing: i64,
    /// Partitions whose stored offset is not the partition's end.
    pub offsets_off: usize,
    pub kills: u32,
    pub terminations: u32,
    pub storm_changes: u32,
    pub backends_terminated: u32,
    pub database_outages: u32,
    pub broker_pauses: u32,
    /// Workers that exited by themselves (and were restarted).
    pub exits: u32,
    pub elapsed: Duration,
}

impl Summary {
    /// Whether Postgres holds the stream exactly once.
    pub fn passed(&self) -> bool {
        self.duplicates == 0
            && self.missing == 0
            && self.offsets_off == 0
            && self.rows == self.valid as i64
            && self.dead_letters == self.malformed as i64
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chaos {}: seed={} assignment={} messages={} rows={} dead_letters={} duplicates={} \
             missing={} offsets_off={} faults: kill={} term={} storm={} backends={} \
             db_outage={} broker_pause={} self_exits={} elapsed={:.1}s",
            if self.passed() { "PASS" } else { "FAIL" },
            self.seed,
            self.assignment,
            self.messages,
            self.rows,
            self.dead_letters,
            self.duplicates,
            self.missing,
            self.offsets_off,
            self.kills,
            self.terminations,
            self.storm_changes,
            self.backends_terminated,
            self.database_outages,
            self.broker_pauses,
            self.exits,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Everything a campaign runs against.
struct Rig {
    options: ChaosOptions,
    binary: PathBuf,
    logs: PathBuf,
    brokers: String,
    broker: Reaped,
    topic: String,
    group: String,
    /// The campaign's database, directly and through the proxy.
    database: String,
    admin: PgPool,
    pool: PgPool,
    proxy: Proxy,
    /// Reads the partitions' watermarks; in no group.
    inspector: BaseConsumer,
    workers: Vec<Reaped>,
    started: u32,
    summary: Summary,
}

/// How a campaign fails when its broker (librdkafka's mock cluster, in a child process)
/// dies under it: a failure of the test rig, not a verdict on the workers.
pub const BROKER_DIED: &str = "the campaign's broker died";

/// Runs one campaign and returns its summary (check [`Summary::passed`]).
pub async fn run(options: ChaosOptions) -> anyhow::Result<Summary> {
    ensure!(options.workers >= 1, "--workers must be at least 1");
    ensure!(options.rate > 0.0, "--rate must be above 0");
    let seed = options.seed.unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut rig = Rig::start(options, seed).await?;
    eprintln!(
        "chaos: seed {seed}, database {}, logs in {}",
        rig.database,
        rig.logs.display()
    );
    for _ in 0..rig.options.workers {
        rig.spawn_worker()?;
    }

    let produce_options = ProduceOptions {
        brokers: rig.brokers.clone(),
        topic: rig.topic.clone(),
        count: rig.options.messages,
        rate: Some(rig.options.rate),
        malformed_ratio: rig.options.malformed_ratio,
        seed,
    };
    let producer = tokio::task::spawn_blocking(move || produce(&produce_options));
    // Faults start once the producer has read the topic's metadata: a broker paused
    // before that would fail the campaign's own producer, not the workers.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut faults = vec![Fault::Kill; rig.options.kills as usize];
    faults.extend([
        Fault::Terminate,
        Fault::Storm,
        Fault::TerminateBackends,
        Fault::DatabaseOutage,
        Fault::BrokerPause,
    ]);
    faults.shuffle(&mut rng);
    for fault in faults {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
        rig.restart_exited()?;
        rig.inject(fault, &mut rng).await?;
    }

    let produced = producer.await.context("the producer thread failed")??;
    rig.summary.valid = produced.valid;
    rig.summary.malformed = produced.malformed.values().sum();
    let ends = rig.catch_up(Duration::from_secs(180)).await?;
    rig.stop_workers().await;
    rig.check(&ends).await?;
    rig.summary.seed = seed;
    rig.summary.elapsed = started.elapsed();
    let keep = rig.options.keep_database || !rig.summary.passed();
    Ok(rig.finish(keep).await)
}

impl Rig {
    async fn start(options: ChaosOptions, seed: u64) -> anyhow::Result<Self> {
        let binary = std::env::current_exe().context("locating this binary")?;
        let id = format!("{seed:x}-{:08x}", rand::random::<u32>());
        let logs = std::env::temp_dir().join(format!("kafka-pg-ingest-chaos-{id}"));
        std::fs::create_dir_all(&logs)?;
        let topic = "website-metrics".to_owned();

        let mut broker = Command::new(&binary)
            .args(["dev", "broker", "--topic", &topic, "--partitions"])
            .arg(options.partitions.to_string())
            .stdout(Stdio::piped())
            .stderr(File::create(logs.join("broker.log"))?)
            .spawn()
            .context("starting `dev broker`")?;
        let mut line = String::new();
        BufReader::new(broker.stdout.take().context("broker stdout")?).read_line(&mut line)?;
        let brokers = line.trim().to_owned();
        ensure!(!brokers.is_empty(), "`dev broker` printed no address");

        let group = format!("chaos-{id}");
        let inspector = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("{group}-inspect"))
            .create()?;
        let database = format!("kpi_chaos_{}", id.replace('-', "_"));
        let server: PgConnectOptions = options
            .database
            .database_url
            .parse()
            .context("--database-url is not a Postgres URL")?;
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(server.clone())
            .await
            .context("connecting to --database-url")?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&admin)
            .await?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(server.clone().database(&database))
            .await?;
        crate::store::migrate(&pool).await?;
        let proxy = Proxy::start(proxy_target(&server)?).await?;
        Ok(Self {
            binary,
            logs,
            brokers,
            broker: Reaped(broker),
            topic,
            group,
            database,
            admin,
            pool,
            proxy,
            inspector,
            workers: Vec::new(),
            started: 0,
            summary: Summary {
                assignment: options.assignment.as_str(),
                messages: options.messages,
                ..Summary::default()
            },
            options,
        })
    }

    /// Starts a worker of this binary, connecting to Postgres through the proxy, in
    /// plaintext: the proxy finds the COMMITs it cuts by their bytes.
    fn spawn_worker(&mut self) -> anyhow::Result<()> {
        self.started += 1;
        let url = format!(
            "postgres://{}@127.0.0.1:{}/{}?sslmode=disable",
            user_of(&self.options.database.database_url),
            self.proxy.port,
            self.database
        );
        let log = File::create(self.logs.join(format!("worker-{}.log", self.started)))?;
        let assignment = format!(
            "partition.assignment.strategy={}",
            self.options.assignment.as_str()
        );
        let child = Command::new(&self.binary)
            .args(["run", "--brokers", &self.brokers, "--database-url", &url])
            .args(["--group", &self.group, "--topic", &self.topic])
            .args(["--kafka-option", &assignment])
            // Fast group changes, so a killed worker's partitions move within seconds.
            .args(["--kafka-option", "session.timeout.ms=6000"])
            .args(["--kafka-option", "heartbeat.interval.ms=500"])
            // Also the rebalance timeout: how long a rebalance waits for killed members.
            .args(["--kafka-option", "max.poll.interval.ms=10000"])
            .env("KAFKA_PG_INGEST__RETRY__CLAIM_LIMIT_SECS", "8")
            .env("KAFKA_PG_INGEST__RETRY__MAX_DELAY_MS", "2000")
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting a worker")?;
        self.workers.push(Reaped(child));
        Ok(())
    }

    /// Restarts workers that exited by themselves, counting them. Fails at once when the
    /// broker itself has died: its records are gone, so the run can no longer judge the
    /// workers.
    fn restart_exited(&mut self) -> anyhow::Result<()> {
        if self.broker.exited() {
            let log = std::fs::read_to_string(self.logs.join("broker.log")).unwrap_or_default();
            bail!(
                "{BROKER_DIED}: {}; logs in {}",
                log.lines().last().unwrap_or("no log"),
                self.logs.display()
            );
        }
        let before = self.workers.len();
        self.workers.retain_mut(|w| !w.exited());
        let gone = before - self.workers.len();
        self.summary.exits += gone as u32;
        for _ in 0..gone {
            self.spawn_worker()?;
        }
        Ok(())
    }

    async fn inject(&mut self, fault: Fault, rng: &mut impl Rng) -> anyhow::Result<()> {
        match fault {
            Fault::Kill => {
                let i = rng.random_range(0..self.workers.len());
                drop(self.workers.swap_remove(i));
                self.summary.kills += 1;
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
                self.spawn_worker()?;
            }
            Fault::Terminate => {
                let i = rng.random_range(0..self.workers.len());
                let mut worker = self.workers.swap_remove(i);
                worker.signal("TERM")?;
                let status = tokio::task::spawn_blocking(move || worker.0.wait()).await??;
                if !status.success() {
                    bail!("a worker exited with {status} after SIGTERM");
                }
                self.summary.terminations += 1;
                self.spawn_worker()?;
            }
            Fault::Storm => {
                for _ in 0..3 {
                    self.spawn_worker()?;
                    self.summary.storm_changes += 1;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(1500..3000))).await;
                    let extra = self.workers.pop().context("the storm's worker")?;
                    extra.signal("TERM")?;
                    drop(extra);
                    self.summary.storm_changes += 1;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
                }
            }
            Fault::TerminateBackends => {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name = $2",
                )
                .bind(&self.database)
                .bind(crate::store::APPLICATION_NAME)
                .execute(&self.admin)
                .await?;
                self.summary.backends_terminated += 1;
            }
            Fault::DatabaseOutage => {
                self.proxy.set_up(false);
                tokio::time::sleep(Duration::from_secs(10)).await;
                self.proxy.set_up(true);
                self.summary.database_outages += 1;
            }
            Fault::BrokerPause => {
                self.broker.signal("STOP")?;
                tokio::time::sleep(Duration::from_secs(5)).await;
                self.broker.signal("CONT")?;
                self.summary.broker_pauses += 1;
            }
        }
        Ok(())
    }

    /// Waits until every partition's stored offset is its end offset, restarting workers
    /// that exit meanwhile.
    /// Returns those end offsets.
    async fn catch_up(&mut self, limit: Duration) -> anyhow::Result<Vec<(i32, Option<i64>)>> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            self.restart_exited()?;
            // The broker may still be recovering from a fault: a failed read is retried.
            match tokio::task::block_in_place(|| self.end_offsets()) {
                Ok(ends) if self.stored_offsets().await? == ends => return Ok(ends),
                Ok(_) => {}
                Err(e) => eprintln!("chaos: reading end offsets failed ({e}); retrying"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!(
            "the group did not catch up within {limit:?}; logs in {}",
            self.logs.display()
        )
    }

    /// Each partition's high watermark. (The in-process broker deletes the oldest records
    /// past ~5 MB per partition; records deleted before they were consumed show up as
    /// missing: lower --rate then.)
    fn end_offsets(&self) -> anyhow::Result<Vec<(i32, Option<i64>)>> {
        (0..self.options.partitions)
            .map(|p| {
                let (_, high) =
                    self.inspector
                        .fetch_watermarks(&self.topic, p, Duration::from_secs(10))?;
                Ok((p, Some(high)))
            })
            .collect()
    }

    async fn stored_offsets(&self) -> anyhow::Result<Vec<(i32, Option<i64>)>> {
        Ok(sqlx::query_as(
            "SELECT partition, next_offset FROM ingest.offsets \
             WHERE consumer_group = $1 AND topic = $2 ORDER BY partition",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .fetch_all(&self.pool)
        .await?)
    }

    /// SIGTERM to every worker; they finish their batches and leave.
    async fn stop_workers(&mut self) {
        for worker in &self.workers {
            let _ = worker.signal("TERM");
        }
        let workers = std::mem::take(&mut self.workers);
        let _ = tokio::task::spawn_blocking(move || {
            for mut w in workers {
                let _ = w.0.wait();
            }
        })
        .await;
    }

    /// Counts what Postgres holds against what was produced and against the partitions'
    /// end offsets (`ends`, final once the producer is done).
    async fn check(&mut self, ends: &[(i32, Option<i64>)]) -> anyhow::Result<()> {
        let (rows, coordinates, comments): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT (kafka_partition, kafka_offset)), count(DISTINCT comment) \
             FROM web_metrics.metrics WHERE kafka_topic = $1",
        )
        .bind(&self.topic)
        .fetch_one(&self.pool)
        .await?;
        let (dead, dead_offsets): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT (partition, \"offset\")) FROM ingest.dead_letters \
             WHERE consumer_group = $1 AND topic = $2",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .fetch_one(&self.pool)
        .await?;
        let s = &mut self.summary;
        s.rows = rows;
        s.dead_letters = dead;
        // A duplicate is a second row of one message, whichever coordinates it carries.
        s.duplicates = (rows - comments) + (rows - coordinates) + (dead - dead_offsets);
        s.missing = (s.valid as i64 - comments).max(0) + (s.malformed as i64 - dead_offsets).max(0);
        let stored = self.stored_offsets().await?;
        self.summary.offsets_off = ends.iter().filter(|e| !stored.contains(e)).count();
        if self.summary.missing > 0 {
            for p in 0..self.options.partitions {
                if let Ok((low, _)) = tokio::task::block_in_place(|| {
                    self.inspector
                        .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                }) && low > 0
                {
                    eprintln!(
                        "chaos: partition {p} starts at offset {low} on the broker: records \
                         deleted by its retention before they were consumed are missing"
                    );
                }
            }
        }
        Ok(())
    }

    /// Closes the rig, dropping its database and logs unless `keep`; yields the summary.
    async fn finish(self, keep: bool) -> Summary {
        self.pool.close().await;
        if keep {
            eprintln!(
                "chaos: kept database {} and logs in {}",
                self.database,
                self.logs.display()
            );
        } else {
            let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            )))
            .execute(&self.admin)
            .await;
            let _ = std::fs::remove_dir_all(&self.logs);
        }
        self.summary
    }
}

/// The user part of a Postgres URL (`postgres` when absent).
fn user_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    match rest.split_once('@') {
        Some((userinfo, _)) => userinfo.to_owned(),
        None => "postgres".to_owned(),
    }
}

/// The server's TCP address, for the proxy to relay to.
fn proxy_target(server: &PgConnectOptions) -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let (host, port) = (server.get_host(), server.get_port());
    (host, port)
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("cannot resolve {host}:{port} of --database-url"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart_for_the_proxy() {
        let url = "postgres://app:pw@127.0.0.1:5433/postgres?sslmode=disable";
        let server: PgConnectOptions = url.parse().expect("a Postgres URL");
        assert_eq!(
            proxy_target(&server).expect("resolves"),
            "127.0.0.1:5433".parse().expect("addr")
        );
        assert_eq!(user_of(url), "app:pw");
        assert_eq!(user_of("postgres://localhost/x"), "postgres");
    }
}
