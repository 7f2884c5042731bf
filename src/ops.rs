//! Operator commands: `offsets show|rewind` and `dlq list|show|retry|purge`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::{Config, WriteMode};
use crate::kafka::{self, Inspector};
use crate::progress::Progress;
use crate::record::hex;
use crate::routes::Routes;
use crate::store::admin::{self, DeadLetter, DeadLetterFilter, OffsetRow};
use crate::store::{self, Store};
use crate::telemetry::outage::Outage;

/// How long one broker metadata request may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// One partition in `offsets show`.
#[derive(Debug, Serialize)]
pub struct OffsetStatus {
    #[serde(flatten)]
    pub row: OffsetRow,
    /// The broker's low and high watermarks; `None` when the broker did not answer.
    pub low: Option<i64>,
    pub high: Option<i64>,
    /// Records on the broker not yet committed to Postgres.
    pub lag: Option<i64>,
}

/// The stored offsets of `group` (every group when `None`) with the broker's view.
pub async fn show(
    config: &Config,
    group: Option<&str>,
    watermarks: bool,
) -> anyhow::Result<Vec<OffsetStatus>> {
    let pool = store::connect_pool(config).await?;
    let rows = admin::offset_rows(&pool, group, None).await?;
    let client = watermarks.then(|| kafka::metadata_client(config, Arc::new(Outage::new("Kafka")))).transpose()?;
    tokio::task::block_in_place(|| {
        rows.into_iter()
            .map(|row| {
                let marks = match &client {
                    Some(client) => {
                        match client.fetch_watermarks(&row.topic, row.partition, BROKER_TIMEOUT) {
                            Ok(marks) => Some(marks),
                            // A broker that does not answer answers no other partition:
                            // one wait, not one per row.
                            Err(e) if unreachable(&e) => bail!(
                                "the broker ({}) gave no watermarks within {} s: {e}; \
                                 pass --no-watermarks to show the stored offsets alone",
                                config.kafka.brokers,
                                BROKER_TIMEOUT.as_secs()
                            ),
                            Err(e) => {
                                eprintln!(
                                    "warning: no watermarks for {}/{}: {e}",
                                    row.topic, row.partition
                                );
                                None
                            }
                        }
                    }
                    None => None,
                };
                let lag = marks.map(|(low, high)| (high - row.next_offset.unwrap_or(low)).max(0));
                Ok(OffsetStatus {
                    low: marks.map(|m| m.0),
                    high: marks.map(|m| m.1),
                    lag,
                    row,
                })
            })
            .collect()
    })
}

/// Whether a broker request failed for want of a broker (none reachable, no answer in
/// time), not for what it asked.
fn unreachable(err: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        err.rdkafka_error_code(),
        Some(
            Code::OperationTimedOut
                | Code::AllBrokersDown
                | Code::BrokerTransportFailure
                | Code::RequestTimedOut
        )
    )
}

/// The text table of `offsets show`.
pub fn format_offsets(statuses: &[OffsetStatus]) -> String {
    let opt = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let rows = statuses
        .iter()
        .map(|s| {
            vec![
                s.row.consumer_group.clone(),
                s.row.topic.clone(),
                s.row.partition.to_string(),
                opt(s.row.next_offset),
                opt(s.low),
                opt(s.high),
                opt(s.lag),
                // A worker that exited cleanly left its partitions unowned.
                if s.row.owner.is_empty() { "-".to_owned() } else { s.row.owner.clone() },
                s.row.epoch.to_string(),
                s.row.updated_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                opt(s.row.replay_until),
            ]
        })
        .collect();
    table(
        &[
            "GROUP",
            "TOPIC",
            "PARTITION",
            "NEXT_OFFSET",
            "LOW",
            "HIGH",
            "LAG",
            "OWNER",
            "EPOCH",
            "UPDATED_AT",
            "REPLAY_UNTIL",
        ],
        rows,
    )
}

/// Where a rewind moves the stored offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewindTarget {
    Offset(i64),
    /// The first offset whose record timestamp is at or after this time (the high
    /// watermark when there is none).
    Time(DateTime<Utc>),
    /// The low watermark: the oldest record the broker still has.
    Earliest,
}

/// One partition of a rewind plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedMove {
    pub partition: i32,
    pub from: Option<i64>,
    pub to: i64,
    /// Records read again: how far `to` lies below `from`.
    pub reread: i64,
    /// Once applied: where the partition's replay ends (this rewind's, or an earlier
    /// one's still under way).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_until: Option<i64>,
}

impl PlannedMove {
    fn new(partition: i32, from: Option<i64>, to: i64) -> Self {
        Self {
            partition,
            from,
            to,
            reread: from.map_or(0, |from| (from - to).max(0)),
            replay_until: None,
        }
    }
}

/// What a rewind will do (or did, when `applied`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RewindPlan {
    pub group: String,
    pub topic: String,
    /// Leave rows already in the table instead of replacing them with re-read records.
    pub keep: bool,
    pub moves: Vec<PlannedMove>,
    /// Targets the broker's watermarks moved (an offset beyond the end, say).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub applied: bool,
}

/// Plans a rewind of `topic` for `group` (the given partitions, or every stored one);
/// with `apply`, moves the offsets in one transaction.
pub async fn rewind(
    config: &Config,
    topic: &str,
    partitions: &[i32],
    target: RewindTarget,
    keep: bool,
    apply: bool,
) -> anyhow::Result<RewindPlan> {
    let group = &config.kafka.group;
    let routes = Routes::new(config)?;
    if let Some(route) = routes.route_of(topic).map(|i| routes.decoders()[i].route())
        && route.mode == WriteMode::Upsert
        && !route.orders_versions()
    {
        bail!(
            "route {} ({} -> {}) upserts without recording where a row came from, so a replay \
             would write older records of a key over newer ones: set `version:` to a column \
             ordering a key's versions, or map columns from @partition and @offset (and @topic, \
             for a route reading several topics) in the route; re-read records older than a row \
             then leave it as it is",
            route.key,
            route.topics_label(),
            route.table
        );
    }
    let pool = store::connect_pool(config).await?;
    let rows = admin::offset_rows(&pool, Some(group), Some(topic)).await?;
    if let Some(p) = partitions
        .iter()
        .find(|p| !rows.iter().any(|r| r.partition == **p))
    {
        bail!(
            "group `{group}` has no stored offset for {topic}/{p}: nothing to rewind there \
             (a partition never claimed starts at kafka.auto_offset_reset)"
        );
    }
    let rows: Vec<OffsetRow> = rows
        .into_iter()
        .filter(|r| partitions.is_empty() || partitions.contains(&r.partition))
        .collect();
    if rows.is_empty() {
        bail!("group `{group}` has no stored offsets for topic `{topic}`");
    }
    let client = kafka::metadata_client(config, Arc::new(Outage::new("Kafka")))?;
    let targets = tokio::task::block_in_place(|| resolve(&client, topic, &rows, target))?;
    let notes = rows
        .iter()
        .zip(&targets)
        .filter(|(_, (to, wanted))| wanted != to)
        .map(|(row, &(to, wanted))| {
            let side = if wanted > to { "high" } else { "low" };
            format!(
                "partition {}: offset {wanted} lies beyond the broker's {side} watermark: moving to {to}",
                row.partition
            )
        })
        .collect();
    let mut moves: Vec<PlannedMove> = rows
        .iter()
        .zip(targets)
        .map(|(row, (to, _))| PlannedMove::new(row.partition, row.next_offset, to))
        .collect();
    if apply {
        let wanted: Vec<(i32, i64)> = moves.iter().map(|m| (m.partition, m.to)).collect();
        // What the rows held when moved, which a worker may have advanced since the plan.
        let moved = admin::rewind(&pool, group, topic, &wanted, keep).await?;
        moves = moved
            .into_iter()
            .map(|m| PlannedMove {
                replay_until: m.replay_until,
                ..PlannedMove::new(m.partition, m.from, m.to)
            })
            .collect();
    }
    Ok(RewindPlan {
        group: group.clone(),
        topic: topic.to_owned(),
        keep,
        moves,
        notes,
        applied: apply,
    })
}

/// Follows the replay an applied rewind started until every moved partition has read
/// again up to where it stood (its `replay_until`, cleared by the worker that passes it),
/// showing the records replayed, the rate and the time left. The group's workers do the
/// replay: without one running, this waits until interrupted (the rewind stays either
/// way), saying so when nothing moves for [`STALLED`].
pub async fn wait_for_replay(config: &Config, plan: &RewindPlan) -> anyhow::Result<()> {
    // What each moved partition replays: from its new offset to its replay_until (which
    // may lie beyond where this rewind found it, left by an earlier one).
    let spans: Vec<(i32, i64, i64)> = plan
        .moves
        .iter()
        .filter_map(|m| Some((m.partition, m.to, m.replay_until?)))
        .filter(|(_, to, until)| until > to)
        .collect();
    let total: i64 = spans.iter().map(|(_, to, until)| until - to).sum();
    if spans.is_empty() {
        eprintln!("nothing to wait for: no moved partition reads records again");
        return Ok(());
    }
    let pool = store::connect_pool(config).await?;
    eprintln!(
        "waiting for the workers of group `{}` to read {total} records of {} again \
         (Ctrl-C stops waiting; the rewind stays)",
        plan.group, plan.topic
    );
    let mut progress = Progress::new("records replayed", total as u64);
    let (mut last, mut moved_at) = (-1, tokio::time::Instant::now());
    loop {
        let rows = admin::offset_rows(&pool, Some(&plan.group), Some(&plan.topic)).await?;
        let mut done = 0;
        let mut replaying = false;
        for &(partition, to, until) in &spans {
            let row = rows.iter().find(|r| r.partition == partition);
            let next = row.and_then(|r| r.next_offset).unwrap_or(to);
            let cleared = row.is_none_or(|r| r.replay_until.is_none());
            done += if cleared { until - to } else { (next - to).clamp(0, until - to) };
            replaying |= !cleared;
        }
        progress.set(done as u64);
        if !replaying {
            progress.finish();
            return Ok(());
        }
        if done != last {
            (last, moved_at) = (done, tokio::time::Instant::now());
        } else if moved_at.elapsed() >= STALLED {
            progress.suspend(|| {
                tracing::warn!(
                    group = %plan.group,
                    "the replay has not moved for {} s: is a worker of the group running \
                     (`offsets show` names the owners)? A partition whose last offsets hold \
                     no record (transaction markers) ends its replay with its next record",
                    STALLED.as_secs()
                );
            });
            moved_at = tokio::time::Instant::now();
        }
        tokio::time::sleep(REPLAY_POLL).await;
    }
}

/// How long `offsets rewind --wait` sees no progress before it says so.
const STALLED: Duration = Duration::from_secs(30);

/// How often `offsets rewind --wait` reads the stored offsets.
const REPLAY_POLL: Duration = Duration::from_millis(500);

/// The target offset of each row, kept within the broker's watermarks, with the offset
/// wanted before that.
fn resolve(
    client: &Inspector,
    topic: &str,
    rows: &[OffsetRow],
    target: RewindTarget,
) -> anyhow::Result<Vec<(i64, i64)>> {
    let times = match target {
        RewindTarget::Time(at) => {
            let mut list = TopicPartitionList::new();
            for row in rows {
                list.add_partition_offset(
                    topic,
                    row.partition,
                    Offset::Offset(at.timestamp_millis()),
                )?;
            }
            Some(
                client
                    .offsets_for_times(list, BROKER_TIMEOUT)
                    .context("asking the broker for offsets by time")?,
            )
        }
        _ => None,
    };
    rows.iter()
        .map(|row| {
            let (low, high) = client
                .fetch_watermarks(topic, row.partition, BROKER_TIMEOUT)
                .with_context(|| format!("reading the watermarks of {topic}/{}", row.partition))?;
            let wanted = match target {
                RewindTarget::Offset(n) => n,
                RewindTarget::Earliest => low,
                RewindTarget::Time(at) => {
                    let answer = times
                        .as_ref()
                        .and_then(|t| t.find_partition(topic, row.partition))
                        .map(|e| e.offset());
                    match answer {
                        Some(Offset::Offset(n)) => n,
                        // "No record at or after the time" -- or a broker without a time
                        // index (librdkafka's mock cluster): the records themselves tell.
                        _ => first_offset_at(client, topic, row.partition, (low, high), at)?,
                    }
                }
            };
            Ok((wanted.clamp(low, high), wanted))
        })
        .collect()
}

/// The first offset in `low..high` whose record timestamp is at or after `at` (`high`
/// when none is), by binary search over the records; timestamps are taken as
/// non-decreasing, as producer create times are.
fn first_offset_at(
    client: &Inspector,
    topic: &str,
    partition: i32,
    (low, high): (i64, i64),
    at: DateTime<Utc>,
) -> anyhow::Result<i64> {
    let (mut lo, mut hi) = (low, high);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let (offset, timestamp) = record_at(client, topic, partition, mid)?;
        if timestamp >= at.timestamp_millis() {
            hi = mid;
        } else {
            // Compaction may have skipped offsets: the record read may sit past `mid`.
            lo = offset.max(mid) + 1;
        }
    }
    Ok(lo)
}

/// The offset and timestamp (ms) of the first record at or after `offset`.
fn record_at(
    client: &Inspector,
    topic: &str,
    partition: i32,
    offset: i64,
) -> anyhow::Result<(i64, i64)> {
    use rdkafka::Message;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    client.assign(&list)?;
    let deadline = std::time::Instant::now() + BROKER_TIMEOUT;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        if let Some(message) = client.poll(left) {
            let message = message.context("reading a record to find its timestamp")?;
            if message.partition() == partition && message.offset() >= offset {
                let timestamp = message.timestamp().to_millis().with_context(|| {
                    format!(
                        "record {topic}/{partition}@{} has no timestamp",
                        message.offset()
                    )
                })?;
                return Ok((message.offset(), timestamp));
            }
        }
    }
    bail!("no record of {topic}/{partition} at offset {offset} arrived within {BROKER_TIMEOUT:?}")
}

/// The text of a rewind plan.
pub fn format_plan(plan: &RewindPlan) -> String {
    let mode = if plan.keep {
        "rows already in the table stay"
    } else {
        "re-read records replace their rows"
    };
    let rows = plan
        .moves
        .iter()
        .map(|m| {
            vec![
                m.partition.to_string(),
                m.from.map_or_else(|| "-".into(), |n| n.to_string()),
                m.to.to_string(),
                m.reread.to_string(),
            ]
        })
        .collect();
    let total: i64 = plan.moves.iter().map(|m| m.reread).sum();
    let status = if plan.applied {
        "applied: workers continue from the new offsets"
    } else {
        "nothing changed: add --yes to apply"
    };
    let notes: String = plan.notes.iter().map(|n| format!("{n}\n")).collect();
    format!(
        "rewind of topic {} for group {} ({mode})\n{}{notes}{total} records will be read again\n{status}\n",
        plan.topic,
        plan.group,
        table(&["PARTITION", "FROM", "TO", "RE-READ"], rows)
    )
}

/// Counts by reason, then the dead letters themselves.
#[derive(Debug, Serialize)]
pub struct DeadLetterListing {
    pub counts: Vec<(String, i64)>,
    /// How many dead letters the filter matches (`dead_letters` holds at most the limit).
    pub total: i64,
    pub dead_letters: Vec<DeadLetter>,
}

pub async fn list_dead_letters(
    config: &Config,
    filter: &DeadLetterFilter,
    limit: i64,
) -> anyhow::Result<DeadLetterListing> {
    let pool = store::connect_pool(config).await?;
    let counts = admin::dead_letter_counts(&pool, filter).await?;
    Ok(DeadLetterListing {
        total: counts.iter().map(|(_, n)| n).sum(),
        counts,
        dead_letters: admin::dead_letters(&pool, filter, limit).await?,
    })
}

pub fn format_listing(listing: &DeadLetterListing) -> String {
    let counts = listing
        .counts
        .iter()
        .map(|(reason, n)| vec![reason.clone(), n.to_string()])
        .collect();
    let rows = listing
        .dead_letters
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.consumer_group.clone(),
                format!("{}/{}@{}", d.topic, d.partition, d.offset),
                d.reason_code.clone(),
                d.attempts.to_string(),
                d.last_failed_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                d.reason.chars().take(60).collect(),
            ]
        })
        .collect();
    let shown = listing.dead_letters.len() as i64;
    let more = if shown < listing.total {
        format!(
            "showing the oldest {shown} of {}; pass --limit N (or --reason, --topic, --since) to see others\n",
            listing.total
        )
    } else {
        String::new()
    };
    format!(
        "{}\n{}{more}",
        table(&["REASON", "COUNT"], counts),
        table(
            &[
                "ID",
                "GROUP",
                "RECORD",
                "REASON",
                "ATTEMPTS",
                "LAST_FAILED_AT",
                "DETAIL"
            ],
            rows
        )
    )
}

/// One dead letter by id.
pub async fn show_dead_letter(config: &Config, id: i64) -> anyhow::Result<DeadLetter> {
    let pool = store::connect_pool(config).await?;
    let filter = DeadLetterFilter {
        ids: vec![id],
        ..DeadLetterFilter::default()
    };
    admin::dead_letters(&pool, &filter, 1)
        .await?
        .pop()
        .with_context(|| format!("no dead letter with id {id}"))
}

/// A dead letter in full: the value as text when it is UTF-8, else hex.
/// A dead letter as `dlq show --json` prints it: with its key and value.
#[derive(Debug, Serialize)]
pub struct ShownDeadLetter<'a> {
    #[serde(flatten)]
    pub letter: &'a DeadLetter,
    pub key: Option<ShownBytes>,
    pub value: Option<ShownBytes>,
}

/// Raw bytes: as text when they are UTF-8, and always as base64.
#[derive(Debug, Serialize)]
pub struct ShownBytes {
    pub utf8: Option<String>,
    pub base64: String,
}

impl<'a> From<&'a DeadLetter> for ShownDeadLetter<'a> {
    fn from(letter: &'a DeadLetter) -> Self {
        use base64::Engine;
        let shown = |bytes: &Option<Vec<u8>>| {
            bytes.as_deref().map(|b| ShownBytes {
                utf8: std::str::from_utf8(b).ok().map(str::to_owned),
                base64: base64::engine::general_purpose::STANDARD.encode(b),
            })
        };
        Self {
            letter,
            key: shown(&letter.key),
            value: shown(&letter.value),
        }
    }
}

pub fn format_dead_letter(d: &DeadLetter) -> String {
    let bytes = |b: &Option<Vec<u8>>| match b.as_deref().map(std::str::from_utf8) {
        None => "(null)".to_owned(),
        Some(Ok(text)) => text.to_owned(),
        Some(Err(_)) => format!("hex:{}", hex(b.as_deref().unwrap_or_default())),
    };
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    format!(
        "id:              {}\ngroup:           {}\nrecord:          {}/{}@{}\nkafka timestamp: {}\n\
         reason code:     {}\nreason:          {}\nsqlstate:        {}\ntrace id:        {}\n\
         attempts:        {}\nfirst failed at: {}\nlast failed at:  {}\nheaders:         {}\n\
         key:             {}\nvalue:\n{}\n",
        d.id,
        d.consumer_group,
        d.topic,
        d.partition,
        d.offset,
        d.kafka_timestamp
            .map_or_else(|| "-".into(), |t| t.to_rfc3339()),
        d.reason_code,
        d.reason,
        opt(&d.sqlstate),
        opt(&d.trace_id),
        d.attempts,
        d.first_failed_at.to_rfc3339(),
        d.last_failed_at.to_rfc3339(),
        d.headers,
        bytes(&d.key),
        bytes(&d.value),
    )
}

/// Decodes the chosen dead letters of the configured group again with the current
/// configuration and moves those that now succeed into the target table.
pub async fn retry_dead_letters(
    config: &Config,
    filter: &DeadLetterFilter,
) -> anyhow::Result<admin::Redrive> {
    let store = Store::connect(config, store::APPLICATION_NAME).await?;
    // A re-drive exports no metrics: its own counter.
    let requests = prometheus_client::metrics::counter::Counter::default();
    let registry =
        crate::registry::Registry::for_routes(&config.schema_registry, store.routes(), requests)
            .map_err(anyhow::Error::msg)?;
    Ok(store.redrive(filter, registry.as_ref()).await?)
}

/// Parses `30d`, `12h`, `15m` or `90s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit: give e.g. 30d, 12h, 15m or 90s"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a whole number"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`: use s, m, h or d"
            ));
        }
    };
    Ok(Duration::from_secs(seconds))
}

/// Left-aligned columns as wide as their widest cell.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_seconds_minutes_hours_and_days() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("7").unwrap_err().contains("no unit"));
        assert!(parse_duration("7w").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn tables_align_columns_to_the_widest_cell() {
        let text = table(&["A", "BB"], vec![vec!["long".into(), "x".into()]]);
        assert_eq!(text, "A     BB\nlong  x\n");
    }
}
