//! `kafka-pg-ingest dev`: a standalone Kafka-protocol broker and a load generator, so the
//! worker can be tried (and its faults rehearsed) without a Kafka installation.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use rand::SeedableRng;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, Producer};
use tokio_util::sync::CancellationToken;

use crate::sample::{self, SampleProducer};

pub mod chaos;
pub mod freeze;
pub mod proxy;
pub mod reaped;

/// Runs librdkafka's mock cluster with `topics` until `shutdown`; prints the bootstrap
/// address as the first line of stdout.
pub async fn broker(
    topics: &[String],
    partitions: i32,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    ensure!(partitions > 0, "--partitions must be at least 1");
    let cluster = MockCluster::new(1).context("failed to start the mock cluster")?;
    for topic in topics {
        cluster
            .create_topic(topic, partitions, 1)
            .with_context(|| format!("failed to create topic {topic}"))?;
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", cluster.bootstrap_servers())?;
    stdout.flush()?;
    tracing::info!(
        brokers = %cluster.bootstrap_servers(),
        topics = ?topics,
        partitions,
        "broker running; it keeps about 5 MB per partition and deletes older records"
    );
    shutdown.cancelled().await;
    drop(cluster);
    Ok(())
}

/// What `produce` sent.
#[derive(Debug, Default)]
pub struct Produced {
    pub valid: u64,
    /// Malformed messages by the dead-letter reason they will end with.
    pub malformed: BTreeMap<&'static str, u64>,
}

/// Load-generator settings (the flags of `dev produce`).
#[derive(Debug, Clone, clap::Args)]
pub struct ProduceOptions {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub brokers: String,
    /// Topic to produce to.
    #[arg(long, default_value = "website-metrics")]
    pub topic: String,
    /// How many messages.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Messages per second (unlimited when absent).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Share of malformed messages, 0..=1.
    #[arg(long, default_value_t = 0.0)]
    pub malformed_ratio: f64,
    /// Seed of the generator, for a reproducible stream.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Produces `count` website-metrics messages round-robin over the topic's partitions,
/// a `malformed_ratio` share of them malformed, at most `rate` per second. Blocking.
pub fn produce(options: &ProduceOptions) -> anyhow::Result<Produced> {
    ensure!(
        (0.0..=1.0).contains(&options.malformed_ratio),
        "--malformed-ratio must be between 0 and 1"
    );
    ensure!(
        options.rate.is_none_or(|r| r > 0.0),
        "--rate must be above 0"
    );
    let partitions = partition_count(&options.brokers, &options.topic)?;
    let mut producer = SampleProducer::new(&options.brokers, &options.topic, partitions)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let mut produced = Produced::default();
    // Sent in slices of a tenth of a second's worth, so a rate holds without a timer per message.
    let slice = options
        .rate
        .map_or(10_000, |r| ((r / 10.0).ceil() as u64).max(1));
    let started = Instant::now();
    let mut id = 0;
    while id < options.count {
        let n = slice.min(options.count - id);
        let mut payloads = Vec::with_capacity(n as usize);
        for i in id..id + n {
            let (malformed, bytes) = sample::message(i, options.malformed_ratio, &mut rng);
            match malformed {
                Some(reason) => *produced.malformed.entry(reason).or_default() += 1,
                None => produced.valid += 1,
            }
            payloads.push(Some(bytes));
        }
        producer.send(payloads)?;
        id += n;
        if let Some(rate) = options.rate {
            let due = Duration::from_secs_f64(id as f64 / rate);
            std::thread::sleep(due.saturating_sub(started.elapsed()));
        }
    }
    Ok(produced)
}

fn partition_count(brokers: &str, topic: &str) -> anyhow::Result<i32> {
    let client: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let metadata = client
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("cannot read metadata of topic {topic} from {brokers}"))?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    ensure!(
        partitions > 0,
        "topic {topic} has no partitions at {brokers}"
    );
    Ok(partitions as i32)
}
