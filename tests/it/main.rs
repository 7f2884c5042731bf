//! Integration tests against a real Postgres and a real Kafka-protocol broker
//! (librdkafka's mock cluster). Each test has its own database, topic and group.

mod binary;
mod core;
mod faults;
mod helpers;
mod telemetry;
mod traces;
