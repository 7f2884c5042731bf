//! Keeping each partition's position true to its stored row and to the broker's log.
//!
//! Invariant: a fenced partition commits nothing until it is re-positioned from its
//! stored row, and every partition Kafka assigns to this worker ends up consumed: a row
//! moved by an operator is followed (within a second, busy or idle), a row claimed by a
//! newer owner is left to it (and claimed back if Kafka still assigns it here after the
//! session timeout), a row deleted or older than this worker's claim is claimed again.
//! A position outside the broker's log is never moved silently: `kafka.on_data_loss`
//! stops the worker or records the gap.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, RebalanceProtocol};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use super::{Pipeline, PipelineError};
use crate::config::OnDataLoss;
use crate::kafka::start::{self, DataLoss};
use crate::kafka::{ClaimPatience, ClaimRequest, Orphan, PartitionState, TopicPartition};
use crate::store::{PartitionRange, StoreError, StoredOffset};

/// How often partitions are checked against their stored rows and orphans claimed.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

/// How long the watermark reads of one range check may take in all.
const RANGE_CHECK_LIMIT: Duration = Duration::from_secs(10);

impl Pipeline {
    /// Marks the partitions of fenced ranges stale (no record of them enters a batch)
    /// and re-positions them from their stored rows. When the rows cannot be read now,
    /// they stay stale and the next maintenance tries again. A partition claimed anew
    /// by this worker since the range was built is already positioned by that claim.
    pub(super) async fn fence(&mut self, fenced: &[PartitionRange]) -> Result<(), PipelineError> {
        let mut claims: Vec<(TopicPartition, i64)> = Vec::new();
        {
            let mut assignments = self.assignments.lock();
            for r in fenced {
                let tp = (r.topic.clone(), r.partition);
                if let Some(state) = assignments.get_mut(&tp).filter(|s| s.epoch == r.epoch) {
                    state.stale = true;
                    claims.push((tp, r.epoch));
                }
            }
        }
        if claims.is_empty() {
            return Ok(());
        }
        let partitions = claims.iter().map(|(tp, _)| tp.clone()).collect();
        match self.read_rows(partitions, false).await {
            Ok(rows) => self.reposition(&claims, rows),
            Err(e) if e.class() == crate::retry::ErrorClass::Transient => {
                tracing::warn!(error = %e, "cannot read the rows of fenced partitions; they wait until they can be re-positioned");
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Once a second: re-positions partitions whose stored row no longer says what this
    /// worker holds (stale ones, and quiet ones an operator moved), claims due orphans,
    /// and checks positions against the broker's log when librdkafka reported one
    /// outside it.
    pub(super) async fn maintain(&mut self) -> Result<(), PipelineError> {
        if self.last_maintenance.elapsed() >= MAINTENANCE_INTERVAL {
            self.last_maintenance = Instant::now();
            if let Err(e) = self.follow_rows().await {
                if e.class() != crate::retry::ErrorClass::Transient {
                    return Err(e.into());
                }
                tracing::warn!(error = %e, "checking stored offsets failed; checking again later");
            }
            self.claim_orphans()?;
        }
        if let Some((at, only)) = self.range_check.take() {
            if at <= Instant::now() {
                self.check_ranges(only)?;
            } else {
                self.range_check = Some((at, only));
            }
        }
        Ok(())
    }

    /// Re-positions every held partition not in the commit in flight (whose own commit
    /// finds out) whose row differs from what this worker holds, or that is stale.
    async fn follow_rows(&mut self) -> Result<(), StoreError> {
        let in_flight: HashSet<TopicPartition> = self
            .in_flight
            .iter()
            .flat_map(|f| &f.ranges)
            .map(|r| (r.topic.clone(), r.partition))
            .collect();
        let held: Vec<(TopicPartition, PartitionState)> = self
            .assignments
            .lock()
            .iter()
            .filter(|(tp, _)| !in_flight.contains(*tp))
            .map(|(tp, state)| (tp.clone(), *state))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let rows = self
            .read_rows(held.iter().map(|(tp, _)| tp.clone()).collect(), false)
            .await?;
        // Compared with what this worker held when it read them (a claim while the read
        // polled is judged by the next maintenance).
        let moved: Vec<(TopicPartition, i64)> = held
            .into_iter()
            .filter(|(tp, s)| {
                let row = rows.iter().find(|r| r.topic == tp.0 && r.partition == tp.1);
                s.stale
                    || row
                        .is_none_or(|r| r.epoch != s.epoch || r.next_offset != Some(s.next_offset))
            })
            .map(|(tp, s)| (tp, s.epoch))
            .collect();
        if !moved.is_empty() {
            self.reposition(&moved, rows);
        }
        Ok(())
    }

    /// Follows the stored rows of `partitions`, each held under the given epoch when the
    /// rows were read (a partition without a row in `rows` has none; one claimed anew
    /// since is left alone): where this worker still holds the claim, continue from the
    /// stored offset; a newer claim is left to its owner; a missing or older row is
    /// claimed again.
    pub(super) fn reposition(
        &mut self,
        partitions: &[(TopicPartition, i64)],
        rows: Vec<StoredOffset>,
    ) {
        let grace = self.config.session_timeout();
        let mut seeks = Vec::new();
        let mut handled = Vec::new();
        {
            let mut assignments = self.assignments.lock();
            let context = self.consumer().context();
            let mut orphans = context.orphans();
            for (tp, epoch) in partitions {
                let Some(state) = assignments.get_mut(tp).filter(|s| s.epoch == *epoch) else {
                    continue;
                };
                handled.push(tp.clone());
                let row = rows.iter().find(|r| r.topic == tp.0 && r.partition == tp.1);
                let (due, least_epoch, resume_at) = match row {
                    Some(row) if row.epoch == state.epoch => match row.next_offset {
                        Some(next) => {
                            if next == state.next_offset {
                                tracing::info!(topic = %tp.0, partition = tp.1, next_offset = next,
                                    "re-positioned from the stored offset");
                            } else {
                                tracing::warn!(topic = %tp.0, partition = tp.1, next_offset = next,
                                    "stored offset moved under this worker; continuing from it");
                            }
                            state.next_offset = next;
                            state.stale = false;
                            state.gap = None;
                            seeks.push((tp.clone(), next));
                            continue;
                        }
                        None => (Instant::now(), state.epoch + 1, Some(state.next_offset)),
                    },
                    Some(row) if row.epoch > state.epoch => {
                        tracing::warn!(topic = %tp.0, partition = tp.1, owner = %row.owner, epoch = row.epoch,
                            "partition fenced: claimed by another worker; claiming it back if Kafka still assigns it here after the session timeout");
                        (Instant::now() + grace, row.epoch + 1, None)
                    }
                    Some(row) => {
                        tracing::warn!(topic = %tp.0, partition = tp.1, stored_epoch = row.epoch, epoch = state.epoch,
                            "the offset row is older than this worker's claim (restored from an older dump?); claiming the partition again");
                        (Instant::now(), state.epoch + 1, None)
                    }
                    None => {
                        tracing::warn!(topic = %tp.0, partition = tp.1, next_offset = state.next_offset,
                            "the offset row is gone; claiming the partition again where this worker stood");
                        (Instant::now(), state.epoch + 1, Some(state.next_offset))
                    }
                };
                assignments.remove(tp);
                orphans.insert(
                    tp.clone(),
                    Orphan {
                        due,
                        least_epoch,
                        resume_at,
                    },
                );
            }
        }
        // Only the partitions handled here: held-back records of one claimed anew since
        // the read continue its new position, and no seek would bring them back.
        self.forget_pending(&handled);
        self.seek(&seeks);
    }

    /// Claims the orphans that are due and that Kafka still assigns here, and seeks
    /// each to where it starts.
    fn claim_orphans(&mut self) -> Result<(), PipelineError> {
        let consumer = self.consumer();
        let now = Instant::now();
        let due: Vec<ClaimRequest> = consumer
            .context()
            .orphans()
            .iter()
            .filter(|(_, o)| o.due <= now)
            .map(|(tp, o)| ClaimRequest {
                partition: tp.clone(),
                least_epoch: o.least_epoch,
                resume_at: o.resume_at,
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let assigned = assigned_partitions(consumer);
        let (wanted, gone): (Vec<_>, Vec<_>) = due
            .into_iter()
            .partition(|r| assigned.contains(&r.partition));
        {
            let mut orphans = consumer.context().orphans();
            for request in gone {
                orphans.remove(&request.partition);
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        tracing::info!(partitions = ?wanted.iter().map(|r| &r.partition).collect::<Vec<_>>(),
            "claiming partitions assigned here but not held");
        let starts =
            tokio::task::block_in_place(|| consumer.context().claim(&wanted, ClaimPatience::Once))
                .map_err(PipelineError::Consumer)?;
        let partitions: Vec<TopicPartition> = starts.iter().map(|(tp, _)| tp.clone()).collect();
        let seeks: Vec<(TopicPartition, i64)> = starts
            .into_iter()
            .filter_map(|(tp, offset)| match offset {
                Offset::Offset(n) => Some((tp, n)),
                _ => None,
            })
            .collect();
        self.forget_pending(&partitions);
        self.seek(&seeks);
        Ok(())
    }

    /// Checks held partitions' positions (`only` these, else all) against the broker's
    /// watermarks, after librdkafka reported a fetch position outside its log: outside,
    /// it stops or skips by `kafka.on_data_loss`; inside, the partition is sought to its
    /// position again, which restarts a fetch librdkafka stopped. Partitions the broker
    /// did not answer for are checked again a second later, alone.
    fn check_ranges(&mut self, only: Option<Vec<TopicPartition>>) -> Result<(), PipelineError> {
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
    fn forget_pending(&mut self, partitions: &[TopicPartition]) {
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
    fn seek(&mut self, seeks: &[(TopicPartition, i64)]) {
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
    fn mark_stale(&self, partitions: &[TopicPartition]) {
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
    fn restart(&mut self, partitions: &[(TopicPartition, i64)]) {
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
                tracing::info!(partitions = ?wanted, "fetching restarted");
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
    fn positions(&self) -> Vec<(TopicPartition, i64)> {
        let assignments = self.assignments.lock();
        assignments
            .iter()
            .map(|(tp, s)| (tp.clone(), self.position(tp, s)))
            .collect()
    }
}

/// The partitions librdkafka has assigned to `consumer` (none when it cannot say).
fn assigned_partitions(consumer: &crate::kafka::IngestConsumer) -> HashSet<TopicPartition> {
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
