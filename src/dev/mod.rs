//! `kafka-pg-ingest dev`: a standalone Kafka-protocol broker and a load generator, so the
//! worker can be tried (and its faults rehearsed) without a Kafka installation.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use rand::SeedableRng;
use rdkafka::producer::{BaseProducer, Producer};
use tokio_util::sync::CancellationToken;

use crate::progress::Progress;
use crate::sample::{self, SampleProducer};

pub mod chaos;
pub mod freeze;
pub mod proxy;
pub mod reaped;
pub mod registry;

/// Runs librdkafka's mock cluster with `topics` until `shutdown`; prints the bootstrap
/// address as the first line of stdout. With `advertised_port`, the broker tells
/// clients it is at 127.0.0.1:PORT (a proxy that the fault campaign can point at a
/// fresh broker: a topic deleted and re-created).
pub async fn broker(
    topics: &[String],
    partitions: i32,
    advertised_port: Option<u16>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    ensure!(partitions > 0, "--partitions must be at least 1");
    // A client hosting the mock cluster, so its native handle is at hand for the
    // advertised address.
    let host: BaseProducer = rdkafka::ClientConfig::new()
        .set("test.mock.num.brokers", "1")
        .create()
        .context("failed to start the mock cluster")?;
    let cluster = host
        .client()
        .mock_cluster()
        .context("failed to start the mock cluster")?;
    for topic in topics {
        cluster
            .create_topic(topic, partitions, 1)
            .with_context(|| format!("failed to create topic {topic}"))?;
    }
    let listener = cluster.bootstrap_servers();
    if let Some(port) = advertised_port {
        let host_name = std::ffi::CString::new("127.0.0.1")?;
        // SAFETY: the mock cluster belongs to `host`, alive for this whole function;
        // librdkafka copies the host name under the cluster's lock.
        unsafe {
            let mock = rdkafka::bindings::rd_kafka_handle_mock_cluster(host.client().native_ptr());
            ensure!(!mock.is_null(), "the mock cluster has no handle");
            rdkafka::bindings::rd_kafka_mock_broker_set_host_port(
                mock,
                1,
                host_name.as_ptr(),
                i32::from(port),
            );
        }
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{listener}")?;
    stdout.flush()?;
    tracing::info!(
        brokers = %listener,
        advertised_port,
        topics = ?topics,
        partitions,
        "broker running; it keeps about 5 MB per partition and deletes older records"
    );
    shutdown.cancelled().await;
    drop(cluster);
    drop(host);
    Ok(())
}

/// What `produce` sent.
#[derive(Debug, Default)]
pub struct Produced {
    pub valid: u64,
    /// Malformed messages by the dead-letter reason they will end with.
    pub malformed: BTreeMap<&'static str, u64>,
}

/// The database of `demo` and `bench`: the local server unless told otherwise.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalDatabase {
    /// Postgres URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub database_url: String,
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
    /// `avro`, `protobuf`, `json_schema`: the same probes in the Confluent wire format,
    /// under the website-metrics schema registered at `--schema-registry` as
    /// `{topic}-value`; malformed ones are then framed values cut short by a byte
    /// (`bad_avro`, `bad_protobuf`, `bad_json_schema`) and unframed bytes (`not_framed`).
    #[arg(long, value_enum, default_value = "json")]
    pub format: crate::config::ValueFormat,
    /// Base URL of a Confluent-compatible Schema Registry (with a registry `--format`).
    #[arg(long, value_name = "URL")]
    pub schema_registry: Option<String>,
    /// The registered schema's id (set by `dev produce` once it has registered it).
    #[arg(skip)]
    pub schema_id: Option<u32>,
}

/// A sample message ([`sample::message`]) framed by `framer`: a valid one framed, a
/// malformed one (but an empty one) a framed value cut short or its bytes unframed, by
/// turns.
fn as_framed(
    malformed: Option<&'static str>,
    bytes: Vec<u8>,
    framer: &sample::Framer,
    i: u64,
) -> anyhow::Result<(Option<&'static str>, Vec<u8>)> {
    Ok(match malformed {
        None => (None, framer.encode(&bytes)?),
        Some("empty") => (malformed, bytes),
        Some(_) if i.is_multiple_of(2) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i);
            let valid = sample::website_metric(i, &mut rng);
            let mut framed = framer.encode(&valid)?;
            framed.truncate(framed.len() - 1);
            (Some(framer.cut_short_reason()), framed)
        }
        Some(_) => (Some("not_framed"), bytes),
    })
}

/// Lets a producer be held between its slices, with nothing in flight: the fault
/// campaign swaps the broker under a held producer, so no message straddles the swap.
#[derive(Debug, Default)]
pub struct Gate {
    hold: AtomicBool,
    holding: AtomicBool,
}

impl Gate {
    /// Holds the producer; returns once it waits with every sent message acknowledged.
    pub fn hold(&self, finished: impl Fn() -> bool) {
        self.hold.store(true, Ordering::SeqCst);
        while !self.holding.load(Ordering::SeqCst) && !finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lets the producer go on.
    pub fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
    }

    /// Waits while held.
    fn pass(&self) {
        while self.hold.load(Ordering::SeqCst) {
            self.holding.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(10));
        }
        self.holding.store(false, Ordering::SeqCst);
    }
}

/// Produces `count` website-metrics messages round-robin over the topic's partitions,
/// a `malformed_ratio` share of them malformed, at most `rate` per second. Blocking.
pub fn produce(options: &ProduceOptions) -> anyhow::Result<Produced> {
    produce_gated(options, &Gate::default())
}

/// [`produce`], waiting at `gate` before each slice of messages.
pub fn produce_gated(options: &ProduceOptions, gate: &Gate) -> anyhow::Result<Produced> {
    ensure!(
        (0.0..=1.0).contains(&options.malformed_ratio),
        "--malformed-ratio must be between 0 and 1"
    );
    ensure!(
        options.rate.is_none_or(|r| r > 0.0),
        "--rate must be above 0"
    );
    let framer = match options.schema_id {
        Some(id) => sample::Framer::new(options.format, id)?,
        None => None,
    };
    let partitions = partition_count(&options.brokers, &options.topic)?;
    let mut producer = SampleProducer::new(&options.brokers, &options.topic, partitions)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let mut produced = Produced::default();
    // Sent in slices of a tenth of a second's worth, so a rate holds without a timer per message.
    let slice = options
        .rate
        .map_or(10_000, |r| ((r / 10.0).ceil() as u64).max(1));
    let started = Instant::now();
    let mut progress = Progress::new("records produced", options.count);
    let mut id = 0;
    while id < options.count {
        gate.pass();
        let n = slice.min(options.count - id);
        let mut payloads = Vec::with_capacity(n as usize);
        for i in id..id + n {
            let (mut malformed, mut bytes) = sample::message(i, options.malformed_ratio, &mut rng);
            if let Some(framer) = &framer {
                (malformed, bytes) = as_framed(malformed, bytes, framer, i)?;
            }
            match malformed {
                Some(reason) => *produced.malformed.entry(reason).or_default() += 1,
                None => produced.valid += 1,
            }
            payloads.push(Some(bytes));
        }
        producer.send(payloads)?;
        id += n;
        progress.set(id);
        if let Some(rate) = options.rate {
            let due = Duration::from_secs_f64(id as f64 / rate);
            std::thread::sleep(due.saturating_sub(started.elapsed()));
        }
    }
    progress.finish();
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
