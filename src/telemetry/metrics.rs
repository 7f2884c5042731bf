//! Prometheus metrics of the loop, and the health the HTTP endpoints report.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::decode::ReasonCode;
use crate::retry::ErrorClass;

/// `reason_code` of a dead letter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason_code: String,
}

/// Class of a retried failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

/// A partition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub topic: String,
    pub partition: i64,
}

/// Every metric the worker exports, named after Prometheus conventions.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub records_consumed: Counter,
    pub rows_written: Counter,
    pub dead_letters: Family<ReasonLabel, Counter>,
    pub commit_duration: Histogram,
    /// Time spent isolating rows Postgres rejected, per batch that needed it.
    pub isolation_duration: Histogram,
    /// Rows no partition of their partitioned table takes (db_rejected dead letters).
    pub rows_without_partition: Counter,
    /// Requests sent to the schema registry (one per writer schema id per process,
    /// plus those of references and of registries that did not answer).
    pub schema_registry_requests: Counter,
    /// Ranges of offsets skipped because the broker no longer had them.
    pub offset_gaps: Counter,
    pub skipped_offsets: Counter,
    pub retries: Family<ClassLabel, Counter>,
    pub fencing_conflicts: Counter,
    pub rebalances: Counter,
    pub lag: Family<PartitionLabel, Gauge>,
    pub next_offset: Family<PartitionLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kafka_pg_ingest");
        let metrics = Self {
            records_consumed: Counter::default(),
            rows_written: Counter::default(),
            dead_letters: Family::default(),
            // 1 ms .. ~16 s.
            commit_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 10 ms .. ~160 s.
            isolation_duration: Histogram::new(exponential_buckets(0.01, 2.0, 15)),
            rows_without_partition: Counter::default(),
            schema_registry_requests: Counter::default(),
            offset_gaps: Counter::default(),
            skipped_offsets: Counter::default(),
            retries: Family::default(),
            fencing_conflicts: Counter::default(),
            rebalances: Counter::default(),
            lag: Family::default(),
            next_offset: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "records_consumed",
            "Kafka records taken into committed batches",
            metrics.records_consumed.clone(),
        );
        registry.register(
            "rows_written",
            "Rows written to the target table",
            metrics.rows_written.clone(),
        );
        registry.register(
            "dead_letters",
            "Dead letters written, by reason_code",
            metrics.dead_letters.clone(),
        );
        registry.register_with_unit(
            "batch_commit_duration",
            "Duration of successful batch commits",
            Unit::Seconds,
            metrics.commit_duration.clone(),
        );
        registry.register_with_unit(
            "isolation_duration",
            "Time spent isolating the rows Postgres rejected from a batch (db_rejected dead letters)",
            Unit::Seconds,
            metrics.isolation_duration.clone(),
        );
        registry.register(
            "rows_without_partition",
            "Rows no partition of their partitioned target table takes (SQLSTATE 23514), dead-lettered as db_rejected until the partition exists",
            metrics.rows_without_partition.clone(),
        );
        registry.register(
            "schema_registry_requests",
            "Requests sent to the schema registry for writer schemas (each id once per process)",
            metrics.schema_registry_requests.clone(),
        );
        registry.register(
            "offset_gaps",
            "Ranges of offsets skipped because the broker no longer had them (kafka.on_data_loss: skip), recorded in ingest.offset_gaps",
            metrics.offset_gaps.clone(),
        );
        registry.register(
            "skipped_offsets",
            "Offsets inside those ranges",
            metrics.skipped_offsets.clone(),
        );
        registry.register(
            "retries",
            "Failures retried, by class",
            metrics.retries.clone(),
        );
        registry.register(
            "fencing_conflicts",
            "Partitions found claimed by another worker at commit",
            metrics.fencing_conflicts.clone(),
        );
        registry.register(
            "rebalances",
            "Rebalance callbacks (assign, revoke, error)",
            metrics.rebalances.clone(),
        );
        registry.register(
            "partition_lag",
            "High watermark minus the offset stored in Postgres",
            metrics.lag.clone(),
        );
        registry.register(
            "partition_next_offset",
            "Next offset stored in Postgres",
            metrics.next_offset.clone(),
        );
        // Series exist from the start, at 0, so rates and dashboards never see gaps.
        let transient = ClassLabel {
            class: ErrorClass::Transient.as_str().to_owned(),
        };
        metrics.retries.get_or_create(&transient).inc_by(0);
        for code in ReasonCode::ALL {
            let reason = ReasonLabel {
                reason_code: code.as_str().to_owned(),
            };
            metrics.dead_letters.get_or_create(&reason).inc_by(0);
        }
        Self {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// What `/healthz` and `/readyz` report beyond the database check.
#[derive(Debug)]
pub struct Health {
    /// When the loop last finished a step, in ms since the epoch.
    last_step_ms: AtomicU64,
    /// Whether librdkafka's last statistics showed the consumer up in its group.
    in_group: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        let health = Self {
            last_step_ms: AtomicU64::new(0),
            in_group: AtomicBool::new(false),
        };
        health.stepped();
        health
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Health {
    /// Records that the loop finished a step.
    pub fn stepped(&self) {
        self.last_step_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether a step finished within `limit`.
    pub fn stepped_within(&self, limit: Duration) -> bool {
        now_ms().saturating_sub(self.last_step_ms.load(Ordering::Relaxed))
            <= limit.as_millis() as u64
    }

    pub fn set_in_group(&self, up: bool) {
        self.in_group.store(up, Ordering::Relaxed);
    }

    pub fn in_group(&self) -> bool {
        self.in_group.load(Ordering::Relaxed)
    }
}
