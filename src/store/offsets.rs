//! Offset rows: claims on assignment, the compare-and-set that fences stale owners, and
//! reads of the stored position.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use super::{APPLICATION_NAME, PartitionRange, Store, StoreError, db, execute_trusted};

/// How long a claim waits on the locks of another worker's transaction before it ends
/// that transaction, if that transaction has been waiting on its client all that time
/// (at most half of `postgres.lock_timeout_ms`, so it happens before the wait times
/// out). The claim makes this worker the partition's owner (Kafka assigned it here), so
/// such a holder is a previous owner that is frozen or cut off. Ending it lets the group
/// move on; its batch is read again. A previous owner still working (a slow commit) is
/// waited for, and this worker's own sessions are never ended.
const CLAIM_PATIENCE: Duration = Duration::from_secs(2);

/// The result of claiming one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub topic: String,
    pub partition: i32,
    /// `None` when nothing was ever committed: the reset policy decides.
    pub next_offset: Option<i64>,
    /// The epoch every commit of this ownership must carry.
    pub epoch: i64,
}

/// A stored offset row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: Option<i64>,
    pub epoch: i64,
    pub owner: String,
}

impl Store {
    /// Clears `owner` from the offset rows it still holds, at a clean exit, so that
    /// `offsets show` tells a live owner from a gone one. A row another worker claimed
    /// since names that worker and stays; the epoch stays, so the fencing is as before.
    pub async fn release(&self, owner: &str) -> Result<u64, StoreError> {
        self.bounded("release the claimed partitions", async |conn| {
            sqlx::query(
                "UPDATE ingest.offsets SET owner = '', updated_at = now() \
                 WHERE consumer_group = $1 AND owner = $2",
            )
            .bind(&self.group)
            .bind(owner)
            .execute(conn)
            .await
            .map(|done| done.rows_affected())
            .map_err(db("release the claimed partitions"))
        })
        .await
    }

    /// Clears `owner` from the rows of partitions revoked from it, where it still holds
    /// them at the epoch of its claim (a row another worker claimed since is theirs), so
    /// `offsets show` tells a live owner from a past one. Commits never read the owner:
    /// a batch of such a partition still in flight commits or is fenced by its epoch.
    pub async fn release_revoked(
        &self,
        owner: &str,
        partitions: &[((String, i32), i64)],
    ) -> Result<u64, StoreError> {
        let topics: Vec<&str> = partitions.iter().map(|((t, _), _)| t.as_str()).collect();
        let parts: Vec<i32> = partitions.iter().map(|((_, p), _)| *p).collect();
        let epochs: Vec<i64> = partitions.iter().map(|(_, e)| *e).collect();
        self.bounded("release revoked partitions", async |conn| {
            sqlx::query(
                "UPDATE ingest.offsets AS o SET owner = '', updated_at = now() \
                 FROM unnest($3::text[], $4::int4[], $5::int8[]) AS r(topic, partition, epoch) \
                 WHERE o.consumer_group = $1 AND o.owner = $2 AND o.topic = r.topic \
                   AND o.partition = r.partition AND o.epoch = r.epoch",
            )
            .bind(&self.group)
            .bind(owner)
            .bind(&topics)
            .bind(&parts)
            .bind(&epochs)
            .execute(conn)
            .await
            .map(|done| done.rows_affected())
            .map_err(db("release revoked partitions"))
        })
        .await
    }

    /// Claims partitions for `owner` in one statement: creates missing rows, bumps the
    /// epoch of existing ones (fencing any previous owner) and returns where to start.
    /// Each partition comes with the least epoch its claim may take (0 for any): a
    /// worker claiming a partition again passes its last epoch + 1, so a row deleted or
    /// restored from an older dump never hands out an epoch it held before.
    ///
    /// A claim blocked by another worker's transaction on the same rows for longer than
    /// `CLAIM_PATIENCE` ends that transaction (see there).
    pub async fn claim(
        &self,
        owner: &str,
        partitions: &[((String, i32), i64)],
    ) -> Result<Vec<Claim>, StoreError> {
        let topics: Vec<&str> = partitions.iter().map(|((t, _), _)| t.as_str()).collect();
        let parts: Vec<i32> = partitions.iter().map(|((_, p), _)| *p).collect();
        let least: Vec<i64> = partitions.iter().map(|(_, e)| *e).collect();
        let patience = CLAIM_PATIENCE.min(self.lock_timeout / 2);
        self.bounded("claim partitions", async |conn| {
            // One transaction: a transaction-pooling proxy keeps both statements on the
            // backend whose pid is read.
            let mut tx = conn.begin().await.map_err(db("claim partitions"))?;
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *tx)
                .await
                .map_err(db("claim partitions"))?;
            // A lock held by something that is not ended (a live commit, an operator's
            // session) fails the claim soon, so the rebalance callback does not block for
            // long; the claim is retried, or its partitions claimed again shortly.
            let wait = (patience + Duration::from_secs(1)).min(self.lock_timeout);
            execute_trusted(
                &mut tx,
                &format!("SET LOCAL lock_timeout = {}", wait.as_millis()),
                "claim partitions",
            )
            .await?;
            let claim = sqlx::query_as::<_, (String, i32, Option<i64>, i64)>(
                "INSERT INTO ingest.offsets AS o (consumer_group, topic, partition, next_offset, epoch, owner) \
                 SELECT $1, t, p, NULL, GREATEST(e, 1), $2 \
                 FROM unnest($3::text[], $4::int4[], $5::int8[]) AS u(t, p, e) \
                 ON CONFLICT (consumer_group, topic, partition) DO UPDATE \
                   SET epoch = GREATEST(o.epoch + 1, EXCLUDED.epoch), owner = EXCLUDED.owner, \
                       updated_at = now() \
                 RETURNING topic, partition, next_offset, epoch",
            )
            .bind(&self.group)
            .bind(owner)
            .bind(&topics)
            .bind(&parts)
            .bind(&least)
            .fetch_all(&mut *tx);
            let rows = {
                tokio::pin!(claim);
                loop {
                    tokio::select! {
                        rows = &mut claim => break rows.map_err(db("claim partitions"))?,
                        () = tokio::time::sleep(patience) => self.end_blockers(pid, patience).await,
                    }
                }
            };
            tx.commit().await.map_err(db("claim partitions"))?;
            Ok(rows
                .into_iter()
                .map(|(topic, partition, next_offset, epoch)| Claim {
                    topic,
                    partition,
                    next_offset,
                    epoch,
                })
                .collect())
        })
        .await
    }

    /// Ends the transactions of other workers (their sessions' `application_name` is a
    /// worker's, not this one's; same role and database) that block backend `pid` and
    /// have been waiting on their client for at least `waiting`. Best effort: a failure is
    /// logged and the blocked statement keeps waiting within its own deadlines.
    async fn end_blockers(&self, pid: i32, waiting: Duration) {
        // (pid, state, seconds since the transaction began) of each backend ended.
        type Ended = Vec<(i32, Option<String>, Option<f64>)>;
        let ended: Result<Ended, sqlx::Error> = sqlx::query_as(
            // Materialized first, so the terminations apply to the blockers alone,
            // whatever order the planner would evaluate conditions in.
            "WITH blockers AS MATERIALIZED ( \
               SELECT a.pid, a.state, extract(epoch FROM now() - a.xact_start)::float8 AS age \
               FROM pg_stat_activity a \
               WHERE a.pid = ANY(pg_blocking_pids($1)) AND a.application_name LIKE $2 \
                 AND a.application_name <> current_setting('application_name') \
                 AND a.usename = current_user AND a.datname = current_database() \
                 AND a.wait_event = 'ClientRead' \
                 AND a.state_change < now() - make_interval(secs => $3)) \
             SELECT pid, state, age FROM blockers WHERE pg_terminate_backend(pid)",
        )
        .bind(pid)
        .bind(format!("{APPLICATION_NAME} %"))
        .bind(waiting.as_secs_f64())
        .fetch_all(&self.pool)
        .await;
        match ended {
            Ok(ended) => {
                for (blocker, state, age) in ended {
                    tracing::warn!(
                        backend = blocker,
                        state = state.as_deref().unwrap_or("?"),
                        transaction_secs = age.unwrap_or_default(),
                        "ended another worker's transaction that blocked the claim of its \
                         partitions while waiting on its client (a previous owner, frozen or cut off); \
                         its batch is read again here"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot end the transactions blocking a claim"),
        }
    }

    /// Stores where first claims start (partitions that had no stored offset), each only
    /// while its row still carries the claim's epoch and no offset; returns the
    /// partitions stored. One missing from the answer was claimed by another worker
    /// meanwhile.
    pub async fn store_starts(
        &self,
        starts: &[(&str, i32, i64, i64)],
    ) -> Result<Vec<(String, i32)>, StoreError> {
        let topics: Vec<&str> = starts.iter().map(|s| s.0).collect();
        let parts: Vec<i32> = starts.iter().map(|s| s.1).collect();
        let epochs: Vec<i64> = starts.iter().map(|s| s.2).collect();
        let offsets: Vec<i64> = starts.iter().map(|s| s.3).collect();
        self.bounded("store where partitions start", async |conn| {
            sqlx::query_as(
                "UPDATE ingest.offsets o SET next_offset = u.start, updated_at = now() \
                 FROM unnest($2::text[], $3::int4[], $4::int8[], $5::int8[]) AS u(t, p, e, start) \
                 WHERE o.consumer_group = $1 AND o.topic = u.t AND o.partition = u.p \
                   AND o.epoch = u.e AND o.next_offset IS NULL \
                 RETURNING o.topic, o.partition",
            )
            .bind(&self.group)
            .bind(&topics)
            .bind(&parts)
            .bind(&epochs)
            .bind(&offsets)
            .fetch_all(&mut *conn)
            .await
            .map_err(db("store where partitions start"))
        })
        .await
    }

    /// The stored rows of the given partitions (all of the group's when empty).
    pub async fn stored_offsets(
        &self,
        partitions: &[(String, i32)],
    ) -> Result<Vec<StoredOffset>, StoreError> {
        self.read_offsets(partitions, false).await
    }

    /// The stored rows of the given partitions once no transaction holds them: a COMMIT
    /// whose answer was lost may still be under way on the server, and its rows' locks
    /// make this read wait for its outcome instead of seeing the rows before it.
    pub async fn settled_offsets(
        &self,
        partitions: &[(String, i32)],
    ) -> Result<Vec<StoredOffset>, StoreError> {
        self.read_offsets(partitions, true).await
    }

    async fn read_offsets(
        &self,
        partitions: &[(String, i32)],
        settled: bool,
    ) -> Result<Vec<StoredOffset>, StoreError> {
        let (topics, parts): (Vec<&str>, Vec<i32>) =
            partitions.iter().map(|(t, p)| (t.as_str(), *p)).unzip();
        let lock = if settled { " FOR SHARE" } else { "" };
        let sql = format!(
            "SELECT topic, partition, next_offset, epoch, owner FROM ingest.offsets \
             WHERE consumer_group = $1 \
               AND (cardinality($2::text[]) = 0 OR (topic, partition) IN \
                    (SELECT * FROM unnest($2::text[], $3::int4[]))) \
             ORDER BY topic, partition{lock}"
        );
        self.bounded("read stored offsets", async |conn| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(&self.group)
                .bind(&topics)
                .bind(&parts)
                .fetch_all(&mut *conn)
                .await
                .map_err(db("read stored offsets"))
        })
        .await
    }
}

/// Part of a batch that re-reads records below where a rewind found its partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Replay {
    pub topic: String,
    pub partition: i32,
    /// First re-read offset (the batch's start).
    pub from: i64,
    /// End (exclusive) of the re-read offsets in this batch: its end, or where the
    /// partition stood before the rewind if that comes first.
    pub until: i64,
    /// Leave rows already there instead of replacing them.
    pub keep: bool,
}

/// What the compare-and-set found.
pub(super) struct Advance<'a> {
    /// Ranges that did NOT advance: their partition belongs to someone else now, or an
    /// operator moved its offset.
    pub fenced: Vec<&'a PartitionRange>,
    /// Advanced ranges that start below a rewind's `replay_until`.
    pub replays: Vec<Replay>,
}

/// Advances every range whose row still holds the expected start and epoch, clearing
/// `replay_until` once a range passes it.
pub(super) async fn compare_and_set<'a>(
    conn: &mut PgConnection,
    group: &str,
    ranges: &'a [PartitionRange],
) -> Result<Advance<'a>, StoreError> {
    let topics: Vec<&str> = ranges.iter().map(|r| r.topic.as_str()).collect();
    let parts: Vec<i32> = ranges.iter().map(|r| r.partition).collect();
    let starts: Vec<i64> = ranges.iter().map(|r| r.start).collect();
    let ends: Vec<i64> = ranges.iter().map(|r| r.end).collect();
    let epochs: Vec<i64> = ranges.iter().map(|r| r.epoch).collect();
    // The join reads the replay columns as they were before this update; a concurrent
    // rewind also moves next_offset, so the compare fails rather than mixing the two.
    // `LEAST` ignores NULLs, so without a rewind the replay end must stay NULL explicitly:
    // otherwise every batch would count as a replay and delete its own range first.
    #[derive(sqlx::FromRow)]
    struct Advanced {
        topic: String,
        partition: i32,
        start_offset: i64,
        replay_end: Option<i64>,
        replay_keep: bool,
    }
    let advanced: Vec<Advanced> = sqlx::query_as(
        "UPDATE ingest.offsets AS o SET next_offset = u.end_offset, updated_at = now(), \
           replay_until = CASE WHEN u.end_offset < u.replay_until THEN u.replay_until END \
         FROM (SELECT n.*, c.replay_until, c.replay_keep \
               FROM unnest($2::text[], $3::int4[], $4::int8[], $5::int8[], $6::int8[]) \
                    AS n(topic, partition, start_offset, end_offset, epoch) \
               JOIN ingest.offsets c ON c.consumer_group = $1 AND c.topic = n.topic \
                                    AND c.partition = n.partition) AS u \
         WHERE o.consumer_group = $1 AND o.topic = u.topic AND o.partition = u.partition \
           AND o.epoch = u.epoch AND o.next_offset = u.start_offset \
         RETURNING o.topic, o.partition, u.start_offset, \
           CASE WHEN u.replay_until IS NOT NULL THEN LEAST(u.end_offset, u.replay_until) END \
             AS replay_end, u.replay_keep",
    )
    .bind(group)
    .bind(&topics)
    .bind(&parts)
    .bind(&starts)
    .bind(&ends)
    .bind(&epochs)
    .fetch_all(conn)
    .await
    .map_err(db("advance offsets"))?;
    let fenced = ranges
        .iter()
        .filter(|r| {
            !advanced
                .iter()
                .any(|a| a.topic == r.topic && a.partition == r.partition)
        })
        .collect();
    let replays = advanced
        .into_iter()
        .filter_map(|a| {
            let range = ranges
                .iter()
                .find(|r| r.topic == a.topic && r.partition == a.partition)?;
            // Offsets the broker no longer had (a gap skipped on the way) are not read
            // again: their rows stay.
            let from = range.first_read().max(a.start_offset);
            match a.replay_end {
                Some(until) if from < until => Some(Replay {
                    topic: a.topic,
                    partition: a.partition,
                    from,
                    until,
                    keep: a.replay_keep,
                }),
                _ => None,
            }
        })
        .collect();
    Ok(Advance { fenced, replays })
}
