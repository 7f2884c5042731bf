//! Progress of long work for the person waiting on it: on a terminal, a bar with the
//! count, the rate and the time left on stderr; otherwise (a log file, CI) a plain line
//! every [`LINE_EVERY`] and one at the end.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// How often a plain progress line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(10);

/// The progress of one piece of work of `total` units.
pub struct Progress {
    what: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    said: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Starts reporting `what` (e.g. "records produced") out of `total`.
    pub fn new(what: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg}: {wide_bar} {human_pos}/{human_len} ({rate}, {eta} left)",
            ) {
                bar.set_style(style.with_key(
                    "rate",
                    |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0}/s", state.per_sec());
                    },
                ));
            }
            bar.set_message(what);
            bar
        });
        let now = Instant::now();
        Self {
            what,
            total,
            done: 0,
            started: now,
            said: now,
            bar,
        }
    }

    /// Sets how many units are done.
    pub fn set(&mut self, done: u64) {
        self.done = done;
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.said.elapsed() >= LINE_EVERY => self.line(),
            None => {}
        }
    }

    /// Adds `n` units done.
    pub fn add(&mut self, n: u64) {
        self.set(self.done + n);
    }

    /// Runs `say` (a log line) with the bar, if any, out of its way.
    pub fn suspend(&self, say: impl FnOnce()) {
        match &self.bar {
            Some(bar) => bar.suspend(say),
            None => say(),
        }
    }

    /// Ends the report: the bar is cleared, or a last line written.
    pub fn finish(mut self) {
        match self.bar.take() {
            Some(bar) => bar.finish_and_clear(),
            None => self.line(),
        }
    }

    fn line(&mut self) {
        self.said = Instant::now();
        let (what, done, total) = (self.what, self.done, self.total);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let percent = 100.0 * done as f64 / total.max(1) as f64;
        let left = if rate > 0.0 {
            format!("{:.0} s left", total.saturating_sub(done) as f64 / rate)
        } else {
            "time left unknown".to_owned()
        };
        tracing::info!(what, done, total, per_s = rate.round() as u64,
            "{what}: {done}/{total} ({percent:.0}%), {rate:.0}/s, {left}");
    }
}

impl Drop for Progress {
    /// Work that ended early (an error) leaves no bar behind.
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
