//! Integration tests against a real Postgres and a real Kafka-protocol broker
//! (librdkafka's mock cluster). Each test has its own database, topic and group.

mod binary;
mod chaos;
mod core;
mod deploy;
mod faults;
mod helpers;
mod kafka_tls;
mod pki;
mod postgres_tls;
mod privileges;
mod replay;
mod routes;
mod telemetry;
mod traces;
