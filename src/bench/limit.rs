//! The limit the worker is measured against: the most Postgres absorbs of the bench's
//! rows on one connection, and the same measured by an independent client (`psql`).
//!
//! Both write the same rows, encoded beforehand by Postgres itself as COPY BINARY, into
//! a fresh table shaped like the worker's (indexes included), one transaction per batch
//! that also advances the batch's offset rows by compare-and-set, as the worker's does.
//! The rows are encoded once, before any measurement, so encoding never limits what is
//! measured. Our client's connection has `TCP_NODELAY` set (the worker's does too; sqlx
//! 0.9.0 leaves it unset, which costs a delayed ACK per COPY); psql's libpq sets it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, ensure};
use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgPool};

use super::DecodedRows;

/// Batch sizes the limit is the best of.
pub const BATCH_SIZES: [usize; 3] = [5_000, 10_000, 20_000];

/// Topic name of the limit's offset rows (they belong to a group of their own).
const TOPIC: &str = "bench-limit";

/// One batch size's measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub batch_size: usize,
    /// Our client (sqlx, COPY BINARY).
    pub rows_per_s: f64,
    /// `psql`'s `\copy` of the same files.
    pub psql_rows_per_s: f64,
    /// CPU of the Postgres backend per row, under our client.
    pub backend_cpu_us_per_row: f64,
}

/// `size: ours / psql` rows per second of each batch size, on one line.
pub fn by_size(measured: &[Measured]) -> String {
    let sizes: Vec<String> = measured
        .iter()
        .map(|m| {
            format!(
                "{}: {:.0} / {:.0}",
                m.batch_size, m.rows_per_s, m.psql_rows_per_s
            )
        })
        .collect();
    sizes.join(", ")
}

/// The rows as COPY BINARY files, in batches of each of [`BATCH_SIZES`].
pub struct Encoded {
    dir: PathBuf,
    /// Per batch size: each batch's file and how many rows it holds.
    batches: Vec<(usize, Vec<(PathBuf, usize)>)>,
    rows: usize,
    partitions: i32,
    columns: String,
}

impl Drop for Encoded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Loads `rows` into a scratch table of `schema` and has Postgres write them out as
/// COPY BINARY, one file per batch, in message order (message `i` is at partition
/// `i % partitions`, offset `i / partitions`).
pub async fn encode(
    pool: &PgPool,
    schema: &str,
    rows: &DecodedRows,
    partitions: i32,
) -> anyhow::Result<Encoded> {
    let dir = std::env::temp_dir().join(format!("kafka-pg-ingest-{schema}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut encoded = Encoded {
        dir,
        batches: Vec::new(),
        rows: rows.rows,
        partitions,
        columns: rows.columns.clone(),
    };
    let scratch = format!("{schema}.encoded");
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE UNLOGGED TABLE {scratch} AS SELECT {} FROM web_metrics.metrics WITH NO DATA",
        rows.columns
    )))
    .execute(&mut *conn)
    .await?;
    let mut copy = conn
        .copy_in_raw(&format!("COPY {scratch} ({}) FROM STDIN", rows.columns))
        .await?;
    for batch in &rows.batches {
        copy.send(batch.as_slice()).await?;
    }
    copy.finish().await?;
    let p = i64::from(partitions);
    // Each batch file selects a range of stream positions: without this index every one
    // would scan the whole stream (quadratic in its length).
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE INDEX ON {scratch} ((kafka_offset * {p} + kafka_partition)); ANALYZE {scratch}"
    )))
    .execute(&mut *conn)
    .await?;
    for size in BATCH_SIZES {
        let mut files = Vec::new();
        for (k, from) in (0..rows.rows).step_by(size).enumerate() {
            let to = (from + size).min(rows.rows);
            let sql = format!(
                "COPY (SELECT {cols} FROM {scratch} \
                       WHERE kafka_offset * {p} + kafka_partition >= {from} \
                         AND kafka_offset * {p} + kafka_partition < {to} \
                       ORDER BY kafka_offset, kafka_partition) \
                 TO STDOUT (FORMAT binary)",
                cols = rows.columns
            );
            let mut bytes = Vec::new();
            let mut out = conn.copy_out_raw(&sql).await?;
            while let Some(chunk) = out.try_next().await? {
                bytes.extend_from_slice(&chunk);
            }
            drop(out);
            let path = encoded.dir.join(format!("{size}-{k}.bin"));
            std::fs::write(&path, &bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
            files.push((path, to - from));
        }
        encoded.batches.push((size, files));
    }
    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {scratch}")))
        .execute(&mut *conn)
        .await?;
    Ok(encoded)
}

/// Each partition's next offset once the first `done` messages have landed.
fn next_offsets(done: usize, partitions: i32) -> Vec<i64> {
    let p = partitions as usize;
    (0..p)
        .map(|i| done.saturating_sub(i).div_ceil(p) as i64)
        .collect()
}

/// The compare-and-set of one batch: every partition's row moves from where the
/// previous batch left it to where this one ends, or nothing moves.
const ADVANCE: &str = "UPDATE ingest.offsets AS o SET next_offset = u.e, updated_at = now() \
     FROM unnest($3::int4[], $4::int8[], $5::int8[]) AS u(p, s, e) \
     WHERE o.consumer_group = $1 AND o.topic = $2 AND o.partition = u.p \
       AND o.epoch = 1 AND o.next_offset = u.s";

/// Measures every batch size with both clients into fresh tables of `schema`.
pub async fn measure(
    pool: &PgPool,
    database_url: &str,
    schema: &str,
    encoded: &Encoded,
    partitioned: bool,
) -> anyhow::Result<Vec<Measured>> {
    let mut measured = Vec::new();
    for (size, files) in &encoded.batches {
        // Each client twice, in the order psql, ours, ours, psql, the best of each: what
        // ran just before (the worker's run, the other client) weighs on neither.
        let at = |pass: u32| Batches {
            schema,
            encoded,
            size: *size,
            files,
            pass,
            partitioned,
        };
        let psql_first = psql(pool, database_url, &at(1)).await?;
        let own_first = own(pool, &at(2)).await?;
        let own_second = own(pool, &at(3)).await?;
        let psql_second = psql(pool, database_url, &at(4)).await?;
        let (rows_per_s, backend_cpu_s) = if own_first.0 >= own_second.0 {
            own_first
        } else {
            own_second
        };
        measured.push(Measured {
            batch_size: *size,
            rows_per_s,
            psql_rows_per_s: psql_first.max(psql_second),
            backend_cpu_us_per_row: backend_cpu_s * 1e6 / encoded.rows as f64,
        });
    }
    Ok(measured)
}

/// A fresh table and a fresh group's offset rows (epoch 1, at 0) for one client's pass:
/// their names.
async fn prepare(
    pool: &PgPool,
    at: &Batches<'_>,
    client: &str,
) -> anyhow::Result<(String, String)> {
    let (table, group) = at.names(client);
    super::create_table(pool, &table, at.partitioned).await?;
    sqlx::query(
        "INSERT INTO ingest.offsets (consumer_group, topic, partition, next_offset, epoch, owner) \
         SELECT $1, $2, p, 0, 1, 'bench' FROM generate_series(0, $3 - 1) AS p",
    )
    .bind(&group)
    .bind(TOPIC)
    .bind(at.encoded.partitions)
    .execute(pool)
    .await?;
    Ok((table, group))
}

/// One pass of one client over the batches of one size.
struct Batches<'a> {
    schema: &'a str,
    encoded: &'a Encoded,
    size: usize,
    files: &'a [(PathBuf, usize)],
    /// Numbers the pass's table and offset rows.
    pass: u32,
    /// The table partitioned as the worker's.
    partitioned: bool,
}

impl Batches<'_> {
    /// The pass's table and the group of its offset rows.
    fn names(&self, client: &str) -> (String, String) {
        let (schema, size, pass) = (self.schema, self.size, self.pass);
        (
            format!("{schema}.limit_{client}_{size}_{pass}"),
            format!("{schema}-limit-{client}-{size}-{pass}").replace('_', "-"),
        )
    }
}

/// Our client: rows per second, and the CPU seconds its backend spent.
async fn own(pool: &PgPool, at: &Batches<'_>) -> anyhow::Result<(f64, f64)> {
    let (encoded, files) = (at.encoded, at.files);
    let (table, group) = prepare(pool, at, "own").await?;
    let batches: Vec<Vec<u8>> = files
        .iter()
        .map(|(path, _)| std::fs::read(path))
        .collect::<Result<_, _>>()?;
    let partition_ids: Vec<i32> = (0..encoded.partitions).collect();
    let sql = format!(
        "COPY {table} ({}) FROM STDIN (FORMAT binary)",
        encoded.columns
    );
    let mut conn = pool.acquire().await?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await?;
    let cpu_before = super::process::cpu_seconds(backend as u32).unwrap_or(f64::NAN);
    let mut done = 0;
    let started = Instant::now();
    for (bytes, (_, rows)) in batches.iter().zip(files) {
        let starts = next_offsets(done, encoded.partitions);
        done += rows;
        let ends = next_offsets(done, encoded.partitions);
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        crate::store::copy(&mut tx, &sql, bytes).await?;
        let moved = sqlx::query(ADVANCE)
            .bind(&group)
            .bind(TOPIC)
            .bind(&partition_ids)
            .bind(&starts)
            .bind(&ends)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        ensure!(
            moved == partition_ids.len() as u64,
            "the limit's compare-and-set moved {moved} rows"
        );
        tx.commit().await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = super::process::cpu_seconds(backend as u32).unwrap_or(f64::NAN);
    check_landed(pool, &table, encoded.rows).await?;
    Ok((encoded.rows as f64 / elapsed, cpu_after - cpu_before))
}

/// `psql`'s `\copy` of the same files in one script, timed as a whole (its start and
/// connect included, a few milliseconds).
async fn psql(pool: &PgPool, database_url: &str, at: &Batches<'_>) -> anyhow::Result<f64> {
    let (encoded, files) = (at.encoded, at.files);
    let (table, group) = prepare(pool, at, "psql").await?;
    let partition_ids: Vec<String> = (0..encoded.partitions).map(|p| p.to_string()).collect();
    let array = |v: &[String]| format!("'{{{}}}'", v.join(","));
    let mut script = String::from("\\set ON_ERROR_STOP on\n");
    let mut done = 0;
    for (path, rows) in files {
        let starts: Vec<String> = next_offsets(done, encoded.partitions)
            .iter()
            .map(i64::to_string)
            .collect();
        done += rows;
        let ends: Vec<String> = next_offsets(done, encoded.partitions)
            .iter()
            .map(i64::to_string)
            .collect();
        script.push_str(&format!(
            "BEGIN;\n\\copy {table} ({cols}) FROM '{file}' WITH (FORMAT binary)\n\
             UPDATE ingest.offsets AS o SET next_offset = u.e, updated_at = now() \
             FROM unnest({ids}::int4[], {starts}::int8[], {ends}::int8[]) AS u(p, s, e) \
             WHERE o.consumer_group = '{group}' AND o.topic = '{TOPIC}' AND o.partition = u.p \
             AND o.epoch = 1 AND o.next_offset = u.s;\nCOMMIT;\n",
            cols = encoded.columns,
            file = path.display(),
            ids = array(&partition_ids),
            starts = array(&starts),
            ends = array(&ends),
        ));
    }
    let script_path = encoded
        .dir
        .join(format!("psql-{}-{}.sql", at.size, at.pass));
    std::fs::write(&script_path, script)?;
    let started = Instant::now();
    let output = run_psql(database_url, &script_path).await?;
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    check_landed(pool, &table, encoded.rows).await?;
    let moved: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(next_offset), 0)::int8 FROM ingest.offsets WHERE consumer_group = $1",
    )
    .bind(&group)
    .fetch_one(pool)
    .await?;
    ensure!(
        moved == encoded.rows as i64,
        "psql's compare-and-sets moved the offsets to {moved}, not {}",
        encoded.rows
    );
    Ok(encoded.rows as f64 / elapsed)
}

async fn run_psql(database_url: &str, script: &Path) -> anyhow::Result<std::process::Output> {
    tokio::process::Command::new("psql")
        .args(["-X", "-q", "-d", database_url, "-f"])
        .arg(script)
        .stdout(std::process::Stdio::null())
        .output()
        .await
        .context("cannot run psql (the Postgres client tools; scripts/setup installs them)")
}

/// Checks every row is once in `table`, then drops it (a bench of millions of rows
/// would otherwise hold gigabytes of them).
async fn check_landed(pool: &PgPool, table: &str, rows: usize) -> anyhow::Result<()> {
    super::ensure_each_once(pool, table, rows as i64).await?;
    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_offsets_follow_round_robin_partitions() {
        assert_eq!(next_offsets(0, 3), vec![0, 0, 0]);
        assert_eq!(next_offsets(1, 3), vec![1, 0, 0]);
        assert_eq!(next_offsets(5, 3), vec![2, 2, 1]);
        assert_eq!(next_offsets(6, 3), vec![2, 2, 2]);
    }
}
