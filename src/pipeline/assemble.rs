//! Assembling batches from the consumer: poll, keep what continues each partition's
//! position, decode.
//!
//! Invariant: a batch's range of a partition starts exactly where the partition's
//! position stands (the end of the batch in flight, else the stored offset) under the
//! epoch of this worker's claim. Records of another epoch (a stale delivery after a
//! re-claim) and records of a partition marked stale (its row moved under it) never
//! enter a batch, and nothing is dropped between two batches of one partition: a
//! partition loses records only by becoming stale, and comes back from its stored row.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tracing::Span;

use super::Pipeline;
use crate::kafka::{self, TopicPartition};
use crate::record::Record;
use crate::store::{Batch, PartitionRange};
use crate::telemetry::spans;

impl Pipeline {
    /// Polls until the batch is full or `batch.max_wait_ms` has passed; `None` when no
    /// record came. The batch's span starts with its first record: the wait for one is
    /// idle time, not the batch's.
    pub(super) fn collect(&mut self) -> Option<(Span, Vec<(i64, Record)>)> {
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
    pub(super) fn poll_one(&mut self, timeout: Duration) -> Option<(i64, Record)> {
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
            Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset)) => {
                // librdkafka does not say which partition: the loop checks them all.
                tracing::warn!(
                    "a fetch position is outside the broker's log; checking every partition's watermarks"
                );
                self.range_check = Some((Instant::now(), None));
                None
            }
            Err(e) => {
                // librdkafka recovers from broker errors by itself; they are reported here.
                tracing::warn!(error = %e, "Kafka consumer error");
                None
            }
        }
    }

    /// Keeps, per partition, records of the current claim that continue its position
    /// (see the invariant above), and decodes. A gap the partition skipped under
    /// `kafka.on_data_loss: skip` goes with its next range, to be recorded in its
    /// transaction.
    pub(super) fn build(&self, collected: Vec<(i64, Record)>) -> Batch {
        let mut assignments = self.assignments.lock();
        let mut ranges: Vec<PartitionRange> = Vec::new();
        let mut index: HashMap<TopicPartition, usize> = HashMap::new();
        let mut records = Vec::with_capacity(collected.len());
        for (epoch, record) in collected {
            let tp = (record.topic.clone(), record.partition);
            let Some(state) = assignments
                .get_mut(&tp)
                .filter(|s| s.epoch == epoch && !s.stale)
            else {
                continue;
            };
            match index.get(&tp) {
                Some(&i) => {
                    if record.offset < ranges[i].end {
                        continue;
                    }
                    ranges[i].end = record.offset + 1;
                }
                None => {
                    let position = self
                        .in_flight
                        .iter()
                        .flat_map(|f| &f.ranges)
                        .find(|r| r.topic == tp.0 && r.partition == tp.1 && r.epoch == state.epoch)
                        .map_or(state.next_offset, |r| r.end);
                    if record.offset < position {
                        continue;
                    }
                    if record.offset > position {
                        // Within the broker's log (a position outside it is an error,
                        // see `poll_one`): compacted records or transaction markers.
                        tracing::debug!(topic = %tp.0, partition = tp.1, from = position, to = record.offset,
                            "offsets without records (compaction or transaction markers)");
                    }
                    index.insert(tp.clone(), ranges.len());
                    ranges.push(PartitionRange {
                        topic: tp.0,
                        partition: tp.1,
                        epoch: state.epoch,
                        start: position,
                        end: record.offset + 1,
                        gap: state.gap.take(),
                    });
                }
            }
            records.push(record);
        }
        drop(assignments);
        Batch::decode(records, self.store.routes(), ranges)
    }

    /// The same batch without its ranges (and their records) of the fenced claims: a
    /// range of the same partition under a newer claim stays.
    pub(super) fn without(&self, batch: Batch, fenced: &[PartitionRange]) -> Batch {
        let gone = |r: &PartitionRange| {
            fenced
                .iter()
                .any(|f| f.topic == r.topic && f.partition == r.partition && f.epoch == r.epoch)
        };
        let (dropped, ranges): (Vec<PartitionRange>, Vec<PartitionRange>) =
            batch.ranges.into_iter().partition(gone);
        let records = batch
            .records
            .into_iter()
            .filter(|r| {
                !dropped
                    .iter()
                    .any(|d| d.topic == r.topic && d.partition == r.partition)
            })
            .collect();
        Batch::decode(records, self.store.routes(), ranges)
    }
}
