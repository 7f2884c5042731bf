//! Where a claimed partition starts, checked against what the broker still holds.
//!
//! A first claim stores a concrete offset (the broker's low or high watermark, per
//! `kafka.auto_offset_reset`) before any record of it is handed on, so every later
//! claim resumes there. A stored offset outside the broker's log is never moved by
//! librdkafka (its `auto.offset.reset` is `error`): `kafka.on_data_loss` decides, and
//! `skip` records the gap with the partition's next batch.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::Consumer;

use super::{Inspector, TopicPartition};
use crate::config::{OffsetReset, OnDataLoss};
use crate::store::{Gap, GapKind};

/// How long one watermark request may take.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a claimed partition starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Fetch from `fetch`; commits continue from `next`, which must be stored first when
    /// `store` (the partition had no stored offset).
    At {
        next: i64,
        fetch: i64,
        gap: Option<Gap>,
        store: bool,
    },
    /// No stored offset, and the broker did not say where its log starts or ends:
    /// claim again later.
    Unknown,
    /// The stored offset is outside the broker's log, and the policy is to stop.
    Lost(DataLoss),
}

/// A stored offset the broker's log no longer covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataLoss {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub stored: i64,
    pub low: i64,
    pub high: i64,
}

impl fmt::Display for DataLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            group,
            topic,
            partition,
            stored,
            low,
            high,
        } = self;
        let rewind = format!(
            "kafka-pg-ingest offsets rewind --group {group} --topic {topic} --partition {partition} --to-earliest --yes"
        );
        if stored < low {
            write!(
                f,
                "data loss on {topic}/{partition} (group {group}): the stored offset {stored} is below \
                 the oldest offset the broker still has (low watermark {low}, high watermark {high}); \
                 records {stored}..{low} were deleted (retention) before they were ingested. \
                 To continue from offset {low}, run `{rewind}`, or set kafka.on_data_loss: skip \
                 to record such gaps in ingest.offset_gaps and move on"
            )
        } else {
            write!(
                f,
                "data loss on {topic}/{partition} (group {group}): the stored offset {stored} is beyond \
                 the end of the partition on the broker (low watermark {low}, high watermark {high}); \
                 the topic was deleted and re-created, or its log truncated. To read the partition \
                 again from offset {low} (its records replace the rows stored at the same offsets), \
                 run `{rewind}`, or set kafka.on_data_loss: skip to skip the new log's records below \
                 offset {stored}, recorded in ingest.offset_gaps"
            )
        }
    }
}

/// The gap between a position and the broker's log `low..high`, if it lies outside.
pub fn outside(position: i64, (low, high): (i64, i64)) -> Option<Gap> {
    let (from, to, kind) = if position < low {
        (position, low, GapKind::BelowLogStart)
    } else if position > high {
        (low, position, GapKind::BeyondLogEnd)
    } else {
        return None;
    };
    Some(Gap {
        from,
        to,
        kind,
        low,
        high,
        detected_at: Utc::now(),
    })
}

/// Where to fetch from to skip a gap: the log start when records were deleted, else
/// the log end (records below the stored offset are dropped as they arrive).
pub fn fetch_past(gap: &Gap) -> i64 {
    match gap.kind {
        GapKind::BelowLogStart => gap.low,
        GapKind::BeyondLogEnd => gap.high,
    }
}

/// Decides where a partition starts from its stored offset and the broker's
/// watermarks (`None` when the broker did not answer).
pub fn plan(
    group: &str,
    tp: &TopicPartition,
    stored: Option<i64>,
    marks: Option<(i64, i64)>,
    reset: OffsetReset,
    policy: OnDataLoss,
) -> Start {
    let (stored, (low, high)) = match (stored, marks) {
        (None, None) => return Start::Unknown,
        (None, Some((low, high))) => {
            let start = match reset {
                OffsetReset::Earliest => low,
                OffsetReset::Latest => high,
            };
            return Start::At {
                next: start,
                fetch: start,
                gap: None,
                store: true,
            };
        }
        // librdkafka's fetch checks it: with auto.offset.reset=error an offset out of
        // range comes back as an error, and the loop checks the watermarks then.
        (Some(n), None) => {
            return Start::At {
                next: n,
                fetch: n,
                gap: None,
                store: false,
            };
        }
        (Some(n), Some(marks)) => (n, marks),
    };
    match (outside(stored, (low, high)), policy) {
        (None, _) => Start::At {
            next: stored,
            fetch: stored,
            gap: None,
            store: false,
        },
        (Some(gap), OnDataLoss::Skip) => Start::At {
            next: stored,
            fetch: fetch_past(&gap),
            gap: Some(gap),
            store: false,
        },
        (Some(_), OnDataLoss::Stop) => Start::Lost(DataLoss {
            group: group.to_owned(),
            topic: tp.0.clone(),
            partition: tp.1,
            stored,
            low,
            high,
        }),
    }
}

/// The low and high watermarks of each partition the broker answered for within
/// `limit` in all.
pub fn watermarks(
    client: &Inspector,
    partitions: &[TopicPartition],
    limit: Duration,
) -> HashMap<TopicPartition, (i64, i64)> {
    let deadline = Instant::now() + limit;
    let mut marks = HashMap::new();
    for tp in partitions {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match client.fetch_watermarks(&tp.0, tp.1, left.min(WATERMARK_TIMEOUT)) {
            Ok(m) => {
                marks.insert(tp.clone(), m);
            }
            Err(e) => {
                tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, "cannot read the partition's watermarks");
            }
        }
    }
    marks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(next: i64, fetch: i64, store: bool) -> Start {
        Start::At {
            next,
            fetch,
            gap: None,
            store,
        }
    }

    #[test]
    fn a_first_claim_starts_at_a_concrete_offset_that_is_stored() {
        let tp = ("t".to_owned(), 0);
        let plan = |stored, marks, reset| plan("g", &tp, stored, marks, reset, OnDataLoss::Stop);
        assert_eq!(
            plan(None, Some((10, 90)), OffsetReset::Earliest),
            at(10, 10, true)
        );
        assert_eq!(
            plan(None, Some((10, 90)), OffsetReset::Latest),
            at(90, 90, true)
        );
        assert_eq!(plan(None, None, OffsetReset::Latest), Start::Unknown);
        assert_eq!(plan(Some(50), None, OffsetReset::Latest), at(50, 50, false));
        for stored in [10, 50, 90] {
            assert_eq!(
                plan(Some(stored), Some((10, 90)), OffsetReset::Earliest),
                at(stored, stored, false)
            );
        }
    }

    #[test]
    fn a_stored_offset_outside_the_log_stops_or_skips_by_policy() {
        let tp = ("t".to_owned(), 3);
        let Start::Lost(below) = plan(
            "g",
            &tp,
            Some(5),
            Some((10, 90)),
            OffsetReset::Earliest,
            OnDataLoss::Stop,
        ) else {
            panic!("stops below the log start");
        };
        let text = below.to_string();
        for part in [
            "t/3",
            "group g",
            "stored offset 5",
            "low watermark 10",
            "high watermark 90",
            "--partition 3 --to-earliest",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        let Start::Lost(beyond) = plan(
            "g",
            &tp,
            Some(500),
            Some((0, 90)),
            OffsetReset::Earliest,
            OnDataLoss::Stop,
        ) else {
            panic!("stops beyond the log end");
        };
        assert!(beyond.to_string().contains("re-created"), "{beyond}");

        // Under skip: (next, fetch, gap from, gap to, gap kind).
        let skipped = |stored, log| {
            let Start::At {
                next,
                fetch,
                gap: Some(gap),
                store: false,
            } = plan(
                "g",
                &tp,
                Some(stored),
                Some(log),
                OffsetReset::Latest,
                OnDataLoss::Skip,
            )
            else {
                panic!("skips {stored} outside {log:?}");
            };
            (next, fetch, gap.from, gap.to, gap.kind)
        };
        assert_eq!(skipped(5, (10, 90)), (5, 10, 5, 10, GapKind::BelowLogStart));
        assert_eq!(
            skipped(500, (0, 90)),
            (500, 90, 0, 500, GapKind::BeyondLogEnd)
        );
    }
}
