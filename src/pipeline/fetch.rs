//! Moving librdkafka's fetch positions: seeks, restarts of a fetch librdkafka stopped,
//! and the check of positions against the broker's log.
//!
//! Invariant: librdkafka fetches each held partition from where this worker continues
//! it (the end of its batch in flight, else its stored offset). A partition whose fetch
//! could not be moved is marked stale, so nothing of it enters a batch until maintenance
//! re-positions it; a position outside the broker's log is never moved silently
//! (`kafka.on_data_loss` stops the worker or records the gap).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, RebalanceProtocol};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use super::{Pipeline, PipelineError};
use crate::config::OnDataLoss;
use crate::kafka::{self, TopicPartition};
use crate::kafka::start::{self, DataLoss};

/// How long the watermark reads of one range check may take in all.
const RANGE_CHECK_LIMIT: Duration = Duration::from_secs(10);

impl Pipeline {
    /// Checks held partitions' positions (`only` these, else all) against the broker's
    /// watermarks, after librdkafka reported a fetch position outside its log: outside,
    /// it stops or skips by `kafka.on_data_loss`; inside, the partition is sought to its
    /// position again, which restarts a fetch librdkafka stopped. Partitions the broker
    /// did not answer for are checked again a second later, alone.
    pub(super) fn check_ranges(&mut self, only: Option<Vec<TopicPartition>>) -> Result<(), PipelineError> {
        let stale: Vec<TopicPartition> = {
            let assignments = self.assignments.lock();
            assignments
                .iter()
                .filter(|(_, s)| s.stale)
                .map(|(tp, _)| tp.clone())
                .collect()
        };
        let positions: Vec<(TopicPartition, i64)> = self
            .positions()
            .into_iter()
            .filter(|(tp, _)| !stale.contains(tp) && only.as_ref().is_none_or(|o| o.contains(tp)))
            .collect();
        let partitions: Vec<TopicPartition> = positions.iter().map(|(tp, _)| tp.clone()).collect();
        let marks = tokio::task::block_in_place(|| {
            start::watermarks(
                self.consumer().context().inspector(),
                &partitions,
                RANGE_CHECK_LIMIT,
            )
        });
        let unanswered: Vec<TopicPartition> = partitions
            .iter()
            .filter(|tp| !marks.contains_key(*tp))
            .cloned()
            .collect();
        if !unanswered.is_empty() {
            self.range_check = Some((Instant::now() + Duration::from_secs(1), Some(unanswered)));
        }
        let policy = self.consumer().context().on_data_loss();
        let mut seeks = Vec::new();
        for (tp, position) in positions {
            let Some(&marks) = marks.get(&tp) else {
                continue;
            };
            match start::outside(position, marks) {
                None => seeks.push((tp, position)),
                Some(_) if policy == OnDataLoss::Stop => {
                    let loss = DataLoss {
                        group: self.config.kafka.group.clone(),
                        topic: tp.0,
                        partition: tp.1,
                        stored: position,
                        low: marks.0,
                        high: marks.1,
                    };
                    return Err(PipelineError::Consumer(loss.to_string()));
                }
                Some(gap) => {
                    tracing::warn!(topic = %tp.0, partition = tp.1, from = gap.from, to = gap.to,
                        reason = gap.kind.as_str(), "offsets the broker no longer has are skipped (kafka.on_data_loss: skip)");
                    if let Some(state) = self.assignments.lock().get_mut(&tp) {
                        state.gap = Some(gap);
                    }
                    seeks.push((tp, start::fetch_past(&gap)));
                }
            }
        }
        let partitions: Vec<TopicPartition> = seeks.iter().map(|(tp, _)| tp.clone()).collect();
        self.forget_pending(&partitions);
        self.seek(&seeks);
        Ok(())
    }

    /// Drops held-back records of `partitions`: a seek delivers them again.
    pub(super) fn forget_pending(&mut self, partitions: &[TopicPartition]) {
        self.pending.retain(|(_, r)| {
            !partitions
                .iter()
                .any(|(t, p)| *t == r.topic && *p == r.partition)
        });
    }

    /// Moves librdkafka's fetch positions. A partition whose seek failed would go on
    /// from a position its state does not continue: it is marked stale, so nothing of
    /// it enters a batch until the next maintenance re-positions it. One whose fetch
    /// librdkafka stopped is assigned again instead (see [`Pipeline::restart`]).
    pub(super) fn seek(&mut self, seeks: &[(TopicPartition, i64)]) {
        if seeks.is_empty() {
            return;
        }
        let mut positions = TopicPartitionList::new();
        for ((topic, partition), offset) in seeks {
            let _ = positions.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        let consumer = self.consumer();
        let result = tokio::task::block_in_place(|| {
            consumer.seek_partitions(positions, Timeout::After(Duration::from_secs(5)))
        });
        let mut stopped = Vec::new();
        let failed: Vec<TopicPartition> = match result {
            Ok(done) => done
                .elements()
                .iter()
                .filter_map(|e| {
                    let err = e.error().err()?;
                    let tp = (e.topic().to_owned(), e.partition());
                    if err.rdkafka_error_code() == Some(RDKafkaErrorCode::State) {
                        let offset = seeks.iter().find(|(s, _)| *s == tp).map(|(_, o)| *o)?;
                        stopped.push((tp, offset));
                        return None;
                    }
                    tracing::warn!(error = %err, topic = e.topic(), partition = e.partition(), "seek failed; trying again shortly");
                    Some(tp)
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "seek failed; trying again shortly");
                seeks.iter().map(|(tp, _)| tp.clone()).collect()
            }
        };
        self.mark_stale(&failed);
        self.restart(&stopped);
    }

    /// Nothing of `partitions` enters a batch until the next maintenance re-positions
    /// them from their stored rows.
    pub(super) fn mark_stale(&self, partitions: &[TopicPartition]) {
        let mut assignments = self.assignments.lock();
        for tp in partitions {
            if let Some(state) = assignments.get_mut(tp) {
                state.stale = true;
            }
        }
    }

    /// Restarts fetching partitions librdkafka stopped (a position outside the broker's
    /// log, under `auto.offset.reset=error`), which it refuses to seek: they are
    /// assigned again at the given offsets. Under the eager protocol an assignment is
    /// replaced whole, so every held partition restarts where this worker continues it.
    pub(super) fn restart(&mut self, partitions: &[(TopicPartition, i64)]) {
        if partitions.is_empty() {
            return;
        }
        let consumer = self.consumer();
        let assigned = assigned_partitions(consumer);
        // A partition no longer assigned here is not taken back.
        let wanted: Vec<&(TopicPartition, i64)> = partitions
            .iter()
            .filter(|(tp, _)| assigned.contains(tp))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let list = |entries: &mut dyn Iterator<Item = (&TopicPartition, Offset)>| {
            let mut tpl = TopicPartitionList::new();
            for ((topic, partition), offset) in entries {
                let _ = tpl.add_partition_offset(topic, *partition, offset);
            }
            tpl
        };
        let eager = !matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let (result, restarted) = if eager {
            // A partition with a gap to skip is fetched past it, as its claim did.
            let gaps: Vec<(TopicPartition, i64)> = self
                .assignments
                .lock()
                .iter()
                .filter_map(|(tp, s)| s.gap.map(|g| (tp.clone(), start::fetch_past(&g))))
                .collect();
            let held: Vec<(TopicPartition, i64)> = self
                .positions()
                .into_iter()
                .map(|(tp, position)| {
                    let fetch = gaps
                        .iter()
                        .find(|(g, _)| *g == tp)
                        .map_or(position, |(_, f)| *f);
                    (tp, fetch)
                })
                .collect();
            let mut all = assigned.iter().map(|tp| {
                let offset = wanted
                    .iter()
                    .find(|(w, _)| w == tp)
                    .map(|(_, o)| *o)
                    .or_else(|| held.iter().find(|(h, _)| h == tp).map(|(_, o)| *o))
                    .map_or(Offset::End, Offset::Offset);
                (tp, offset)
            });
            let tpl = list(&mut all);
            let result = tokio::task::block_in_place(|| {
                consumer.assign(&tpl).and_then(|()| consumer.resume(&tpl))
            });
            (result, assigned.iter().cloned().collect())
        } else {
            let tps: Vec<TopicPartition> = wanted.iter().map(|(tp, _)| tp.clone()).collect();
            let unassign = list(&mut tps.iter().map(|tp| (tp, Offset::Invalid)));
            let assign = list(&mut wanted.iter().map(|(tp, o)| (tp, Offset::Offset(*o))));
            let result = tokio::task::block_in_place(|| {
                consumer
                    .incremental_unassign(&unassign)
                    .and_then(|()| consumer.incremental_assign(&assign))
                    .and_then(|()| consumer.resume(&assign))
            });
            (result, tps)
        };
        match result {
            Ok(()) => {
                let partitions = kafka::partition_list(wanted.iter().map(|(tp, _)| (tp.0.as_str(), tp.1)));
                tracing::info!(partitions = %partitions, "fetching restarted");
                self.forget_pending(&restarted);
            }
            Err(e) => {
                tracing::warn!(error = %e, "restarting the fetch failed; trying again shortly");
                let failed: Vec<TopicPartition> = wanted.iter().map(|(tp, _)| tp.clone()).collect();
                self.mark_stale(&failed);
            }
        }
    }

    /// Where each held partition continues: the end of the batch in flight, else its
    /// stored offset.
    pub(super) fn positions(&self) -> Vec<(TopicPartition, i64)> {
        let assignments = self.assignments.lock();
        assignments
            .iter()
            .map(|(tp, s)| (tp.clone(), self.position(tp, s)))
            .collect()
    }
}

/// The partitions librdkafka has assigned to `consumer` (none when it cannot say).
pub(super) fn assigned_partitions(consumer: &crate::kafka::IngestConsumer) -> HashSet<TopicPartition> {
    consumer
        .assignment()
        .map(|tpl| {
            tpl.elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect()
        })
        .unwrap_or_default()
}
