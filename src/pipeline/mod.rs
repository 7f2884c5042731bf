//! The loop: poll a batch, decode it, commit it. [`Pipeline::step`] does one cycle so
//! tests can drive it; [`run`] is that step in a loop with shutdown.
//!
//! Invariant: a partition's batches commit strictly in order, and a batch continues each
//! partition from where its in-flight predecessor ends. Partitions are spread over
//! commit lanes (`batch.lanes`), each lane one batch in flight on its own connection;
//! every lane's batch settles before any lane's next batch starts. The rooms of the
//! loop: `assemble` (batches from the consumer), `settle` (retries, ambiguous commits,
//! fencing, polling while a commit takes long), `positions` (following stored rows and
//! the broker's log, orphaned partitions), `outputs` (metrics, gauges, the offset
//! mirror), `run` (the loop as a service: shutdown, endpoints, leaving the group).

mod assemble;
mod fetch;
mod outputs;
mod positions;
mod run;
mod settle;

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use crate::config::Config;
use crate::kafka::{self, Assignments, IngestConsumer, Observers, TopicPartition};
use crate::record::Record;
use crate::registry::Registry;
use crate::routes::Routes;
use crate::store::{Batch, CommitOutcome, PartitionRange, Store, StoreError};
use crate::telemetry::metrics::PartitionLabel;
use crate::telemetry::spans;
use assemble::Collected;
use run::leave_group;
pub use run::{Latencies, Stats, run};
use settle::CommitTask;

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A configuration changed in code after loading that cannot work.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
    /// The consumer's context gave up: a claim that kept failing, brokers that refuse
    /// this worker's certificate or credentials, or a stored offset outside the broker's
    /// log under `kafka.on_data_loss: stop`.
    #[error("{0}")]
    Consumer(String),
    #[error("shutdown requested while a batch was being retried; nothing of it was committed")]
    ShutDown,
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("cannot serve /metrics on {addr} (run.metrics_addr, --metrics-addr): {source}")]
    Serve {
        addr: String,
        source: std::io::Error,
    },
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// No batch committed in this step (nothing was in flight, or nothing arrived
    /// within `batch.max_wait_ms`).
    Idle,
    /// A batch committed.
    Committed {
        records: usize,
        rows: u64,
        dead_letters: u64,
    },
    /// Every partition of the batch was fenced; nothing committed.
    Fenced { partitions: usize },
}

impl StepOutcome {
    /// The outcomes of two lanes' batches as one: what committed adds up; fenced
    /// partitions are the outcome only where nothing committed.
    fn and(self, other: Self) -> Self {
        use StepOutcome::{Committed, Fenced, Idle};
        match (self, other) {
            (Idle, o) | (o, Idle) => o,
            (
                Committed {
                    records,
                    rows,
                    dead_letters,
                },
                Committed {
                    records: r,
                    rows: w,
                    dead_letters: d,
                },
            ) => Committed {
                records: records + r,
                rows: rows + w,
                dead_letters: dead_letters + d,
            },
            (c @ Committed { .. }, Fenced { .. }) | (Fenced { .. }, c @ Committed { .. }) => c,
            (Fenced { partitions }, Fenced { partitions: p }) => Fenced {
                partitions: partitions + p,
            },
        }
    }
}

/// A lane's batch committing on its own task while the next ones are polled and decoded.
struct InFlight {
    /// The batch's offset advances, which the next batch continues from.
    ranges: Vec<PartitionRange>,
    /// The batch's span, ended when the commit is settled.
    span: Span,
    task: CommitTask,
}

/// One worker's loop state.
pub struct Pipeline {
    config: Config,
    store: Store,
    /// The routes' tables, for spans.
    tables: String,
    consumer: Option<IngestConsumer>,
    owner: String,
    assignments: Assignments,
    /// Records that arrived while partitions were paused, or for a lane already full,
    /// tagged with the claim they arrived under; consumed before polling again.
    pending: VecDeque<(u64, Record)>,
    /// How many lanes commit at once (`Config::lanes`).
    lanes: usize,
    /// The batches committing: at most one per lane, each partition in at most one.
    in_flight: Vec<InFlight>,
    observers: Observers,
    /// Partitions whose gauges are exported, to retract them when the partition goes.
    exported: Vec<PartitionLabel>,
    /// Offsets committed to Postgres but not yet mirrored to Kafka, and when the last
    /// mirror was sent: mirroring once per second keeps commit requests from piling up
    /// behind a rebalance.
    unmirrored: HashMap<TopicPartition, i64>,
    last_mirror: Instant,
    /// When the consumer was last polled: a wait for Postgres polls once it has gone
    /// [`settle::COMMIT_PATIENCE`] without.
    last_poll: Instant,
    /// When partitions were last checked against their stored rows.
    last_maintenance: Instant,
    /// When to check positions against the broker's watermarks (librdkafka said one is
    /// outside the log), and which (all held ones when `None`).
    range_check: Option<(Instant, Option<Vec<TopicPartition>>)>,
    stats: Stats,
    /// Spans are exported: batches get links and attributes.
    traced: bool,
    /// Where writer schemas come from, when a route reads a registry format.
    registry: Option<std::sync::Arc<Registry>>,
}

impl Pipeline {
    /// Connects to Postgres (with startup retries), then joins the consumer group.
    pub async fn connect(config: Config) -> Result<Self, PipelineError> {
        check(&config)?;
        let owner = kafka::worker_id();
        let application_name = crate::store::worker_application_name(&owner);
        let store = Store::connect(&config, &application_name).await?;
        Self::with_owner(config, store, owner)
    }

    fn with_owner(config: Config, store: Store, owner: String) -> Result<Self, PipelineError> {
        let assignments = Assignments::default();
        let observers = Observers::default();
        let lanes = config.lanes();
        let registry = Registry::for_routes(
            &config.schema_registry,
            store.routes(),
            observers.metrics.schema_registry_requests.clone(),
        )
        .map_err(StoreError::Fatal)?
        .map(std::sync::Arc::new);
        let consumer = kafka::subscribe(
            &config,
            store.clone(),
            &owner,
            assignments.clone(),
            observers.clone(),
        )?;
        tracing::info!(
            owner = %owner,
            group = %config.kafka.group,
            topics = %store.routes().subscription().join(","),
            lanes,
            database = %config.database_url_masked(),
            "worker started; joining the group, then claiming the partitions it assigns"
        );
        Ok(Self {
            traced: config.otel.exporter_otlp_endpoint.is_some(),
            tables: store.routes().tables(),
            lanes,
            config,
            store,
            consumer: Some(consumer),
            owner,
            assignments,
            pending: VecDeque::new(),
            in_flight: Vec::new(),
            observers,
            exported: Vec::new(),
            unmirrored: HashMap::new(),
            last_mirror: Instant::now(),
            last_poll: Instant::now(),
            last_maintenance: Instant::now(),
            range_check: None,
            stats: Stats::default(),
            registry,
        })
    }

    /// Counters so far (for tests; `close` hands them over).
    #[cfg(any(test, feature = "internals"))]
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// This worker's id, as written to `ingest.offsets.owner`.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The metrics and health this pipeline reports.
    pub fn observers(&self) -> &Observers {
        &self.observers
    }

    /// The store this pipeline commits to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn consumer(&self) -> &IngestConsumer {
        // `consumer` is only taken by `close`, which consumes `self`.
        self.consumer
            .as_ref()
            .expect("consumer is present until close")
    }

    /// One cycle: poll and decode each lane's next batch while the lanes' previous
    /// batches commit, then settle those commits (retrying transient failures) and
    /// start committing the new batches.
    ///
    /// A partition's batches commit strictly in order (a batch continues from the
    /// offsets its predecessor commits); polling, decoding and the other lanes' commits
    /// overlap a commit. The outcome returned is that of the batches settled in this
    /// step. After an error only [`Pipeline::close`] may follow: the batches polled in
    /// this step are gone, and a further step would continue past them.
    pub async fn step(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<StepOutcome, PipelineError> {
        if let Some(fatal) = self.consumer().context().take_fatal() {
            return Err(PipelineError::Consumer(fatal));
        }
        let polling = Instant::now();
        let collected = tokio::task::block_in_place(|| self.collect());
        if let Some(fatal) = self.consumer().context().take_fatal() {
            return Err(PipelineError::Consumer(fatal));
        }
        let kept: Vec<(Span, Vec<Record>, Vec<PartitionRange>)> = collected
            .into_iter()
            .map(|Collected { span, entries, .. }| {
                let (records, ranges) = self.keep(entries);
                (span, records, ranges)
            })
            .collect();
        self.resolve_schemas(&kept, shutdown).await?;
        let mut next = tokio::task::block_in_place(|| decode_lanes(kept, self.store.routes()));
        if self.traced {
            for (span, batch) in &next {
                spans::describe(span, batch, &self.config.kafka.group, &self.tables);
            }
        }
        let (poll_decode, waiting) = (polling.elapsed(), Instant::now());
        let mut outcome = StepOutcome::Idle;
        // The lanes still in flight stay listed while one settles: their ranges are
        // positions that re-positioning a fenced partition must not undo.
        while let Some(InFlight { span, task, .. }) = self.in_flight.pop() {
            let settled = match self.await_polling(task).await {
                Ok((batch, result, elapsed)) => {
                    self.settle(batch, result, elapsed, shutdown)
                        .instrument(span.clone())
                        .await
                }
                Err(e) => Err(StoreError::Fatal(format!("the commit task failed: {e}")).into()),
            };
            let (settled, fenced) = settled.inspect_err(|e| spans::failed(&span, e))?;
            outcome = outcome.and(settled);
            if !fenced.is_empty() {
                // A next batch continued from offsets that did not commit.
                for (_, batch) in &mut next {
                    if batch
                        .ranges
                        .iter()
                        .any(|r| fenced.iter().any(|f| f.same_claim(r)))
                    {
                        *batch = self.without(std::mem::take(batch), &fenced);
                    }
                }
            }
        }
        tracing::debug!(
            poll_decode_ms = poll_decode.as_secs_f64() * 1e3,
            commit_wait_ms = waiting.elapsed().as_secs_f64() * 1e3,
            lanes = next.len(),
            "step timing"
        );
        for (span, batch) in next.into_iter().filter(|(_, b)| !b.ranges.is_empty()) {
            let ranges = batch.ranges.clone();
            let commit = span.in_scope(|| spans::commit(&self.tables));
            let task = self.spawn_commit(batch, commit);
            self.in_flight.push(InFlight { ranges, span, task });
        }
        self.maintain().await?;
        self.observers.health.stepped();
        self.export_partition_gauges();
        Ok(outcome)
    }

    /// Lets the batches in flight finish their commit attempts (without retrying:
    /// whatever did not commit is read again by the partition's next owner), mirrors the
    /// last offsets, then leaves the group. Returns the final counters.
    pub async fn close(mut self) -> Stats {
        for in_flight in std::mem::take(&mut self.in_flight) {
            match in_flight.task.await {
                Ok((
                    batch,
                    Ok(CommitOutcome::Committed {
                        rows,
                        dead_letters,
                        isolation,
                    }),
                    elapsed,
                )) => {
                    let span = in_flight.span;
                    let _inside = span.enter();
                    self.committed(&batch, &span, elapsed, (rows, dead_letters), isolation);
                }
                Ok((_, other, _)) => {
                    tracing::warn!(result = ?other, "batch in flight at shutdown did not commit; it will be read again");
                }
                Err(e) => tracing::error!(error = %e, "the commit task failed"),
            }
        }
        self.mirror_offsets();
        if let Err(e) = self.store.release(&self.owner).await {
            tracing::warn!(error = %e, "could not clear this worker from the offset rows it owned; they keep its name until claimed");
        }
        if let Some(consumer) = self.consumer.take() {
            leave_group(consumer);
        }
        std::mem::take(&mut self.stats)
    }
}

/// Checks a configuration again before a worker starts: an embedding application may
/// have changed it in code since it was loaded (the routes are checked when the store
/// prepares their statements).
fn check(config: &Config) -> Result<(), crate::config::ConfigError> {
    config.validate()?;
    crate::security::validate(config)
}

/// Decodes each lane's records into its batch, the lanes side by side on threads of
/// their own: decoding is most of the loop's own work, and one thread decoding every
/// lane would bound them all.
fn decode_lanes(
    lanes: Vec<(Span, Vec<Record>, Vec<PartitionRange>)>,
    routes: &Routes,
) -> Vec<(Span, Batch)> {
    let decode = |(span, records, ranges): (Span, Vec<Record>, Vec<PartitionRange>)| {
        let batch = tracing::info_span!(parent: &span, "decode")
            .in_scope(|| Batch::decode(records, routes, ranges));
        (span, batch)
    };
    if lanes.len() < 2 {
        return lanes.into_iter().map(decode).collect();
    }
    std::thread::scope(|scope| {
        let decoding: Vec<_> = lanes
            .into_iter()
            .map(|lane| scope.spawn(move || decode(lane)))
            .collect();
        decoding
            .into_iter()
            // A panic while decoding is a bug: it goes on as the loop's own.
            .map(|d| d.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}
