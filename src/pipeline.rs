//! The loop: poll a batch, decode it, commit it. [`Pipeline::step`] does one cycle so
//! tests can drive it; [`run`] is that step in a loop with shutdown.
//!
//! A batch is retried as a whole on transient failures while its partitions are paused
//! and the consumer keeps polling (so the group does not evict the worker). Partitions a
//! commit finds fenced are dropped from the batch and re-positioned from Postgres.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use crate::config::Config;
use crate::decode::ReasonCode;
use crate::kafka::{self, Assignments, IngestConsumer, Observers, TopicPartition};
use crate::record::Record;
use crate::retry::{self, ErrorClass};
use crate::store::{Batch, CommitOutcome, PartitionRange, Store, StoreError, StoredOffset};
use crate::telemetry::http::{self, Endpoints};
use crate::telemetry::metrics::{ClassLabel, PartitionLabel, ReasonLabel};
use crate::telemetry::spans;

/// How often committed offsets are mirrored to Kafka at most.
const MIRROR_INTERVAL: Duration = Duration::from_secs(1);

/// How often an idle worker looks for stored offsets moved under it (a rewind): a busy
/// one finds out at its next commit.
const IDLE_POSITION_CHECK: Duration = Duration::from_secs(1);

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
    /// The consumer's context gave up: a claim that kept failing, or brokers that
    /// refuse this worker's certificate or credentials.
    #[error("{0}")]
    Consumer(String),
    #[error("shutdown requested while a batch was being retried; nothing of it was committed")]
    ShutDown,
    #[error("cannot serve /metrics on {addr} (run.metrics_addr, --metrics-addr): {source}")]
    Serve {
        addr: String,
        source: std::io::Error,
    },
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// No records arrived within `batch.max_wait_ms`.
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

/// Counters of a pipeline's life, for reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub batches: u64,
    pub rows: u64,
    pub dead_letters: u64,
    /// Transient failures retried (commits and re-reads).
    pub retries: u64,
    /// Partitions found fenced at commit.
    pub fenced: u64,
    /// Commits whose outcome had to be read back from the offset rows.
    pub ambiguous_commits: u64,
    /// Durations of recent successful commits.
    pub commit_latency: Latencies,
}

/// The most recent commit durations, for percentiles; bounded so a long-running worker
/// does not grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latencies(VecDeque<Duration>);

impl Latencies {
    const CAPACITY: usize = 4096;

    fn record(&mut self, d: Duration) {
        if self.0.len() == Self::CAPACITY {
            self.0.pop_front();
        }
        self.0.push_back(d);
    }

    /// The `p`-th percentile (0..=100) of the recorded durations.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let mut sorted: Vec<Duration> = self.0.iter().copied().collect();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
    }
}

/// A batch committing on its own task while the next one is polled and decoded.
struct InFlight {
    /// The batch's offset advances, which the next batch continues from.
    ranges: Vec<PartitionRange>,
    /// The batch's span, ended when the commit is settled.
    span: Span,
    task: JoinHandle<(Batch, Result<CommitOutcome, StoreError>, Duration)>,
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
    /// Records that arrived while partitions were paused, tagged with the epoch they
    /// arrived under; consumed before polling again.
    pending: VecDeque<(i64, Record)>,
    /// At most one batch committing.
    in_flight: Option<InFlight>,
    observers: Observers,
    /// Partitions whose gauges are exported, to retract them when the partition goes.
    exported: Vec<PartitionLabel>,
    /// Offsets committed to Postgres but not yet mirrored to Kafka, and when the last
    /// mirror was sent: mirroring once per second keeps commit requests from piling up
    /// behind a rebalance.
    unmirrored: HashMap<TopicPartition, i64>,
    last_mirror: Instant,
    last_position_check: Instant,
    stats: Stats,
    /// Spans are exported: batches get links and attributes.
    traced: bool,
}

impl Pipeline {
    /// Connects to Postgres (with startup retries), then joins the consumer group.
    pub async fn connect(config: Config) -> Result<Self, PipelineError> {
        let store = Store::connect(&config).await?;
        Self::with_store(config, store)
    }

    /// Joins the consumer group using an existing store.
    pub fn with_store(config: Config, store: Store) -> Result<Self, PipelineError> {
        let assignments = Assignments::default();
        let owner = kafka::worker_id();
        let observers = Observers::default();
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
            topics = ?store.routes().subscription(),
            database = %config.database_url_masked(),
            "worker started"
        );
        Ok(Self {
            traced: config.otel.exporter_otlp_endpoint.is_some(),
            tables: store.routes().tables(),
            config,
            store,
            consumer: Some(consumer),
            owner,
            assignments,
            pending: VecDeque::new(),
            in_flight: None,
            observers,
            exported: Vec::new(),
            unmirrored: HashMap::new(),
            last_mirror: Instant::now(),
            last_position_check: Instant::now(),
            stats: Stats::default(),
        })
    }

    /// Counters so far.
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

    /// One cycle: poll and decode a batch while the previous batch commits, then settle
    /// that commit (retrying transient failures) and start committing the new batch.
    ///
    /// Commits stay strictly sequential (a batch continues from the offsets its
    /// predecessor commits); only polling and decoding overlap a commit. The outcome
    /// returned is that of the batch settled in this step.
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
        let mut next = collected.map(|(span, entries)| {
            let batch =
                span.in_scope(|| tracing::info_span!("decode").in_scope(|| self.build(entries)));
            if self.traced {
                spans::describe(&span, &batch, &self.config.kafka.group, &self.tables);
            }
            (span, batch)
        });
        let (poll_decode, waiting) = (polling.elapsed(), Instant::now());
        let outcome = match self.in_flight.take() {
            Some(InFlight { span, task, .. }) => {
                let settled = match task.await {
                    Ok((batch, result, elapsed)) => {
                        self.settle(batch, result, elapsed, shutdown)
                            .instrument(span.clone())
                            .await
                    }
                    Err(e) => Err(StoreError::Fatal(format!("the commit task failed: {e}")).into()),
                };
                let (outcome, fenced) = settled.inspect_err(|e| spans::failed(&span, e))?;
                if !fenced.is_empty() {
                    // The next batch continued from offsets that did not commit.
                    next = next.map(|(span, b)| (span, self.without(b, &fenced)));
                }
                outcome
            }
            None => StepOutcome::Idle,
        };
        tracing::debug!(
            poll_decode_ms = poll_decode.as_secs_f64() * 1e3,
            commit_wait_ms = waiting.elapsed().as_secs_f64() * 1e3,
            "step timing"
        );
        if let Some((span, batch)) = next.filter(|(_, b)| !b.ranges.is_empty()) {
            let store = self.store.clone();
            let ranges = batch.ranges.clone();
            let commit = span.in_scope(|| spans::commit(&self.tables));
            let task = tokio::spawn(
                async move {
                    let started = Instant::now();
                    let result = store.commit(&batch).await;
                    (batch, result, started.elapsed())
                }
                .instrument(commit),
            );
            self.in_flight = Some(InFlight { ranges, span, task });
        }
        if outcome == StepOutcome::Idle
            && self.in_flight.is_none()
            && self.last_position_check.elapsed() >= IDLE_POSITION_CHECK
        {
            self.last_position_check = Instant::now();
            if let Err(e) = self.follow_moved_offsets().await {
                tracing::warn!(error = %e, "checking stored offsets failed; checking again later");
            }
        }
        self.observers.health.stepped();
        self.export_partition_gauges();
        Ok(outcome)
    }

    /// Re-positions owned partitions whose stored row no longer says what this worker
    /// holds: an operator moved the offset, or another worker took the partition.
    async fn follow_moved_offsets(&mut self) -> Result<(), StoreError> {
        let owned: Vec<TopicPartition> = self.assignments.lock().keys().cloned().collect();
        if owned.is_empty() {
            return Ok(());
        }
        let stored = self.store.stored_offsets(&owned).await?;
        let moved: Vec<StoredOffset> = {
            let assignments = self.assignments.lock();
            stored
                .into_iter()
                .filter(|row| {
                    assignments
                        .get(&(row.topic.clone(), row.partition))
                        .is_some_and(|s| s.epoch != row.epoch || s.next_offset != row.next_offset)
                })
                .collect()
        };
        self.reposition(moved);
        Ok(())
    }

    /// Sets `next_offset` and `lag` of every owned partition; retracts the others.
    fn export_partition_gauges(&mut self) {
        let metrics = &self.observers.metrics;
        let marks = self
            .observers
            .high_watermarks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut exported = Vec::new();
        for ((topic, partition), state) in self.assignments.lock().iter() {
            let label = PartitionLabel {
                topic: topic.clone(),
                partition: i64::from(*partition),
            };
            let next = state.next_offset.unwrap_or(0);
            metrics.next_offset.get_or_create(&label).set(next);
            if let Some(high) = marks.get(&(topic.clone(), *partition)) {
                metrics.lag.get_or_create(&label).set((high - next).max(0));
            }
            exported.push(label);
        }
        for gone in self.exported.iter().filter(|l| !exported.contains(l)) {
            metrics.next_offset.remove(gone);
            metrics.lag.remove(gone);
        }
        self.exported = exported;
    }

    /// Takes a commit's first result to its end: retries transient failures with
    /// backoff, reads ambiguous commits back, drops fenced partitions. Returns what
    /// happened and every range found fenced on the way.
    async fn settle(
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
                Ok(CommitOutcome::Committed { rows, dead_letters }) => {
                    self.stats.commit_latency.record(elapsed);
                    self.observers
                        .metrics
                        .commit_duration
                        .observe(elapsed.as_secs_f64());
                    self.committed(&batch, rows, dead_letters);
                    spans::committed(&Span::current(), rows, dead_letters);
                    let outcome = StepOutcome::Committed {
                        records: batch.records.len(),
                        rows,
                        dead_letters,
                    };
                    return Ok((outcome, all_fenced));
                }
                Ok(CommitOutcome::Fenced(fenced)) => {
                    self.stats.fenced += fenced.len() as u64;
                    self.observers
                        .metrics
                        .fencing_conflicts
                        .inc_by(fenced.len() as u64);
                    let partitions: Vec<TopicPartition> = fenced
                        .iter()
                        .map(|r| (r.topic.clone(), r.partition))
                        .collect();
                    match self.store.stored_offsets(&partitions).await {
                        Ok(stored) => self.reposition(stored),
                        Err(e) => self.wait_or_fail(e, &mut delays, shutdown).await?,
                    }
                    batch = self.without(batch, &fenced);
                    all_fenced.extend(fenced);
                    if batch.ranges.is_empty() {
                        let partitions = all_fenced.len();
                        return Ok((StepOutcome::Fenced { partitions }, all_fenced));
                    }
                }
                Err(e) => self.wait_or_fail(e, &mut delays, shutdown).await?,
            }
            let started = Instant::now();
            let commit = spans::commit(&self.tables);
            result = self.store.commit(&batch).instrument(commit).await;
            elapsed = started.elapsed();
        }
    }

    /// Polls until the batch is full or `batch.max_wait_ms` has passed; `None` when no
    /// record came. The batch's span starts with its first record: the wait for one is
    /// idle time, not the batch's.
    fn collect(&mut self) -> Option<(Span, Vec<(i64, Record)>)> {
        let deadline = Instant::now() + self.config.batch_wait();
        let first = self.next_entry(deadline)?;
        let span = spans::batch(self.traced);
        let poll = tracing::info_span!(parent: &span, "poll").entered();
        let (max_records, max_bytes) = (self.config.batch.max_records, self.config.batch.max_bytes);
        let mut bytes = first.1.size();
        let mut collected = vec![first];
        while collected.len() < max_records && bytes < max_bytes {
            let Some(entry) = self.next_entry(deadline) else {
                break;
            };
            bytes += entry.1.size();
            collected.push(entry);
        }
        drop(poll);
        if self.traced {
            for (_, record) in &collected {
                spans::link(&span, record);
            }
        }
        Some((span, collected))
    }

    /// The next record, held back or polled, unless `deadline` passes first.
    fn next_entry(&mut self, deadline: Instant) -> Option<(i64, Record)> {
        if let Some(entry) = self.pending.pop_front() {
            return Some(entry);
        }
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if let Some(entry) = self.poll_one(remaining) {
                return Some(entry);
            }
            if remaining.is_zero() {
                return None;
            }
        }
    }

    /// One poll; a record comes back tagged with the epoch of its partition's claim.
    fn poll_one(&self, timeout: Duration) -> Option<(i64, Record)> {
        match self.consumer().poll(timeout)? {
            Ok(message) => {
                let record = kafka::to_record(&message);
                let epoch = self
                    .assignments
                    .lock()
                    .get(&(record.topic.clone(), record.partition))
                    .map_or(-1, |s| s.epoch);
                Some((epoch, record))
            }
            Err(e) => {
                // librdkafka recovers from broker errors by itself; they are reported here.
                tracing::warn!(error = %e, "Kafka consumer error");
                None
            }
        }
    }

    /// Keeps, per partition, records of the current claim that continue its position
    /// (stale deliveries after a re-claim or a seek are dropped), and decodes. A
    /// partition's position is where the batch in flight ends, else its stored offset.
    fn build(&self, collected: Vec<(i64, Record)>) -> Batch {
        let assignments = self.assignments.lock();
        let mut ranges: Vec<PartitionRange> = Vec::new();
        let mut index: HashMap<TopicPartition, usize> = HashMap::new();
        let mut records = Vec::with_capacity(collected.len());
        for (epoch, record) in collected {
            let tp = (record.topic.clone(), record.partition);
            let Some(state) = assignments.get(&tp).filter(|s| s.epoch == epoch) else {
                continue;
            };
            let position = self
                .in_flight
                .iter()
                .flat_map(|f| &f.ranges)
                .find(|r| r.topic == tp.0 && r.partition == tp.1 && r.epoch == state.epoch)
                .map_or(state.next_offset, |r| Some(r.end));
            match index.get(&tp) {
                Some(&i) => {
                    if record.offset < ranges[i].end {
                        continue;
                    }
                    ranges[i].end = record.offset + 1;
                }
                None => {
                    if position.is_some_and(|n| record.offset < n) {
                        continue;
                    }
                    match position {
                        Some(n) if record.offset > n => {
                            tracing::warn!(topic = %tp.0, partition = tp.1, from = n, to = record.offset,
                                "offsets skipped by the broker (retention or compaction)");
                        }
                        None if record.offset > 0 => {
                            tracing::warn!(topic = %tp.0, partition = tp.1, offset = record.offset,
                                "no stored offset: starting at the oldest record the broker has; \
                                 earlier offsets were deleted (retention) or never existed");
                        }
                        _ => {}
                    }
                    index.insert(tp.clone(), ranges.len());
                    ranges.push(PartitionRange {
                        topic: tp.0,
                        partition: tp.1,
                        epoch: state.epoch,
                        start: position,
                        end: record.offset + 1,
                    });
                }
            }
            records.push(record);
        }
        drop(assignments);
        Batch::decode(records, self.store.routes(), ranges)
    }

    /// The same batch without the given partitions.
    fn without(&self, batch: Batch, fenced: &[PartitionRange]) -> Batch {
        let gone = |topic: &str, partition: i32| {
            fenced
                .iter()
                .any(|f| f.topic == topic && f.partition == partition)
        };
        let records = batch
            .records
            .into_iter()
            .filter(|r| !gone(&r.topic, r.partition))
            .collect();
        let ranges = batch
            .ranges
            .into_iter()
            .filter(|r| !gone(&r.topic, r.partition))
            .collect();
        Batch::decode(records, self.store.routes(), ranges)
    }

    fn committed(&mut self, batch: &Batch, rows: u64, dead_letters: u64) {
        self.stats.batches += 1;
        self.stats.rows += rows;
        self.stats.dead_letters += dead_letters;
        let metrics = &self.observers.metrics;
        metrics.records_consumed.inc_by(batch.records.len() as u64);
        metrics.rows_written.inc_by(rows);
        for (_, rejection) in &batch.rejects {
            let reason = ReasonLabel {
                reason_code: rejection.code.as_str().to_owned(),
            };
            metrics.dead_letters.get_or_create(&reason).inc();
        }
        // Whatever else was dead-lettered, Postgres rejected inside the commit.
        let rejected_by_db = dead_letters.saturating_sub(batch.rejects.len() as u64);
        if rejected_by_db > 0 {
            let reason = ReasonLabel {
                reason_code: ReasonCode::DbRejected.as_str().to_owned(),
            };
            metrics
                .dead_letters
                .get_or_create(&reason)
                .inc_by(rejected_by_db);
        }
        {
            let mut assignments = self.assignments.lock();
            for r in &batch.ranges {
                let tp = (r.topic.clone(), r.partition);
                if let Some(state) = assignments.get_mut(&tp).filter(|s| s.epoch == r.epoch) {
                    state.next_offset = Some(r.end);
                }
                self.unmirrored.insert(tp, r.end);
            }
        }
        tracing::debug!(
            records = batch.records.len(),
            rows,
            dead_letters,
            partitions = batch.ranges.len(),
            "batch committed"
        );
        if self.last_mirror.elapsed() >= MIRROR_INTERVAL {
            self.mirror_offsets();
        }
    }

    /// Sends the offsets committed since the last mirror to Kafka. Advisory only, for
    /// lag tools: positions are never read back from Kafka.
    fn mirror_offsets(&mut self) {
        self.last_mirror = Instant::now();
        if !self.config.kafka.mirror_offsets || self.unmirrored.is_empty() {
            return;
        }
        let mut mirror = TopicPartitionList::new();
        for ((topic, partition), end) in self.unmirrored.drain() {
            let _ = mirror.add_partition_offset(&topic, partition, Offset::Offset(end));
        }
        if let Err(e) = self.consumer().commit(&mirror, CommitMode::Async) {
            tracing::debug!(error = %e, "mirroring offsets to Kafka failed");
        }
    }

    /// Reads the offset rows after a COMMIT whose outcome is unknown, and says what
    /// happened: committed, fenced, or not applied (`None`).
    async fn resolve_ambiguous(&self, batch: &Batch) -> Result<Option<CommitOutcome>, StoreError> {
        let partitions: Vec<TopicPartition> = batch
            .ranges
            .iter()
            .map(|r| (r.topic.clone(), r.partition))
            .collect();
        let stored = self.store.stored_offsets(&partitions).await?;
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
            }));
        }
        let fenced: Vec<PartitionRange> = batch
            .ranges
            .iter()
            .filter(|r| !find(r).is_some_and(|s| s.epoch == r.epoch && s.next_offset == r.start))
            .cloned()
            .collect();
        Ok((!fenced.is_empty()).then_some(CommitOutcome::Fenced(fenced)))
    }

    /// Follows the stored rows of partitions found moved: where this worker still holds
    /// the claim (an operator moved the offset), continue from the stored offset;
    /// otherwise forget the partition until the group hands it back.
    fn reposition(&mut self, stored: Vec<StoredOffset>) {
        let partitions: Vec<TopicPartition> = stored
            .iter()
            .map(|row| (row.topic.clone(), row.partition))
            .collect();
        let mut seeks = Vec::new();
        {
            let mut assignments = self.assignments.lock();
            for row in stored {
                let tp = (row.topic.clone(), row.partition);
                match assignments.get_mut(&tp) {
                    Some(state) if state.epoch == row.epoch => {
                        tracing::warn!(topic = %row.topic, partition = row.partition, next_offset = ?row.next_offset,
                            "stored offset moved under this worker; continuing from it");
                        state.next_offset = row.next_offset;
                        seeks.push((tp, row.next_offset));
                    }
                    Some(_) => {
                        tracing::warn!(topic = %row.topic, partition = row.partition, owner = %row.owner,
                            "partition fenced: claimed by another worker");
                        assignments.remove(&tp);
                    }
                    None => {}
                }
            }
        }
        self.pending.retain(|(_, r)| {
            !partitions
                .iter()
                .any(|(t, p)| *t == r.topic && *p == r.partition)
        });
        for ((topic, partition), next) in seeks {
            let offset = next.map_or(Offset::Beginning, Offset::Offset);
            let consumer = self.consumer();
            let result = tokio::task::block_in_place(|| {
                consumer.seek(
                    &topic,
                    partition,
                    offset,
                    Timeout::After(Duration::from_secs(5)),
                )
            });
            if let Err(e) = result {
                tracing::warn!(error = %e, topic = %topic, partition, "seek after fencing failed");
            }
        }
    }

    /// Fails on a non-transient error; otherwise waits one backoff delay with the
    /// assigned partitions paused, polling so the group keeps this worker.
    async fn wait_or_fail(
        &mut self,
        err: StoreError,
        delays: &mut impl Iterator<Item = Duration>,
        shutdown: &CancellationToken,
    ) -> Result<(), PipelineError> {
        if err.class() != ErrorClass::Transient {
            return Err(err.into());
        }
        let delay = delays
            .next()
            .unwrap_or(Duration::from_millis(self.config.retry.max_delay_ms));
        self.stats.retries += 1;
        let class = ClassLabel {
            class: err.class().as_str().to_owned(),
        };
        self.observers.metrics.retries.get_or_create(&class).inc();
        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, class = err.class().as_str(), "transient failure, retrying batch");
        let until = Instant::now() + delay;
        tokio::task::block_in_place(|| {
            while Instant::now() < until && !shutdown.is_cancelled() {
                let consumer = self.consumer();
                if let Ok(assigned) = consumer.assignment() {
                    // Re-paused each turn: a rebalance may have added partitions.
                    let _ = consumer.pause(&assigned);
                }
                let slice = until
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(200));
                if let Some(entry) = self.poll_one(slice) {
                    self.pending.push_back(entry);
                }
            }
            let consumer = self.consumer();
            if let Ok(assigned) = consumer.assignment() {
                let _ = consumer.resume(&assigned);
            }
        });
        if shutdown.is_cancelled() {
            return Err(PipelineError::ShutDown);
        }
        Ok(())
    }

    /// Lets the batch in flight finish its commit attempt (without retrying: whatever
    /// did not commit is read again by the partition's next owner), mirrors the last
    /// offsets, then leaves the group. Returns the final counters.
    pub async fn close(mut self) -> Stats {
        if let Some(in_flight) = self.in_flight.take() {
            match in_flight.task.await {
                Ok((batch, Ok(CommitOutcome::Committed { rows, dead_letters }), elapsed)) => {
                    self.stats.commit_latency.record(elapsed);
                    let _inside = in_flight.span.enter();
                    self.committed(&batch, rows, dead_letters);
                    spans::committed(&in_flight.span, rows, dead_letters);
                }
                Ok((_, other, _)) => {
                    tracing::warn!(result = ?other, "batch in flight at shutdown did not commit; it will be read again");
                }
                Err(e) => tracing::error!(error = %e, "the commit task failed"),
            }
        }
        self.mirror_offsets();
        if let Some(consumer) = self.consumer.take() {
            tokio::task::block_in_place(move || {
                consumer.unsubscribe();
                drop(consumer);
            });
        }
        std::mem::take(&mut self.stats)
    }
}

/// Runs the loop until `shutdown` is cancelled or `cycles` steps have run.
pub async fn run(
    config: Config,
    cycles: Option<u64>,
    shutdown: CancellationToken,
) -> Result<Stats, PipelineError> {
    let sleep = Duration::from_secs_f64(config.run.sleep_secs);
    let metrics_addr = config.run.metrics_addr.clone();
    let stuck_after = config.max_poll_interval() * 2;
    let mut pipeline = Pipeline::connect(config).await?;
    let stop_http = CancellationToken::new();
    let server = match metrics_addr {
        Some(addr) => {
            let endpoints = Endpoints {
                metrics: pipeline.observers.metrics.clone(),
                health: pipeline.observers.health.clone(),
                pool: pipeline.store.pool().clone(),
                stuck_after,
            };
            let (_, server) = http::serve(&addr, endpoints, stop_http.clone())
                .await
                .map_err(|source| PipelineError::Serve { addr, source })?;
            Some(server)
        }
        None => None,
    };
    let mut done = 0u64;
    let result = loop {
        if shutdown.is_cancelled() || cycles.is_some_and(|c| done >= c) {
            break Ok(());
        }
        done += 1;
        match pipeline.step(&shutdown).await {
            Ok(StepOutcome::Idle) if !sleep.is_zero() => {
                tokio::select! {
                    () = tokio::time::sleep(sleep) => {}
                    () = shutdown.cancelled() => {}
                }
            }
            Ok(_) => {}
            Err(PipelineError::ShutDown) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let stats = pipeline.close().await;
    stop_http.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    let ms = |p| {
        stats
            .commit_latency
            .percentile(p)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    tracing::info!(
        batches = stats.batches,
        rows = stats.rows,
        dead_letters = stats.dead_letters,
        retries = stats.retries,
        fenced = stats.fenced,
        ambiguous_commits = stats.ambiguous_commits,
        commit_p50_ms = ms(50.0),
        commit_p99_ms = ms(99.0),
        "worker stopped"
    );
    result.map(|()| stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_pick_the_ranked_sample() {
        let mut l = Latencies::default();
        assert_eq!(l.percentile(50.0), None);
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.percentile(50.0), Some(Duration::from_millis(50)));
        assert_eq!(l.percentile(99.0), Some(Duration::from_millis(99)));
        assert_eq!(l.percentile(100.0), Some(Duration::from_millis(100)));
    }
}
