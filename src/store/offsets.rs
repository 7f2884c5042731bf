//! Offset rows: claims on assignment, the compare-and-set that fences stale owners, and
//! reads of the stored position.

use sqlx::PgConnection;

use super::{PartitionRange, Store, StoreError, db};

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
    /// Claims partitions for `owner` in one statement: creates missing rows, bumps the
    /// epoch of existing ones (fencing any previous owner) and returns where to start.
    pub async fn claim(
        &self,
        owner: &str,
        partitions: &[(String, i32)],
    ) -> Result<Vec<Claim>, StoreError> {
        let (topics, parts): (Vec<&str>, Vec<i32>) =
            partitions.iter().map(|(t, p)| (t.as_str(), *p)).unzip();
        let rows: Vec<(String, i32, Option<i64>, i64)> = sqlx::query_as(
            "INSERT INTO ingest.offsets AS o (consumer_group, topic, partition, next_offset, epoch, owner) \
             SELECT $1, t, p, NULL, 1, $2 FROM unnest($3::text[], $4::int4[]) AS u(t, p) \
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE \
               SET epoch = o.epoch + 1, owner = EXCLUDED.owner, updated_at = now() \
             RETURNING topic, partition, next_offset, epoch",
        )
        .bind(&self.group)
        .bind(owner)
        .bind(&topics)
        .bind(&parts)
        .fetch_all(&self.pool)
        .await
        .map_err(db("claim partitions"))?;
        Ok(rows
            .into_iter()
            .map(|(topic, partition, next_offset, epoch)| Claim {
                topic,
                partition,
                next_offset,
                epoch,
            })
            .collect())
    }

    /// The stored rows of the given partitions (all of the group's when empty).
    pub async fn stored_offsets(
        &self,
        partitions: &[(String, i32)],
    ) -> Result<Vec<StoredOffset>, StoreError> {
        let (topics, parts): (Vec<&str>, Vec<i32>) =
            partitions.iter().map(|(t, p)| (t.as_str(), *p)).unzip();
        sqlx::query_as(
            "SELECT topic, partition, next_offset, epoch, owner FROM ingest.offsets \
             WHERE consumer_group = $1 \
               AND (cardinality($2::text[]) = 0 OR (topic, partition) IN \
                    (SELECT * FROM unnest($2::text[], $3::int4[]))) \
             ORDER BY topic, partition",
        )
        .bind(&self.group)
        .bind(&topics)
        .bind(&parts)
        .fetch_all(&self.pool)
        .await
        .map_err(db("read stored offsets"))
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
    let starts: Vec<Option<i64>> = ranges.iter().map(|r| r.start).collect();
    let ends: Vec<i64> = ranges.iter().map(|r| r.end).collect();
    let epochs: Vec<i64> = ranges.iter().map(|r| r.epoch).collect();
    // The join reads the replay columns as they were before this update; a concurrent
    // rewind also moves next_offset, so the compare fails rather than mixing the two.
    #[derive(sqlx::FromRow)]
    struct Advanced {
        topic: String,
        partition: i32,
        start_offset: Option<i64>,
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
           AND o.epoch = u.epoch AND o.next_offset IS NOT DISTINCT FROM u.start_offset \
         RETURNING o.topic, o.partition, u.start_offset, \
           LEAST(u.end_offset, u.replay_until) AS replay_end, u.replay_keep",
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
        .filter_map(|a| match (a.start_offset, a.replay_end) {
            (Some(from), Some(until)) if from < until => Some(Replay {
                topic: a.topic,
                partition: a.partition,
                from,
                until,
                keep: a.replay_keep,
            }),
            _ => None,
        })
        .collect();
    Ok(Advance { fenced, replays })
}
