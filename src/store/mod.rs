//! Postgres: connection, migrations, the target table, offsets and batch commits.

pub mod admin;
mod commit;
mod offsets;
pub mod schema;
mod socket;

use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

pub use commit::{Batch, CommitOutcome, Gap, GapKind, Isolation, Part, PartitionRange, copy};
pub use offsets::{Claim, StoredOffset};

use crate::config::Config;
use crate::retry::{self, ErrorClass};
use crate::routes::Routes;
use crate::security;
use crate::telemetry::outage::Outage;
use schema::RouteSql;

/// `application_name` of the connections of the operator commands, and the start of the
/// workers' (see [`worker_application_name`]), so operators (and tests) can find them.
pub const APPLICATION_NAME: &str = "kafka-pg-ingest";

/// `application_name` of a worker's connections: [`APPLICATION_NAME`], a space and the
/// tail of the worker's id (as in `ingest.offsets.owner`), so each worker's sessions
/// can be told apart, by operators and by a claim ending a previous owner's transaction.
pub fn worker_application_name(owner: &str) -> String {
    let tail = owner.len().saturating_sub(8);
    format!("{APPLICATION_NAME} {}", owner.get(tail..).unwrap_or(owner))
}

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
    /// A call got no answer within the store's deadline; its connection was dropped.
    #[error("{0}")]
    TimedOut(String),
    #[error("{0}")]
    Fatal(String),
}

impl StoreError {
    /// What the caller should do.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Db { class, .. } => *class,
            Self::AmbiguousCommit(_) | Self::TimedOut(_) => ErrorClass::Transient,
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

/// The worker's view of Postgres.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    group: String,
    routes: Routes,
    /// The statements of each route, in the order of `routes`.
    sql: Vec<RouteSql>,
    /// How long the worker waits for one transaction (or one read) before it gives up
    /// on the connection.
    deadline: Duration,
    /// `postgres.lock_timeout_ms`.
    lock_timeout: Duration,
}

impl Store {
    /// Connects (retrying with backoff for `postgres.connect_retry_secs`) under
    /// `application_name`, migrates when configured, and checks every route's table.
    pub async fn connect(config: &Config, application_name: &str) -> Result<Self, StoreError> {
        let pool = connect_pool_as(config, application_name).await?;
        let routes = resolve(config)?;
        if config.postgres.migrate_on_start {
            migrate(&pool, &routes).await?;
        }
        Self::with_routes(pool, config, routes).await
    }

    /// Uses an existing pool (tests, embedding services); checks every route's table.
    pub async fn for_pool(pool: PgPool, config: &Config) -> Result<Self, StoreError> {
        Self::with_routes(pool, config, resolve(config)?).await
    }

    async fn with_routes(
        pool: PgPool,
        config: &Config,
        mut routes: Routes,
    ) -> Result<Self, StoreError> {
        let sql = schema::prepare(&pool, routes.iter(), config.sink.write_method).await?;
        for (index, route) in sql.iter().enumerate() {
            routes.set_format(index, route.format());
        }
        Ok(Self {
            pool,
            group: config.kafka.group.clone(),
            routes,
            sql,
            deadline: Duration::from_millis(config.postgres.statement_timeout_ms) * 2,
            lock_timeout: Duration::from_millis(config.postgres.lock_timeout_ms),
        })
    }

    /// Runs `work` on a connection of its own and gives up after the deadline (twice
    /// `postgres.statement_timeout_ms`): the server cancels a statement long before, so
    /// only a connection that no longer answers (a half-open socket, a frozen server)
    /// gets here. Such a connection is closed, never returned to the pool, whose release
    /// would wait on it forever; the failure is transient.
    async fn bounded<T>(
        &self,
        context: &'static str,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.bounded_within(self.deadline, context, work).await
    }

    /// [`Store::bounded`] with a deadline of its own, for work of many statements.
    async fn bounded_within<T>(
        &self,
        deadline: Duration,
        context: &'static str,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db(context))?;
        match tokio::time::timeout(deadline, work(&mut conn)).await {
            Ok(result) => result,
            Err(_) => {
                drop(conn.detach());
                Err(StoreError::TimedOut(format!(
                    "failed to {context}: Postgres did not answer within {deadline:?}"
                )))
            }
        }
    }

    /// The routes this store writes, with their decoders.
    pub fn routes(&self) -> &Routes {
        &self.routes
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

/// Opens the pool of an operator command, retrying with backoff until
/// `postgres.connect_retry_secs` runs out.
pub async fn connect_pool(config: &Config) -> Result<PgPool, StoreError> {
    connect_pool_as(config, APPLICATION_NAME).await
}

/// Opens a pool whose sessions carry `application_name`, retrying with backoff until
/// `postgres.connect_retry_secs` runs out.
pub async fn connect_pool_as(
    config: &Config,
    application_name: &str,
) -> Result<PgPool, StoreError> {
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
    let options =
        security::apply_postgres(&config.postgres, options.application_name(application_name))
            .options(session_settings(config));
    let limit = Duration::from_secs(config.postgres.connect_retry_secs);
    let started = Instant::now();
    let mut delays = retry::backoff(&config.retry);
    let outage = Outage::new("Postgres");
    let (host, port) = (options.get_host().to_owned(), options.get_port());
    let pool_options = PgPoolOptions::new()
        .max_connections(config.postgres.max_connections)
        .acquire_timeout(Duration::from_millis(config.postgres.acquire_timeout_ms))
        .after_connect(move |_, _| {
            let host = host.clone();
            Box::pin(async move {
                // Resolved at each connect: the name may point elsewhere after a failover.
                let server: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
                    .await
                    .map(Iterator::collect)
                    .unwrap_or_default();
                socket::tune(&server);
                Ok(())
            })
        });
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
            Ok(pool) => {
                outage.recovered();
                return Ok(pool);
            }
            Err(e) if retry::classify(&e) == ErrorClass::Transient => {
                let Some(delay) = retry::next_delay(&mut delays, started, limit) else {
                    return Err(StoreError::Fatal(format!(
                        "cannot reach Postgres at {} after {:.0?} (postgres.connect_retry_secs = {}): {e}",
                        config.database_url_masked(),
                        started.elapsed(),
                        config.postgres.connect_retry_secs
                    )));
                };
                tracing::debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "connecting failed, retrying");
                outage.failed(&format_args!(
                    "connecting to {}: {e}",
                    config.database_url_masked()
                ));
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                return Err(StoreError::Fatal(format!(
                    "cannot connect to Postgres at {}: {e}{}",
                    config.database_url_masked(),
                    // Fatal I/O errors are refused TLS handshakes (see `retry::classify`);
                    // configuration errors here are unreadable keys or certificates.
                    if matches!(
                        e,
                        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Configuration(_)
                    ) {
                        " (TLS: check postgres.sslmode, postgres.sslrootcert and that the URL's host is a name the server's certificate holds)"
                    } else {
                        ""
                    }
                )));
            }
        }
    }
}

/// Server-side deadlines of every session: no statement, lock wait or idle transaction
/// of the worker lasts unbounded, and the server probes a silent client's socket so a
/// vanished worker's backend (and its locks) goes away.
fn session_settings(config: &Config) -> [(&'static str, String); 7] {
    let pg = &config.postgres;
    [
        // The protocol's statements are written for it, whatever the server's default:
        // each sees what committed before it (a claim, the column-type check of COPY
        // BINARY after its lock).
        ("default_transaction_isolation", "read committed".to_owned()),
        ("statement_timeout", pg.statement_timeout_ms.to_string()),
        ("lock_timeout", pg.lock_timeout_ms.to_string()),
        (
            "idle_in_transaction_session_timeout",
            pg.idle_in_transaction_timeout_ms.to_string(),
        ),
        ("tcp_keepalives_idle", "10".to_owned()),
        ("tcp_keepalives_interval", "5".to_owned()),
        ("tcp_keepalives_count", "3".to_owned()),
    ]
}

/// Applies the embedded migrations of the `ingest` schema (serialised across workers by
/// sqlx's advisory lock), then creates the default route's table when one of `routes`
/// writes into it and it is missing. Their connection has no lock or statement deadline
/// (a worker starting while another migrates waits for it) and is closed afterwards, so
/// those settings never reach a batch.
pub async fn migrate(pool: &PgPool, routes: &Routes) -> Result<(), StoreError> {
    let failed =
        |e: &dyn std::fmt::Display| StoreError::Fatal(format!("failed to apply migrations: {e}"));
    let mut conn = pool.acquire().await.map_err(|e| failed(&e))?.detach();
    let applied = async {
        sqlx::raw_sql("SET lock_timeout = 0; SET statement_timeout = 0")
            .execute(&mut conn)
            .await?;
        let migrator = sqlx::migrate!("./migrations");
        adopt_first_migration(&mut conn, &migrator).await?;
        migrator.run(&mut conn).await?;
        Ok::<(), sqlx::Error>(())
    }
    .await
    .map_err(|e| failed(&e));
    let default_table = routes
        .iter()
        .any(|r| (r.schema_name.as_str(), r.table_name.as_str()) == DEFAULT_TABLE);
    let created = match applied {
        Ok(()) if default_table => create_default_table(&mut conn).await.map_err(|e| {
            StoreError::Fatal(format!(
                "cannot create web_metrics.metrics, the table a route writes into: {e}; \
                 create it as its owner (`kafka-pg-ingest migrate` with this configuration)"
            ))
        }),
        other => other,
    };
    let _ = conn.close().await;
    created
}

/// The configuration's routes; an error is fatal.
fn resolve(config: &Config) -> Result<Routes, StoreError> {
    Routes::new(config).map_err(|e| StoreError::Fatal(e.to_string()))
}

/// The default route's table: `web_metrics.metrics`.
const DEFAULT_TABLE: (&str, &str) = ("web_metrics", "metrics");

/// The checksum of the first migration as it was when it also created
/// `web_metrics.metrics`.
const FIRST_MIGRATION_WITH_WEB_METRICS: &str = "2e81b33763b7c28f343b910df7eee2dc17f621f523aaf37c64079453e38e44561db51b799fb28125e09b8ac283cd16e9";

/// A database migrated when the first migration also created the website-metrics table
/// records that migration's old checksum, which sqlx would refuse as a modified
/// migration: it is recorded as the current one (the table stays, as any route's).
async fn adopt_first_migration(
    conn: &mut sqlx::PgConnection,
    migrator: &sqlx::migrate::Migrator,
) -> Result<(), sqlx::Error> {
    let Some(first) = migrator.iter().find(|m| m.version == 1) else {
        return Ok(());
    };
    // Read first: the UPDATE needs a privilege that a fully migrated database must not
    // ask of a worker.
    let recorded: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !recorded {
        return Ok(());
    }
    let old: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM _sqlx_migrations \
           WHERE version = 1 AND checksum = decode($1, 'hex'))",
    )
    .bind(FIRST_MIGRATION_WITH_WEB_METRICS)
    .fetch_one(&mut *conn)
    .await?;
    if old {
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $1 \
             WHERE version = 1 AND checksum = decode($2, 'hex')",
        )
        .bind(first.checksum.as_ref())
        .bind(FIRST_MIGRATION_WITH_WEB_METRICS)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Creates `web_metrics.metrics` unless it exists (then no privilege beyond reading
/// the catalog is needed); concurrent workers take turns on an advisory lock.
async fn create_default_table(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    let exists = "SELECT to_regclass('web_metrics.metrics') IS NOT NULL";
    if sqlx::query_scalar::<_, bool>(exists)
        .fetch_one(&mut *conn)
        .await?
    {
        return Ok(());
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('kafka-pg-ingest web_metrics'))")
        .execute(&mut *tx)
        .await?;
    // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema is
    // there: an owner may have created it and granted CREATE on it alone.
    let schema = "SELECT to_regnamespace('web_metrics') IS NOT NULL";
    if !sqlx::query_scalar::<_, bool>(schema)
        .fetch_one(&mut *tx)
        .await?
    {
        sqlx::raw_sql("CREATE SCHEMA IF NOT EXISTS web_metrics")
            .execute(&mut *tx)
            .await?;
    }
    sqlx::raw_sql(include_str!("web_metrics.sql"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
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
