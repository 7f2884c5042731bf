//! kafka-pg-ingest: moves Kafka records into PostgreSQL exactly once.
//!
//! Each poll batch's rows, dead letters and offset advance commit in one Postgres
//! transaction; offsets live in Postgres and are claimed with an epoch on every
//! assignment, so a worker that lost its partition cannot commit. See `pipeline` for the
//! loop, `store` for the transaction, `kafka` for the claim.

pub mod bench;
pub mod cli;
pub mod config;
pub mod decode;
pub mod demo;
pub mod dev;
pub mod kafka;
pub mod ops;
pub mod pipeline;
pub mod record;
pub mod retry;
pub mod route;
pub mod sample;
pub mod security;
pub mod store;
pub mod telemetry;
