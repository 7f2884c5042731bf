//! Settling a commit: retries of transient failures, ambiguous commits read back from
//! the offset rows, fenced partitions dropped and re-positioned.
//!
//! Invariant: the consumer is polled at least every [`POLL_SLICE`] (plus one poll's
//! own wait) while a commit is retried or runs [`COMMIT_PATIENCE`] past the last poll, with
//! every assigned partition paused, so the group keeps this worker however long
//! Postgres takes; records that arrive meanwhile wait in `pending`.

use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use super::{Pipeline, PipelineError, StepOutcome};
use crate::kafka::TopicPartition;
use crate::record::Record;
use crate::retry::{self, ErrorClass};
use crate::store::{Batch, CommitOutcome, PartitionRange, StoreError, StoredOffset};
use crate::telemetry::metrics::ClassLabel;
use crate::telemetry::outage::Outage;
use crate::telemetry::spans;

/// How long a commit may run, counted from the last poll, before the loop starts
/// polling with partitions paused.
pub(super) const COMMIT_PATIENCE: Duration = Duration::from_secs(1);

/// The longest wait of one poll while partitions are paused.
const POLL_SLICE: Duration = Duration::from_millis(200);

/// A commit running on its own task: it hands the batch back with its result and how
/// long the attempt took.
pub(super) type CommitTask = JoinHandle<(Batch, Result<CommitOutcome, StoreError>, Duration)>;

impl Pipeline {
    /// Starts committing `batch` on its own task, under `span`.
    pub(super) fn spawn_commit(&self, batch: Batch, span: Span) -> CommitTask {
        let store = self.store.clone();
        tokio::spawn(
            async move {
                let started = Instant::now();
                let result = store.commit(&batch).await;
                (batch, result, started.elapsed())
            }
            .instrument(span),
        )
    }

    /// Awaits a task (a commit, a read of offset rows). One still running
    /// [`COMMIT_PATIENCE`] after the last poll (a slow database, rows being isolated,
    /// lanes finishing one after another) is awaited while polling with every assigned
    /// partition paused, so `max.poll.interval.ms` never passes without a poll.
    pub(super) async fn await_polling<T>(
        &mut self,
        mut task: JoinHandle<T>,
    ) -> Result<T, JoinError> {
        let patience = tokio::time::Instant::from_std(self.last_poll + COMMIT_PATIENCE);
        if let Ok(done) = tokio::time::timeout_at(patience, &mut task).await {
            return done;
        }
        tracing::debug!("Postgres is taking long: polling with partitions paused meanwhile");
        self.poll_paused(|| task.is_finished(), None);
        task.await
    }

    /// The stored offset rows of `partitions` (`settled`: once no transaction holds
    /// them), read while polling (see [`Pipeline::await_polling`]).
    pub(super) async fn read_rows(
        &mut self,
        partitions: Vec<TopicPartition>,
        settled: bool,
    ) -> Result<Vec<StoredOffset>, StoreError> {
        let store = self.store.clone();
        let task = tokio::spawn(async move {
            if settled {
                store.settled_offsets(&partitions).await
            } else {
                store.stored_offsets(&partitions).await
            }
        });
        self.await_polling(task)
            .await
            .map_err(|e| StoreError::Fatal(format!("reading offset rows failed: {e}")))?
    }

    /// Polls with every assigned partition paused until `done` holds or `shutdown` is
    /// cancelled, holding back what arrives; then resumes the partitions.
    fn poll_paused(&mut self, done: impl Fn() -> bool, shutdown: Option<&CancellationToken>) {
        tokio::task::block_in_place(|| {
            while !done() && !shutdown.is_some_and(CancellationToken::is_cancelled) {
                let consumer = self.consumer();
                if let Ok(assigned) = consumer.assignment() {
                    // Re-paused each turn: a rebalance may have added partitions.
                    let _ = consumer.pause(&assigned);
                }
                if let Some(entry) = self.poll_one(POLL_SLICE) {
                    self.pending.push_back(entry);
                }
            }
            let consumer = self.consumer();
            if let Ok(assigned) = consumer.assignment() {
                let _ = consumer.resume(&assigned);
            }
        });
    }

    /// Takes a commit's first result to its end: retries transient failures with
    /// backoff, reads ambiguous commits back, drops fenced partitions. Returns what
    /// happened and every range found fenced on the way.
    pub(super) async fn settle(
        &mut self,
        mut batch: Batch,
        mut result: Result<CommitOutcome, StoreError>,
        mut elapsed: Duration,
        shutdown: &CancellationToken,
    ) -> Result<(StepOutcome, Vec<PartitionRange>), PipelineError> {
        let mut delays = retry::backoff(&self.config.retry);
        let mut all_fenced = Vec::new();
        loop {
            if let Err(StoreError::AmbiguousCommit(e)) = &result {
                self.stats.ambiguous_commits += 1;
                tracing::warn!(error = %e, "commit outcome unknown; reading it back from the offset rows");
                match self.resolve_ambiguous(&batch).await {
                    // Not applied: retried like any transient failure.
                    Ok(None) => {}
                    Ok(Some(outcome)) => result = Ok(outcome),
                    Err(read_error) => result = Err(read_error),
                }
            }
            match result {
                Ok(CommitOutcome::Committed {
                    rows,
                    dead_letters,
                    isolation,
                }) => {
                    let span = Span::current();
                    self.committed(&batch, &span, elapsed, (rows, dead_letters), isolation);
                    let outcome = StepOutcome::Committed {
                        records: batch.records.len(),
                        rows,
                        dead_letters,
                    };
                    return Ok((outcome, all_fenced));
                }
                Ok(CommitOutcome::Fenced(fenced)) => {
                    tracing::info!(partitions = %crate::kafka::partition_list(fenced.iter().map(|r| (r.topic.as_str(), r.partition))),
                        "partitions of the batch were claimed anew or moved since it was built; they did not commit");
                    self.stats.fenced += fenced.len() as u64;
                    self.observers
                        .metrics
                        .fencing_conflicts
                        .inc_by(fenced.len() as u64);
                    self.fence(&fenced).await?;
                    batch = self.without(batch, &fenced);
                    all_fenced.extend(fenced);
                    if batch.ranges.is_empty() {
                        let partitions = all_fenced.len();
                        return Ok((StepOutcome::Fenced { partitions }, all_fenced));
                    }
                }
                Err(e) => {
                    let class = e.class();
                    self.wait_or_fail(e.into(), class, &mut delays, shutdown)
                        .await?;
                }
            }
            let commit = spans::commit(&self.tables);
            let task = self.spawn_commit(batch, commit);
            (batch, result, elapsed) = self
                .await_polling(task)
                .await
                .map_err(|e| StoreError::Fatal(format!("the commit task failed: {e}")))?;
        }
    }

    /// Reads the offset rows after a COMMIT whose outcome is unknown, and says what
    /// happened: committed, fenced, or not applied (`None`).
    async fn resolve_ambiguous(
        &mut self,
        batch: &Batch,
    ) -> Result<Option<CommitOutcome>, StoreError> {
        let partitions: Vec<TopicPartition> = batch
            .ranges
            .iter()
            .map(|r| (r.topic.clone(), r.partition))
            .collect();
        let stored = self.read_rows(partitions, true).await?;
        let find = |r: &PartitionRange| {
            stored
                .iter()
                .find(|s| s.topic == r.topic && s.partition == r.partition)
        };
        let committed = batch
            .ranges
            .iter()
            .all(|r| find(r).is_some_and(|s| s.epoch == r.epoch && s.next_offset == Some(r.end)));
        if committed {
            // Counted as decoded: rows Postgres rejected inside that commit are not known here.
            let dead = batch.rejects.len() as u64;
            return Ok(Some(CommitOutcome::Committed {
                rows: batch.row_count() as u64,
                dead_letters: dead,
                isolation: None,
            }));
        }
        let fenced: Vec<PartitionRange> = batch
            .ranges
            .iter()
            .filter(|r| {
                !find(r).is_some_and(|s| s.epoch == r.epoch && s.next_offset == Some(r.start))
            })
            .cloned()
            .collect();
        Ok((!fenced.is_empty()).then_some(CommitOutcome::Fenced(fenced)))
    }

    /// Has the registry answer for every writer schema id the lanes' records carry,
    /// waiting out a registry that does not answer (polling, partitions paused, as for
    /// Postgres): its records are decided only once it does.
    pub(super) async fn resolve_schemas(
        &mut self,
        lanes: &[(Span, Vec<Record>, Vec<PartitionRange>)],
        shutdown: &CancellationToken,
    ) -> Result<(), PipelineError> {
        let Some(registry) = self.registry.clone() else {
            return Ok(());
        };
        let ids = crate::registry::schema_ids(
            self.store.routes(),
            lanes.iter().flat_map(|(_, records, _)| records),
        );
        let mut delays = retry::backoff(&self.config.retry);
        loop {
            // Fetches take up to schema_registry.timeout_ms each: the consumer keeps
            // polling meanwhile, as during a slow commit.
            let fetching = {
                let (registry, ids) = (registry.clone(), ids.clone());
                tokio::spawn(async move { registry.resolve(ids).await })
            };
            let resolved = self.await_polling(fetching).await.map_err(|e| {
                StoreError::Fatal(format!("the schema registry task failed: {e}"))
            })?;
            match resolved {
                Ok(()) => {
                    self.observers.outages.registry.recovered();
                    return Ok(());
                }
                Err(e) => {
                    let class = e.class;
                    self.wait_or_fail(e.into(), class, &mut delays, shutdown)
                        .await?;
                }
            }
        }
    }

    /// The dependency a batch's transient failure comes from, and what failed.
    fn outage_of(&self, err: &PipelineError) -> (&Outage, &'static str) {
        match err {
            PipelineError::Registry(_) => (&self.observers.outages.registry, "fetching writer schemas"),
            _ => (&self.observers.outages.commits, "committing a batch"),
        }
    }

    /// Fails on a non-transient error; otherwise waits one backoff delay with the
    /// assigned partitions paused, polling so the group keeps this worker.
    pub(super) async fn wait_or_fail(
        &mut self,
        err: PipelineError,
        class: ErrorClass,
        delays: &mut impl Iterator<Item = Duration>,
        shutdown: &CancellationToken,
    ) -> Result<(), PipelineError> {
        if class != ErrorClass::Transient {
            return Err(err);
        }
        let delay = delays
            .next()
            .unwrap_or(Duration::from_millis(self.config.retry.max_delay_ms));
        self.stats.retries += 1;
        let label = ClassLabel {
            class: class.as_str().to_owned(),
        };
        self.observers.metrics.retries.get_or_create(&label).inc();
        tracing::debug!(error = %err, retry_in_ms = delay.as_millis() as u64, class = class.as_str(), "transient failure, retrying batch");
        let (outage, what) = self.outage_of(&err);
        outage.failed(&format_args!("{what}: {err}"));
        let until = Instant::now() + delay;
        self.poll_paused(|| Instant::now() >= until, Some(shutdown));
        if shutdown.is_cancelled() {
            return Err(PipelineError::ShutDown);
        }
        Ok(())
    }
}
