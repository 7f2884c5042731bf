//! The Kafka consumer and its rebalance callback, where partitions are claimed.
//!
//! Positions come from Postgres only. On assignment the callback claims the partitions
//! (bumping their epoch, which fences the previous owner) and assigns them AT the stored
//! offsets. It never assigns first and seeks afterwards: a fetch started by the assign
//! could deliver records from Kafka's committed offset before the seek lands.

mod record;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

pub use record::to_record;

use crate::config::{Config, OffsetReset, RetryConfig};
use crate::retry::{self, ErrorClass};
use crate::security;
use crate::store::{Claim, Store, StoreError};
use crate::telemetry::metrics::{Health, Metrics};

/// A partition: topic and number.
pub type TopicPartition = (String, i32);

/// What this worker holds of a partition it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionState {
    /// Epoch of this worker's claim; commits carry it.
    pub epoch: i64,
    /// The stored next offset (`None`: nothing committed yet).
    pub next_offset: Option<i64>,
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
    retry: RetryConfig,
    claim_limit: Duration,
    assignments: Assignments,
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

    /// Retries a claim with backoff. The callback runs inside `poll`, so blocking here
    /// is bounded by `retry.claim_limit_secs`, which config keeps below
    /// `max.poll.interval.ms`.
    fn claim_with_retry(&self, partitions: &[TopicPartition]) -> Result<Vec<Claim>, StoreError> {
        let started = Instant::now();
        let mut delays = retry::backoff(&self.retry);
        loop {
            // The loop calls `poll` under `block_in_place`, so entering the runtime is allowed.
            match self
                .runtime
                .block_on(self.store.claim(&self.owner, partitions))
            {
                Ok(claims) => return Ok(claims),
                Err(e) if e.class() == ErrorClass::Transient => {
                    let Some(delay) = retry::next_delay(&mut delays, started, self.claim_limit)
                    else {
                        return Err(e);
                    };
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "claim failed, retrying");
                    std::thread::sleep(delay);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn on_assign(&self, consumer: &BaseConsumer<Self>, partitions: &[TopicPartition]) {
        let claims = match self.claim_with_retry(partitions) {
            Ok(claims) => claims,
            Err(e) => {
                tracing::error!(error = %e, "cannot claim assigned partitions; stopping");
                self.set_fatal(format!("cannot claim assigned partitions: {e}"));
                return;
            }
        };
        let mut tpl = TopicPartitionList::new();
        let mut assignments = self.assignments.lock();
        for claim in claims {
            let offset = match (claim.next_offset, self.reset) {
                (Some(n), _) => Offset::Offset(n),
                (None, OffsetReset::Earliest) => Offset::Beginning,
                (None, OffsetReset::Latest) => Offset::End,
            };
            if let Err(e) = tpl.add_partition_offset(&claim.topic, claim.partition, offset) {
                tracing::error!(error = %e, topic = %claim.topic, partition = claim.partition, "bad claimed offset");
                continue;
            }
            tracing::info!(
                topic = %claim.topic,
                partition = claim.partition,
                next_offset = ?claim.next_offset,
                epoch = claim.epoch,
                "claimed partition"
            );
            assignments.insert(
                (claim.topic, claim.partition),
                PartitionState {
                    epoch: claim.epoch,
                    next_offset: claim.next_offset,
                },
            );
        }
        drop(assignments);
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(&tpl),
            _ => consumer.assign(&tpl),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "assign failed");
        }
    }

    fn on_revoke(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
        partitions: &[TopicPartition],
    ) {
        let mut assignments = self.assignments.lock();
        for tp in partitions {
            assignments.remove(tp);
        }
        drop(assignments);
        tracing::info!(partitions = ?partitions, "partitions revoked");
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
            None => tracing::error!(error = %error, reason, "librdkafka error"),
        }
    }

    /// librdkafka's periodic statistics (`statistics.interval.ms`): group state for
    /// `/readyz`, high watermarks for lag.
    fn stats(&self, statistics: Statistics) {
        let up = statistics
            .cgrp
            .as_ref()
            .is_some_and(|g| g.state == "up" && g.join_state == "steady");
        self.observers.health.set_in_group(up);
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
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
        }
    }
}

/// The worker's consumer type.
pub type IngestConsumer = BaseConsumer<IngestContext>;

/// A client for broker metadata only (watermarks, offsets for times): the worker's
/// connection settings, in no group.
pub fn metadata_client(config: &Config) -> Result<BaseConsumer, KafkaError> {
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
        .create()
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
        // Prefetch a few batches per partition, not librdkafka's 100,000 records: memory
        // stays bounded and the loop never waits long for data. When the local queue is
        // full, look again soon (librdkafka waits a whole second by default, stalling
        // the loop once the queue drains).
        .set(
            "queued.min.messages",
            (config.batch.max_records * 4).to_string(),
        )
        .set("fetch.queue.backoff.ms", "20")
        .set(
            "auto.offset.reset",
            match config.kafka.auto_offset_reset {
                OffsetReset::Earliest => "earliest",
                OffsetReset::Latest => "latest",
            },
        );
    if config.run.metrics_addr.is_some() {
        // Statistics feed /readyz (group state) and the lag gauges (high watermarks).
        client.set("statistics.interval.ms", "1000");
    }
    connection(&mut client, config);
    // Set last so no option can turn them back on: Kafka's offsets are advisory here.
    client
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let context = IngestContext {
        store,
        runtime: tokio::runtime::Handle::current(),
        owner: owner.to_owned(),
        reset: config.kafka.auto_offset_reset,
        retry: config.retry.clone(),
        claim_limit: config.claim_limit(),
        assignments,
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
