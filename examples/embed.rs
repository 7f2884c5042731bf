//! The worker embedded in an application: its configuration built in code, its loop run
//! under the application's own shutdown token, its counters read when it stops.
//!
//! `cargo run --example embed [DATABASE_URL]` produces 1,000 website-metrics
//! messages into an in-process broker, ingests them into `web_metrics.metrics` of that
//! database (default `postgres://postgres@127.0.0.1:5432/postgres`), and stops once the
//! offsets stored in Postgres reach the end of the topic.

use std::time::Duration;

use anyhow::Context;
use kafka_pg_ingest::config::Overrides;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio_util::sync::CancellationToken;

const MESSAGES: u64 = 1_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database_url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());

    // Stands in for the application's Kafka cluster and producers.
    let cluster = MockCluster::new(1).context("start the in-process broker")?;
    let brokers = cluster.bootstrap_servers();
    let topic = format!("embed-{}", uuid::Uuid::new_v4().simple());
    cluster.create_topic(&topic, 2, 1)?;
    let (b, t) = (brokers.clone(), topic.clone());
    tokio::task::spawn_blocking(move || produce_probes(&b, &t)).await??;

    // The built-in defaults (the website-metrics route), with what this application
    // decides in code; `load_config` checks the whole, naming any key that cannot work.
    let group = format!("{topic}-ingest");
    let mut config = kafka_pg_ingest::load_config(
        None,
        Vec::new(),
        &Overrides {
            brokers: Some(brokers),
            database_url: Some(database_url.clone()),
            group: Some(group.clone()),
            topics: vec![topic.clone()],
            ..Overrides::default()
        },
    )?;
    // Typed fields changed afterwards are checked again when the worker starts.
    config.batch.max_records = 250;

    // The application stops the worker when it likes; here, once Postgres holds offsets
    // for every message.
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(stop_when_ingested(database_url, group, shutdown.clone()));
    let stats = kafka_pg_ingest::run(config, None, shutdown).await?;
    watcher.await??;
    println!(
        "{} batches, {} rows, {} dead letters, commit p50 {:?}",
        stats.batches,
        stats.rows,
        stats.dead_letters,
        stats.commit_latency.percentile(50.0).unwrap_or_default()
    );
    Ok(())
}

/// Produces [`MESSAGES`] probe results as the website checker does, one JSON object per
/// HTTP probe (the default route's fields).
fn produce_probes(brokers: &str, topic: &str) -> anyhow::Result<()> {
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for id in 0..MESSAGES {
        let probe = serde_json::json!({
            "request_timestamp": format!("2026-12-03 10:{:02}:{:02}", id / 60 % 60, id % 60),
            "url": "https://www.example.com/",
            "ip_address": "93.184.215.14",
            "resp_time": "0:00:00.084211",
            "resp_status_code": 200,
            "pattern_found": true,
            "service_name": "Web metric collection service",
            "comment": id.to_string(),
        })
        .to_string();
        let key = id.to_string();
        producer
            .send(BaseRecord::to(topic).key(&key).payload(&probe))
            .map_err(|(e, _)| e)?;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// Cancels `shutdown` once the offsets `group` stored in Postgres sum to [`MESSAGES`].
async fn stop_when_ingested(
    database_url: String,
    group: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(&database_url).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let stored: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(next_offset), 0)::int8 FROM ingest.offsets WHERE consumer_group = $1",
        )
        .bind(&group)
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
        if stored >= MESSAGES as i64 || tokio::time::Instant::now() > deadline {
            shutdown.cancel();
            anyhow::ensure!(
                stored >= MESSAGES as i64,
                "only {stored} of {MESSAGES} ingested in 120 s"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
