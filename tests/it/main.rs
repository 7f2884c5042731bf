//! Integration tests against a real Postgres and a real Kafka-protocol broker
//! (librdkafka's mock cluster). Each test has its own database, topic and group.

mod avro;
mod binary;
mod chaos;
mod core;
pub mod debezium;
mod deploy;
mod docs;
mod edges;
mod faults;
#[path = "../../src/decode/fixture.rs"]
mod fixture;
mod freeze;
mod helpers;
mod isolation;
mod kafka_tls;
mod lanes;
mod migrations;
mod outages;
mod pages;
mod partitions;
mod pki;
mod positions;
mod postgres_tls;
pub mod privileges;
mod redrive;
mod registry_formats;
mod replay;
pub mod routes;
mod telemetry;
mod traces;
