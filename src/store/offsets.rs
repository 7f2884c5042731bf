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

/// Advances every range whose row still holds the expected start and epoch; returns the
/// ranges that did NOT advance (their partition belongs to someone else now).
pub(super) async fn compare_and_set<'a>(
    conn: &mut PgConnection,
    group: &str,
    ranges: &'a [PartitionRange],
) -> Result<Vec<&'a PartitionRange>, StoreError> {
    let topics: Vec<&str> = ranges.iter().map(|r| r.topic.as_str()).collect();
    let parts: Vec<i32> = ranges.iter().map(|r| r.partition).collect();
    let starts: Vec<Option<i64>> = ranges.iter().map(|r| r.start).collect();
    let ends: Vec<i64> = ranges.iter().map(|r| r.end).collect();
    let epochs: Vec<i64> = ranges.iter().map(|r| r.epoch).collect();
    let advanced: Vec<(String, i32)> = sqlx::query_as(
        "UPDATE ingest.offsets AS o SET next_offset = u.end_offset, updated_at = now() \
         FROM unnest($2::text[], $3::int4[], $4::int8[], $5::int8[], $6::int8[]) \
              AS u(topic, partition, start_offset, end_offset, epoch) \
         WHERE o.consumer_group = $1 AND o.topic = u.topic AND o.partition = u.partition \
           AND o.epoch = u.epoch AND o.next_offset IS NOT DISTINCT FROM u.start_offset \
         RETURNING o.topic, o.partition",
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
    Ok(ranges
        .iter()
        .filter(|r| {
            !advanced
                .iter()
                .any(|(t, p)| *t == r.topic && *p == r.partition)
        })
        .collect())
}
