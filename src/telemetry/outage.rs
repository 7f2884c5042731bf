//! Failures of a dependency as state changes: one line when it starts failing (with the
//! reason), at most one "still failing" line per [`REPEAT`] while it does, and one when it
//! works again (with how long it did not). librdkafka reports every reconnect attempt
//! and a batch is retried every backoff delay: logged one by one, an outage of an hour
//! would bury every other line. Metrics and `/readyz` count what these lines leave out.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Least time between two lines about failures of one dependency.
pub const REPEAT: Duration = Duration::from_secs(30);

/// One dependency's failures, shared by every thread that reports them.
#[derive(Debug)]
pub struct Outage {
    /// What failed, as the lines name it ("Kafka", "Postgres", ...).
    what: &'static str,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The first and the latest failure of the current outage.
    since: Option<Instant>,
    last: Option<Instant>,
    /// When the last line about failures was written.
    said: Option<Instant>,
    /// Failures of the current outage, and those since the last line.
    failures: u64,
    unsaid: u64,
    /// A line announced the current outage, so its end gets one too.
    announced: bool,
}

/// The dependencies whose failures a worker reports as outages, each shared by the
/// threads that meet them.
#[derive(Debug, Clone)]
pub struct Outages {
    pub kafka: Arc<Outage>,
    /// Reads and claims; a commit can fail where they work (a full disk, a timeout).
    pub postgres: Arc<Outage>,
    pub commits: Arc<Outage>,
    pub registry: Arc<Outage>,
}

impl Default for Outages {
    fn default() -> Self {
        Self {
            kafka: Arc::new(Outage::new("Kafka")),
            postgres: Arc::new(Outage::new("Postgres")),
            commits: Arc::new(Outage::new("Batch commits")),
            registry: Arc::new(Outage::new("the schema registry")),
        }
    }
}

/// A line to write about a dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// It started failing (or failed again, [`REPEAT`] after the last line).
    Failing,
    /// It is still failing: for `down` since the outage began, `failures` of them
    /// since the last line.
    Still { down: Duration, failures: u64 },
    /// It works again, after `down` and `failures` failures.
    Working { down: Duration, failures: u64 },
}

impl State {
    fn failed(&mut self, now: Instant) -> Option<Line> {
        self.failures += 1;
        self.unsaid += 1;
        self.last = Some(now);
        let quiet = self.said.is_some_and(|said| now < said + REPEAT);
        let line = match self.since {
            None => {
                self.since = Some(now);
                Line::Failing
            }
            Some(since) if self.announced => Line::Still {
                down: now.duration_since(since),
                failures: self.unsaid,
            },
            Some(_) => Line::Failing,
        };
        if quiet {
            return None;
        }
        self.said = Some(now);
        self.unsaid = 0;
        self.announced = true;
        Some(line)
    }

    fn recovered(&mut self, now: Instant) -> Option<Line> {
        let since = self.since.take()?;
        self.last = None;
        let failures = std::mem::take(&mut self.failures);
        self.unsaid = 0;
        let line = std::mem::take(&mut self.announced).then(|| Line::Working {
            down: now.duration_since(since),
            failures,
        });
        if line.is_some() {
            // A failure right after the end (a stale pooled connection) is counted, not
            // told: it would be a start and an end a moment apart.
            self.said = Some(now);
        }
        line
    }
}

impl Outage {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports a failure, written only if it starts an outage or the last line is older
    /// than [`REPEAT`]: a dependency that fails and works by turns writes at most one
    /// failure line per [`REPEAT`], and an end only after a written start.
    pub fn failed(&self, error: &dyn fmt::Display) {
        let line = self.state().failed(Instant::now());
        let what = self.what;
        match line {
            Some(Line::Failing) => {
                tracing::warn!(dependency = what, error = %error, "{what} failing; retrying");
            }
            Some(Line::Still { down, failures }) => {
                let down_s = down.as_secs();
                tracing::warn!(dependency = what, error = %error, down_s, failures,
                    "{what} still failing after {down_s} s ({failures} failures since the last line); retrying");
            }
            Some(Line::Working { .. }) | None => {}
        }
    }

    /// Reports that the dependency works: ends the current outage, if any.
    pub fn recovered(&self) {
        self.end(|_| true);
    }

    /// Reports that the dependency seems to work: ends the current outage if no failure
    /// came for `quiet`.
    pub fn quiet_for(&self, quiet: Duration) {
        self.end(|state| state.last.is_none_or(|last| last.elapsed() >= quiet));
    }

    /// Whether a failure was reported since the dependency last worked.
    pub fn failing(&self) -> bool {
        self.state().since.is_some()
    }

    fn end(&self, over: impl FnOnce(&State) -> bool) {
        let line = {
            let mut state = self.state();
            if !over(&state) {
                return;
            }
            state.recovered(Instant::now())
        };
        if let Some(Line::Working { down, failures }) = line {
            let what = self.what;
            let down_ms = down.as_millis() as u64;
            tracing::info!(dependency = what, down_ms, failures,
                "{what} working again after {:.1} s ({failures} failures reported)", down.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn an_outage_of_an_hour_failing_every_second_writes_one_line_per_30_s_and_its_end() {
        let start = Instant::now();
        let mut state = State::default();
        let lines: Vec<(u64, Line)> = (0..3600)
            .filter_map(|s| state.failed(at(start, s)).map(|l| (s, l)))
            .collect();
        assert_eq!(lines.len(), 120, "{lines:?}");
        assert_eq!(lines[0], (0, Line::Failing));
        assert_eq!(
            lines[1],
            (30, Line::Still { down: Duration::from_secs(30), failures: 30 })
        );
        assert_eq!(
            state.recovered(at(start, 3600)),
            Some(Line::Working { down: Duration::from_secs(3600), failures: 3600 })
        );
        assert_eq!(state.recovered(at(start, 3601)), None, "one end per outage");
    }

    #[test]
    fn failing_and_working_by_turns_writes_at_most_two_lines_per_30_s() {
        let start = Instant::now();
        let mut state = State::default();
        let mut lines = Vec::new();
        for s in (0..120).step_by(2) {
            lines.extend(state.failed(at(start, s)));
            lines.extend(state.recovered(at(start, s + 1)));
        }
        // A start at 0 s, its end at 1 s; the next start is the first failure 30 s after
        // that end (32 s), and so on: the turns between are counted only.
        assert_eq!(lines.len(), 8, "{lines:?}");
        assert!(lines.iter().step_by(2).all(|l| *l == Line::Failing));
    }

    #[test]
    fn a_single_failure_gets_a_start_and_an_end() {
        let start = Instant::now();
        let mut state = State::default();
        assert_eq!(state.failed(start), Some(Line::Failing));
        assert_eq!(
            state.recovered(at(start, 2)),
            Some(Line::Working { down: Duration::from_secs(2), failures: 1 })
        );
        assert_eq!(state.recovered(at(start, 3)), None, "working without a failure says nothing");
        assert_eq!(state.failed(at(start, 4)), None, "a failure right after an end is counted");
        assert_eq!(state.recovered(at(start, 5)), None, "and so is its end");
    }
}
