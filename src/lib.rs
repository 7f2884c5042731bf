//! kafka-pg-ingest: moves Kafka records into PostgreSQL exactly once.
//!
//! Each poll batch's rows, dead letters and offset advance commit in one Postgres
//! transaction; offsets live in Postgres and are claimed with an epoch on every
//! assignment, so a worker that lost its partition cannot commit. See `pipeline` for the
//! loop, `store` for the transaction, `kafka` for the claim, and `docs/architecture.md`
//! for the map of the crate and the walk of one record.
//!
//! The binary is a thin shell over this library ([`cli`]); an application can embed the
//! worker. The public face is small:
//!
//! - [`config`]: the typed configuration, plain data with a documented field per key;
//! - [`load_config`]: its layers (defaults, file, environment, overrides) loaded and
//!   checked as a whole;
//! - [`run`]: the worker, until the application's shutdown token is cancelled, returning
//!   its [`Stats`]; why it stopped otherwise is a [`PipelineError`].
//!
//! The rest of the crate is internal (`docs/architecture.md` maps it).
//!
//! ```
//! use kafka_pg_ingest::config::Overrides;
//!
//! let mut config = kafka_pg_ingest::load_config(
//!     None,
//!     Vec::new(),
//!     &Overrides {
//!         brokers: Some("127.0.0.1:9092".into()),
//!         topics: vec!["website-metrics".into()],
//!         ..Overrides::default()
//!     },
//! )?;
//! assert_eq!(config.batch.max_records, 20_000);
//! config.batch.max_wait_ms = 100;
//! config.validate()?; // `run` checks it again before it connects
//!
//! // A configuration that cannot work is refused, naming the key to change.
//! let zero = [("KAFKA_PG_INGEST__BATCH__MAX_RECORDS".to_owned(), "0".to_owned())];
//! let refused = kafka_pg_ingest::load_config(None, zero, &Overrides::default());
//! assert!(refused.unwrap_err().to_string().contains("batch.max_records"));
//!
//! // Running it needs the broker and Postgres (see `examples/embed.rs`):
//! # async fn run(config: kafka_pg_ingest::config::Config) -> anyhow::Result<()> {
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let stats = kafka_pg_ingest::run(config, None, shutdown).await?;
//! println!("{} rows, {} dead letters", stats.rows, stats.dead_letters);
//! # Ok(())
//! # }
//! # Ok::<(), kafka_pg_ingest::config::ConfigError>(())
//! ```

pub mod cli;
pub mod config;

/// Declares the rooms behind the public face: `pub(crate)`, or `pub` but hidden from the
/// documentation with the `internals` feature, which only this crate's own integration
/// tests, examples and fuzz target turn on (through a dev-dependency on the crate itself).
/// Nothing reached through them is a stable interface.
macro_rules! inner_rooms {
    ($($room:ident),* $(,)?) => {$(
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        pub mod $room;
        #[cfg(not(feature = "internals"))]
        pub(crate) mod $room;
    )*};
}

inner_rooms!(
    bench, decode, demo, dev, kafka, ops, pipeline, progress, record, registry, retry, route,
    routes, sample, security, store, telemetry,
);

pub use pipeline::{Latencies, PipelineError, Stats, run};
pub use retry::ErrorClass;
pub use store::StoreError;

use std::path::Path;

/// Loads the configuration from its layers (see [`config::Config::load`]) and checks
/// what the typed data alone cannot: the transport security keys and the files they
/// name, and the routes against the mapping rules (tables, columns, keys). Every
/// entry point loads through here, so a bad configuration fails before anything runs,
/// naming the key to change.
pub fn load_config(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &config::Overrides,
) -> Result<config::Config, config::ConfigError> {
    checked(config::Config::load(file, env, overrides)?)
}

/// `config` once checked for what the typed data alone cannot say (see [`load_config`]).
pub fn checked(config: config::Config) -> Result<config::Config, config::ConfigError> {
    security::validate(&config)?;
    routes::Routes::new(&config)?;
    Ok(config)
}
