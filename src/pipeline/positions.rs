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

use rdkafka::consumer::Consumer;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use super::{Pipeline, PipelineError};
use crate::config::OnDataLoss;
use crate::kafka::start::{self, DataLoss};
use crate::kafka::{ClaimRequest, Orphan, TopicPartition};
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
        let mut partitions: Vec<TopicPartition> = Vec::new();
        {
            let mut assignments = self.assignments.lock();
            for r in fenced {
                let tp = (r.topic.clone(), r.partition);
                if let Some(state) = assignments.get_mut(&tp).filter(|s| s.epoch == r.epoch) {
                    state.stale = true;
                    partitions.push(tp);
                }
            }
        }
        if partitions.is_empty() {
            return Ok(());
        }
        match self.store.stored_offsets(&partitions).await {
            Ok(rows) => self.reposition(&partitions, rows),
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
        if self.range_check_at.is_some_and(|at| at <= Instant::now()) {
            self.check_ranges()?;
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
        let held: Vec<TopicPartition> = self
            .assignments
            .lock()
            .keys()
            .filter(|tp| !in_flight.contains(*tp))
            .cloned()
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let rows = self.store.stored_offsets(&held).await?;
        let moved: Vec<TopicPartition> = {
            let assignments = self.assignments.lock();
            held.into_iter()
                .filter(|tp| {
                    let row = rows.iter().find(|r| r.topic == tp.0 && r.partition == tp.1);
                    assignments.get(tp).is_some_and(|s| {
                        s.stale
                            || row.is_none_or(|r| {
                                r.epoch != s.epoch || r.next_offset != Some(s.next_offset)
                            })
                    })
                })
                .collect()
        };
        if !moved.is_empty() {
            self.reposition(&moved, rows);
        }
        Ok(())
    }

    /// Follows the stored rows of `partitions` (a partition without a row in `rows` has
    /// none): where this worker still holds the claim, continue from the stored offset;
    /// a newer claim is left to its owner; a missing or older row is claimed again.
    pub(super) fn reposition(&mut self, partitions: &[TopicPartition], rows: Vec<StoredOffset>) {
        let grace = self.config.session_timeout();
        let mut seeks = Vec::new();
        {
            let mut assignments = self.assignments.lock();
            let context = self.consumer().context();
            let mut orphans = context.orphans();
            for tp in partitions {
                let Some(state) = assignments.get_mut(tp) else {
                    continue;
                };
                let row = rows.iter().find(|r| r.topic == tp.0 && r.partition == tp.1);
                let (due, least_epoch, resume_at) = match row {
                    Some(row) if row.epoch == state.epoch => match row.next_offset {
                        Some(next) => {
                            tracing::warn!(topic = %tp.0, partition = tp.1, next_offset = next,
                                "stored offset moved under this worker; continuing from it");
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
        self.forget_pending(partitions);
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
        let assigned: HashSet<TopicPartition> = consumer
            .assignment()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect()
            })
            .unwrap_or_default();
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
        let starts = tokio::task::block_in_place(|| consumer.context().claim(&wanted))
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

    /// Checks every held partition's position against the broker's watermarks, after
    /// librdkafka reported a fetch position outside its log: outside, it stops or skips
    /// by `kafka.on_data_loss`; inside, the partition is sought to its position again,
    /// which restarts a fetch librdkafka stopped.
    fn check_ranges(&mut self) -> Result<(), PipelineError> {
        let positions: Vec<(TopicPartition, i64)> = {
            let assignments = self.assignments.lock();
            assignments
                .iter()
                .filter(|(_, s)| !s.stale)
                .map(|(tp, s)| {
                    let position = self
                        .in_flight
                        .iter()
                        .flat_map(|f| &f.ranges)
                        .find(|r| r.topic == tp.0 && r.partition == tp.1 && r.epoch == s.epoch)
                        .map_or(s.next_offset, |r| r.end);
                    (tp.clone(), position)
                })
                .collect()
        };
        let partitions: Vec<TopicPartition> = positions.iter().map(|(tp, _)| tp.clone()).collect();
        let marks = tokio::task::block_in_place(|| {
            start::watermarks(
                self.consumer().context().inspector(),
                &partitions,
                RANGE_CHECK_LIMIT,
            )
        });
        // Partitions the broker did not answer for are checked again shortly.
        self.range_check_at =
            (marks.len() < positions.len()).then(|| Instant::now() + Duration::from_secs(1));
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
    /// it enters a batch until the next maintenance re-positions it.
    fn seek(&self, seeks: &[(TopicPartition, i64)]) {
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
        let failed: Vec<TopicPartition> = match result {
            Ok(done) => done
                .elements()
                .iter()
                .filter_map(|e| {
                    let err = e.error().err()?;
                    tracing::warn!(error = %err, topic = e.topic(), partition = e.partition(), "seek failed; trying again shortly");
                    Some((e.topic().to_owned(), e.partition()))
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "seek failed; trying again shortly");
                seeks.iter().map(|(tp, _)| tp.clone()).collect()
            }
        };
        let mut assignments = self.assignments.lock();
        for tp in failed {
            if let Some(state) = assignments.get_mut(&tp) {
                state.stale = true;
            }
        }
    }
}
