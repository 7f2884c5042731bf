//! `kafka-pg-ingest dev chaos`: a fault campaign against real worker processes.
//!
//! Starts a broker (`dev broker`, a child process) and a database of its own, each
//! reached through a TCP proxy this harness controls, and several workers of this binary
//! in one group (with `kafka.on_data_loss: skip`); produces website-metrics messages
//! (some malformed) at a steady rate while it injects faults at random moments; waits
//! until the group has caught up; then checks what Postgres holds, offset by offset:
//! every offset of every partition is exactly one row or dead letter, or lies in a gap
//! the broker really lost (recorded in `ingest.offset_gaps`); no message is twice in the
//! table; every stored offset is at its partition's end.

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

use super::freeze::{client_ports, freeze_in_transaction};
use super::proxy::Proxy;
use super::reaped::Reaped;
use super::{LocalDatabase, ProduceOptions, Produced, produce_gated};
use crate::progress::Progress;

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
    /// The target table partitioned by day on `time_stamp` (one partition per day of
    /// the sample's dates, the unique index on the coordinates and `time_stamp`).
    #[arg(long)]
    pub partitioned: bool,
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
    /// A worker frozen (SIGSTOP) inside a Postgres transaction for 10 s, past the
    /// session timeout, then thawed.
    Freeze,
    /// Every worker stopped while the broker's retention deletes records they have not
    /// ingested yet, then resumed: the gaps are skipped and recorded.
    RetentionOvertake,
    /// The topic deleted and re-created: a fresh broker behind the same address, its
    /// logs empty, below every stored offset.
    TopicRecreate,
}

/// What a campaign found.
#[derive(Debug, Default)]
pub struct Summary {
    pub seed: u64,
    pub assignment: &'static str,
    pub partitioned: bool,
    pub messages: u64,
    pub valid: u64,
    pub malformed: u64,
    pub rows: i64,
    pub dead_letters: i64,
    pub duplicates: i64,
    pub missing: i64,
    /// Partitions whose stored offset is not the partition's end.
    pub offsets_off: usize,
    /// Dead letters of a reason the stream cannot cause: a valid record filed as one.
    pub misfiled: i64,
    pub kills: u32,
    pub terminations: u32,
    pub storm_changes: u32,
    pub backends_terminated: u32,
    pub database_outages: u32,
    pub broker_pauses: u32,
    pub freezes: u32,
    pub overtakes: u32,
    pub recreates: u32,
    /// Ranges recorded in `ingest.offset_gaps`, and the offsets below the log start
    /// they hold.
    pub gaps: i64,
    pub gapped: i64,
    /// Workers that exited by themselves (and were restarted).
    pub exits: u32,
    pub elapsed: Duration,
}

impl Summary {
    /// Whether Postgres holds the stream exactly once, and no worker stopped by itself.
    pub fn passed(&self) -> bool {
        let lossless = self.gaps > 0
            || (self.rows == self.valid as i64 && self.dead_letters == self.malformed as i64);
        self.duplicates == 0
            && self.missing == 0
            && self.offsets_off == 0
            && self.misfiled == 0
            && self.exits == 0
            && lossless
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chaos {}: seed={} assignment={} table={} messages={} rows={} dead_letters={} gaps={} \
             gapped_offsets={} duplicates={} missing={} offsets_off={} misfiled={} faults: kill={} term={} \
             storm={} backends={} db_outage={} broker_pause={} freeze={} retention={} \
             recreate={} self_exits={} elapsed={:.1}s",
            if self.passed() { "PASS" } else { "FAIL" },
            self.seed,
            self.assignment,
            if self.partitioned {
                "partitioned"
            } else {
                "plain"
            },
            self.messages,
            self.rows,
            self.dead_letters,
            self.gaps,
            self.gapped,
            self.duplicates,
            self.missing,
            self.offsets_off,
            self.misfiled,
            self.kills,
            self.terminations,
            self.storm_changes,
            self.backends_terminated,
            self.database_outages,
            self.broker_pauses,
            self.freezes,
            self.overtakes,
            self.recreates,
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
    /// The brokers' address for every client: the Kafka proxy.
    brokers: String,
    broker: Reaped,
    /// In front of the broker, so a fresh one can take its place.
    kafka_proxy: Proxy,
    /// Holds the campaign's producer while the broker is swapped.
    gate: std::sync::Arc<super::Gate>,
    /// Id of the next message produced besides the stream (`comment` ids stay unique).
    next_id: u64,
    /// Dead-letter reasons the stream's malformed messages (and the retention fault's
    /// oversized ones) end with; any other is a record filed wrongly.
    expected_reasons: Vec<String>,
    /// When the topic was re-created, and each partition's log start just before.
    recreated: Option<(chrono::DateTime<chrono::Utc>, Vec<i64>)>,
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
        format: crate::config::ValueFormat::Json,
        schema_registry: None,
        schema_id: None,
    };
    let gate = rig.gate.clone();
    let producer = tokio::task::spawn_blocking(move || produce_gated(&produce_options, &gate));
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
        Fault::Freeze,
        Fault::RetentionOvertake,
    ]);
    faults.shuffle(&mut rng);
    // Last: until the new log grows past the stored offsets nothing lands, so a fault
    // after it (a freeze inside a commit, say) would find no commit to hit.
    faults.push(Fault::TopicRecreate);
    let mut progress = Progress::new("faults injected", faults.len() as u64);
    for fault in faults {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
        rig.restart_exited()?;
        rig.inject(fault, &mut rng, &producer).await?;
        progress.add(1);
    }
    progress.finish();

    let produced = producer.await.context("the producer thread failed")??;
    rig.summary.valid = produced.valid;
    rig.summary.malformed = produced.malformed.values().sum();
    rig.expected_reasons
        .extend(produced.malformed.keys().map(|r| (*r).to_owned()));
    if rig.summary.recreates > 0 {
        rig.top_up(seed).await?;
    }
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

        // The proxy's port must be known before the broker starts (it advertises it), so
        // the proxy starts pointing nowhere and is aimed at the broker once it is up.
        let kafka_proxy = Proxy::start("127.0.0.1:9".parse()?).await?;
        let (broker, listener) = start_broker(
            &binary,
            &logs.join("broker.log"),
            &topic,
            options.partitions,
            kafka_proxy.port,
        )?;
        kafka_proxy.retarget(listener);
        let brokers = format!("127.0.0.1:{}", kafka_proxy.port);

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
        let defaults = crate::load_config(None, Vec::new(), &crate::config::Overrides::default())?;
        crate::store::migrate(&pool, &crate::routes::Routes::new(&defaults)?).await?;
        if options.partitioned {
            // The default table's place taken by a partitioned one of its shape (whose
            // `id` default keeps the first's sequence, so that one stays).
            let ddl = crate::sample::partitioned_by_day(
                "web_metrics.metrics",
                "web_metrics.metrics_unpartitioned",
            );
            sqlx::raw_sql(AssertSqlSafe(format!(
                "ALTER TABLE web_metrics.metrics RENAME TO metrics_unpartitioned; {ddl}"
            )))
            .execute(&pool)
            .await?;
        }
        let proxy = Proxy::start(proxy_target(&server)?).await?;
        Ok(Self {
            binary,
            logs,
            brokers,
            broker,
            kafka_proxy,
            gate: std::sync::Arc::new(super::Gate::default()),
            next_id: options.messages,
            expected_reasons: vec![crate::decode::ReasonCode::TooLongString.as_str().to_owned()],
            recreated: None,
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
                partitioned: options.partitioned,
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
            // Retention overtaking a stopped group and re-created topics are rehearsed
            // here: such gaps are recorded and checked, not a reason to stop.
            .env("KAFKA_PG_INGEST__KAFKA__ON_DATA_LOSS", "skip")
            .env("KAFKA_PG_INGEST__RETRY__MAX_DELAY_MS", "2000")
            // Lanes commit side by side whatever the machine's cores: the faults land
            // between concurrent commits of one worker too.
            .env("KAFKA_PG_INGEST__BATCH__LANES", "2")
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

    async fn inject(
        &mut self,
        fault: Fault,
        rng: &mut impl Rng,
        producer: &tokio::task::JoinHandle<anyhow::Result<Produced>>,
    ) -> anyhow::Result<()> {
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
                leave(self.workers.swap_remove(i)).await?;
                self.summary.terminations += 1;
                self.spawn_worker()?;
            }
            Fault::Storm => {
                for _ in 0..3 {
                    self.spawn_worker()?;
                    self.summary.storm_changes += 1;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(1500..3000))).await;
                    // A graceful leave: the worker finishes its batch and leaves the group.
                    let extra = self.workers.pop().context("the storm's worker")?;
                    leave(extra).await?;
                    self.summary.storm_changes += 1;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
                }
            }
            Fault::TerminateBackends => {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name LIKE $2",
                )
                .bind(&self.database)
                .bind(format!("{} %", crate::store::APPLICATION_NAME))
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
            Fault::Freeze => {
                // Traffic of its own, so there are commits to catch even when the stream
                // has ended.
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let traffic = self.trickle(stop.clone());
                let frozen = self.freeze_one().await;
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                let sent = traffic.await.context("the traffic thread failed")??;
                self.summary.valid += sent;
                let i = frozen?.context("no worker was caught inside a transaction")?;
                tokio::time::sleep(Duration::from_secs(10)).await;
                self.workers[i].signal("CONT")?;
                self.summary.freezes += 1;
            }
            Fault::RetentionOvertake => {
                // Overtaking stored offsets: a partition never started yet begins at its
                // log start, which skips nothing it ever held.
                let deadline = Instant::now() + Duration::from_secs(60);
                while self
                    .stored_offsets()
                    .await?
                    .iter()
                    .filter(|(_, n)| n.is_some())
                    .count()
                    < self.options.partitions as usize
                {
                    ensure!(
                        Instant::now() < deadline,
                        "the group never stored every partition's offset"
                    );
                    self.restart_exited()?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                for worker in &self.workers {
                    worker.signal("STOP")?;
                }
                let overtaken = self.overtake().await;
                for worker in &self.workers {
                    worker.signal("CONT")?;
                }
                overtaken?;
                self.summary.overtakes += 1;
            }
            Fault::TopicRecreate => {
                let gate = self.gate.clone();
                let done = || producer.is_finished();
                tokio::task::block_in_place(|| gate.hold(done));
                let recreated = self.recreate_topic();
                gate.release();
                recreated?;
                self.summary.recreates += 1;
            }
        }
        Ok(())
    }

    /// Stops (SIGSTOP) whichever worker is first caught inside a commit; its index.
    async fn freeze_one(&self) -> anyhow::Result<Option<usize>> {
        // The workers reach Postgres through the database proxy, whose own connections
        // are the backends' clients.
        let proxy = &self.proxy;
        for round in 0..100 {
            let i = round % self.workers.len();
            let worker = &self.workers[i];
            let ports = || proxy.upstream_ports(&client_ports(worker.id(), proxy.port));
            if freeze_in_transaction(worker, &self.admin, &self.database, ports, 10).await? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Produces valid messages (ids from `next_id` on, which it advances) at about 2,000
    /// a second until `stop`; yields how many, once stopped.
    fn trickle(
        &mut self,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
        let (brokers, topic, partitions) = (
            self.brokers.clone(),
            self.topic.clone(),
            self.options.partitions,
        );
        let first = self.next_id;
        // Room for ten minutes of it; ids are only required to be unique.
        self.next_id += 1_200_000;
        tokio::task::spawn_blocking(move || {
            let mut producer = crate::sample::SampleProducer::new(&brokers, &topic, partitions)?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(first);
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let batch: Vec<Option<Vec<u8>>> = (first + sent..first + sent + 200)
                    .map(|i| Some(crate::sample::website_metric(i, &mut rng)))
                    .collect();
                sent += producer.send(batch)?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(sent)
        })
    }

    /// Fills every partition with large records until the broker's retention has
    /// deleted records below each partition's stored offset (the workers are stopped).
    async fn overtake(&mut self) -> anyhow::Result<()> {
        let big = format!(
            r#"{{"request_timestamp": "2021-01-01T00:00:00Z", "url": "u", "comment": "{}"}}"#,
            "x".repeat(100_000)
        );
        let mut producer = crate::sample::SampleProducer::new(
            &self.brokers,
            &self.topic,
            self.options.partitions,
        )?;
        for _ in 0..20 {
            let stored = self.stored_offsets().await?;
            let lows = tokio::task::block_in_place(|| self.watermarks())?;
            // Every stored offset below its log start (a partition not claimed yet starts
            // at its log start anyway).
            let behind = stored.iter().all(|(p, next)| {
                lows.get(*p as usize)
                    .is_some_and(|(low, _)| Some(*low) > *next)
            });
            if behind {
                return Ok(());
            }
            let batch = vec![Some(big.as_bytes()); 8 * self.options.partitions as usize];
            tokio::task::block_in_place(|| producer.send(batch))?;
        }
        bail!("the broker's retention never passed the stored offsets")
    }

    /// Replaces the broker with a fresh one behind the same address: the topic is back,
    /// empty, below every stored offset. The campaign's producer is held meanwhile.
    fn recreate_topic(&mut self) -> anyhow::Result<()> {
        let lows = self.watermarks()?.into_iter().map(|(low, _)| low).collect();
        self.recreated = Some((chrono::Utc::now(), lows));
        let log = self
            .logs
            .join(format!("broker-{}.log", self.summary.recreates + 2));
        let (broker, listener) = start_broker(
            &self.binary,
            &log,
            &self.topic,
            self.options.partitions,
            self.kafka_proxy.port,
        )?;
        self.kafka_proxy.retarget(listener);
        // The old broker goes with its records (dropping it kills it).
        self.broker = broker;
        Ok(())
    }

    /// After a topic was re-created, produces more valid messages until every
    /// partition's log reaches its stored offset again, so the group can catch up.
    async fn top_up(&mut self, seed: u64) -> anyhow::Result<()> {
        let mut producer = crate::sample::SampleProducer::new(
            &self.brokers,
            &self.topic,
            self.options.partitions,
        )?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(1));
        for _ in 0..1_000 {
            let stored = self.stored_offsets().await?;
            let ends = tokio::task::block_in_place(|| self.watermarks())?;
            let short = stored.iter().any(|(p, next)| {
                ends.get(*p as usize)
                    .is_none_or(|(_, high)| next.is_some_and(|n| n > *high))
            });
            if !short {
                return Ok(());
            }
            let id = self.next_id;
            let batch: Vec<Option<Vec<u8>>> = (id..id + 400)
                .map(|i| Some(crate::sample::website_metric(i, &mut rng)))
                .collect();
            self.next_id += 400;
            self.summary.valid += 400;
            tokio::task::block_in_place(|| producer.send(batch))?;
        }
        bail!("the re-created topic never reached the stored offsets")
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

    /// Each partition's high watermark.
    fn end_offsets(&self) -> anyhow::Result<Vec<(i32, Option<i64>)>> {
        Ok(self
            .watermarks()?
            .into_iter()
            .zip(0..)
            .map(|((_, high), p)| (p, Some(high)))
            .collect())
    }

    /// Each partition's low and high watermarks, by partition number.
    fn watermarks(&self) -> anyhow::Result<Vec<(i64, i64)>> {
        (0..self.options.partitions)
            .map(|p| {
                Ok(self
                    .inspector
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(10))?)
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
        // A gap must say what the broker had: below its log start, records it no longer
        // held (by then, or before the topic was re-created); beyond the log end, the new
        // log's records below the stored offset.
        let lows_now: Vec<i64> = tokio::task::block_in_place(|| self.watermarks())?
            .into_iter()
            .map(|(low, _)| low)
            .collect();
        let (recreated_at, lows_before) = match &self.recreated {
            Some((at, lows)) => (Some(*at), lows.clone()),
            None => (None, lows_now.clone()),
        };
        let partitions: Vec<i32> = (0..self.options.partitions).collect();
        let (gaps, gapped, false_gaps): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(to_offset - from_offset) FILTER \
               (WHERE reason = 'below_log_start'), 0)::int8, \
             count(*) FILTER (WHERE from_offset >= to_offset \
               OR (reason = 'below_log_start' AND (to_offset <> low_watermark \
                   OR to_offset > CASE WHEN detected_at < $6 THEN w.before ELSE w.now END)) \
               OR (reason = 'beyond_log_end' AND (from_offset <> low_watermark OR $6 IS NULL))) \
             FROM ingest.offset_gaps g \
             JOIN unnest($3::int4[], $4::int8[], $5::int8[]) AS w(p, before, now) ON w.p = g.partition \
             WHERE consumer_group = $1 AND topic = $2",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(&partitions)
        .bind(&lows_before)
        .bind(&lows_now)
        .bind(recreated_at)
        .fetch_one(&self.pool)
        .await?;
        let misfiled: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM ingest.dead_letters \
             WHERE consumer_group = $1 AND topic = $2 AND reason_code <> ALL($3)",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(&self.expected_reasons)
        .fetch_one(&self.pool)
        .await?;
        // Offset by offset up to each partition's end: one row, one dead letter, or a
        // record the broker deleted before it was ingested (a gap below its log start).
        // Offsets skipped in a re-created topic's new log are below the stored offset,
        // where the old log's records already hold them.
        let (partitions, highs): (Vec<i32>, Vec<i64>) =
            ends.iter().map(|(p, h)| (*p, h.unwrap_or(0))).unzip();
        let (uncovered, twice): (i64, i64) = sqlx::query_as(
            "WITH ends AS (SELECT * FROM unnest($1::int4[], $2::int8[]) AS e(p, high)), \
             offsets AS (SELECT p, generate_series(0, high - 1) AS o FROM ends), \
             held AS ( \
               SELECT kafka_partition AS p, kafka_offset AS o FROM web_metrics.metrics \
                 WHERE kafka_topic = $3 \
               UNION ALL SELECT partition, \"offset\" FROM ingest.dead_letters \
                 WHERE consumer_group = $4 AND topic = $3 \
               UNION ALL SELECT partition, generate_series(from_offset, to_offset - 1) \
                 FROM ingest.offset_gaps \
                 WHERE consumer_group = $4 AND topic = $3 AND reason = 'below_log_start'), \
             counted AS (SELECT p, o, count(*) AS n FROM held GROUP BY p, o) \
             SELECT count(*) FILTER (WHERE c.n IS NULL), count(*) FILTER (WHERE c.n > 1) \
             FROM offsets LEFT JOIN counted c USING (p, o)",
        )
        .bind(&partitions)
        .bind(&highs)
        .bind(&self.topic)
        .bind(&self.group)
        .fetch_one(&self.pool)
        .await?;
        let s = &mut self.summary;
        s.rows = rows;
        s.dead_letters = dead;
        s.gaps = gaps;
        s.gapped = gapped;
        // A duplicate is a second row of one message, whichever coordinates it carries,
        // an offset held twice, or a gap that does not say what the broker had.
        s.duplicates =
            (rows - comments) + (rows - coordinates) + (dead - dead_offsets) + twice + false_gaps;
        s.missing = uncovered;
        s.misfiled = misfiled;
        if gaps == 0 {
            s.missing +=
                (s.valid as i64 - comments).max(0) + (s.malformed as i64 - dead_offsets).max(0);
        }
        let stored = self.stored_offsets().await?;
        self.summary.offsets_off = ends.iter().filter(|e| !stored.contains(e)).count();
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

/// Starts `dev broker` advertising 127.0.0.1:`advertised_port`; the process and the
/// address it listens on.
fn start_broker(
    binary: &std::path::Path,
    log: &std::path::Path,
    topic: &str,
    partitions: i32,
    advertised_port: u16,
) -> anyhow::Result<(Reaped, std::net::SocketAddr)> {
    let mut broker = Reaped(
        Command::new(binary)
            .args(["dev", "broker", "--topic", topic, "--partitions"])
            .arg(partitions.to_string())
            .args(["--advertised-port", &advertised_port.to_string()])
            .stdout(Stdio::piped())
            .stderr(File::create(log)?)
            .spawn()
            .context("starting `dev broker`")?,
    );
    let mut line = String::new();
    BufReader::new(broker.stdout.take().context("broker stdout")?).read_line(&mut line)?;
    let listener = line
        .trim()
        .parse()
        .with_context(|| format!("`dev broker` printed no address: {line:?}"))?;
    Ok((broker, listener))
}

/// SIGTERM to a worker, which must finish its batch, leave the group and exit 0.
async fn leave(worker: Reaped) -> anyhow::Result<()> {
    worker.signal("TERM")?;
    let status = tokio::task::spawn_blocking(move || {
        let mut worker = worker;
        worker.0.wait()
    })
    .await??;
    ensure!(
        status.success(),
        "a worker exited with {status} after SIGTERM"
    );
    Ok(())
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
