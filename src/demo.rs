//! `kafka-pg-ingest demo`: the whole path on an embedded broker.
//!
//! Starts librdkafka's in-process mock cluster, produces sample website-metrics messages
//! (some malformed) to a fresh topic, ingests them with the real pipeline into the given
//! Postgres, and reports what landed. A fresh topic and group per run keeps runs apart.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::SeedableRng;
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use crate::config::Overrides;
use crate::pipeline::Pipeline;
use crate::progress::Progress;
use crate::sample;

/// What the demo found in Postgres at the end.
#[derive(Debug)]
pub struct DemoReport {
    pub topic: String,
    pub produced: u64,
    pub rows: i64,
    pub dead_letters: Vec<(String, i64)>,
    pub offsets: Vec<(i32, Option<i64>)>,
    pub elapsed: Duration,
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "topic {}: {} messages produced, ingested in {:.1?}",
            self.topic, self.produced, self.elapsed
        )?;
        writeln!(f, "rows in web_metrics.metrics: {}", self.rows)?;
        let dead: i64 = self.dead_letters.iter().map(|(_, n)| n).sum();
        writeln!(f, "dead letters in ingest.dead_letters: {dead}")?;
        for (reason, n) in &self.dead_letters {
            writeln!(f, "  {reason:<16} {n}")?;
        }
        writeln!(f, "offsets in ingest.offsets:")?;
        for (partition, next) in &self.offsets {
            let next = next.map_or("-".to_owned(), |n| n.to_string());
            writeln!(f, "  partition {partition}: next_offset {next}")?;
        }
        Ok(())
    }
}

/// Runs the demo against the Postgres at `database_url`.
pub async fn run(database_url: &str, messages: u64, partitions: i32) -> anyhow::Result<DemoReport> {
    let cluster =
        MockCluster::new(1).context("failed to start the in-process Kafka mock cluster")?;
    let brokers = cluster.bootstrap_servers();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let topic = format!("website-metrics-demo-{suffix}");
    cluster
        .create_topic(&topic, partitions, 1)
        .context("failed to create the demo topic")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(2021);
    let payloads: Vec<Option<Vec<u8>>> = (0..messages)
        .map(|id| Some(sample::message(id, 0.03, &mut rng).1))
        .collect();
    let (b, t) = (brokers.clone(), topic.clone());
    let produced =
        tokio::task::spawn_blocking(move || sample::produce(&b, &t, partitions, payloads))
            .await
            .context("producer thread failed")??;

    let config = crate::load_config(
        None,
        std::env::vars(),
        &Overrides {
            brokers: Some(brokers),
            database_url: Some(database_url.to_owned()),
            group: Some(format!("web-metrics-demo-{suffix}")),
            topics: vec![topic.clone()],
            ..Overrides::default()
        },
    )?;
    let started = Instant::now();
    let mut pipeline = Pipeline::connect(config).await?;
    let shutdown = CancellationToken::new();
    let deadline = started + Duration::from_secs(120);
    let mut landed = 0u64;
    let mut progress = Progress::new("records ingested", produced);
    while landed < produced {
        if Instant::now() > deadline {
            bail!("demo did not catch up within 120 s ({landed} of {produced} records)");
        }
        if let crate::pipeline::StepOutcome::Committed { records, .. } =
            pipeline.step(&shutdown).await?
        {
            landed += records as u64;
            progress.set(landed);
        }
    }
    progress.finish();
    let elapsed = started.elapsed();
    let pool = pipeline.store().pool().clone();
    let group = pipeline.store().group().to_owned();
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM web_metrics.metrics WHERE kafka_topic = $1")
            .bind(&topic)
            .fetch_one(&pool)
            .await?;
    let dead_letters: Vec<(String, i64)> = sqlx::query_as(
        "SELECT reason_code, count(*) FROM ingest.dead_letters WHERE topic = $1 GROUP BY 1 ORDER BY 1",
    )
    .bind(&topic)
    .fetch_all(&pool)
    .await?;
    let offsets: Vec<(i32, Option<i64>)> = sqlx::query_as(
        "SELECT partition, next_offset FROM ingest.offsets WHERE consumer_group = $1 AND topic = $2 ORDER BY 1",
    )
    .bind(&group)
    .bind(&topic)
    .fetch_all(&pool)
    .await?;
    pipeline.close().await;
    drop(cluster);
    Ok(DemoReport {
        topic,
        produced,
        rows,
        dead_letters,
        offsets,
        elapsed,
    })
}
