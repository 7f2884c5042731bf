//! Running the loop as a service: [`run`] steps a [`Pipeline`] until shutdown, serves
//! the metrics endpoints meanwhile, and leaves the consumer group within a bound; the
//! counters it reports.
//!
//! Invariant: a stop never cuts a batch in half: the loop finishes or abandons the step
//! in progress (an abandoned transaction rolls back), then closes every lane before it
//! leaves the group.

use std::collections::VecDeque;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;

use super::{IngestConsumer, Pipeline, PipelineError, StepOutcome};
use crate::config::Config;
use crate::telemetry::http::{self, Endpoints};

/// Counters of a pipeline's life, for reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub batches: u64,
    pub rows: u64,
    pub dead_letters: u64,
    /// Transient failures retried (commits and re-reads).
    pub retries: u64,
    /// Partitions found fenced at commit.
    pub fenced: u64,
    /// Commits whose outcome had to be read back from the offset rows.
    pub ambiguous_commits: u64,
    /// Durations of recent successful commits.
    pub commit_latency: Latencies,
}

/// The most recent commit durations, for percentiles; bounded so a long-running worker
/// does not grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latencies(VecDeque<Duration>);

impl Latencies {
    const CAPACITY: usize = 4096;

    pub(super) fn record(&mut self, d: Duration) {
        if self.0.len() == Self::CAPACITY {
            self.0.pop_front();
        }
        self.0.push_back(d);
    }

    /// The `p`-th percentile (0..=100) of the recorded durations.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let mut sorted: Vec<Duration> = self.0.iter().copied().collect();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
    }
}

/// How long leaving the group may take at shutdown.
const LEAVE_LIMIT: Duration = Duration::from_secs(10);

/// Unsubscribes and closes the consumer, giving up after [`LEAVE_LIMIT`]: librdkafka's
/// close waits for the group to take the leave, which a group stuck mid-rebalance (or
/// an unreachable coordinator) can hold far longer than a stop may take. Offsets live
/// in Postgres, so a leave left unfinished costs only the session timeout before the
/// partitions move on.
pub(super) fn leave_group(consumer: IngestConsumer) {
    let (left, leaving) = std::sync::mpsc::channel();
    let closer = std::thread::Builder::new()
        .name("leave-group".into())
        .spawn(move || {
            consumer.unsubscribe();
            drop(consumer);
            let _ = left.send(());
        });
    if let Err(e) = closer {
        tracing::error!(error = %e, "cannot start a thread to leave the group; exiting without leaving");
        return;
    }
    if tokio::task::block_in_place(|| leaving.recv_timeout(LEAVE_LIMIT)).is_err() {
        tracing::warn!(
            limit_secs = LEAVE_LIMIT.as_secs(),
            "leaving the consumer group did not finish in time; stopping without it (the group \
             moves the partitions on after its session timeout)"
        );
    }
}

/// Runs the loop until `shutdown` is cancelled or `cycles` steps have run.
pub async fn run(
    config: Config,
    cycles: Option<u64>,
    shutdown: CancellationToken,
) -> Result<Stats, PipelineError> {
    let sleep = Duration::from_secs_f64(config.run.sleep_secs);
    let metrics_addr = config.run.metrics_addr.clone();
    let stuck_after = config.max_poll_interval() * 2;
    // A stop during start-up (waiting for Postgres, or for another worker's migration)
    // drops what was opened: nothing is claimed before the loop runs.
    let mut pipeline = tokio::select! {
        pipeline = Pipeline::connect(config) => pipeline?,
        () = shutdown.cancelled() => {
            tracing::info!("stopped while starting");
            return Ok(Stats::default());
        }
    };
    let stop_http = CancellationToken::new();
    let server = match metrics_addr {
        Some(addr) => {
            let endpoints = Endpoints {
                metrics: pipeline.observers().metrics.clone(),
                health: pipeline.observers().health.clone(),
                pool: pipeline.store.pool().clone(),
                stuck_after,
            };
            let (_, server) = http::serve(&addr, endpoints, stop_http.clone())
                .await
                .map_err(|source| PipelineError::Serve { addr, source })?;
            Some(server)
        }
        None => None,
    };
    let mut done = 0u64;
    let result = loop {
        if shutdown.is_cancelled() || cycles.is_some_and(|c| done >= c) {
            break Ok(());
        }
        done += 1;
        match pipeline.step(&shutdown).await {
            Ok(StepOutcome::Idle) if !sleep.is_zero() => {
                tokio::select! {
                    () = tokio::time::sleep(sleep) => {}
                    () = shutdown.cancelled() => {}
                }
            }
            Ok(_) => {}
            Err(PipelineError::ShutDown) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // The id the offset rows name, so a stopped worker's log lines up with them.
    let owner = pipeline.owner().to_owned();
    let stats = pipeline.close().await;
    stop_http.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    let ms = |p| {
        stats
            .commit_latency
            .percentile(p)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    tracing::info!(
        owner = %owner,
        batches = stats.batches,
        rows = stats.rows,
        dead_letters = stats.dead_letters,
        retries = stats.retries,
        fenced = stats.fenced,
        ambiguous_commits = stats.ambiguous_commits,
        commit_p50_ms = ms(50.0),
        commit_p99_ms = ms(99.0),
        "worker stopped"
    );
    result.map(|()| stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_pick_the_ranked_sample() {
        let mut l = Latencies::default();
        assert_eq!(l.percentile(50.0), None);
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.percentile(50.0), Some(Duration::from_millis(50)));
        assert_eq!(l.percentile(99.0), Some(Duration::from_millis(99)));
        assert_eq!(l.percentile(100.0), Some(Duration::from_millis(100)));
    }
}
