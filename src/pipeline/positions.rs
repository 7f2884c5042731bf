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

use rdkafka::Offset;
use rdkafka::consumer::Consumer;

use super::fetch::assigned_partitions;
use super::{Pipeline, PipelineError};
use crate::kafka::{self, ClaimPatience, ClaimRequest, Orphan, PartitionState, TopicPartition};
use crate::store::{PartitionRange, StoreError, StoredOffset};

/// How often partitions are checked against their stored rows and orphans claimed.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

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
                // They wait until they can be re-positioned.
                self.observers
                    .outages
                    .postgres
                    .failed(&format_args!("reading the rows of fenced partitions: {e}"));
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
                self.observers
                    .outages
                    .postgres
                    .failed(&format_args!("checking stored offsets: {e}"));
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
        self.observers.outages.postgres.recovered();
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
        tracing::info!(partitions = %kafka::partition_list(wanted.iter().map(|r| (r.partition.0.as_str(), r.partition.1))),
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
}
