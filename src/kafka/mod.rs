//! The Kafka consumer and its rebalance callback, where partitions are claimed.
//!
//! Positions come from Postgres only. On assignment the callback claims the partitions
//! (bumping their epoch, which fences the previous owner) and assigns them AT the stored
//! offsets. It never assigns first and seeks afterwards: a fetch started by the assign
//! could deliver records from Kafka's committed offset before the seek lands.
//!
//! Every partition Kafka assigns is consumed or being claimed: one this worker could not
//! claim, or lost to another claim while Kafka still assigns it here, is an orphan that
//! the loop claims again (see [`Orphan`]).

mod record;
pub mod start;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

pub use record::to_record;

use crate::config::{Config, OffsetReset, OnDataLoss, RetryConfig};
use crate::retry::{self, ErrorClass};
use crate::security;
use crate::store::{Claim, Gap, Store, StoreError};
use crate::telemetry::metrics::{Health, Metrics};
use crate::telemetry::outage::{Outage, Outages};
use start::Start;

/// A partition: topic and number.
pub type TopicPartition = (String, i32);

/// Partitions as `topic/partition`, comma-separated: one text field in a log line, not
/// a debug dump.
pub fn partition_list<'a>(partitions: impl IntoIterator<Item = (&'a str, i32)>) -> String {
    let listed: Vec<String> = partitions
        .into_iter()
        .map(|(topic, partition)| format!("{topic}/{partition}"))
        .collect();
    listed.join(", ")
}

/// How long a revoke may spend clearing this worker from the offset rows.
const RELEASE_LIMIT: Duration = Duration::from_secs(1);

/// How long without a failure, with a broker connected, ends a Kafka outage.
const KAFKA_QUIET: Duration = Duration::from_secs(5);

/// How long the watermark reads of one claim may take in all.
const CLAIM_WATERMARKS_LIMIT: Duration = Duration::from_secs(5);

/// What this worker holds of a partition it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionState {
    /// Epoch of this worker's claim; commits carry it.
    pub epoch: i64,
    /// This process's own number for the claim (`next_claim`). Polled records are
    /// tagged with it, not with the epoch: two claims of one partition can get the same
    /// epoch (a restored dump lowers a row's epoch), and a record polled under the first
    /// must never enter a batch of the second.
    pub claim: u64,
    /// The stored next offset.
    pub next_offset: i64,
    /// Offsets skipped under `kafka.on_data_loss: skip`, recorded with the partition's
    /// next batch.
    pub gap: Option<Gap>,
    /// A commit found the partition's row moved: no record of it is taken into a batch
    /// until it is re-positioned from the stored row.
    pub stale: bool,
}

/// A number no earlier claim of this process got (the first is 1).
fn next_claim() -> u64 {
    static CLAIMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    CLAIMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A partition Kafka assigns to this worker that it does not hold: its claim found no
/// start yet, another worker claimed it since, or its offset row vanished. Claimed
/// again once `due`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orphan {
    pub due: Instant,
    /// The least epoch the next claim may take.
    pub least_epoch: i64,
    /// Where this worker stood when the partition's row vanished: the claim stores it
    /// when the row comes back without an offset (rows up to there are in the table).
    pub resume_at: Option<i64>,
}

/// How long a claim retries transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimPatience {
    /// Up to `retry.claim_limit_secs` (on assignment).
    Retry,
    /// One attempt (orphans, claimed again every second anyway).
    Once,
}

/// One partition to claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    pub partition: TopicPartition,
    /// The least epoch the claim may take (0 for any).
    pub least_epoch: i64,
    /// Where to start when the row has no stored offset (instead of
    /// `kafka.auto_offset_reset`).
    pub resume_at: Option<i64>,
}

/// Partitions this worker owns, shared by the rebalance callback and the loop.
#[derive(Debug, Default, Clone)]
pub struct Assignments(Arc<Mutex<HashMap<TopicPartition, PartitionState>>>);

impl Assignments {
    /// Locks the map; a poisoned lock still holds consistent data (every update is a
    /// single insert or remove), so it is used as is.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<TopicPartition, PartitionState>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Consumer context: claims partitions in Postgres inside the rebalance callback.
pub struct IngestContext {
    store: Store,
    runtime: tokio::runtime::Handle,
    owner: String,
    reset: OffsetReset,
    on_data_loss: OnDataLoss,
    retry: RetryConfig,
    claim_limit: Duration,
    assignments: Assignments,
    orphans: Mutex<HashMap<TopicPartition, Orphan>>,
    /// Reads watermarks, in no group.
    inspector: Inspector,
    fatal: Mutex<Option<String>>,
    observers: Observers,
}

/// What the consumer reports to telemetry.
#[derive(Debug, Clone, Default)]
pub struct Observers {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// High watermarks from librdkafka's statistics, for lag.
    pub high_watermarks: Arc<Mutex<HashMap<TopicPartition, i64>>>,
    pub outages: Outages,
}

impl IngestContext {
    /// The error that made the callback give up, if any; the loop stops on it.
    pub fn take_fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Records why the loop must stop; the first reason wins.
    fn set_fatal(&self, reason: String) {
        self.fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(reason);
    }

    /// The metadata client of this consumer's brokers.
    pub fn inspector(&self) -> &Inspector {
        &self.inspector
    }

    /// What to do with a stored offset outside the broker's log.
    pub fn on_data_loss(&self) -> OnDataLoss {
        self.on_data_loss
    }

    /// The orphans (assigned here, not held), for the loop to claim again.
    pub fn orphans(&self) -> MutexGuard<'_, HashMap<TopicPartition, Orphan>> {
        self.orphans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Retries a claim with backoff for up to `limit`. The callback runs inside `poll`,
    /// so blocking here is bounded by `retry.claim_limit_secs`, which config keeps below
    /// `max.poll.interval.ms`.
    fn claim_with_retry(
        &self,
        requests: &[ClaimRequest],
        limit: Duration,
    ) -> Result<Vec<Claim>, StoreError> {
        let partitions: Vec<(TopicPartition, i64)> = requests
            .iter()
            .map(|r| (r.partition.clone(), r.least_epoch))
            .collect();
        let started = Instant::now();
        let mut delays = retry::backoff(&self.retry);
        loop {
            // The loop calls `poll` under `block_in_place`, so entering the runtime is allowed.
            match self
                .runtime
                .block_on(self.store.claim(&self.owner, &partitions))
            {
                Ok(claims) => {
                    self.observers.outages.postgres.recovered();
                    return Ok(claims);
                }
                Err(e) if e.class() == ErrorClass::Transient => {
                    let Some(delay) = retry::next_delay(&mut delays, started, limit) else {
                        return Err(e);
                    };
                    tracing::debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "claim failed, retrying");
                    self.observers.outages.postgres.failed(&format_args!("claiming partitions: {e}"));
                    std::thread::sleep(delay);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Claims partitions and decides where each starts: its stored offset, checked
    /// against the broker's watermarks, or for a row without one a concrete offset
    /// (`resume_at`, else per `kafka.auto_offset_reset`) stored before any record is
    /// handed on. Held partitions enter the assignments; the others become orphans.
    /// Returns every partition with the offset to fetch it from (the log end for
    /// orphans, which fetch nothing worth keeping until claimed); an error is a reason
    /// to stop. A claim Postgres cannot take now (an outage outlasting `patience`)
    /// leaves every partition an orphan: the worker keeps its place in the group and
    /// claims them again once Postgres answers.
    pub fn claim(
        &self,
        requests: &[ClaimRequest],
        patience: ClaimPatience,
    ) -> Result<Vec<(TopicPartition, Offset)>, String> {
        let limit = match patience {
            ClaimPatience::Retry => self.claim_limit,
            ClaimPatience::Once => Duration::ZERO,
        };
        let claims = match self.claim_with_retry(requests, limit) {
            Ok(claims) => claims,
            Err(e) if e.class() == ErrorClass::Transient => {
                tracing::warn!(error = %e, partitions = requests.len(),
                    "cannot claim assigned partitions now; they wait unconsumed and are claimed again shortly");
                // Claimed again shortly; an orphan's lone attempt backs off further, as
                // something (an operator's session, an outage) holds it up.
                let retry_in = match patience {
                    ClaimPatience::Retry => Duration::from_secs(1),
                    ClaimPatience::Once => Duration::from_secs(5),
                };
                let mut assignments = self.assignments.lock();
                let mut orphans = self.orphans();
                for request in requests {
                    assignments.remove(&request.partition);
                    orphans.insert(
                        request.partition.clone(),
                        Orphan {
                            due: Instant::now() + retry_in,
                            least_epoch: request.least_epoch,
                            resume_at: request.resume_at,
                        },
                    );
                }
                return Ok(requests
                    .iter()
                    .map(|r| (r.partition.clone(), Offset::End))
                    .collect());
            }
            Err(e) => return Err(format!("cannot claim assigned partitions: {e}")),
        };
        let claimed: Vec<TopicPartition> = claims
            .iter()
            .map(|c| (c.topic.clone(), c.partition))
            .collect();
        let marks = start::watermarks(&self.inspector, &claimed, CLAIM_WATERMARKS_LIMIT);
        let group = self.store.group();
        let mut planned = Vec::new();
        let mut retry_soon = Vec::new();
        let resume_at = |tp: &TopicPartition| {
            requests
                .iter()
                .find(|r| r.partition == *tp)
                .and_then(|r| r.resume_at)
        };
        for (claim, tp) in claims.into_iter().zip(claimed) {
            let plan = start::plan(
                group,
                &tp,
                claim.next_offset.or(resume_at(&tp)),
                marks.get(&tp).copied(),
                self.reset,
                self.on_data_loss,
            );
            match plan {
                Start::At {
                    next, fetch, gap, ..
                } => {
                    // A row without an offset gets the start stored before any record
                    // of it is handed on.
                    let store = claim.next_offset.is_none();
                    let note = start_note(claim.next_offset.is_some(), resume_at(&tp).is_some(), self.reset);
                    planned.push((tp, claim.epoch, next, fetch, gap, store, note));
                }
                Start::Unknown => retry_soon.push((tp, claim.epoch)),
                Start::Lost(loss) => return Err(loss.to_string()),
            }
        }
        let starts: Vec<(&str, i32, i64, i64)> = planned
            .iter()
            .filter(|p| p.5)
            .map(|(tp, epoch, next, ..)| (tp.0.as_str(), tp.1, *epoch, *next))
            .collect();
        let stored = match starts.is_empty() {
            true => Vec::new(),
            false => match self.runtime.block_on(self.store.store_starts(&starts)) {
                Ok(stored) => stored,
                Err(e) if e.class() == ErrorClass::Transient => {
                    tracing::warn!(error = %e, "cannot store where claimed partitions start; claiming them again");
                    Vec::new()
                }
                Err(e) => return Err(format!("cannot store where claimed partitions start: {e}")),
            },
        };
        let mut fetch_from = Vec::new();
        let mut started: Vec<(&str, String)> = Vec::new();
        let mut assignments = self.assignments.lock();
        let mut orphans = self.orphans();
        for (tp, epoch, next, fetch, gap, store, note) in planned {
            if store && !stored.contains(&tp) {
                retry_soon.push((tp, epoch));
                continue;
            }
            tracing::debug!(topic = %tp.0, partition = tp.1, next_offset = next, fetch_from = fetch, epoch,
                first_claim = store, "claimed partition ({note})");
            // One line per kind of start, not per partition: a rebalance of hundreds of
            // partitions stays a few lines.
            match started.iter_mut().find(|(n, _)| *n == note) {
                Some((_, list)) => list.push_str(&format!(", {}/{}@{next}", tp.0, tp.1)),
                None => started.push((note, format!("{}/{}@{next}", tp.0, tp.1))),
            }
            if let Some(gap) = &gap {
                tracing::warn!(topic = %tp.0, partition = tp.1, from = gap.from, to = gap.to,
                    reason = gap.kind.as_str(), "offsets the broker no longer has are skipped (kafka.on_data_loss: skip)");
            }
            orphans.remove(&tp);
            assignments.insert(
                tp.clone(),
                PartitionState {
                    epoch,
                    claim: next_claim(),
                    next_offset: next,
                    gap,
                    stale: false,
                },
            );
            fetch_from.push((tp, Offset::Offset(fetch)));
        }
        for (note, partitions) in started {
            let count = partitions.matches('@').count();
            tracing::info!(partitions = %partitions, "claimed {count} partition(s): {note}");
        }
        for (tp, epoch) in retry_soon {
            tracing::warn!(topic = %tp.0, partition = tp.1, "no start for a claimed partition yet; claiming it again shortly");
            assignments.remove(&tp);
            orphans.insert(
                tp.clone(),
                Orphan {
                    due: Instant::now() + Duration::from_secs(1),
                    least_epoch: epoch + 1,
                    resume_at: resume_at(&tp),
                },
            );
            fetch_from.push((tp, Offset::End));
        }
        Ok(fetch_from)
    }

    fn on_assign(&self, consumer: &BaseConsumer<Self>, partitions: &[TopicPartition]) {
        let wanted: Vec<ClaimRequest> = partitions
            .iter()
            .map(|tp| ClaimRequest {
                partition: tp.clone(),
                least_epoch: 0,
                resume_at: None,
            })
            .collect();
        // Rebalances hand members empty assignments too: nothing to claim, but the
        // (empty) assign below is what completes the rebalance.
        let starts = if wanted.is_empty() {
            Vec::new()
        } else {
            match self.claim(&wanted, ClaimPatience::Retry) {
                Ok(starts) => starts,
                Err(reason) => {
                    tracing::error!(reason, "cannot start the assigned partitions; stopping");
                    self.set_fatal(reason);
                    return;
                }
            }
        };
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), fetch) in starts {
            if let Err(e) = tpl.add_partition_offset(&topic, partition, fetch) {
                tracing::error!(error = %e, topic = %topic, partition, "bad claimed offset");
            }
        }
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(&tpl),
            _ => consumer.assign(&tpl),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "assign failed");
        }
        // librdkafka keeps a partition's pause across unassign and assign: one revoked
        // while the loop had it paused (polling through a retry or a long commit) would
        // come back paused and never be fetched again. The loop pauses it again if it
        // still waits.
        if let Err(e) = consumer.resume(&tpl) {
            tracing::error!(error = %e, "resuming assigned partitions failed");
        }
    }

    /// Clears this worker from the offset rows of `held` partitions just revoked, within
    /// [`RELEASE_LIMIT`]: the callback holds up polling meanwhile. Skipped while Postgres
    /// is failing; the next claim of each row names its owner anyway.
    fn release_revoked(&self, held: &[(TopicPartition, i64)]) {
        if held.is_empty() || self.observers.outages.postgres.failing() {
            return;
        }
        let release = self.store.release_revoked(&self.owner, held);
        match self
            .runtime
            .block_on(async { tokio::time::timeout(RELEASE_LIMIT, release).await })
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "could not clear this worker from revoked partitions' rows"),
            Err(_) => tracing::debug!("clearing this worker from revoked partitions' rows took too long; left to the next claim"),
        }
    }

    fn on_revoke(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
        partitions: &[TopicPartition],
    ) {
        let mut assignments = self.assignments.lock();
        let mut orphans = self.orphans();
        let mut held = Vec::new();
        for tp in partitions {
            if let Some(state) = assignments.remove(tp) {
                held.push((tp.clone(), state.epoch));
            }
            orphans.remove(tp);
        }
        drop((assignments, orphans));
        tracing::info!(partitions = %partition_list(partitions.iter().map(|tp| (tp.0.as_str(), tp.1))),
            "partitions revoked");
        self.release_revoked(&held);
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
            _ => consumer.unassign(),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "unassign failed");
        }
    }
}

impl ClientContext for IngestContext {
    /// librdkafka's global errors. It retries every broker connection by itself, which
    /// is right for a network fault but hides a refused certificate or credential
    /// forever: those stop the worker, naming the keys to check.
    fn error(&self, error: KafkaError, reason: &str) {
        match error
            .rdkafka_error_code()
            .and_then(|code| security::refusal_hint(code, reason))
        {
            Some(hint) => {
                tracing::error!(error = %error, reason, "{hint}; stopping");
                self.set_fatal(format!("{hint}: {reason}"));
            }
            None => report_error(&self.observers.outages.kafka, &error, reason),
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        librdkafka_log(&self.observers.outages.kafka, level, fac, log_message);
    }

    /// librdkafka's periodic statistics (`statistics.interval.ms`): group state for
    /// `/readyz`, high watermarks for lag.
    fn stats(&self, statistics: Statistics) {
        let up = statistics
            .cgrp
            .as_ref()
            .is_some_and(|g| g.state == "up" && g.join_state == "steady");
        self.observers.health.set_in_group(up);
        if brokers_up(&statistics) {
            // Connected, and no failure for a while: a broker of several still down keeps
            // reporting failures.
            self.observers.outages.kafka.quiet_for(KAFKA_QUIET);
        }
        let mut marks = self
            .observers
            .high_watermarks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.hi_offset >= 0 {
                    marks.insert((topic.clone(), *partition), p.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.observers.metrics.rebalances.inc();
        let partitions: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, &partitions)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl, &partitions)
            }
            other => {
                // The assignment is lost; whoever gets the partitions claims them anew,
                // which fences any batch of ours still in flight.
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                self.assignments.lock().clear();
                self.orphans().clear();
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
        }
    }
}

/// Where a claimed partition starts and why, for its log line: at its stored offset,
/// where this worker stood before its row vanished, or per `kafka.auto_offset_reset`.
fn start_note(stored: bool, resumed: bool, reset: OffsetReset) -> &'static str {
    match (stored, resumed, reset) {
        (true, ..) => "resuming at the stored offsets",
        (false, true, _) => "their offset rows had no offset; resuming where this worker stood",
        (false, false, OffsetReset::Earliest) => {
            "no stored offsets; starting at the oldest record the broker still has \
             (kafka.auto_offset_reset: earliest)"
        }
        (false, false, OffsetReset::Latest) => {
            "no stored offsets; starting at the end of each partition: records already on \
             the broker are not ingested (kafka.auto_offset_reset: latest)"
        }
    }
}

/// Whether librdkafka holds a connection to a broker it learned of, and no such broker
/// is down or reconnecting (one it has no use for stays `INIT`). librdkafka repeats an
/// identical failure only every 30 s: a broker of several down that long must not
/// look like one that works.
fn brokers_up(statistics: &Statistics) -> bool {
    let learned: Vec<&str> = statistics
        .brokers
        .values()
        .filter(|b| b.source == "learned")
        .map(|b| b.state.as_str())
        .collect();
    learned.contains(&"UP") && learned.iter().all(|s| matches!(*s, "UP" | "INIT"))
}

/// Whether a librdkafka error says a broker cannot be reached: an outage, retried by
/// librdkafka itself. Any other error is logged as it comes.
pub fn unreachable(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::NetworkException
    )
}

/// A librdkafka error event: a broker out of reach counts toward the Kafka outage, any
/// other error is an ERROR line of its own.
fn report_error(outage: &Outage, error: &KafkaError, reason: &str) {
    match error.rdkafka_error_code() {
        Some(code) if unreachable(code) => outage.failed(&format_args!("{reason} ({error})")),
        // A position outside the broker's log: the loop checks the watermarks and
        // `kafka.on_data_loss` decides, saying so.
        Some(RDKafkaErrorCode::AutoOffsetReset) => tracing::debug!(error = %error, reason, "librdkafka error"),
        _ => tracing::error!(error = %error, reason, "librdkafka error"),
    }
}

/// A line of librdkafka's log. Connection failures, repeated on every reconnect
/// attempt, count toward the Kafka outage instead of a line each; the rest is
/// logged at its own level.
fn librdkafka_log(outage: &Outage, level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel::*;
    // FAIL: a connection failed (a warning or worse) or was closed (information: idle
    // connections are closed too). COMMITFAIL: the advisory mirror of offsets to Kafka
    // failed (no coordinator, a rebalance under way); Postgres holds the offsets.
    match level {
        Emerg | Alert | Critical | Error | Warning if matches!(fac, "FAIL" | "ERROR" | "REQTMOUT") => {
            outage.failed(&message)
        }
        _ if fac == "COMMITFAIL" => tracing::debug!(target: "librdkafka", fac, "{message}"),
        Notice | Info if fac == "FAIL" => tracing::debug!(target: "librdkafka", fac, "{message}"),
        Emerg | Alert | Critical | Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        Notice | Info => tracing::info!(target: "librdkafka", fac, "{message}"),
        Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// The worker's consumer type.
pub type IngestConsumer = BaseConsumer<IngestContext>;

/// The context of metadata clients: their librdkafka errors count toward `outage`.
pub struct InspectorContext {
    outage: Arc<Outage>,
}

impl ClientContext for InspectorContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        librdkafka_log(&self.outage, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        report_error(&self.outage, &error, reason);
    }
}

impl ConsumerContext for InspectorContext {}

/// A client for broker metadata only.
pub type Inspector = BaseConsumer<InspectorContext>;

/// A client for broker metadata only (watermarks, offsets for times): the worker's
/// connection settings, in no group. Its connection failures count toward `outage`.
pub fn metadata_client(config: &Config, outage: Arc<Outage>) -> Result<Inspector, KafkaError> {
    let mut client = ClientConfig::new();
    connection(&mut client, config);
    // librdkafka wants a group even to assign partitions; this one never joins or commits.
    client
        .set(
            "group.id",
            format!(
                "{}-inspect-{}",
                config.kafka.group,
                uuid::Uuid::new_v4().simple()
            ),
        )
        .set("enable.auto.commit", "false")
        .create_with_context(InspectorContext { outage })
}

/// Where the brokers are and how to reach them: bootstrap servers, `kafka.options`, and
/// the security keys (which `kafka.options` cannot set, so they win).
fn connection(client: &mut ClientConfig, config: &Config) {
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (key, value) in &config.kafka.options {
        client.set(key, value);
    }
    security::apply_kafka(client, &config.kafka);
}

/// Creates the consumer and subscribes it. Must be called inside a Tokio runtime.
pub fn subscribe(
    config: &Config,
    store: Store,
    owner: &str,
    assignments: Assignments,
    observers: Observers,
) -> Result<IngestConsumer, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("group.id", &config.kafka.group)
        .set("client.id", owner)
        .set("enable.partition.eof", "false")
        // Prefetch one batch per partition and, over all partitions, two batches' bytes
        // per lane (not librdkafka's 100,000 records and 64 MB): memory stays bounded
        // by the batch bounds, and the next batch is ready while one commits. When the
        // local queue is full, look again soon (librdkafka waits a whole second by
        // default, stalling the loop once the queue drains).
        .set("queued.min.messages", config.batch.max_records.to_string())
        .set(
            "queued.max.messages.kbytes",
            (2 * config.lanes() * config.batch.max_bytes / 1024)
                .clamp(1024, 65536)
                .to_string(),
        )
        .set("fetch.queue.backoff.ms", "20");
    connection(&mut client, config);
    // Statistics feed /readyz (group state), the lag gauges (high watermarks) and the
    // end of a Kafka outage (brokers connected again); config refuses the option.
    client.set("statistics.interval.ms", "1000");
    // Set last (config also refuses them in kafka.options). Kafka's offsets are advisory
    // here; a position out of the broker's range is an error for the loop to judge
    // (kafka.on_data_loss), never a silent jump; aborted transactions are never read.
    client
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("isolation.level", "read_committed");
    let context = IngestContext {
        store,
        runtime: tokio::runtime::Handle::current(),
        owner: owner.to_owned(),
        reset: config.kafka.auto_offset_reset,
        on_data_loss: config.kafka.on_data_loss,
        retry: config.retry.clone(),
        claim_limit: config.claim_limit(),
        assignments,
        orphans: Mutex::new(HashMap::new()),
        inspector: metadata_client(config, observers.outages.kafka.clone())?,
        fatal: Mutex::new(None),
        observers,
    };
    let consumer: IngestConsumer = client.create_with_context(context)?;
    let subscription = consumer.context().store.routes().subscription();
    let topics: Vec<&str> = subscription.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// A worker id unique across machines and restarts: host, pid and a random suffix.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..8])
}
