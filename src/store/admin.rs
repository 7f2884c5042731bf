//! Operator actions on the stored state: offset rows (show, rewind) and dead letters
//! (list, show, retry, purge).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use sqlx::PgConnection;

use super::commit::{Ranges, copy_fields};
use super::{Batch, Store, StoreError, db};
use crate::config::{Envelope, WriteMode};
use crate::decode::{ReasonCode, Rejection};
use crate::progress::Progress;
use crate::record::Record;

/// One `ingest.offsets` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct OffsetRow {
    pub consumer_group: String,
    pub topic: String,
    pub partition: i32,
    pub next_offset: Option<i64>,
    pub epoch: i64,
    pub owner: String,
    pub updated_at: DateTime<Utc>,
    /// Set while records re-read after a rewind are below where the partition stood.
    pub replay_until: Option<i64>,
}

/// The offset rows of `group` (every group when `None`), optionally of one topic.
pub async fn offset_rows(
    pool: &PgPool,
    group: Option<&str>,
    topic: Option<&str>,
) -> Result<Vec<OffsetRow>, StoreError> {
    sqlx::query_as(
        "SELECT consumer_group, topic, partition, next_offset, epoch, owner, updated_at, replay_until \
         FROM ingest.offsets \
         WHERE ($1::text IS NULL OR consumer_group = $1) AND ($2::text IS NULL OR topic = $2) \
         ORDER BY consumer_group, topic, partition",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(pool)
    .await
    .map_err(db("read offset rows"))
}

/// A stored offset moved by a rewind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Moved {
    pub partition: i32,
    pub from: Option<i64>,
    pub to: i64,
    /// Where the replay the move started (or an earlier one) ends: `None` when nothing
    /// below the partition's furthest offset is read again.
    pub replay_until: Option<i64>,
}

/// Moves the stored offsets of `group`/`topic` in one transaction. A partition moved
/// below where it stood remembers that offset (`replay_until`), so the rows re-read
/// there replace the existing ones (or, with `keep`, leave them). The epoch stays: the
/// owner's next compare-and-set fails and it continues from the new offset.
pub async fn rewind(
    pool: &PgPool,
    group: &str,
    topic: &str,
    moves: &[(i32, i64)],
    keep: bool,
) -> Result<Vec<Moved>, StoreError> {
    let (partitions, targets): (Vec<i32>, Vec<i64>) = moves.iter().copied().unzip();
    let rows: Vec<(i32, Option<i64>, i64, Option<i64>)> = sqlx::query_as(
        "UPDATE ingest.offsets o SET next_offset = m.target, replay_keep = $3, updated_at = now(), \
           replay_until = CASE WHEN m.target < GREATEST(o.next_offset, o.replay_until) \
                               THEN GREATEST(o.next_offset, o.replay_until) END \
         FROM (SELECT u.*, c.next_offset AS previous FROM unnest($4::int4[], $5::int8[]) AS u(partition, target) \
               JOIN ingest.offsets c ON c.consumer_group = $1 AND c.topic = $2 AND c.partition = u.partition) m \
         WHERE o.consumer_group = $1 AND o.topic = $2 AND o.partition = m.partition \
         RETURNING o.partition, m.previous, o.next_offset, o.replay_until",
    )
    .bind(group)
    .bind(topic)
    .bind(keep)
    .bind(&partitions)
    .bind(&targets)
    .fetch_all(pool)
    .await
    .map_err(db("move stored offsets"))?;
    let mut moved: Vec<Moved> = rows
        .into_iter()
        .map(|(partition, from, to, replay_until)| Moved {
            partition,
            from,
            to,
            replay_until,
        })
        .collect();
    moved.sort_by_key(|m| m.partition);
    Ok(moved)
}

/// Which dead letters an operator means.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub group: Option<String>,
    pub ids: Vec<i64>,
    pub reason: Option<String>,
    pub topic: Option<String>,
    pub since: Option<DateTime<Utc>>,
}

/// The `WHERE` of [`DeadLetterFilter`], on parameters `$1..$5`.
const FILTER: &str = "($1::text IS NULL OR consumer_group = $1) \
     AND (cardinality($2::int8[]) = 0 OR id = ANY($2)) \
     AND ($3::text IS NULL OR reason_code = $3) \
     AND ($4::text IS NULL OR topic = $4) \
     AND ($5::timestamptz IS NULL OR last_failed_at >= $5)";

macro_rules! bind_filter {
    ($query:expr, $f:expr) => {
        $query
            .bind($f.group.as_deref())
            .bind(&$f.ids)
            .bind($f.reason.as_deref())
            .bind($f.topic.as_deref())
            .bind($f.since)
    };
}

/// Dead letters a re-drive decodes and writes at a time (all in its one transaction).
const REDRIVE_CHUNK: usize = 5_000;

/// A dead letter as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub consumer_group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(skip)]
    pub key: Option<Vec<u8>>,
    #[serde(skip)]
    pub value: Option<Vec<u8>>,
    pub headers: serde_json::Value,
    pub kafka_timestamp: Option<DateTime<Utc>>,
    pub reason_code: String,
    pub reason: String,
    pub sqlstate: Option<String>,
    pub trace_id: Option<String>,
    pub attempts: i32,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
}

const DEAD_LETTER_COLUMNS: &str = "id, consumer_group, topic, partition, \"offset\", key, value, \
     headers, kafka_timestamp, reason_code, reason, sqlstate, trace_id, attempts, \
     first_failed_at, last_failed_at";

/// Dead letters per reason code, most first.
pub async fn dead_letter_counts(
    pool: &PgPool,
    filter: &DeadLetterFilter,
) -> Result<Vec<(String, i64)>, StoreError> {
    let sql = format!(
        "SELECT reason_code, count(*) FROM ingest.dead_letters WHERE {FILTER} \
         GROUP BY reason_code ORDER BY count(*) DESC, reason_code"
    );
    bind_filter!(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
        .fetch_all(pool)
        .await
        .map_err(db("count dead letters"))
}

/// The dead letters matching `filter`, oldest first, at most `limit`.
pub async fn dead_letters(
    pool: &PgPool,
    filter: &DeadLetterFilter,
    limit: i64,
) -> Result<Vec<DeadLetter>, StoreError> {
    let sql = format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM ingest.dead_letters WHERE {FILTER} ORDER BY id LIMIT $6"
    );
    bind_filter!(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(db("read dead letters"))
}

/// Deletes the dead letters of `group` (every group when `None`) last failed before
/// `older_than` ago; with `dry_run`, only counts them.
pub async fn purge_dead_letters(
    pool: &PgPool,
    group: Option<&str>,
    older_than: std::time::Duration,
    dry_run: bool,
) -> Result<u64, StoreError> {
    let filter = "($1::text IS NULL OR consumer_group = $1) \
                  AND last_failed_at < now() - make_interval(secs => $2)";
    let seconds = older_than.as_secs_f64();
    if dry_run {
        let sql = format!("SELECT count(*) FROM ingest.dead_letters WHERE {filter}");
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(group)
            .bind(seconds)
            .fetch_one(pool)
            .await
            .map_err(db("count dead letters to purge"))?;
        return Ok(n.unsigned_abs());
    }
    let sql = format!("DELETE FROM ingest.dead_letters WHERE {filter}");
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(group)
        .bind(seconds)
        .execute(pool)
        .await
        .map_err(db("purge dead letters"))?;
    Ok(done.rows_affected())
}

/// What a re-drive of dead letters did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Redrive {
    /// Dead letters that decoded and inserted: now rows, no longer dead letters.
    pub moved: u64,
    /// Dead letters that failed again: kept with `attempts` + 1 and the new reason.
    pub still_failing: u64,
    /// The tables the moved ones went into, comma-separated.
    pub tables: String,
}

impl Store {
    /// Decodes the dead letters of this store's group matching `filter` again with
    /// the routes' decoders; in one transaction, those that now make rows move into the
    /// target table and out of the dead letters, the others stay with one more attempt
    /// and their new reason. A letter of an upsert route whose key's row was written from
    /// a later record of its partition stays, as `superseded`: it would put an older
    /// version over a newer one.
    ///
    /// Refuses, changing nothing, letters this configuration cannot judge: of a topic
    /// no route reads, or of an upsert route that does not record its rows' source
    /// position.
    pub async fn redrive(
        &self,
        filter: &DeadLetterFilter,
        registry: Option<&crate::registry::Registry>,
    ) -> Result<Redrive, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        // Deferred constraints would only fire at COMMIT, outside every savepoint.
        sqlx::raw_sql("SET CONSTRAINTS ALL IMMEDIATE")
            .execute(&mut *tx)
            .await
            .map_err(db("check constraints at once"))?;
        let sql = format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM ingest.dead_letters \
             WHERE consumer_group = $6 AND {FILTER} ORDER BY id FOR UPDATE"
        );
        let letters: Vec<DeadLetter> =
            bind_filter!(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
                .bind(&self.group)
                .fetch_all(&mut *tx)
                .await
                .map_err(db("read dead letters"))?;
        self.check_redrivable(&letters)?;
        let mut records: Vec<Record> = letters.iter().map(DeadLetter::record).collect();
        // Within a partition, in offset order: the last record of a key wins.
        let mut order: Vec<usize> = (0..records.len()).collect();
        order.sort_by_key(|&i| {
            (
                records[i].topic.clone(),
                records[i].partition,
                records[i].offset,
            )
        });
        let letters: Vec<&DeadLetter> = order.iter().map(|&i| &letters[i]).collect();
        records = order.iter().map(|&i| records[i].clone()).collect();
        if let Some(registry) = registry {
            let ids = crate::registry::schema_ids(&self.routes, records.iter());
            registry
                .resolve(ids)
                .await
                .map_err(|e| StoreError::Fatal(e.to_string()))?;
        }
        let decoded = Batch::decode(records.clone(), &self.routes, Vec::new());
        let superseded = self.superseded(&mut tx, &decoded).await?;
        let skipped: HashSet<usize> = superseded.iter().map(|(i, _)| *i).collect();
        let kept: Vec<usize> = (0..records.len())
            .filter(|i| !skipped.contains(i))
            .collect();
        let mut failed: Vec<(usize, Rejection)> = Vec::new();
        let mut progress = Progress::new("dead letters re-driven", kept.len() as u64);
        // In chunks, in order, within the one transaction, so a long re-drive shows how
        // far it is: a key's later record is still written after its earlier one. Routes
        // ordering versions, reading Debezium events or deleting on tombstones choose
        // among all of a key's records at once (the newest version, a delete then a
        // write as one update, a truncate, a TOAST fill), so a re-drive touching one
        // writes in one piece.
        let whole = records.iter().any(|r| {
            self.routes.route_of(&r.topic).is_some_and(|i| {
                let route = self.routes.decoders()[i].route();
                route.version.is_some()
                    || route.envelope != Envelope::None
                    || route.delete_on_tombstone
            })
        });
        let chunk_len = if whole { kept.len().max(1) } else { REDRIVE_CHUNK };
        for chunk in kept.chunks(chunk_len) {
            let batch = Batch::decode(
                chunk.iter().map(|&i| records[i].clone()).collect(),
                &self.routes,
                Vec::new(),
            );
            let mut rejects: Vec<(usize, Rejection)> = Vec::new();
            // A re-drive reports what stays dead; the worker's metrics count only its own.
            let mut without_partition = 0;
            self.write_rows_isolating(
                &mut tx,
                &batch,
                &Ranges::default(),
                &mut rejects,
                &mut without_partition,
            )
            .await?;
            rejects.extend(batch.rejects.iter().cloned());
            // Back to indexes of `records`.
            failed.extend(rejects.into_iter().map(|(i, r)| (chunk[i], r)));
            progress.add(chunk.len() as u64);
        }
        progress.finish();
        // Then the superseded ones.
        failed.extend(superseded.into_iter().map(|(i, newer)| {
            (
                i,
                Rejection::new(
                    ReasonCode::Superseded,
                    format!(
                        "the row of this record's key holds a newer version ({newer}); \
                         re-driving it would put an older version over a newer one"
                    ),
                ),
            )
        }));
        let failed_ids: Vec<i64> = failed.iter().map(|(i, _)| letters[*i].id).collect();
        let failing: HashSet<i64> = failed_ids.iter().copied().collect();
        let moved_ids: Vec<i64> = letters
            .iter()
            .map(|l| l.id)
            .filter(|id| !failing.contains(id))
            .collect();
        sqlx::query("DELETE FROM ingest.dead_letters WHERE id = ANY($1)")
            .bind(&moved_ids)
            .execute(&mut *tx)
            .await
            .map_err(db("delete re-driven dead letters"))?;
        let codes: Vec<&str> = failed.iter().map(|(_, r)| r.code.as_str()).collect();
        let reasons: Vec<&str> = failed.iter().map(|(_, r)| r.reason.as_str()).collect();
        let states: Vec<Option<&str>> = failed.iter().map(|(_, r)| r.sqlstate.as_deref()).collect();
        sqlx::query(
            "UPDATE ingest.dead_letters d SET attempts = d.attempts + 1, last_failed_at = now(), \
               reason_code = u.code, reason = u.reason, sqlstate = u.state \
             FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[]) AS u(id, code, reason, state) \
             WHERE d.id = u.id",
        )
        .bind(&failed_ids)
        .bind(&codes)
        .bind(&reasons)
        .bind(&states)
        .execute(&mut *tx)
        .await
        .map_err(db("update dead letters that failed again"))?;
        tx.commit().await.map_err(db("commit the re-drive"))?;
        Ok(Redrive {
            moved: moved_ids.len() as u64,
            still_failing: failed_ids.len() as u64,
            tables: self.routes.tables(),
        })
    }

    /// Refuses letters of topics no route reads, and of upsert routes that cannot tell
    /// an older record from a newer one.
    fn check_redrivable(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        let mut unrouted: Vec<&str> = Vec::new();
        let mut blind: Vec<String> = Vec::new();
        for letter in letters {
            match self.routes.route_of(&letter.topic) {
                None => unrouted.push(&letter.topic),
                Some(i) => {
                    let route = &self.routes.decoders()[i].route();
                    if route.mode == WriteMode::Upsert && !route.orders_versions() {
                        blind.push(format!(
                            "{} ({} -> {})",
                            route.key,
                            route.topics_label(),
                            route.table
                        ));
                    }
                }
            }
        }
        unrouted.sort_unstable();
        unrouted.dedup();
        blind.sort_unstable();
        blind.dedup();
        if !unrouted.is_empty() {
            return Err(StoreError::Fatal(format!(
                "no route of this configuration reads topic(s) {} of the chosen dead letters; \
                 nothing was changed. Pass the configuration the worker ran with: its --config, \
                 or --topic {} as given to `run`",
                unrouted.join(", "),
                unrouted.join(" --topic ")
            )));
        }
        if !blind.is_empty() {
            return Err(StoreError::Fatal(format!(
                "route(s) {} upsert without recording where a row came from, so a re-driven \
                 record could overwrite a row written from a later record of its key; nothing \
                 was changed. Set `version:` to a column ordering a key's versions, or map \
                 columns from @partition and @offset (and @topic, for a route reading several \
                 topics) in the route (records older than the row then stay as superseded dead \
                 letters)",
                blind.join(", ")
            )));
        }
        Ok(())
    }

    /// The records of `batch` (by index) whose upsert would put an older version over a
    /// newer one, each with what makes the row newer.
    async fn superseded(
        &self,
        conn: &mut PgConnection,
        batch: &Batch,
    ) -> Result<Vec<(usize, String)>, StoreError> {
        let mut found = Vec::new();
        for (part, sql) in batch.parts.iter().zip(&self.sql) {
            let Some(check) = sql.upsert.as_ref().and_then(|u| u.superseded.as_ref()) else {
                continue;
            };
            if part.rows.is_empty() {
                continue;
            }
            let lines: Vec<Vec<Option<String>>> = part.lines().map(copy_fields).collect();
            let numbers: Vec<i32> = (0..lines.len() as i32).collect();
            let mut query =
                sqlx::query_as::<_, (i32, String)>(sqlx::AssertSqlSafe(check.select.clone()))
                    .bind(numbers);
            for &field in &check.fields {
                let texts: Vec<Option<String>> = lines
                    .iter()
                    .map(|l| l.get(field).cloned().flatten())
                    .collect();
                query = query.bind(texts);
            }
            let rows = query
                .fetch_all(&mut *conn)
                .await
                .map_err(db("find superseded dead letters"))?;
            found.extend(
                rows.into_iter()
                    .map(|(line, newer)| (part.rows[line as usize].record, newer)),
            );
        }
        Ok(found)
    }
}

impl DeadLetter {
    /// The record as it was consumed, to decode again.
    pub fn record(&self) -> Record {
        Record {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            key: self.key.clone(),
            value: self.value.clone(),
            headers: headers_from_json(&self.headers),
            timestamp_ms: self.kafka_timestamp.map(|t| t.timestamp_millis()),
        }
    }
}

/// Undoes [`Record::headers_json`].
fn headers_from_json(json: &serde_json::Value) -> Vec<(String, Option<Vec<u8>>)> {
    let items = json.as_array().map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .map(|item| {
            let key = item["key"].as_str().unwrap_or_default().to_owned();
            let value = match (item["value"].as_str(), item["value_hex"].as_str()) {
                (Some(text), _) => Some(text.as_bytes().to_vec()),
                (None, Some(hex)) => Some(unhex(hex)),
                (None, None) => None,
            };
            (key, value)
        })
        .collect()
}

fn unhex(hex: &str) -> Vec<u8> {
    hex.as_bytes()
        .chunks(2)
        .filter_map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_survive_the_round_trip_through_json() {
        let record = Record {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            value: None,
            headers: vec![
                ("traceparent".into(), Some(b"00-ab-cd-01".to_vec())),
                ("bin".into(), Some(vec![0xff, 0x00, 0x10])),
                ("none".into(), None),
            ],
            timestamp_ms: None,
        };
        assert_eq!(headers_from_json(&record.headers_json()), record.headers);
    }
}
