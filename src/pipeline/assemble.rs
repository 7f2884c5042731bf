//! Assembling batches from the consumer: poll, keep what continues each partition's
//! position, decode.
//!
//! Invariant: a batch's range of a partition starts exactly where the partition's
//! position stands (the end of the batch in flight, else the stored offset) under the
//! epoch of this worker's claim. Records polled under another claim (a stale delivery
//! after a re-claim) and records of a partition marked stale (its row moved under it) never
//! enter a batch, and nothing is dropped between two batches of one partition: a
//! partition loses records only by becoming stale, and comes back from its stored row.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tracing::Span;

use super::Pipeline;
use crate::kafka::{self, PartitionState, TopicPartition};
use crate::record::Record;
use crate::store::{Batch, PartitionRange};
use crate::telemetry::spans;

/// The lane of a partition among `lanes`: a topic's partitions go round the lanes in
/// order, so they spread evenly; each topic starts at a lane of its own.
fn lane_of(topic: &str, partition: i32, lanes: usize) -> usize {
    // FNV-1a: the same lane in every run and build, unlike the std hasher's.
    let start = topic.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let partition = u64::try_from(partition).unwrap_or_default();
    (start.wrapping_add(partition) % lanes as u64) as usize
}

/// The records polled for one lane's batch, under the batch's span.
pub(super) struct Collected {
    pub(super) span: Span,
    pub(super) entries: Vec<(u64, Record)>,
    /// Payload bytes of `entries`.
    bytes: usize,
}

impl Collected {
    fn full(&self, max_records: usize, max_bytes: usize) -> bool {
        self.entries.len() >= max_records || self.bytes >= max_bytes
    }
}

impl Pipeline {
    /// Polls each lane's next batch; empty when no record came. Until a lane's batch is
    /// full it waits for records up to `batch.max_wait_ms`; after that it takes only
    /// records ready at once, until every lane is full or it holds as much as all lanes
    /// may: a backlog fills every lane's batch, while a full batch of a quiet stream
    /// does not wait. Records of a lane already full wait in `pending` for the next
    /// step. Each lane's batch gets its own span, started with its first record: the
    /// wait for one is idle time, not the batch's.
    pub(super) fn collect(&mut self) -> Vec<Collected> {
        let deadline = Instant::now() + self.config.batch_wait();
        let (max_records, max_bytes) = (self.config.batch.max_records, self.config.batch.max_bytes);
        let (most_records, most_bytes) = (max_records * self.lanes, max_bytes * self.lanes);
        let mut lanes: Vec<Option<Collected>> = (0..self.lanes).map(|_| None).collect();
        // Each batch's `poll` child, open until polling ends.
        let mut polls = Vec::new();
        let mut held = Vec::new();
        let (mut records, mut bytes, mut full) = (0, 0, 0);
        loop {
            let until = if full == 0 { deadline } else { Instant::now() };
            let Some(entry) = self.next_entry(until) else {
                break;
            };
            records += 1;
            bytes += entry.1.size();
            let lane = lanes[lane_of(&entry.1.topic, entry.1.partition, self.lanes)]
                .get_or_insert_with(|| {
                    let span = spans::batch(self.traced);
                    polls.push(tracing::info_span!(parent: &span, "poll"));
                    Collected {
                        span,
                        entries: Vec::new(),
                        bytes: 0,
                    }
                });
            if lane.full(max_records, max_bytes) {
                held.push(entry);
            } else {
                lane.bytes += entry.1.size();
                lane.entries.push(entry);
                full += usize::from(lane.full(max_records, max_bytes));
            }
            if full == self.lanes || records >= most_records || bytes >= most_bytes {
                break;
            }
        }
        drop(polls);
        // Ahead of what is still pending: they came before it.
        for entry in held.into_iter().rev() {
            self.pending.push_front(entry);
        }
        let collected: Vec<Collected> = lanes.into_iter().flatten().collect();
        if self.traced {
            for lane in &collected {
                for (_, record) in &lane.entries {
                    spans::link(&lane.span, record);
                }
            }
        }
        collected
    }

    /// The next record, held back or polled, unless `deadline` passes first.
    fn next_entry(&mut self, deadline: Instant) -> Option<(u64, Record)> {
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

    /// One poll; a record comes back tagged with its partition's claim (0: none).
    pub(super) fn poll_one(&mut self, timeout: Duration) -> Option<(u64, Record)> {
        let polled = self
            .consumer()
            .poll(timeout)
            .map(|p| p.map(|message| kafka::to_record(&message)));
        self.last_poll = Instant::now();
        match polled? {
            Ok(record) => {
                let claim = self
                    .assignments
                    .lock()
                    .get(&(record.topic.clone(), record.partition))
                    .map_or(0, |s| s.claim);
                Some((claim, record))
            }
            Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset)) => {
                // librdkafka does not say which partition: the loop checks them all.
                tracing::warn!(
                    "a fetch position is outside the broker's log; checking every partition's watermarks"
                );
                self.range_check = Some((Instant::now(), None));
                None
            }
            // The context's error callback has counted it toward the outage already.
            Err(e) if e.rdkafka_error_code().is_some_and(kafka::unreachable) => None,
            Err(e) => {
                // librdkafka recovers from broker errors by itself; they are reported here.
                tracing::warn!(error = %e, "Kafka consumer error");
                None
            }
        }
    }

    /// Keeps, per partition, records of the current claim that continue its position
    /// (see the invariant above), with the ranges they advance. A gap the partition
    /// skipped under `kafka.on_data_loss: skip` goes with its next range, to be recorded
    /// in its transaction.
    pub(super) fn keep(&self, collected: Vec<(u64, Record)>) -> (Vec<Record>, Vec<PartitionRange>) {
        let mut assignments = self.assignments.lock();
        let mut ranges: Vec<PartitionRange> = Vec::new();
        let mut index: HashMap<TopicPartition, usize> = HashMap::new();
        let mut records = Vec::with_capacity(collected.len());
        for (claim, record) in collected {
            let tp = (record.topic.clone(), record.partition);
            let Some(state) = assignments
                .get_mut(&tp)
                .filter(|s| s.claim == claim && !s.stale)
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
                    let position = self.position(&tp, state);
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
        (records, ranges)
    }

    /// Where a held partition continues: the end of its range in flight under the same
    /// claim, else its stored offset.
    pub(super) fn position(&self, tp: &TopicPartition, state: &PartitionState) -> i64 {
        self.in_flight
            .iter()
            .flat_map(|f| &f.ranges)
            .find(|r| r.topic == tp.0 && r.partition == tp.1 && r.epoch == state.epoch)
            .map_or(state.next_offset, |r| r.end)
    }

    /// The same batch without its ranges (and their records) of the fenced claims: a
    /// range of the same partition under a newer claim stays.
    pub(super) fn without(&self, batch: Batch, fenced: &[PartitionRange]) -> Batch {
        let gone = |r: &PartitionRange| fenced.iter().any(|f| f.same_claim(r));
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

#[cfg(test)]
mod tests {
    use super::lane_of;

    #[test]
    fn a_topics_partitions_spread_evenly_over_the_lanes() {
        for lanes in 1..=4 {
            for topic in ["website-metrics", "orders", ""] {
                let mut counts = vec![0; lanes];
                for partition in 0..(lanes as i32 * 3) {
                    counts[lane_of(topic, partition, lanes)] += 1;
                }
                assert_eq!(counts, vec![3; lanes], "{topic} over {lanes} lanes");
            }
        }
    }
}
