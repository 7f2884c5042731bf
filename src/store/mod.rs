//! Postgres: connection, migrations, the target table, offsets and batch commits.

pub mod admin;
mod commit;
mod offsets;

use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

pub use commit::{Batch, CommitOutcome, PartitionRange, RowRef};
pub use offsets::{Claim, StoredOffset};

use crate::config::{Config, WriteMethod};
use crate::retry::{self, ErrorClass};

/// `application_name` of the worker's connections, so operators (and tests) can find them.
pub const APPLICATION_NAME: &str = "kafka-pg-ingest";

/// A failure of a Postgres operation, carrying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to {context}: {source}")]
    Db {
        context: &'static str,
        class: ErrorClass,
        #[source]
        source: sqlx::Error,
    },
    /// The connection broke while COMMIT was in flight: the transaction may or may not
    /// have committed; only the offset rows can tell.
    #[error("commit outcome unknown, connection lost during COMMIT: {0}")]
    AmbiguousCommit(#[source] sqlx::Error),
    #[error("{0}")]
    Fatal(String),
}

impl StoreError {
    /// What the caller should do.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Db { class, .. } => *class,
            Self::AmbiguousCommit(_) => ErrorClass::Transient,
            Self::Fatal(_) => ErrorClass::Fatal,
        }
    }
}

/// Wraps a sqlx error with what was being done, classified by SQLSTATE.
fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Db {
        context,
        class: retry::classify(&source),
        source,
    }
}

/// Quotes an identifier so any name (capitals, spaces, quotes) is taken literally.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes `schema.table`.
fn quote_table(qualified: &str) -> String {
    qualified
        .split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

/// The worker's view of Postgres.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    group: String,
    copy_sql: String,
    /// `INSERT` of one row from text parameters, for `sink.write_method: row_inserts`.
    insert_sql: Option<String>,
    /// Name of the unique index on the source coordinates: a violation of it means the
    /// protocol broke, so it stops the worker instead of becoming a dead letter.
    source_index: String,
    replay_sql: ReplaySql,
}

/// Statements of replays after a rewind, built from quoted identifiers only.
#[derive(Debug, Clone)]
struct ReplaySql {
    /// Deletes the target rows of ranges `($1 topics, $2 partitions, $3 from, $4 until)`.
    delete_replaced: String,
    /// A session-local table of the mapped columns, emptied at commit.
    create_staging: String,
    copy_staging: String,
    /// Moves staged rows into the target table, except re-read rows of the ranges
    /// `$1..$4` that are already there.
    insert_kept: String,
    clear_staging: String,
}

impl ReplaySql {
    fn new(table: &str, column_list: &str, sc: &crate::config::SourceColumns) -> Self {
        let (t, p, o) = (
            quote_ident(&sc.topic),
            quote_ident(&sc.partition),
            quote_ident(&sc.offset),
        );
        let ranges = "unnest($1::text[], $2::int4[], $3::int8[], $4::int8[]) AS k(t, p, f, u)";
        let staging = "pg_temp.kafka_pg_ingest_replay";
        Self {
            delete_replaced: format!(
                "DELETE FROM {table} x USING {ranges} \
                 WHERE x.{t} = k.t AND x.{p} = k.p AND x.{o} >= k.f AND x.{o} < k.u"
            ),
            create_staging: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS AS \
                 SELECT {column_list} FROM {table} WITH NO DATA"
            ),
            copy_staging: format!("COPY {staging} ({column_list}) FROM STDIN"),
            insert_kept: format!(
                "INSERT INTO {table} ({column_list}) SELECT {column_list} FROM {staging} s \
                 WHERE NOT EXISTS (SELECT 1 FROM {ranges} JOIN {table} x \
                   ON x.{t} = k.t AND x.{p} = k.p AND x.{o} >= k.f AND x.{o} < k.u \
                   WHERE x.{t} = s.{t} AND x.{p} = s.{p} AND x.{o} = s.{o})"
            ),
            clear_staging: format!("DELETE FROM {staging}"),
        }
    }
}

impl Store {
    /// Connects (retrying with backoff for `postgres.connect_retry_secs`), migrates when
    /// configured, and checks the target table.
    pub async fn connect(config: &Config) -> Result<Self, StoreError> {
        let pool = connect_pool(config).await?;
        if config.postgres.migrate_on_start {
            migrate(&pool).await?;
        }
        Self::for_pool(pool, config).await
    }

    /// Uses an existing pool (tests, embedding services).
    pub async fn for_pool(pool: PgPool, config: &Config) -> Result<Self, StoreError> {
        let sink = &config.sink;
        let table = quote_table(&sink.table);
        let sc = &sink.source_columns;
        let mut columns: Vec<&str> = sink.columns.iter().map(|c| c.column.as_str()).collect();
        columns.extend([sc.topic.as_str(), sc.partition.as_str(), sc.offset.as_str()]);
        let existing: Vec<String> = sqlx::query_scalar(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
        )
        .bind(&table)
        .fetch_all(&pool)
        .await
        .map_err(db("read the target table's columns"))?;
        if existing.is_empty() {
            return Err(StoreError::Fatal(format!(
                "target table `{}` (sink.table) does not exist: run `kafka-pg-ingest migrate` or create it",
                sink.table
            )));
        }
        if let Some(missing) = columns.iter().find(|c| !existing.iter().any(|e| e == *c)) {
            return Err(StoreError::Fatal(format!(
                "target table `{}` has no column `{missing}` named in sink configuration",
                sink.table
            )));
        }
        let mut coordinates = vec![sc.topic.clone(), sc.partition.clone(), sc.offset.clone()];
        coordinates.sort();
        let source_index: Option<String> = sqlx::query_scalar(
            "SELECT i.relname::text FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid \
             WHERE x.indrelid = to_regclass($1) AND x.indisunique AND x.indpred IS NULL \
               AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text) FROM pg_attribute a \
                    WHERE a.attrelid = x.indrelid AND a.attnum = ANY(x.indkey)) = $2::text[] \
             LIMIT 1",
        )
        .bind(&table)
        .bind(&coordinates)
        .fetch_optional(&pool)
        .await
        .map_err(db("look up the unique index on source coordinates"))?;
        let source_index = source_index.ok_or_else(|| {
            StoreError::Fatal(format!(
                "target table `{}` needs a unique index on ({}, {}, {}) (sink.source_columns): \
                 exactly-once audits and replays rely on it",
                sink.table, sc.topic, sc.partition, sc.offset
            ))
        })?;
        let column_list = columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let insert_sql = (sink.write_method == WriteMethod::RowInserts).then(|| {
            let types = sink
                .columns
                .iter()
                .map(|c| c.kind.sql_name())
                .chain(["text", "int4", "int8"]);
            let values = types
                .enumerate()
                .map(|(i, t)| format!("${}::{t}", i + 1))
                .collect::<Vec<_>>()
                .join(", ");
            format!("INSERT INTO {table} ({column_list}) VALUES ({values})")
        });
        Ok(Self {
            pool,
            group: config.kafka.group.clone(),
            copy_sql: format!("COPY {table} ({column_list}) FROM STDIN"),
            insert_sql,
            source_index,
            replay_sql: ReplaySql::new(&table, &column_list, sc),
        })
    }

    /// The pool, for read-only reporting.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The consumer group whose offsets this store keeps.
    pub fn group(&self) -> &str {
        &self.group
    }
}

/// Opens the pool, retrying with backoff until `postgres.connect_retry_secs` runs out.
pub async fn connect_pool(config: &Config) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions =
        config
            .postgres
            .url
            .expose_secret()
            .parse()
            .map_err(|e: sqlx::Error| {
                StoreError::Fatal(format!(
                    "postgres.url ({}) is not a valid Postgres URL: {e}",
                    config.database_url_masked()
                ))
            })?;
    let options = options.application_name(APPLICATION_NAME);
    let limit = Duration::from_secs(config.postgres.connect_retry_secs);
    let started = Instant::now();
    let mut delays = retry::backoff(&config.retry);
    let pool_options = PgPoolOptions::new()
        .max_connections(config.postgres.max_connections)
        .acquire_timeout(Duration::from_millis(config.postgres.acquire_timeout_ms));
    loop {
        // One plain connection probes reachability: the pool's own connect would keep
        // retrying for its whole acquire timeout, hiding the attempts from the log.
        let attempt = match PgConnection::connect_with(&options).await {
            Ok(probe) => {
                let _ = probe.close().await;
                pool_options.clone().connect_with(options.clone()).await
            }
            Err(e) => Err(e),
        };
        match attempt {
            Ok(pool) => return Ok(pool),
            Err(e) if retry::classify(&e) == ErrorClass::Transient => {
                let Some(delay) = retry::next_delay(&mut delays, started, limit) else {
                    return Err(StoreError::Fatal(format!(
                        "cannot reach Postgres at {} after {:.0?} (postgres.connect_retry_secs = {}): {e}",
                        config.database_url_masked(),
                        started.elapsed(),
                        config.postgres.connect_retry_secs
                    )));
                };
                tracing::warn!(
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    url = %config.database_url_masked(),
                    "Postgres unreachable at startup, retrying"
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                return Err(StoreError::Fatal(format!(
                    "cannot connect to Postgres at {}: {e}",
                    config.database_url_masked()
                )));
            }
        }
    }
}

/// Applies the embedded migrations (serialised across workers by sqlx's advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::migrate!("./migrations")
        .run(pool)
        .await
        .map_err(|e| StoreError::Fatal(format!("failed to apply migrations: {e}")))
}

/// Runs a statement built from quoted identifiers only.
async fn execute_trusted(
    conn: &mut sqlx::PgConnection,
    sql: &str,
    context: &'static str,
) -> Result<(), StoreError> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .map(drop)
        .map_err(db(context))
}
