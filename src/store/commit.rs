//! Committing a batch.
//!
//! Invariant: a batch's rows, its dead letters and the advance of its partitions' offset
//! rows commit in ONE transaction, or none of them does. The offset advance is a
//! compare-and-set on (expected next offset, claimed epoch), done first: if another
//! worker claimed a partition since, nothing of this batch is written. Records Postgres
//! rejects with a data error are isolated under savepoints (in a second transaction, the
//! first having rolled back) and become `db_rejected` dead letters in the same
//! transaction as the rest of the batch. Offsets a partition skipped under
//! `kafka.on_data_loss: skip` are recorded in that transaction too. An upsert batch that
//! only adds new keys tries a COPY straight into the table first, under a savepoint
//! (see `insert_new_keys`).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::offsets::{self, Replay};
use super::schema::{COLUMN_TYPES_CHECK, RouteSql, UpsertSql};
use super::{Store, StoreError, db, execute_trusted};
use crate::decode::{CopyFormat, ReasonCode, Rejection};
use crate::record::Record;
use crate::retry::{self, ErrorClass};
use crate::routes::Routes;

/// The offset advance of one partition within a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRange {
    pub topic: String,
    pub partition: i32,
    /// The epoch of this worker's claim.
    pub epoch: i64,
    /// The stored next offset this batch continues from.
    pub start: i64,
    /// The next offset after this batch: last record's offset + 1.
    pub end: i64,
    /// Offsets the broker no longer had, skipped on the way (`kafka.on_data_loss: skip`);
    /// recorded in `ingest.offset_gaps` with this batch.
    pub gap: Option<Gap>,
}

impl PartitionRange {
    /// Whether `other` is a range of the same partition under the same claim.
    pub fn same_claim(&self, other: &PartitionRange) -> bool {
        self.topic == other.topic && self.partition == other.partition && self.epoch == other.epoch
    }

    /// The first offset this batch read of its partition: past the gap when the broker
    /// had deleted the records from its start on.
    pub fn first_read(&self) -> i64 {
        match self.gap {
            Some(gap) if gap.kind == GapKind::BelowLogStart => gap.to.max(self.start),
            _ => self.start,
        }
    }
}

/// A range of offsets a partition skipped because the broker no longer had them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// First offset skipped.
    pub from: i64,
    /// End (exclusive) of the skipped offsets.
    pub to: i64,
    pub kind: GapKind,
    /// The broker's watermarks when the gap was found.
    pub low: i64,
    pub high: i64,
    /// When the worker found it.
    pub detected_at: chrono::DateTime<chrono::Utc>,
}

/// Why offsets were missing on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapKind {
    /// The stored offset was below the log start: retention deleted records before they
    /// were ingested.
    BelowLogStart,
    /// The stored offset was beyond the log end: the topic was deleted and re-created, or
    /// its log truncated; the new log's records below the stored offset are skipped.
    BeyondLogEnd,
}

impl GapKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BelowLogStart => "below_log_start",
            Self::BeyondLogEnd => "beyond_log_end",
        }
    }
}

/// Where one decoded row sits in the COPY buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRef {
    /// End (exclusive) of the row's line in `copy_data`; it starts where the previous ends.
    pub end: usize,
    /// Index of the row's record in `records`.
    pub record: usize,
}

/// The decoded rows of one route within a batch.
#[derive(Debug, Default)]
pub struct Part {
    /// COPY text lines of the decoded records, back to back.
    pub copy_data: Vec<u8>,
    pub rows: Vec<RowRef>,
}

impl Part {
    /// Each row's COPY text line, without its newline.
    pub(super) fn lines(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.rows.iter().map(move |row| {
            let line = &self.copy_data[start..row.end - 1];
            start = row.end;
            line
        })
    }

    fn row_bytes(&self, rows: Range<usize>) -> &[u8] {
        let start = rows.start.checked_sub(1).map_or(0, |i| self.rows[i].end);
        let end = self.rows[rows.end - 1].end;
        &self.copy_data[start..end]
    }
}

/// One transaction's worth of work.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    /// The rows of each route, in the order of the routes.
    pub parts: Vec<Part>,
    /// Records that did not decode, with why.
    pub rejects: Vec<(usize, Rejection)>,
    pub ranges: Vec<PartitionRange>,
}

impl Batch {
    /// Decodes `records` into rows and rejections, to be committed as `ranges`.
    pub fn decode(records: Vec<Record>, routes: &Routes, ranges: Vec<PartitionRange>) -> Self {
        let decoders = routes.decoders();
        let mut parts: Vec<Part> = decoders.iter().map(|_| Part::default()).collect();
        if let [only] = parts.as_mut_slice() {
            only.copy_data
                .reserve(records.iter().map(Record::size).sum());
        }
        let mut rejects = Vec::new();
        // Batches mostly hold runs of one topic: its route is looked up once per run.
        let mut last: Option<(&str, Option<usize>)> = None;
        for (index, record) in records.iter().enumerate() {
            let route = match last {
                Some((topic, route)) if topic == record.topic => route,
                _ => routes.route_of(&record.topic),
            };
            last = Some((&record.topic, route));
            let Some(route) = route else {
                rejects.push((
                    index,
                    Rejection::new(
                        ReasonCode::NoRoute,
                        format!("no route reads topic `{}`", record.topic),
                    ),
                ));
                continue;
            };
            let part = &mut parts[route];
            match decoders[route].decode_into(record, &mut part.copy_data) {
                Ok(true) => part.rows.push(RowRef {
                    end: part.copy_data.len(),
                    record: index,
                }),
                Ok(false) => {}
                Err(rejection) => rejects.push((index, rejection)),
            }
        }
        Batch {
            records,
            parts,
            rejects,
            ranges,
        }
    }

    /// How many records decoded into rows.
    pub fn row_count(&self) -> usize {
        self.parts.iter().map(|p| p.rows.len()).sum()
    }
}

/// What became of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Everything committed. `isolation` tells of isolating rows Postgres rejected,
    /// when it had to.
    Committed {
        rows: u64,
        dead_letters: u64,
        isolation: Option<Isolation>,
    },
    /// Nothing committed: these partitions' offset rows no longer match this worker's
    /// claim (another owner, or an operator moved them).
    Fenced(Vec<PartitionRange>),
}

/// What isolating rejected rows took and found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    pub elapsed: Duration,
    /// Rows of a partitioned table that no partition takes (SQLSTATE 23514 without a
    /// constraint: a CHECK constraint names itself), among the dead letters.
    pub without_partition: u64,
}

impl Store {
    /// Commits a batch under the invariant stated at the top of this module.
    ///
    /// The first attempt COPYs all rows at once, with no savepoint (subtransactions cost
    /// on the hot path). Only when Postgres rejects a row does a second attempt, in a new
    /// transaction, isolate the rejected rows.
    ///
    /// Each attempt runs under the store's deadline; one that times out may have
    /// committed or not (the COMMIT may have been under way), so it is reported as an
    /// ambiguous commit and resolved from the offset rows.
    pub async fn commit(&self, batch: &Batch) -> Result<CommitOutcome, StoreError> {
        let first = self.bounded("commit a batch", async |conn| {
            self.commit_attempt(conn, batch, false).await
        });
        if let Some(outcome) = ambiguous_on_timeout(first.await)? {
            return Ok(outcome);
        }
        let started = Instant::now();
        tracing::info!(
            records = batch.records.len(),
            rows = batch.row_count(),
            "Postgres rejected rows of this batch; isolating them into db_rejected dead letters"
        );
        // Isolating takes a few statements per rejected row: the deadline grows with
        // the batch, so a batch of many rejects is not given up on forever.
        let deadline = self.deadline * (1 + batch.row_count() / 500) as u32;
        let second = self.bounded_within(deadline, "commit a batch", async |conn| {
            self.commit_attempt(conn, batch, true).await
        });
        let mut outcome = ambiguous_on_timeout(second.await)?
            .ok_or_else(|| StoreError::Fatal("isolation ended without a result".into()))?;
        if let CommitOutcome::Committed {
            dead_letters,
            isolation,
            ..
        } = &mut outcome
        {
            if let Some(isolation) = isolation {
                isolation.elapsed = started.elapsed();
            }
            tracing::info!(
                isolated = dead_letters.saturating_sub(batch.rejects.len() as u64),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "isolation done"
            );
        }
        Ok(outcome)
    }

    /// One transaction; `None` when `isolate` is off and a row was rejected.
    async fn commit_attempt(
        &self,
        conn: &mut PgConnection,
        batch: &Batch,
        isolate: bool,
    ) -> Result<Option<CommitOutcome>, StoreError> {
        let mut tx = conn.begin().await.map_err(db("begin a transaction"))?;
        if isolate {
            // Deferred constraints would only fire at COMMIT, outside every savepoint.
            execute_trusted(
                &mut tx,
                "SET CONSTRAINTS ALL IMMEDIATE",
                "check constraints at once",
            )
            .await?;
        }
        let advance = offsets::compare_and_set(&mut tx, &self.group, &batch.ranges).await?;
        if !advance.fenced.is_empty() {
            let fenced = advance.fenced.into_iter().cloned().collect();
            tx.rollback()
                .await
                .map_err(db("roll back a fenced batch"))?;
            return Ok(Some(CommitOutcome::Fenced(fenced)));
        }
        self.prepare_replay(&mut tx, &advance.replays).await?;
        self.write_gaps(&mut tx, &batch.ranges).await?;
        // Replay ranges whose existing rows stay.
        let kept = Ranges::of(advance.replays.iter().filter(|r| r.keep));
        let mut rejects: Vec<(usize, Rejection)> = Vec::new();
        let mut without_partition = 0;
        let rows = if isolate {
            self.write_rows_isolating(&mut tx, batch, &kept, &mut rejects, &mut without_partition)
                .await?
        } else {
            let mut rows = 0;
            for (part, sql) in batch.parts.iter().zip(&self.sql) {
                if part.rows.is_empty() {
                    continue;
                }
                check_types(&mut tx, sql).await?;
                let written = match &sql.insert {
                    Some(insert) if kept.is_empty() => {
                        insert_one_by_one(&mut tx, insert, part).await
                    }
                    _ => write(&mut tx, sql, &part.copy_data, &kept, true).await,
                };
                match written {
                    Ok(n) => rows += n,
                    Err(e) if is_rejection(sql, &e)? => {
                        tracing::info!(error = %e, sqlstate = ?retry::sqlstate(&e), "Postgres rejected a row");
                        tx.rollback()
                            .await
                            .map_err(db("roll back a batch with rejected rows"))?;
                        return Ok(None);
                    }
                    Err(e) => return Err(db("copy rows")(e)),
                }
            }
            rows
        };
        let dead = batch.rejects.iter().chain(&rejects);
        let dead_letters = self
            .write_dead_letters(&mut tx, &batch.records, dead)
            .await?;
        match tx.commit().await {
            Ok(()) => {}
            // A deferred constraint checked at COMMIT: the isolating attempt checks
            // constraints at each statement instead, under its savepoints.
            Err(e) if !isolate && retry::classify(&e) == ErrorClass::Data => {
                tracing::info!(error = %e, sqlstate = ?retry::sqlstate(&e), "Postgres rejected the batch at COMMIT");
                return Ok(None);
            }
            Err(e) if retry::classify(&e) == ErrorClass::Transient => {
                return Err(StoreError::AmbiguousCommit(e));
            }
            Err(e) => return Err(db("commit")(e)),
        }
        Ok(Some(CommitOutcome::Committed {
            rows,
            dead_letters,
            isolation: isolate.then_some(Isolation {
                elapsed: Duration::ZERO,
                without_partition,
            }),
        }))
    }

    /// Writes the rows of every route under savepoints, leaving out the rows Postgres
    /// rejects (recorded in `rejects`).
    ///
    /// The cost grows with the batch, not with rejects x savepoints: a failed COPY names
    /// its line, so each rejected row costs one failed COPY of a window of rows, one COPY
    /// of the rows before it and one of the row alone (which confirms it); windows grow
    /// while they pass and shrink to about twice the distance between rejects. Errors
    /// without a line (an upsert's apply, a deferred constraint, which the isolating
    /// transaction checks at each statement) are bisected; ranges of a few rows go row by
    /// row.
    pub(super) async fn write_rows_isolating(
        &self,
        conn: &mut PgConnection,
        batch: &Batch,
        kept: &Ranges<'_>,
        rejects: &mut Vec<(usize, Rejection)>,
        without_partition: &mut u64,
    ) -> Result<u64, StoreError> {
        let mut written = 0;
        for (part, sql) in batch.parts.iter().zip(&self.sql) {
            if !part.rows.is_empty() {
                check_types(conn, sql).await?;
            }
            let mut window = part.rows.len().max(1);
            // A stack: the range on top is written next, in row order.
            let mut pending: Vec<Range<usize>> = Vec::new();
            pending.push(0..part.rows.len());
            while let Some(mut rows) = pending.pop() {
                if rows.is_empty() {
                    continue;
                }
                if rows.len() > window {
                    pending.push(rows.start + window..rows.end);
                    rows.end = rows.start + window;
                }
                match isolate(conn, sql, part, rows.clone(), kept).await? {
                    Isolated::Written(n) => {
                        written += n;
                        window = window.saturating_mul(2);
                    }
                    Isolated::Rejected(Rejected {
                        rejection,
                        no_partition,
                        ..
                    }) if rows.len() == 1 => {
                        *without_partition += u64::from(no_partition);
                        rejects.push((part.rows[rows.start].record, rejection));
                    }
                    Isolated::Rejected(Rejected { line, .. }) => match line {
                        Some(line) if line <= rows.len() => {
                            let bad = rows.start + line - 1;
                            window = (2 * line).max(MIN_WINDOW);
                            pending.push(bad + 1..rows.end);
                            pending.push(bad..bad + 1);
                            pending.push(rows.start..bad);
                        }
                        _ if rows.len() <= MIN_WINDOW => {
                            pending.extend(rows.rev().map(|i| i..i + 1));
                        }
                        _ => {
                            let mid = rows.start + rows.len() / 2;
                            pending.push(mid..rows.end);
                            pending.push(rows.start..mid);
                        }
                    },
                }
            }
        }
        Ok(written)
    }

    /// Records the gaps the batch's partitions skipped, in its transaction.
    async fn write_gaps(
        &self,
        conn: &mut PgConnection,
        ranges: &[PartitionRange],
    ) -> Result<(), StoreError> {
        let gaps: Vec<(&PartitionRange, &Gap)> = ranges
            .iter()
            .filter_map(|r| r.gap.as_ref().map(|g| (r, g)))
            .collect();
        if gaps.is_empty() {
            return Ok(());
        }
        let column = |f: fn(&Gap) -> i64| gaps.iter().map(|(_, g)| f(g)).collect::<Vec<i64>>();
        sqlx::query(
            "INSERT INTO ingest.offset_gaps (consumer_group, topic, partition, from_offset, \
               to_offset, reason, low_watermark, high_watermark, detected_at) \
             SELECT $1, t, p, f, u, r, l, h, d FROM unnest($2::text[], $3::int4[], $4::int8[], \
               $5::int8[], $6::text[], $7::int8[], $8::int8[], $9::timestamptz[]) AS g(t, p, f, u, r, l, h, d)",
        )
        .bind(&self.group)
        .bind(gaps.iter().map(|(r, _)| r.topic.as_str()).collect::<Vec<_>>())
        .bind(gaps.iter().map(|(r, _)| r.partition).collect::<Vec<_>>())
        .bind(column(|g| g.from))
        .bind(column(|g| g.to))
        .bind(gaps.iter().map(|(_, g)| g.kind.as_str()).collect::<Vec<_>>())
        .bind(column(|g| g.low))
        .bind(column(|g| g.high))
        .bind(gaps.iter().map(|(_, g)| g.detected_at).collect::<Vec<_>>())
        .execute(conn)
        .await
        .map_err(db("record skipped offsets"))?;
        Ok(())
    }

    /// Clears what a replay re-reads: the dead letters of its ranges, which the re-read
    /// records decide again, and, unless it keeps them, their rows.
    async fn prepare_replay(
        &self,
        conn: &mut PgConnection,
        replays: &[Replay],
    ) -> Result<(), StoreError> {
        if replays.is_empty() {
            return Ok(());
        }
        let all = Ranges::of(replays.iter());
        let replaced = Ranges::of(replays.iter().filter(|r| !r.keep));
        all.bind(sqlx::query(
            "DELETE FROM ingest.dead_letters d \
             USING unnest($1::text[], $2::int4[], $3::int8[], $4::int8[]) AS k(t, p, f, u) \
             WHERE d.consumer_group = $5 AND d.topic = k.t AND d.partition = k.p \
               AND d.\"offset\" >= k.f AND d.\"offset\" < k.u",
        ))
        .bind(&self.group)
        .execute(&mut *conn)
        .await
        .map_err(db("clear the dead letters of a replay"))?;
        for replay in self.sql.iter().filter_map(|s| s.replay.as_ref()) {
            if replaced.is_empty() {
                break;
            }
            replaced
                .bind(sqlx::query(AssertSqlSafe(replay.delete_replaced.clone())))
                .execute(&mut *conn)
                .await
                .map_err(db("clear the rows a replay replaces"))?;
        }
        tracing::info!(ranges = ?replays, "replaying records below the offsets of a rewind");
        Ok(())
    }

    async fn write_dead_letters<'a>(
        &self,
        conn: &mut PgConnection,
        records: &[Record],
        dead: impl Iterator<Item = &'a (usize, Rejection)>,
    ) -> Result<u64, StoreError> {
        let mut cols = DeadLetterColumns::default();
        for (index, rejection) in dead {
            cols.push(&records[*index], rejection);
        }
        if cols.offsets.is_empty() {
            return Ok(0);
        }
        let result = sqlx::query(
            "INSERT INTO ingest.dead_letters (consumer_group, topic, partition, \"offset\", key, value, \
               headers, kafka_timestamp, reason_code, reason, sqlstate, trace_id) \
             SELECT $1, t, p, o, k, v, h::jsonb, to_timestamp(ts / 1000.0), rc, r, s, tr \
             FROM unnest($2::text[], $3::int4[], $4::int8[], $5::bytea[], $6::bytea[], $7::text[], \
                         $8::int8[], $9::text[], $10::text[], $11::text[], $12::text[]) \
                  AS u(t, p, o, k, v, h, ts, rc, r, s, tr)",
        )
        .bind(&self.group)
        .bind(&cols.topics)
        .bind(&cols.partitions)
        .bind(&cols.offsets)
        .bind(&cols.keys)
        .bind(&cols.values)
        .bind(&cols.headers)
        .bind(&cols.timestamps)
        .bind(&cols.codes)
        .bind(&cols.reasons)
        .bind(&cols.sqlstates)
        .bind(&cols.trace_ids)
        .execute(conn)
        .await
        .map_err(db("write dead letters"))?;
        Ok(result.rows_affected())
    }
}

/// A commit attempt that ran out of time may have committed (its COMMIT may have been
/// under way): only the offset rows can tell.
fn ambiguous_on_timeout<T>(result: Result<T, StoreError>) -> Result<T, StoreError> {
    result.map_err(|e| match e {
        StoreError::TimedOut(message) => StoreError::AmbiguousCommit(sqlx::Error::Io(
            std::io::Error::new(std::io::ErrorKind::TimedOut, message),
        )),
        other => other,
    })
}

/// Rows no smaller range is bisected below: such a range goes row by row.
const MIN_WINDOW: usize = 8;

/// What writing a range under a savepoint did.
enum Isolated {
    Written(u64),
    /// Postgres rejected a row of the range (which one, when the error says its line).
    Rejected(Rejected),
}

struct Rejected {
    rejection: Rejection,
    /// The 1-based line of the COPY that failed.
    line: Option<usize>,
    /// No partition of the table takes the row.
    no_partition: bool,
}

/// Writes `rows` of `part` under a savepoint; a data error rolls the savepoint back and
/// says which line failed, when Postgres told.
async fn isolate(
    conn: &mut PgConnection,
    sql: &RouteSql,
    part: &super::Part,
    rows: Range<usize>,
    kept: &Ranges<'_>,
) -> Result<Isolated, StoreError> {
    execute_trusted(conn, "SAVEPOINT rows", "set a savepoint").await?;
    // A direct try here would only hide the line number of a rejected row.
    let err = match write(conn, sql, part.row_bytes(rows), kept, false).await {
        Ok(n) => {
            execute_trusted(conn, "RELEASE SAVEPOINT rows", "release a savepoint").await?;
            return Ok(Isolated::Written(n));
        }
        Err(err) if is_rejection(sql, &err)? => err,
        Err(err) => return Err(db("copy rows")(err)),
    };
    execute_trusted(
        conn,
        "ROLLBACK TO SAVEPOINT rows; RELEASE SAVEPOINT rows",
        "roll back to a savepoint",
    )
    .await?;
    if of_new_source_partition(conn, sql, &err).await? {
        return Err(source_duplicate(&err));
    }
    let (message, line, no_partition) = match &err {
        sqlx::Error::Database(e) => {
            let pg = e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
            let line = pg
                .and_then(|pg| pg.r#where())
                .and_then(|context| copy_line(context, &sql.copy_relations));
            let no_partition =
                pg.is_some_and(|pg| pg.code() == "23514" && pg.constraint().is_none());
            (e.message().to_owned(), line, no_partition)
        }
        other => (other.to_string(), None, false),
    };
    let mut rejection = Rejection::new(
        ReasonCode::DbRejected,
        format!("Postgres rejected the row: {message}"),
    );
    rejection.sqlstate = retry::sqlstate(&err);
    Ok(Isolated::Rejected(Rejected {
        rejection,
        line,
        no_partition,
    }))
}

/// The line number of a COPY error's context (`COPY metrics, line 3, column ...`) when
/// it names one of `relations` (whose names may hold anything, `, line ` included).
fn copy_line(context: &str, relations: &[String]) -> Option<usize> {
    let first = context.lines().next()?;
    relations.iter().find_map(|relation| {
        let after = first.strip_prefix(&format!("COPY {relation}, line "))?;
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// Writes COPY text rows of one route: straight into the target table; for an upsert,
/// straight in when `direct` and the batch only adds new keys, else through its staging
/// table; or, when a replay keeps existing rows, through a temporary table, skipping the
/// re-read rows already there.
async fn write(
    conn: &mut PgConnection,
    sql: &RouteSql,
    data: &[u8],
    kept: &Ranges<'_>,
    direct: bool,
) -> Result<u64, sqlx::Error> {
    if let Some(upsert) = &sql.upsert {
        if direct && let Some(written) = insert_new_keys(conn, upsert, data).await? {
            return Ok(written);
        }
        // A replay re-applies its records in order, which ends in the same state.
        sqlx::raw_sql(AssertSqlSafe(upsert.create_staging.clone()))
            .execute(&mut *conn)
            .await?;
        let staged = copy_rows(conn, &sql.copy, sql.format(), data).await?;
        sqlx::raw_sql(AssertSqlSafe(upsert.apply.clone()))
            .execute(&mut *conn)
            .await?;
        upsert.direct.proven();
        return Ok(staged);
    }
    let replay = match &sql.replay {
        Some(replay) if !kept.is_empty() => replay,
        _ => return copy_rows(conn, &sql.copy, sql.format(), data).await,
    };
    sqlx::raw_sql(AssertSqlSafe(replay.create_staging.clone()))
        .execute(&mut *conn)
        .await?;
    copy_rows(conn, &replay.copy_staging, sql.format(), data).await?;
    let inserted = kept
        .bind(sqlx::query(AssertSqlSafe(replay.insert_kept.clone())))
        .execute(&mut *conn)
        .await?;
    // Emptied now: a bisection reuses the table within the same transaction.
    sqlx::raw_sql(AssertSqlSafe(replay.clear_staging.clone()))
        .execute(&mut *conn)
        .await?;
    Ok(inserted.rows_affected())
}

/// Writes an upsert batch that only adds new keys as the plain insert it then is: its
/// lines (without their delete flag) COPYed straight into the table, under a savepoint.
/// That costs about half the staging path (parsing the lines into the staging table,
/// sorting them by key, `INSERT .. ON CONFLICT`). Any error that is not transient (a
/// key the table or the batch already holds, a bad value, a refusal) rolls the try back
/// and returns `None`: the staging path then writes the batch and reports what it
/// reports. A batch with a tombstone goes to the staging path at once.
///
/// Only a route whose table a COPY writes as an INSERT would (see
/// `schema::plain_inserts_fit`) tries, and only once the staging path has worked in
/// this process: a route that cannot upsert at all (a deferrable key, no UPDATE
/// privilege, an identity column that refuses values) fails at its first batch, not
/// at the first one that meets a stored key.
async fn insert_new_keys(
    conn: &mut PgConnection,
    upsert: &UpsertSql,
    data: &[u8],
) -> Result<Option<u64>, sqlx::Error> {
    let Some(copy) = &upsert.copy_direct else {
        return Ok(None);
    };
    if !upsert.direct.due() {
        return Ok(None);
    }
    let Some(lines) = without_flags(data, upsert.plain_end) else {
        return Ok(None);
    };
    sqlx::raw_sql("SAVEPOINT direct")
        .execute(&mut *conn)
        .await?;
    let err = match copy_rows(conn, copy, CopyFormat::Text, &lines).await {
        Ok(written) => {
            sqlx::raw_sql("RELEASE SAVEPOINT direct")
                .execute(&mut *conn)
                .await?;
            upsert.direct.hit();
            return Ok(Some(written));
        }
        Err(e @ sqlx::Error::Database(_)) if retry::classify(&e) != ErrorClass::Transient => e,
        Err(e) => return Err(e),
    };
    sqlx::raw_sql("ROLLBACK TO SAVEPOINT direct; RELEASE SAVEPOINT direct")
        .execute(&mut *conn)
        .await?;
    match retry::classify(&err) {
        ErrorClass::Data => upsert.direct.miss(),
        _ => upsert.direct.refused(&err),
    }
    Ok(None)
}

/// The COPY text lines of an upsert route without their flags, or `None` when a line
/// does more than write its key (its flags are not `plain_end`: it deletes, truncates,
/// or keeps a stored value). A line ends at its raw newline: COPY text escapes the ones
/// inside values.
fn without_flags(data: &[u8], plain_end: &[u8]) -> Option<Vec<u8>> {
    let mut lines = Vec::with_capacity(data.len());
    for line in data.split_inclusive(|&b| b == b'\n') {
        let fields = line.strip_suffix(plain_end)?;
        lines.extend_from_slice(fields);
        lines.push(b'\n');
    }
    Some(lines)
}

/// When an upsert route tries its direct insert. None before the staging path first
/// worked, none ever after a refusal. A miss (a batch with a key already there) wastes
/// the rows COPYed before it, so after one the route skips the next 2 batches, after
/// two in a row the next 4, up to 32: a stream of updates pays one failed try in 32
/// batches, and a stream of new keys is back on the direct path after its first
/// success.
#[derive(Debug, Default)]
pub(super) struct DirectTries {
    /// The staging path worked once.
    proven: AtomicBool,
    /// A direct COPY was refused (not a data error): the route never tries again.
    refused: AtomicBool,
    /// Misses in a row (at most 5).
    misses: AtomicU32,
    /// Batches still to skip.
    skip: AtomicU32,
}

impl DirectTries {
    /// Whether this batch tries; counts a skipped one.
    fn due(&self) -> bool {
        self.proven.load(Ordering::Relaxed)
            && !self.refused.load(Ordering::Relaxed)
            && self
                .skip
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_err()
    }

    fn proven(&self) {
        self.proven.store(true, Ordering::Relaxed);
    }

    fn hit(&self) {
        self.misses.store(0, Ordering::Relaxed);
    }

    fn miss(&self) {
        let misses = (self.misses.load(Ordering::Relaxed) + 1).min(5);
        self.misses.store(misses, Ordering::Relaxed);
        self.skip.store(1 << misses, Ordering::Relaxed);
    }

    fn refused(&self, err: &sqlx::Error) {
        tracing::info!(error = %err, "a COPY straight into an upsert route's table was refused; its batches go through staging from now on");
        self.refused.store(true, Ordering::Relaxed);
    }
}

/// Whether a write error is Postgres rejecting a row (a data error). A duplicate of the
/// source coordinates is not: it means the protocol broke, so it stops the worker.
fn is_rejection(sql: &RouteSql, err: &sqlx::Error) -> Result<bool, StoreError> {
    if unique_violation(err).is_some_and(|(_, c)| sql.source_index.iter().any(|s| s == c)) {
        return Err(source_duplicate(err));
    }
    Ok(retry::classify(err) == ErrorClass::Data)
}

/// The schema and index named by a unique violation.
fn unique_violation(err: &sqlx::Error) -> Option<(&str, &str)> {
    let sqlx::Error::Database(e) = err else {
        return None;
    };
    let pg = e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?;
    (pg.code() == "23505").then_some((pg.schema()?, pg.constraint()?))
}

fn source_duplicate(err: &sqlx::Error) -> StoreError {
    StoreError::Fatal(format!(
        "protocol violation: a row with the same source coordinates already exists \
         ({err}); offsets in ingest.offsets disagree with the target table. \
         Stopping without committing anything."
    ))
}

/// Whether a unique violation `is_rejection` let through was of a partition of the
/// source index created since start (a partition added by pg_partman's maintenance):
/// asked of the catalog once the savepoint is rolled back.
async fn of_new_source_partition(
    conn: &mut PgConnection,
    sql: &RouteSql,
    err: &sqlx::Error,
) -> Result<bool, StoreError> {
    let (Some(root), Some((schema, index))) = (&sql.source_root, unique_violation(err)) else {
        return Ok(false);
    };
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_partition_tree(to_regclass($1)) t \
           JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
           WHERE c.relname = $3 AND n.nspname = $2)",
    )
    .bind(root)
    .bind(schema)
    .bind(index)
    .fetch_one(&mut *conn)
    .await
    .map_err(db("look up the index a row violated"))
}

/// Offset ranges as column arrays, for UNNEST.
#[derive(Debug, Default)]
pub(super) struct Ranges<'a> {
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    froms: Vec<i64>,
    untils: Vec<i64>,
}

impl<'a> Ranges<'a> {
    fn of(replays: impl Iterator<Item = &'a Replay>) -> Self {
        let mut ranges = Self::default();
        for r in replays {
            ranges.topics.push(&r.topic);
            ranges.partitions.push(r.partition);
            ranges.froms.push(r.from);
            ranges.untils.push(r.until);
        }
        ranges
    }

    pub(super) fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// Binds the ranges as `$1..$4`: topics, partitions, first offsets, end offsets.
    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.topics)
            .bind(&self.partitions)
            .bind(&self.froms)
            .bind(&self.untils)
    }
}

/// Dead letters as column arrays, for one UNNEST insert.
#[derive(Default)]
struct DeadLetterColumns<'a> {
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    keys: Vec<Option<&'a [u8]>>,
    values: Vec<Option<&'a [u8]>>,
    headers: Vec<String>,
    timestamps: Vec<Option<i64>>,
    codes: Vec<&'static str>,
    reasons: Vec<&'a str>,
    sqlstates: Vec<Option<&'a str>>,
    trace_ids: Vec<Option<String>>,
}

impl<'a> DeadLetterColumns<'a> {
    fn push(&mut self, record: &'a Record, rejection: &'a Rejection) {
        self.topics.push(&record.topic);
        self.partitions.push(record.partition);
        self.offsets.push(record.offset);
        self.keys.push(record.key.as_deref());
        self.values.push(record.value.as_deref());
        self.headers.push(record.headers_json().to_string());
        self.timestamps.push(record.timestamp_ms);
        self.codes.push(rejection.code.as_str());
        self.reasons.push(&rejection.reason);
        self.sqlstates.push(rejection.sqlstate.as_deref());
        self.trace_ids.push(record.trace_id());
    }
}

/// For a route that writes COPY BINARY: locks its table against type changes for the
/// rest of the transaction and checks its columns still have the types the format was
/// chosen for. Once per transaction, before the route's first COPY. A change stops the
/// worker: on restart it reads the table again and picks the format anew.
async fn check_types(conn: &mut PgConnection, sql: &RouteSql) -> Result<(), StoreError> {
    let Some(types) = &sql.types else {
        return Ok(());
    };
    const CONTEXT: &str = "check the target table's column types";
    execute_trusted(conn, &types.lock, CONTEXT).await?;
    let matching: i64 = sqlx::query_scalar(COLUMN_TYPES_CHECK)
        .bind(&types.names)
        .bind(&types.oids)
        .bind(&types.table)
        .fetch_one(&mut *conn)
        .await
        .map_err(db(CONTEXT))?;
    if matching == types.names.len() as i64 {
        return Ok(());
    }
    Err(StoreError::Fatal(format!(
        "the column types of {} changed since this worker read them, and its rows are \
         written as COPY BINARY of those types: restart the worker (it reads the table \
         again; nothing of this batch was written)",
        types.table
    )))
}

/// Bytes per COPY data message. The server reads a whole message before it parses any
/// of it: one message per batch (megabytes) leaves it idle while the batch arrives and
/// then parses data long gone from its caches; messages this size overlap the two.
const COPY_CHUNK: usize = 64 * 1024;

/// Runs `sql` (a `COPY ... FROM STDIN`) with `data`; the rows copied.
pub async fn copy(conn: &mut PgConnection, sql: &str, data: &[u8]) -> Result<u64, sqlx::Error> {
    copy_pieces(conn, sql, &[data]).await
}

/// The start of COPY BINARY data: its signature, no flags, no header extension.
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The end of COPY BINARY data: a tuple of -1 fields.
const BINARY_TRAILER: &[u8] = &[0xff, 0xff];

/// Runs a route's COPY with `rows` (decoded in the route's format), framing them as
/// COPY BINARY data when the route writes binary.
async fn copy_rows(
    conn: &mut PgConnection,
    sql: &str,
    format: CopyFormat,
    rows: &[u8],
) -> Result<u64, sqlx::Error> {
    match format {
        CopyFormat::Text => copy_pieces(conn, sql, &[rows]).await,
        CopyFormat::Binary => copy_pieces(conn, sql, &[BINARY_HEADER, rows, BINARY_TRAILER]).await,
    }
}

/// Runs `sql` (a `COPY ... FROM STDIN`) with the concatenation of `pieces`.
async fn copy_pieces(
    conn: &mut PgConnection,
    sql: &str,
    pieces: &[&[u8]],
) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(sql).await?;
    for chunk in pieces.iter().flat_map(|piece| piece.chunks(COPY_CHUNK)) {
        if let Err(e) = copy.send(chunk).await {
            // The server's own error, if it sent one, is the one worth reporting.
            return Err(copy.finish().await.err().unwrap_or(e));
        }
    }
    copy.finish().await
}

/// Inserts each row with its own statement (the naive way, for comparison): the COPY
/// text line is split back into fields, each bound as text and cast by the statement.
async fn insert_one_by_one(
    conn: &mut PgConnection,
    sql: &str,
    part: &Part,
) -> Result<u64, sqlx::Error> {
    for line in part.lines() {
        let mut query = sqlx::query(AssertSqlSafe(sql.to_owned()));
        for field in copy_fields(line) {
            query = query.bind(field);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(part.rows.len() as u64)
}

/// The fields of a COPY text line, as text (`None` for NULL).
pub(super) fn copy_fields(line: &[u8]) -> Vec<Option<String>> {
    line.split(|b| *b == b'\t').map(copy_field_text).collect()
}

/// One field of a COPY text line: `\N` is NULL, backslash escapes are undone.
fn copy_field_text(field: &[u8]) -> Option<String> {
    if field == b"\\N" {
        return None;
    }
    let mut out = Vec::with_capacity(field.len());
    let mut bytes = field.iter();
    while let Some(&b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(&other) => out.push(other),
            None => {}
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_error_lines_are_read_after_the_relation_copied_into() {
        let relations = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let metrics = relations(&["metrics", "kafka_pg_ingest_replay_0"]);
        assert_eq!(
            copy_line("COPY metrics, line 7, column status_code: \"x\"", &metrics),
            Some(7)
        );
        assert_eq!(
            copy_line("COPY kafka_pg_ingest_replay_0, line 12", &metrics),
            Some(12)
        );
        let odd = relations(&["metrics, line 1"]);
        assert_eq!(
            copy_line("COPY metrics, line 1, line 3: \"x\"", &odd),
            Some(3)
        );
        assert_eq!(
            copy_line("PL/pgSQL function f() line 3 at RAISE", &metrics),
            None
        );
        assert_eq!(copy_line("COPY other, line 4", &metrics), None);
    }

    #[test]
    fn upsert_lines_lose_their_flags_unless_one_does_more_than_write() {
        let lines = b"1\ta\\tb\\n\tf\n2\t\\N\tf\n";
        assert_eq!(
            without_flags(lines, b"\tf\n").as_deref(),
            Some(&b"1\ta\\tb\\n\n2\t\\N\n"[..])
        );
        assert_eq!(without_flags(b"1\ta\tf\n2\t\\N\tt\n", b"\tf\n"), None);
        // A Debezium route's lines: unread columns, truncate, delete.
        let plain = b"\t\\N\tf\tf\n";
        assert_eq!(
            without_flags(b"1\ta\t\\N\tf\tf\n", plain).as_deref(),
            Some(&b"1\ta\n"[..])
        );
        for other in [&b"1\t\\N\t,1,\tf\tf\n"[..], b"\\N\t\\N\t\\N\tt\tf\n", b"1\t\\N\t\\N\tf\tt\n"] {
            assert_eq!(without_flags(other, plain), None);
        }
    }

    #[test]
    fn direct_tries_skip_more_batches_after_each_miss_in_a_row_and_none_after_a_hit() {
        let tries = DirectTries::default();
        let pattern =
            |tries: &DirectTries, n: usize| (0..n).map(|_| tries.due()).collect::<Vec<_>>();
        assert_eq!(
            pattern(&tries, 2),
            [false, false],
            "not before staging worked"
        );
        tries.proven();
        assert_eq!(pattern(&tries, 2), [true, true]);
        tries.miss();
        assert_eq!(pattern(&tries, 3), [false, false, true]);
        tries.miss();
        assert_eq!(pattern(&tries, 5), [false, false, false, false, true]);
        for _ in 0..10 {
            tries.miss();
        }
        assert_eq!(pattern(&tries, 33).iter().filter(|d| **d).count(), 1);
        tries.hit();
        assert_eq!(pattern(&tries, 2), [true, true]);
        tries.refused(&sqlx::Error::RowNotFound);
        assert_eq!(pattern(&tries, 40), [false; 40], "never after a refusal");
    }
}
