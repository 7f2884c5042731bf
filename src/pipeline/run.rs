//! Running the loop as a service: [`run`] steps a [`Pipeline`] until shutdown, serves
//! the metrics endpoints meanwhile, and leaves the consumer group within a bound; the
//! counters it reports.
//!
//! Invariant: a stop never cuts a batch in half: the loop finishes or abandons the step
//! in progress (an abandoned transaction rolls back), then closes every lane before it
//! leaves the group.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;

use super::{IngestConsumer, Pipeline, PipelineError, StepOutcome};
use crate::config::Config;
use crate::telemetry::http::{self, Endpoints};

/// How often the loop logs its progress at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// Where the last progress line counted from.
struct Progress {
    at: Instant,
    rows: u64,
    dead_letters: u64,
}

impl Pipeline {
    /// Logs the rows and dead letters landed since `last`, their rate, and the lag of
    /// the partitions held; nothing when nothing landed and nothing waits.
    fn log_progress(&self, last: &mut Progress) {
        let now = Instant::now();
        let secs = now.duration_since(last.at).as_secs_f64().max(1e-3);
        let rows = self.stats.rows - last.rows;
        let dead_letters = self.stats.dead_letters - last.dead_letters;
        let positions = self.stored_lags();
        let partitions = positions.len();
        let lag: i64 = positions.iter().filter_map(|p| p.2).sum();
        *last = Progress {
            at: now,
            rows: self.stats.rows,
            dead_letters: self.stats.dead_letters,
        };
        if rows + dead_letters == 0 && lag == 0 {
            return;
        }
        let rows_per_s = (rows as f64 / secs).round() as u64;
        tracing::info!(rows, dead_letters, rows_per_s, partitions, lag,
            "progress: {rows} rows and {dead_letters} dead letters in {secs:.0} s ({rows_per_s} rows/s); \
             {partitions} partitions held, {lag} records behind");
    }
}

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

/// Runs the loop until `shutdown` is cancelled or `cycles` steps have run since this
/// worker first held a partition.
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
    let mut progress = Progress {
        at: Instant::now(),
        rows: 0,
        dead_letters: 0,
    };
    let result = loop {
        if progress.at.elapsed() >= PROGRESS_EVERY {
            pipeline.log_progress(&mut progress);
        }
        if shutdown.is_cancelled() || cycles.is_some_and(|c| done >= c) {
            break Ok(());
        }
        let step = pipeline.step(&shutdown).await;
        // Cycles count from the first claim: joining the group takes polls too.
        if done > 0 || !pipeline.assignments.lock().is_empty() {
            done += 1;
        }
        match step {
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
