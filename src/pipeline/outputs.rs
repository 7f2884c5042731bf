//! Side outputs of committed batches: counters and gauges, and the advisory mirror of
//! offsets to Kafka.
//!
//! Invariant: positions advance only by what committed (`committed` moves each
//! partition past its batch's range); Kafka's mirrored offsets are never read, and the
//! gauges show what Postgres holds.

use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use tracing::Span;

use super::Pipeline;
use crate::decode::ReasonCode;
use crate::kafka::TopicPartition;
use crate::store::{Batch, Isolation};
use crate::telemetry::metrics::{PartitionLabel, ReasonLabel};
use crate::telemetry::spans;

/// How often committed offsets are mirrored to Kafka at most.
const MIRROR_INTERVAL: Duration = Duration::from_secs(1);

impl Pipeline {
    /// Counts a committed batch (in the stats, the metrics and its `span`) and moves its
    /// partitions' positions. `elapsed` is its commit's latency.
    pub(super) fn committed(
        &mut self,
        batch: &Batch,
        span: &Span,
        elapsed: Duration,
        (rows, dead_letters): (u64, u64),
        isolation: Option<Isolation>,
    ) {
        // A commit that went through answers for reads too.
        self.observers.outages.commits.recovered();
        self.observers.outages.postgres.recovered();
        self.stats.batches += 1;
        self.stats.rows += rows;
        self.stats.dead_letters += dead_letters;
        self.stats.commit_latency.record(elapsed);
        spans::committed(span, rows, dead_letters);
        let metrics = &self.observers.metrics;
        metrics.commit_duration.observe(elapsed.as_secs_f64());
        if let Some(isolation) = isolation {
            metrics
                .isolation_duration
                .observe(isolation.elapsed.as_secs_f64());
            metrics
                .rows_without_partition
                .inc_by(isolation.without_partition);
        }
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
                    state.next_offset = r.end;
                }
                if let Some(gap) = &r.gap {
                    metrics.offset_gaps.inc();
                    metrics
                        .skipped_offsets
                        .inc_by((gap.to - gap.from).unsigned_abs());
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
    pub(super) fn mirror_offsets(&mut self) {
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

    /// Each owned partition with its next offset and, once librdkafka's statistics gave
    /// the partition's end, its lag.
    pub(super) fn stored_lags(&self) -> Vec<(TopicPartition, i64, Option<i64>)> {
        let marks = self
            .observers
            .high_watermarks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.assignments
            .lock()
            .iter()
            .map(|(tp, state)| {
                let next = state.next_offset;
                (tp.clone(), next, marks.get(tp).map(|high| (high - next).max(0)))
            })
            .collect()
    }

    /// Sets `next_offset` and `lag` of every owned partition; retracts the others.
    pub(super) fn export_partition_gauges(&mut self) {
        let metrics = &self.observers.metrics;
        let mut exported = Vec::new();
        for ((topic, partition), next, lag) in self.stored_lags() {
            let label = PartitionLabel {
                topic,
                partition: i64::from(partition),
            };
            metrics.next_offset.get_or_create(&label).set(next);
            if let Some(lag) = lag {
                metrics.lag.get_or_create(&label).set(lag);
            }
            exported.push(label);
        }
        for gone in self.exported.iter().filter(|l| !exported.contains(l)) {
            metrics.next_offset.remove(gone);
            metrics.lag.remove(gone);
        }
        self.exported = exported;
    }
}
