//! Typed configuration and its layers.
//!
//! Layers, each overriding the one before: built-in defaults (`config/service.yaml`,
//! embedded) -> the YAML file given with `--config` -> environment variables
//! `KAFKA_PG_INGEST__SECTION__KEY` -> CLI flags. Maps merge key by key; lists replace.
//! Every struct denies unknown fields, so a misspelt key is an error that names it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

mod security;

pub use security::{KafkaSasl, KafkaSsl, SaslMechanism, SecurityProtocol, SslMode};

/// The embedded default configuration: the website-metrics pipeline.
pub const DEFAULT_YAML: &str = include_str!("../../config/service.yaml");

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "KAFKA_PG_INGEST__";

/// A configuration that cannot be used, with the key to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration ({origin}): {message}")]
    Parse { origin: String, message: String },
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

pub(crate) fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

/// The whole configuration of a worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where records come from.
    pub kafka: KafkaConfig,
    /// Where rows, dead letters and offsets go.
    pub postgres: PostgresConfig,
    /// How much one transaction holds.
    pub batch: BatchConfig,
    /// Backoff for transient failures.
    pub retry: RetryConfig,
    /// How a record becomes a row: the limits every route shares, and the mapping of
    /// `kafka.topics` while `routes` is empty.
    pub sink: SinkConfig,
    /// Topic -> table routes, each with its own mapping and write mode. When given, they
    /// replace `kafka.topics` and the mapping of `sink`.
    pub routes: Vec<RouteConfig>,
    /// Loop pacing.
    pub run: RunConfig,
    /// OpenTelemetry trace export.
    pub otel: OtelConfig,
    /// The Confluent-compatible Schema Registry that routes of a registry format read
    /// their writer schemas from.
    pub schema_registry: SchemaRegistryConfig,
}

/// A Confluent-compatible Schema Registry (`schema_registry`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// Base URLs, comma-separated; each is tried in turn when one does not answer.
    pub url: Option<String>,
    /// HTTP basic authentication.
    pub username: Option<String>,
    /// Read from `KAFKA_PG_INGEST__SCHEMA_REGISTRY__PASSWORD(_FILE)` in deployments.
    #[serde(default, deserialize_with = "secret_text")]
    pub password: Option<SecretString>,
    /// PEM CA bundle trusted for an `https` registry, besides the system's.
    pub ca_location: Option<String>,
    /// Deadline of one request.
    pub timeout_ms: u64,
}

/// How a route's record values are encoded.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// UTF-8 JSON.
    #[default]
    Json,
    /// Avro in the Confluent wire format: byte 0, a 4-byte schema id, the datum.
    Avro,
    /// Protobuf in the Confluent wire format: byte 0, a 4-byte schema id, the message
    /// indexes, the message.
    Protobuf,
    /// JSON valid under a JSON Schema, in the Confluent wire format: byte 0, a 4-byte
    /// schema id, the JSON text.
    #[value(name = "json_schema")]
    JsonSchema,
}

/// How a route's record keys are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFormat {
    /// The key as it is: `@key` gives its bytes (for `bytea`) or UTF-8 text,
    /// `@key_json:` parses it as JSON. `string` and `bytes` name the same reading.
    #[default]
    #[serde(alias = "string", alias = "bytes")]
    Json,
    /// Avro in the Confluent wire format.
    Avro,
    /// Protobuf in the Confluent wire format.
    Protobuf,
    /// JSON under a JSON Schema, in the Confluent wire format.
    JsonSchema,
}

impl KeyFormat {
    /// The registry format keys are read in, if any.
    pub fn framed(self) -> Option<ValueFormat> {
        match self {
            Self::Json => None,
            Self::Avro => Some(ValueFormat::Avro),
            Self::Protobuf => Some(ValueFormat::Protobuf),
            Self::JsonSchema => Some(ValueFormat::JsonSchema),
        }
    }
}

impl ValueFormat {
    /// The name the configuration spells it with.
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Avro => "avro",
            Self::Protobuf => "protobuf",
            Self::JsonSchema => "json_schema",
        }
    }

    /// Whether values carry a schema id whose schema comes from the registry.
    pub fn framed(self) -> bool {
        self != Self::Json
    }
}

/// Kafka consumer settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers.
    pub brokers: String,
    /// Consumer group id; also the key of the offset rows.
    pub group: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Start of a partition that has no stored offset.
    pub auto_offset_reset: OffsetReset,
    /// What to do when a stored offset lies outside what the broker holds (retention
    /// deleted records before they were ingested, or the topic was re-created).
    pub on_data_loss: OnDataLoss,
    /// Mirror committed offsets to Kafka (advisory, for lag tools).
    pub mirror_offsets: bool,
    /// Extra librdkafka properties, passed through unchanged; numbers and booleans are
    /// taken as their text (`session.timeout.ms: 6000`).
    #[serde(deserialize_with = "scalar_strings")]
    pub options: BTreeMap<String, String>,
    /// plaintext | ssl | sasl_plaintext | sasl_ssl.
    pub security_protocol: SecurityProtocol,
    /// TLS files, used when `security_protocol` is ssl or sasl_ssl.
    pub ssl: KafkaSsl,
    /// Credentials, used when `security_protocol` is sasl_plaintext or sasl_ssl.
    pub sasl: KafkaSasl,
}

/// Where a partition without a stored offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    /// The oldest record still on the broker.
    Earliest,
    /// Only records produced after the claim.
    Latest,
}

/// What a worker does when a partition's stored offset is outside the broker's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDataLoss {
    /// Stop with a message naming the partition, the offsets and the command that
    /// resolves it.
    Stop,
    /// Move on, recording the skipped range in `ingest.offset_gaps` in the same
    /// transaction as the partition's next batch.
    Skip,
}

/// Postgres connection settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL; a secret, since it may hold a password.
    #[serde(deserialize_with = "secret")]
    pub url: SecretString,
    /// Pool size.
    pub max_connections: u32,
    /// How long to keep retrying the first connection before exiting non-zero.
    pub connect_retry_secs: u64,
    /// How long one operation waits for a pooled connection before it counts as a
    /// transient failure (and is retried with backoff).
    pub acquire_timeout_ms: u64,
    /// Apply migrations at startup.
    pub migrate_on_start: bool,
    /// Postgres cancels any statement of the worker running longer than this
    /// (`statement_timeout`); the worker itself stops waiting for a transaction after
    /// twice as long and drops its connection.
    pub statement_timeout_ms: u64,
    /// Longest wait for a lock (`lock_timeout`); a timed-out wait is retried.
    pub lock_timeout_ms: u64,
    /// Postgres ends a transaction of the worker left idle this long
    /// (`idle_in_transaction_session_timeout`): a frozen worker cannot hold its locks.
    pub idle_in_transaction_timeout_ms: u64,
    /// libpq's sslmode (disable .. verify-full); overrides the URL's when set.
    pub sslmode: Option<SslMode>,
    /// PEM file of the CA(s) trusted for the server's certificate, besides the system's.
    pub sslrootcert: Option<PathBuf>,
    /// PEM client certificate, for `clientcert=` or `cert` authentication.
    pub sslcert: Option<PathBuf>,
    /// PEM private key of `sslcert` (unencrypted).
    pub sslkey: Option<PathBuf>,
}

/// Bounds of one batch (= one transaction), and how many batches commit at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most records in one batch.
    pub max_records: usize,
    /// Most payload bytes in one batch.
    pub max_bytes: usize,
    /// Longest wait to fill a batch, in milliseconds.
    pub max_wait_ms: u64,
    /// Commit lanes: each lane commits the batches of its own partitions on its own
    /// connection, all lanes at once.
    pub lanes: Lanes,
}

/// How many commit lanes a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lanes {
    /// One per core beyond the first, leaving two of `postgres.max_connections` for
    /// claims (at least one lane).
    Auto,
    /// Exactly this many.
    Fixed(usize),
}

impl<'de> Deserialize<'de> for Lanes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Count(usize),
            Word(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Count(n) => Ok(Self::Fixed(n)),
            Written::Word(w) if w == "auto" => Ok(Self::Auto),
            Written::Word(w) => Err(serde::de::Error::custom(format!(
                "batch.lanes: `{w}` is neither `auto` nor a number of lanes"
            ))),
        }
    }
}

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First delay, in milliseconds.
    pub initial_delay_ms: u64,
    /// Cap of the delay, in milliseconds.
    pub max_delay_ms: u64,
    /// How long a claim on assignment is retried before the worker gives up; unset,
    /// 60 s, or half of `max.poll.interval.ms` when that is shorter.
    #[serde(default)]
    pub claim_limit_secs: Option<u64>,
}

/// The claim limit when `retry.claim_limit_secs` is not set (and the poll interval
/// allows it).
const DEFAULT_CLAIM_LIMIT: Duration = Duration::from_secs(60);

/// The target table and how a record maps onto it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Schema-qualified target table, e.g. `web_metrics.metrics`.
    pub table: String,
    /// Larger record values become `too_large` dead letters.
    pub max_record_bytes: usize,
    /// Deeper JSON becomes a `too_deep` dead letter.
    pub max_json_depth: usize,
    /// A longer JSON string, value or key (in bytes as written, escapes included), makes
    /// the record a `too_long_string` dead letter.
    pub max_string_bytes: usize,
    /// A JSON object with more keys, or an array with more elements, at any level, makes
    /// the record a `too_many_fields` dead letter.
    pub max_fields: usize,
    /// How rows are written: `copy` (bulk, the default) or `row_inserts` (one INSERT per
    /// record, as naive consumers do; only for comparison in benchmarks).
    pub write_method: WriteMethod,
    /// How record values are encoded: `json`, or `avro`, `protobuf` or `json_schema` (the
    /// Confluent wire format, schemas from `schema_registry`).
    pub format: ValueFormat,
    /// How record keys are encoded (what `@key_json:` columns read).
    #[serde(default)]
    pub key_format: KeyFormat,
    /// Columns that receive the record's coordinates.
    pub source_columns: SourceColumns,
    /// One entry per mapped column.
    pub columns: Vec<ColumnMapping>,
}

/// How rows reach the target table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMethod {
    /// One COPY per batch.
    Copy,
    /// One INSERT per record.
    RowInserts,
}

/// Names of the columns holding the Kafka coordinates of each row.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceColumns {
    /// Column for the topic (text).
    pub topic: String,
    /// Column for the partition (integer).
    pub partition: String,
    /// Column for the offset (bigint).
    pub offset: String,
}

/// One target column filled from one part of a record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnMapping {
    /// Target column name, taken literally (quoted in SQL).
    pub column: String,
    /// A top-level field name, a JSON pointer into the value (`/a/b/0`), or record
    /// metadata: `@value`, `@key`, `@key_json:/pointer`, `@header:name`, `@timestamp`,
    /// `@topic`, `@partition`, `@offset`.
    pub field: String,
    /// Type the value must have.
    #[serde(rename = "type")]
    pub kind: ColumnType,
    /// Absent or null (with no `default`) makes the record a `missing_field` dead letter.
    #[serde(default)]
    pub required: bool,
    /// Value used when the field is absent or null.
    #[serde(default)]
    pub default: Option<serde_json::Value>,
    /// Accept strings for numbers and booleans (`"42"` -> 42, `"true"` -> true), and
    /// objects and arrays for text (as their JSON).
    #[serde(default)]
    pub coerce: bool,
    /// For `timestamptz` and `date`: `iso8601` (the default), `epoch_s`, `epoch_ms`,
    /// `epoch_us` (timestamptz from numbers), or a chrono strftime pattern such as
    /// `%d/%m/%Y %H:%M:%S %z`.
    #[serde(default)]
    pub format: Option<String>,
}

/// One topic (or every topic matching a regex) into one table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The topic this route reads.
    #[serde(default)]
    pub topic: Option<String>,
    /// Or: every topic whose name matches this regex (anchored at both ends).
    #[serde(default)]
    pub topic_regex: Option<String>,
    /// Schema-qualified target table, `schema.table`; both names are taken literally
    /// (split at the first `.`).
    pub table: String,
    /// How rows are written.
    #[serde(default)]
    pub mode: WriteMode,
    /// Columns of the table's unique key, for `mode: upsert`.
    #[serde(default)]
    pub key: Vec<String>,
    /// For `mode: upsert`: a tombstone (a record without value) deletes the row of its
    /// key; the key columns must then come from record metadata (`@key`, ...).
    #[serde(default)]
    pub delete_on_tombstone: bool,
    /// How record values are encoded: `json`, or `avro`, `protobuf` or `json_schema` (the
    /// Confluent wire format, schemas from `schema_registry`).
    #[serde(default)]
    pub format: ValueFormat,
    /// How record keys are encoded (what `@key_json:` columns read).
    #[serde(default)]
    pub key_format: KeyFormat,
    /// `debezium`: each value is a Debezium change event (for `mode: upsert`).
    #[serde(default)]
    pub envelope: Envelope,
    /// What a Debezium truncate event does to the table.
    #[serde(default)]
    pub on_truncate: OnTruncate,
    /// For `mode: upsert`: a mapped column whose value orders the versions of a key
    /// (e.g. one from `@source:/lsn`); an older version never replaces a newer one.
    #[serde(default)]
    pub version: Option<String>,
    /// One entry per mapped column.
    pub columns: Vec<ColumnMapping>,
}

/// What a record value holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Envelope {
    /// The row itself.
    #[default]
    None,
    /// A Debezium change event: `op` says what it does; columns read its row image.
    Debezium,
}

/// What a Debezium truncate event (`op: t`) does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTruncate {
    /// Nothing: the record only advances its offset.
    #[default]
    Ignore,
    /// Deletes the rows of the target table whose `version` is below the truncate's, in
    /// the batch's transaction, and the batch's records before it.
    Truncate,
}

/// How a route writes its rows.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Every record becomes a new row; the source coordinates (`@topic`, `@partition`,
    /// `@offset` columns under a unique index) make duplicates impossible.
    #[default]
    Insert,
    /// A record replaces the row with the same `key` (insert or update); the last record
    /// of a key in a batch wins.
    Upsert,
}

impl WriteMode {
    /// The name the configuration gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Insert => "insert",
            Self::Upsert => "upsert",
        }
    }
}

/// Column types the decoder validates and encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Text,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Bool,
    Timestamptz,
    Date,
    Interval,
    Inet,
    Uuid,
    Jsonb,
    Bytea,
}

impl ColumnType {
    /// The Postgres type name.
    pub fn sql_name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Int2 => "int2",
            Self::Int4 => "int4",
            Self::Int8 => "int8",
            Self::Float4 => "float4",
            Self::Float8 => "float8",
            Self::Numeric => "numeric",
            Self::Bool => "bool",
            Self::Timestamptz => "timestamptz",
            Self::Date => "date",
            Self::Interval => "interval",
            Self::Inet => "inet",
            Self::Uuid => "uuid",
            Self::Jsonb => "jsonb",
            Self::Bytea => "bytea",
        }
    }

    /// The Postgres column types (`pg_type.typname`, of the base type for domains) a
    /// value of this type can be written into without loss.
    pub fn accepted_columns(self) -> &'static [&'static str] {
        match self {
            Self::Text => &["text", "varchar", "bpchar", "citext", "name"],
            Self::Int2 => &["int2", "int4", "int8", "numeric"],
            Self::Int4 => &["int4", "int8", "numeric"],
            Self::Int8 => &["int8", "numeric"],
            Self::Float4 => &["float4", "float8"],
            Self::Float8 => &["float8"],
            Self::Numeric => &["numeric"],
            Self::Jsonb => &["jsonb", "json"],
            Self::Bool => &["bool"],
            Self::Timestamptz => &["timestamptz"],
            Self::Date => &["date"],
            Self::Interval => &["interval"],
            Self::Inet => &["inet"],
            Self::Uuid => &["uuid"],
            Self::Bytea => &["bytea"],
        }
    }
}

/// Pacing of the loop.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Seconds to pause after a poll that returned nothing.
    pub sleep_secs: f64,
    /// `HOST:PORT` serving `/metrics`, `/healthz` and `/readyz`; off when unset.
    pub metrics_addr: Option<String>,
}

/// OpenTelemetry trace export. Each key is also read from the standard variable of the
/// same name in upper case with an `OTEL_` prefix (`OTEL_EXPORTER_OTLP_ENDPOINT`, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtelConfig {
    /// Collector base URL (`http://host:4318` for http/protobuf, `http://host:4317` for
    /// grpc); tracing is off when unset.
    pub exporter_otlp_endpoint: Option<String>,
    /// Wire protocol of the exporter.
    pub exporter_otlp_protocol: OtlpProtocol,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Which traces are kept.
    pub traces_sampler: TracesSampler,
    /// Ratio (0..=1) of the `traceidratio` samplers.
    pub traces_sampler_arg: Option<f64>,
    /// More resource attributes, `key=value,key=value`.
    pub resource_attributes: Option<String>,
}

/// OTLP transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// The samplers of `OTEL_TRACES_SAMPLER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TracesSampler {
    AlwaysOn,
    AlwaysOff,
    Traceidratio,
    ParentbasedAlwaysOn,
    ParentbasedAlwaysOff,
    ParentbasedTraceidratio,
}

/// Keys of the `otel` section, which are also the standard `OTEL_*` variable names.
const OTEL_KEYS: [&str; 6] = [
    "exporter_otlp_endpoint",
    "exporter_otlp_protocol",
    "service_name",
    "traces_sampler",
    "traces_sampler_arg",
    "resource_attributes",
];

/// librdkafka properties the exactly-once protocol sets itself, with what to use instead.
const PROTOCOL_OPTIONS: [(&str, &str); 8] = [
    ("group.id", "use kafka.group or --group"),
    ("bootstrap.servers", "use kafka.brokers or --brokers"),
    (
        "auto.offset.reset",
        "use kafka.auto_offset_reset for partitions without a stored offset, and \
         kafka.on_data_loss for stored offsets the broker no longer has",
    ),
    (
        "isolation.level",
        "records of aborted transactions are never read: the worker always uses read_committed",
    ),
    (
        "enable.auto.commit",
        "offsets live in Postgres, never committed by librdkafka",
    ),
    (
        "enable.auto.offset.store",
        "offsets live in Postgres, never stored by librdkafka",
    ),
    (
        "enable.partition.eof",
        "the worker does not use end-of-partition events",
    ),
    (
        "statistics.interval.ms",
        "the worker reads librdkafka's statistics once a second for /readyz, the lag gauges \
         and the end of a Kafka outage",
    ),
];

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub brokers: Option<String>,
    pub database_url: Option<String>,
    pub group: Option<String>,
    pub topics: Vec<String>,
    pub sleep_secs: Option<f64>,
    pub kafka_options: Vec<(String, String)>,
    pub metrics_addr: Option<String>,
}

/// The configuration tree merged from every layer, with the layer each key came from.
#[derive(Debug, Clone)]
pub struct Layers {
    tree: Value,
    /// Dotted key paths a layer above the defaults set, with that layer; a list is set
    /// whole, a map key by key.
    origins: BTreeMap<String, String>,
}

/// The layer of keys no file, variable or flag set.
const DEFAULTS: &str = "built-in defaults";

impl Layers {
    /// Merges the built-in defaults, `file`, the environment variables among `env` and
    /// the flags in `overrides`.
    pub fn read(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut layers = Self {
            tree: parse_yaml(DEFAULT_YAML, DEFAULTS)?,
            origins: BTreeMap::new(),
        };
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let origin = format!("file {}", path.display());
            let over = parse_yaml(&text, &path.display().to_string())?;
            let mut leaves = Vec::new();
            leaf_paths(&over, String::new(), &mut leaves);
            for leaf in leaves {
                layers.origins.insert(leaf, origin.clone());
            }
            merge(&mut layers.tree, over);
        }
        for (name, value) in env {
            // `NAME_FILE=path` gives a variable's value from a file (container secrets);
            // the value is taken as text, never parsed.
            let (name, value) = match name.strip_suffix("_FILE") {
                Some(base) if base.starts_with(ENV_PREFIX) || base == "DATABASE_URL" => {
                    let text =
                        std::fs::read_to_string(&value).map_err(|source| ConfigError::Read {
                            path: format!("{value} (named by {name})"),
                            source,
                        })?;
                    let text = text.trim_end_matches(['\n', '\r']).to_owned();
                    (base.to_owned(), Value::String(text))
                }
                // Secrets are taken as written, never parsed: `~` or `"x"` is a password.
                _ if name.ends_with("PASSWORD") || name.ends_with("__URL") => {
                    (name, Value::String(value))
                }
                _ => {
                    let parsed = serde_yaml_ng::from_str(&value).unwrap_or(Value::String(value));
                    (name, parsed)
                }
            };
            let keys: Vec<String> = if name == "DATABASE_URL" {
                // Only as DATABASE_URL_FILE: DATABASE_URL itself is the --database-url flag.
                vec!["postgres".to_owned(), "url".to_owned()]
            } else if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
                let mut keys: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
                // A shell cannot export a name with dots: librdkafka's properties, all
                // dotted, are written with `_` for `.`.
                if let [section, options, property] = keys.as_mut_slice()
                    && section == "kafka"
                    && options == "options"
                {
                    *property = property.replace('_', ".");
                }
                keys
            } else if let Some(key) = name
                .strip_prefix("OTEL_")
                .map(str::to_lowercase)
                .filter(|k| OTEL_KEYS.contains(&k.as_str()))
            {
                vec!["otel".to_owned(), key]
            } else {
                continue;
            };
            let origin = format!("environment variable {name}");
            layers
                .set(&keys, value, origin)
                .map_err(|problem| invalid(&name, problem))?;
        }
        for (keys, value, flag) in overrides.settings() {
            let origin = format!("flag {flag}");
            layers
                .set(&keys, value, origin)
                .map_err(|problem| invalid(flag, problem))?;
        }
        Ok(layers)
    }

    fn set(&mut self, keys: &[String], value: Value, origin: String) -> Result<(), String> {
        set_path(&mut self.tree, keys, value)?;
        // What this layer replaced whole came from it, not from the layers below.
        let path = keys.join(".");
        let below = format!("{path}.");
        self.origins.retain(|key, _| !key.starts_with(&below));
        self.origins.insert(path, origin);
        Ok(())
    }

    /// The layer that set `key` (a dotted path, with `[i]` for list items).
    pub fn origin(&self, key: &str) -> &str {
        self.origins
            .iter()
            .rev()
            .find(|(path, _)| {
                key.strip_prefix(path.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
            })
            .map_or(DEFAULTS, |(_, origin)| origin)
    }

    /// The configuration these layers give, its keys checked against each other. A
    /// value of the wrong type or a relation that cannot work names the key and the
    /// layer that set it.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let config: Config = serde_path_to_error::deserialize(self.tree.clone()).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Parse {
                origin: self.origin(&key).to_owned(),
                message: format!("`{key}`: {}", e.inner()),
            }
        })?;
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { key, problem } if self.origin(&key) != DEFAULTS => {
                let problem = format!("{problem} (set by {})", self.origin(&key));
                ConfigError::Invalid { key, problem }
            }
            other => other,
        })?;
        Ok(config)
    }

    /// The merged configuration as YAML, secrets masked; with `origins`, each key ends
    /// with a comment naming the layer that set it.
    pub fn render(&self, origins: bool) -> String {
        let mut tree = self.tree.clone();
        mask_secrets(&mut tree);
        let mut out = String::new();
        if let Value::Mapping(map) = &tree {
            self.render_map(map, "", 0, origins, &mut out);
        }
        out
    }

    fn render_map(&self, map: &Mapping, path: &str, depth: usize, origins: bool, out: &mut String) {
        let indent = "  ".repeat(depth);
        for (key, value) in map {
            let key = key
                .as_str()
                .map_or_else(|| format!("{key:?}"), str::to_owned);
            let here = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            let name = serde_yaml_ng::to_string(&Value::String(key)).unwrap_or_default();
            let name = name.trim_end();
            let comment = if origins {
                format!("  # {}", self.origin(&here))
            } else {
                String::new()
            };
            match value {
                Value::Mapping(inner) if !inner.is_empty() => {
                    out.push_str(&format!("{indent}{name}:\n"));
                    self.render_map(inner, &here, depth + 1, origins, out);
                }
                _ => {
                    let text = serde_yaml_ng::to_string(value).unwrap_or_default();
                    let text = text.trim_end();
                    let list = matches!(value, Value::Sequence(items) if !items.is_empty());
                    if list || text.contains('\n') {
                        out.push_str(&format!("{indent}{name}:{comment}\n"));
                        for line in text.lines() {
                            out.push_str(&format!("{indent}  {line}\n"));
                        }
                    } else {
                        out.push_str(&format!("{indent}{name}: {text}{comment}\n"));
                    }
                }
            }
        }
    }
}

/// Every leaf key path of a tree (a list is a leaf: lists replace).
fn leaf_paths(value: &Value, path: String, out: &mut Vec<String>) {
    match value {
        Value::Mapping(map) if !map.is_empty() => {
            for (key, inner) in map {
                let key = key
                    .as_str()
                    .map_or_else(|| format!("{key:?}"), str::to_owned);
                let here = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                leaf_paths(inner, here, out);
            }
        }
        _ if !path.is_empty() => out.push(path),
        _ => {}
    }
}

/// Masks passwords and the passwords of URLs, wherever they are in a tree.
fn mask_secrets(value: &mut Value) {
    if let Value::Mapping(map) = value {
        for (key, inner) in map.iter_mut() {
            let key = key.as_str().unwrap_or_default();
            match inner {
                Value::Null => {}
                _ if key.ends_with("password") => *inner = Value::String("***".into()),
                Value::String(text) if key == "url" => *text = mask_url(text),
                _ => mask_secrets(inner),
            }
        }
    }
}

impl Overrides {
    /// The keys these flags set, with their values and the flag (or its variable).
    fn settings(&self) -> Vec<(Vec<String>, Value, &'static str)> {
        let text = |s: &String| Value::String(s.clone());
        let keys = |path: &[&str]| path.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>();
        let mut settings = Vec::new();
        if let Some(b) = &self.brokers {
            settings.push((
                keys(&["kafka", "brokers"]),
                text(b),
                "--brokers (or KAFKA_BROKERS)",
            ));
        }
        if let Some(url) = &self.database_url {
            settings.push((
                keys(&["postgres", "url"]),
                text(url),
                "--database-url (or DATABASE_URL)",
            ));
        }
        if let Some(g) = &self.group {
            settings.push((keys(&["kafka", "group"]), text(g), "--group"));
        }
        if !self.topics.is_empty() {
            let topics = self.topics.iter().map(text).collect();
            settings.push((
                keys(&["kafka", "topics"]),
                Value::Sequence(topics),
                "--topic",
            ));
        }
        if let Some(s) = self.sleep_secs {
            settings.push((keys(&["run", "sleep_secs"]), Value::from(s), "--sleep"));
        }
        if let Some(addr) = &self.metrics_addr {
            settings.push((
                keys(&["run", "metrics_addr"]),
                text(addr),
                "--metrics-addr (or METRICS_ADDR)",
            ));
        }
        for (k, v) in &self.kafka_options {
            // A property's own dots are not key separators.
            settings.push((
                keys(&["kafka", "options", k.as_str()]),
                text(v),
                "--kafka-option",
            ));
        }
        settings
    }
}

impl Config {
    /// Builds the configuration from all layers and checks its keys against each other.
    /// What needs more than the data (the files the security keys name, the routes) is
    /// checked by `crate::load_config`, which every entry point loads through.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        Layers::read(file, env, overrides)?.config()
    }

    /// Refuses relations between keys that cannot work, saying which key to change.
    /// A route of a registry format needs the registry; the registry's keys must work.
    fn check_schema_registry(&self) -> Result<(), ConfigError> {
        let registry = &self.schema_registry;
        // The first route (or the implicit one) reading values or keys from the registry.
        let of = |prefix: String, value: ValueFormat, key: KeyFormat| {
            if value.framed() {
                Some((format!("{prefix}format"), value))
            } else {
                key.framed().map(|f| (format!("{prefix}key_format"), f))
            }
        };
        let framed = if self.routes.is_empty() {
            of("sink.".to_owned(), self.sink.format, self.sink.key_format)
        } else {
            self.routes
                .iter()
                .enumerate()
                .find_map(|(i, r)| of(format!("routes[{i}]."), r.format, r.key_format))
        };
        for (key, set) in [
            ("sink.format", self.sink.format != ValueFormat::Json),
            ("sink.key_format", self.sink.key_format != KeyFormat::Json),
        ] {
            if !self.routes.is_empty() && set {
                return Err(invalid(
                    key,
                    format!(
                        "applies to the implicit route only, and routes are given: set it \
                         on each route (routes[N].{})",
                        key.trim_start_matches("sink.")
                    ),
                ));
            }
        }
        let urls: Vec<&str> = registry
            .url
            .iter()
            .flat_map(|u| u.split(','))
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if let Some((key, format)) = &framed
            && urls.is_empty()
        {
            return Err(invalid(
                "schema_registry.url",
                format!(
                    "is not set, but {key} is {}, whose writer schemas come from a registry: \
                     give its base URL, e.g. http://registry:8081",
                    format.name()
                ),
            ));
        }
        let usable = |u: &str| {
            reqwest::Url::parse(u).is_ok_and(|url| {
                matches!(url.scheme(), "http" | "https") && url.host_str().is_some()
            })
        };
        if let Some(bad) = urls.iter().find(|u| !usable(u)) {
            return Err(invalid(
                "schema_registry.url",
                format!("`{bad}` is not an http:// or https:// URL"),
            ));
        }
        if registry.password.is_some() != registry.username.is_some() {
            return Err(invalid(
                "schema_registry.username",
                "and schema_registry.password go together: set both or neither",
            ));
        }
        if registry.timeout_ms == 0 {
            return Err(invalid(
                "schema_registry.timeout_ms",
                "must be above 0: every request has a deadline",
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(addr) = &self.run.metrics_addr {
            let port = addr.rsplit_once(':').filter(|(host, _)| !host.is_empty());
            if port.is_none_or(|(_, port)| port.parse::<u16>().is_err()) {
                return Err(invalid(
                    "run.metrics_addr",
                    format!("`{addr}` is not HOST:PORT (--metrics-addr), e.g. 0.0.0.0:9090"),
                ));
            }
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid(
                "kafka.brokers",
                "is empty: give host:port[,host:port]",
            ));
        }
        if self.kafka.group.trim().is_empty() {
            return Err(invalid("kafka.group", "is empty: give a consumer group id"));
        }
        if self.kafka.topics.is_empty() || self.kafka.topics.iter().any(|t| t.is_empty()) {
            return Err(invalid(
                "kafka.topics",
                "must name at least one non-empty topic",
            ));
        }
        // librdkafka also takes a topic property with a `topic.` prefix, and
        // `metadata.broker.list` for `bootstrap.servers`.
        fn canonical(key: &str) -> &str {
            match key.strip_prefix("topic.").unwrap_or(key) {
                "metadata.broker.list" => "bootstrap.servers",
                other => other,
            }
        }
        let owned = self.kafka.options.keys().find_map(|key| {
            PROTOCOL_OPTIONS
                .iter()
                .find(|(option, _)| *option == canonical(key))
                .map(|(_, instead)| (key, instead))
        });
        if let Some((key, instead)) = owned {
            return Err(invalid(
                &format!("kafka.options.{key}"),
                format!("is set by the worker itself: remove it ({instead})"),
            ));
        }
        for (key, ms) in [
            (
                "postgres.statement_timeout_ms",
                self.postgres.statement_timeout_ms,
            ),
            ("postgres.lock_timeout_ms", self.postgres.lock_timeout_ms),
            (
                "postgres.idle_in_transaction_timeout_ms",
                self.postgres.idle_in_transaction_timeout_ms,
            ),
        ] {
            if ms == 0 {
                return Err(invalid(
                    key,
                    "must be above 0: every call to Postgres has a deadline",
                ));
            }
        }
        if self.postgres.max_connections < 2 {
            return Err(invalid(
                "postgres.max_connections",
                "must be at least 2: a claim blocked by a frozen worker needs a second connection to end its transaction",
            ));
        }
        if self.batch.max_records == 0 {
            return Err(invalid("batch.max_records", "must be at least 1"));
        }
        if let Lanes::Fixed(n) = self.batch.lanes {
            if n == 0 {
                return Err(invalid("batch.lanes", "must be at least 1, or auto"));
            }
            // A claim holds one connection and may need a second to end a frozen
            // worker's transaction (see postgres.max_connections); one lane runs on
            // the two connections a worker needs at least, as before lanes.
            if n > 1 && n + 2 > self.postgres.max_connections as usize {
                return Err(invalid(
                    "batch.lanes",
                    format!(
                        "{n} lanes need a connection each plus two for claims: raise postgres.max_connections to at least {} or lower batch.lanes",
                        n + 2
                    ),
                ));
            }
        }
        self.check_schema_registry()?;
        if self.batch.max_bytes < self.sink.max_record_bytes {
            return Err(invalid(
                "batch.max_bytes",
                "must be at least sink.max_record_bytes, or a maximal record can never fit a batch",
            ));
        }
        let poll_interval = self.max_poll_interval();
        if self.batch_wait() >= poll_interval / 2 {
            return Err(invalid(
                "batch.max_wait_ms",
                format!(
                    "must be below half of max.poll.interval.ms ({} ms); lower it or raise kafka.options.max.poll.interval.ms",
                    poll_interval.as_millis()
                ),
            ));
        }
        if self.claim_limit() >= poll_interval {
            return Err(invalid(
                "retry.claim_limit_secs",
                format!(
                    "must be below max.poll.interval.ms ({} ms), or the group evicts a worker while it claims; \
                     lower it, or leave it unset to follow the poll interval",
                    poll_interval.as_millis()
                ),
            ));
        }
        if self.retry.initial_delay_ms == 0 || self.retry.max_delay_ms < self.retry.initial_delay_ms
        {
            return Err(invalid(
                "retry.max_delay_ms",
                "must be at least retry.initial_delay_ms, which must be above 0",
            ));
        }
        if !(self.run.sleep_secs.is_finite() && self.run.sleep_secs >= 0.0) {
            return Err(invalid(
                "run.sleep_secs",
                "must be a number of seconds >= 0",
            ));
        }
        if self.sink.max_json_depth == 0 || self.sink.max_json_depth > 120 {
            return Err(invalid("sink.max_json_depth", "must be between 1 and 120"));
        }
        if self.sink.max_record_bytes == 0 {
            return Err(invalid("sink.max_record_bytes", "must be at least 1"));
        }
        self.validate_otel()
    }

    fn validate_otel(&self) -> Result<(), ConfigError> {
        let otel = &self.otel;
        if let Some(endpoint) = &otel.exporter_otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "otel.exporter_otlp_endpoint",
                format!("`{endpoint}` must be a URL starting with http:// or https://"),
            ));
        }
        let ratio = matches!(
            otel.traces_sampler,
            TracesSampler::Traceidratio | TracesSampler::ParentbasedTraceidratio
        );
        if ratio
            && !otel
                .traces_sampler_arg
                .is_some_and(|r| (0.0..=1.0).contains(&r))
        {
            return Err(invalid(
                "otel.traces_sampler_arg",
                "must be a ratio between 0 and 1 for the traceidratio samplers (OTEL_TRACES_SAMPLER_ARG)",
            ));
        }
        let pairs = otel.resource_attributes.iter().flat_map(|a| a.split(','));
        if let Some(bad) = pairs.filter(|p| !p.trim().is_empty()).find(|p| {
            p.split_once('=')
                .is_none_or(|(key, _)| key.trim().is_empty())
        }) {
            return Err(invalid(
                "otel.resource_attributes",
                format!(
                    "`{bad}` is not key=value; give key=value,key=value (OTEL_RESOURCE_ATTRIBUTES)"
                ),
            ));
        }
        Ok(())
    }

    /// `max.poll.interval.ms` as librdkafka will use it (its default is 300 s).
    pub fn max_poll_interval(&self) -> Duration {
        self.kafka_ms("max.poll.interval.ms", 300_000)
    }

    /// `session.timeout.ms` as librdkafka will use it (its default is 45 s): by then the
    /// group has taken a partition from a member that lost it.
    pub fn session_timeout(&self) -> Duration {
        self.kafka_ms("session.timeout.ms", 45_000)
    }

    /// A millisecond property of `kafka.options`, or librdkafka's `default_ms`.
    fn kafka_ms(&self, property: &str, default_ms: u64) -> Duration {
        let ms = self
            .kafka
            .options
            .get(property)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_ms);
        Duration::from_millis(ms)
    }

    /// Longest wait to fill a batch.
    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch.max_wait_ms)
    }

    /// How many commit lanes run: `batch.lanes`, or under `auto` one per core beyond the
    /// first (the loop's polling and decoding take one), as many as leave two pooled
    /// connections for claims (at least one).
    pub fn lanes(&self) -> usize {
        match self.batch.lanes {
            Lanes::Fixed(n) => n,
            Lanes::Auto => {
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                let spare = (self.postgres.max_connections as usize).saturating_sub(2);
                (cores - 1).min(spare).max(1)
            }
        }
    }

    /// How long a claim is retried.
    pub fn claim_limit(&self) -> Duration {
        // Half the poll interval leaves the other half to the batch a rebalance waits on.
        self.retry.claim_limit_secs.map_or_else(
            || DEFAULT_CLAIM_LIMIT.min(self.max_poll_interval() / 2),
            Duration::from_secs,
        )
    }

    /// The database URL with any password replaced, for logs.
    pub fn database_url_masked(&self) -> String {
        mask_url(self.postgres.url.expose_secret())
    }
}

/// Replaces the password of a URL with `***`, and the value of every query parameter
/// whose name ends in `password`. Fails closed: the userinfo runs to the last `@`,
/// whatever a password holds (`/`, `?`, `#`, `@`), so an `@` later in the URL masks more
/// than needed, never less.
pub fn mask_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let masked = match rest.rsplit_once('@') {
        Some((userinfo, after)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{after}"),
            None => rest.to_owned(),
        },
        None => rest.to_owned(),
    };
    let masked = match masked.split_once('?') {
        Some((head, query)) => {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.to_ascii_lowercase().ends_with("password") => {
                        format!("{key}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{head}?{}", pairs.join("&"))
        }
        None => masked,
    };
    format!("{scheme}{masked}")
}

/// A map whose values may be any YAML scalar, each kept as its text.
fn scalar_strings<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, Value>::deserialize(deserializer)?;
    raw.into_iter()
        .map(|(key, value)| {
            let text = scalar_text(value).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "kafka.options.{key} must be a string, number or boolean"
                ))
            })?;
            Ok((key, text))
        })
        .collect()
}

/// A YAML scalar as its text; `None` for anything else.
fn scalar_text(value: Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// An optional secret from any YAML scalar, as its text (a password `123456` is text,
/// not a number to refuse); an error never shows the value.
pub(crate) fn secret_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SecretString>, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Null => Ok(None),
        value => scalar_text(value)
            .map(|text| Some(SecretString::from(text)))
            .ok_or_else(|| {
                serde::de::Error::custom("a secret must be text (its value is not shown)")
            }),
    }
}

/// A required secret, as [`secret_text`].
fn secret<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<SecretString, D::Error> {
    secret_text(deserializer)?
        .ok_or_else(|| serde::de::Error::custom("a secret must be text (its value is not shown)"))
}

fn parse_yaml(text: &str, origin: &str) -> Result<Value, ConfigError> {
    let value: Value = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
        origin: origin.to_owned(),
        message: e.to_string(),
    })?;
    match value {
        Value::Mapping(_) => Ok(value),
        Value::Null => Ok(Value::Mapping(Mapping::new())),
        _ => Err(ConfigError::Parse {
            origin: origin.to_owned(),
            message: "the top level must be a map of sections".into(),
        }),
    }
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn set_path(tree: &mut Value, keys: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = keys.split_last().ok_or("names no key")?;
    let mut node = tree;
    for key in parents {
        let map = node
            .as_mapping_mut()
            .ok_or_else(|| format!("`{key}` is not inside a section"))?;
        node = map
            .entry(Value::String(key.clone()))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    let map = node
        .as_mapping_mut()
        .ok_or_else(|| format!("`{last}` is not inside a section"))?;
    map.insert(Value::String(last.clone()), value);
    Ok(())
}

/// Test support: `load` run on `yaml` written to a temporary file.
#[cfg(test)]
pub(crate) fn with_yaml_file<T>(yaml: &str, load: impl FnOnce(&Path) -> T) -> T {
    let file = std::env::temp_dir().join(format!("kpi-config-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&file, yaml).expect("temp file is writable");
    let result = load(&file);
    let _ = std::fs::remove_file(&file);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_yaml(yaml: &str, env: Vec<(&str, &str)>) -> Result<Config, ConfigError> {
        let env = env.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned()));
        with_yaml_file(yaml, |file| {
            Config::load(Some(file), env, &Overrides::default())
        })
    }

    /// The keys the typed configuration accepts below `path`, found by probing: an
    /// unknown key in a section is refused naming every field the section takes; any
    /// other outcome makes `path` a leaf (a value, a list, or a map of free keys).
    fn accepted_keys(path: &[String], out: &mut Vec<String>) {
        let mut tree = parse_yaml(DEFAULT_YAML, DEFAULTS).expect("defaults parse");
        let mut node = &mut tree;
        for key in path {
            if !node.is_mapping() {
                *node = Value::Mapping(Mapping::new());
            }
            let map = node.as_mapping_mut().expect("a map");
            node = map.entry(Value::String(key.clone())).or_insert(Value::Null);
        }
        if !node.is_mapping() {
            *node = Value::Mapping(Mapping::new());
        }
        let probe = Value::String("__probe__".into());
        node.as_mapping_mut()
            .expect("a map")
            .insert(probe, Value::from(1));
        let message = match serde_path_to_error::deserialize::<_, Config>(tree) {
            Ok(_) => String::new(),
            Err(e) => e.inner().to_string(),
        };
        let Some(expected) = message.strip_prefix("unknown field `__probe__`, expected ") else {
            out.push(path.join("."));
            return;
        };
        for field in expected.split('`').skip(1).step_by(2) {
            let mut inner = path.to_vec();
            inner.push(field.to_owned());
            accepted_keys(&inner, out);
        }
    }

    #[test]
    fn the_configuration_reference_documents_every_key_the_code_accepts_and_no_other() {
        let reference = include_str!("../../docs/configuration.md");
        let documented: Vec<&str> = reference
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split(" | ").next())
            .flat_map(|cell| cell.split(", "))
            .map(|key| key.trim_matches('`'))
            .collect();
        let mut accepted = Vec::new();
        accepted_keys(&[], &mut accepted);
        assert!(accepted.len() > 50, "probing found the keys: {accepted:?}");
        // A documented section covers the keys below it (`sink.source_columns`).
        let covered = |key: &str| {
            documented
                .iter()
                .any(|d| key == *d || key.starts_with(&format!("{d}.")))
        };
        let undocumented: Vec<&String> = accepted.iter().filter(|k| !covered(k)).collect();
        assert!(
            undocumented.is_empty(),
            "keys missing from docs/configuration.md: {undocumented:?}"
        );
        let unknown: Vec<&&str> = documented
            .iter()
            .filter(|d| {
                !accepted
                    .iter()
                    .any(|k| k == *d || k.starts_with(&format!("{d}.")))
            })
            .collect();
        assert!(
            unknown.is_empty(),
            "documented keys the code does not accept: {unknown:?}"
        );
    }

    #[test]
    fn built_in_defaults_are_the_website_metrics_pipeline() {
        let c = Config::load(None, Vec::new(), &Overrides::default()).expect("defaults load");
        assert_eq!(c.kafka.topics, vec!["website-metrics"]);
        assert_eq!(c.kafka.group, "web-metrics-ingest");
        assert_eq!(c.sink.table, "web_metrics.metrics");
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_key() {
        let err = load_yaml("kafka:\n  brokerz: x:1\n", vec![]).unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
    }

    #[test]
    fn layers_apply_in_order_file_then_env_then_flags() {
        let yaml = "kafka:\n  group: from-file\n  brokers: file:1\nbatch:\n  max_records: 7\n";
        let env = vec![
            ("KAFKA_PG_INGEST__KAFKA__GROUP", "from-env"),
            ("KAFKA_PG_INGEST__BATCH__MAX_WAIT_MS", "250"),
        ];
        let dir = std::env::temp_dir().join(format!("kpi-config-{}", uuid::Uuid::new_v4()));
        std::fs::write(&dir, yaml).expect("temp file is writable");
        let flags = Overrides {
            brokers: Some("flag:1".into()),
            ..Overrides::default()
        };
        let env = env.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned()));
        let c = Config::load(Some(&dir), env, &flags).expect("loads");
        let _ = std::fs::remove_file(&dir);
        assert_eq!(c.kafka.group, "from-env");
        assert_eq!(c.kafka.brokers, "flag:1");
        assert_eq!(c.batch.max_records, 7);
        assert_eq!(c.batch.max_wait_ms, 250);
        assert_eq!(c.sink.columns.len(), 8, "lists from defaults survive");
    }

    #[test]
    fn lanes_are_auto_or_a_count_below_the_pool_size() {
        let auto = load_yaml("{}", vec![]).expect("defaults load");
        assert_eq!(auto.batch.lanes, Lanes::Auto);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(
            auto.lanes(),
            (cores - 1).clamp(1, 2),
            "a core for the loop; 4 connections leave 2 lanes"
        );
        let two = load_yaml("{}", vec![("KAFKA_PG_INGEST__BATCH__LANES", "2")]).expect("loads");
        assert_eq!(two.lanes(), 2);
        for (lanes, expected) in [
            ("0", "must be at least 1"),
            ("3", "raise postgres.max_connections to at least 5"),
            ("many", "neither `auto` nor a number"),
        ] {
            let err = load_yaml("{}", vec![("KAFKA_PG_INGEST__BATCH__LANES", lanes)]).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("batch.lanes") && text.contains(expected),
                "{lanes}: {text}"
            );
        }
    }

    #[test]
    fn unknown_env_key_is_an_error_naming_the_key() {
        let err = load_yaml("{}", vec![("KAFKA_PG_INGEST__BATCH__MAX_RECORZ", "1")]).unwrap_err();
        assert!(err.to_string().contains("max_recorz"), "{err}");
    }

    #[test]
    fn batch_wait_above_poll_interval_names_the_key_to_change() {
        let yaml =
            "batch:\n  max_wait_ms: 9000\nkafka:\n  options:\n    max.poll.interval.ms: '10000'\n";
        let err = load_yaml(yaml, vec![]).unwrap_err();
        assert!(err.to_string().contains("batch.max_wait_ms"), "{err}");
    }

    #[test]
    fn a_metrics_address_without_a_port_is_refused_before_anything_starts() {
        for bad in ["localhost", ":9090", "localhost:http", "[::1]"] {
            let err = load_yaml(&format!("run:\n  metrics_addr: '{bad}'\n"), vec![]).unwrap_err();
            assert!(err.to_string().contains("run.metrics_addr"), "{bad}: {err}");
        }
        for good in ["localhost:9090", "0.0.0.0:0", "[::1]:9090"] {
            load_yaml(&format!("run:\n  metrics_addr: '{good}'\n"), vec![])
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn the_claim_limit_follows_a_short_poll_interval_unless_set() {
        let short = "kafka:\n  options:\n    max.poll.interval.ms: '10000'\n";
        let c = load_yaml(short, vec![]).expect("one option is enough");
        assert_eq!(c.claim_limit(), Duration::from_secs(5));
        let c = load_yaml("{}", vec![]).expect("defaults load");
        assert_eq!(c.claim_limit(), Duration::from_secs(60));
        let err = load_yaml(
            short,
            vec![("KAFKA_PG_INGEST__RETRY__CLAIM_LIMIT_SECS", "10")],
        )
        .unwrap_err();
        assert!(err.to_string().contains("retry.claim_limit_secs"), "{err}");
        let c = load_yaml(
            short,
            vec![("KAFKA_PG_INGEST__RETRY__CLAIM_LIMIT_SECS", "3")],
        )
        .expect("a set limit below the interval");
        assert_eq!(c.claim_limit(), Duration::from_secs(3));
    }

    #[test]
    fn librdkafka_options_take_numbers_and_booleans_as_text() {
        let yaml = "kafka:\n  options:\n    session.timeout.ms: 6000\n    check.crcs: true\n";
        let c = load_yaml(
            yaml,
            vec![
                ("KAFKA_PG_INGEST__KAFKA__OPTIONS__FETCH.WAIT.MAX.MS", "50"),
                // The form a shell can export: `_` for the dots.
                (
                    "KAFKA_PG_INGEST__KAFKA__OPTIONS__MAX_POLL_INTERVAL_MS",
                    "10000",
                ),
            ],
        )
        .expect("loads");
        assert_eq!(c.kafka.options["session.timeout.ms"], "6000");
        assert_eq!(c.kafka.options["check.crcs"], "true");
        assert_eq!(c.kafka.options["fetch.wait.max.ms"], "50");
        assert_eq!(c.kafka.options["max.poll.interval.ms"], "10000");
    }

    #[test]
    fn options_the_protocol_owns_are_refused_naming_the_typed_key() {
        for (option, value, names) in [
            ("enable.auto.commit", "'false'", "offsets live in Postgres"),
            (
                "enable.auto.offset.store",
                "'true'",
                "offsets live in Postgres",
            ),
            ("group.id", "other", "kafka.group"),
            ("bootstrap.servers", "h:1", "kafka.brokers"),
            ("auto.offset.reset", "error", "kafka.on_data_loss"),
            ("isolation.level", "read_uncommitted", "read_committed"),
            ("topic.auto.offset.reset", "earliest", "kafka.on_data_loss"),
            ("metadata.broker.list", "h:1", "kafka.brokers"),
            ("statistics.interval.ms", "0", "the end of a Kafka outage"),
        ] {
            let yaml = format!("kafka:\n  options:\n    {option}: {value}\n");
            let err = load_yaml(&yaml, vec![]).unwrap_err().to_string();
            assert!(err.contains(&format!("`kafka.options.{option}`")), "{err}");
            assert!(err.contains(names), "{err}");
        }
    }

    #[test]
    fn postgres_deadlines_cannot_be_switched_off() {
        for key in [
            "statement_timeout_ms",
            "lock_timeout_ms",
            "idle_in_transaction_timeout_ms",
        ] {
            let err = load_yaml(&format!("postgres:\n  {key}: 0\n"), vec![]).unwrap_err();
            assert!(
                err.to_string().contains(&format!("`postgres.{key}`")),
                "{err}"
            );
        }
    }

    #[test]
    fn registry_formats_need_a_registry_and_its_keys_must_work() {
        let route = "routes:\n  - topic: t\n    table: s.t\n    format: avro\n    columns:\n      \
                     - { column: a, field: a, type: text }\n      \
                     - { column: t, field: \"@topic\", type: text }\n      \
                     - { column: p, field: \"@partition\", type: int4 }\n      \
                     - { column: o, field: \"@offset\", type: int8 }\n";
        for (yaml, key, problem) in [
            (
                "sink:\n  format: avro\n".to_owned(),
                "schema_registry.url",
                "sink.format is avro",
            ),
            (
                route.to_owned(),
                "schema_registry.url",
                "routes[0].format is avro",
            ),
            (
                route.replace("format: avro", "format: protobuf"),
                "schema_registry.url",
                "routes[0].format is protobuf",
            ),
            (
                "sink:\n  format: json_schema\n".to_owned(),
                "schema_registry.url",
                "sink.format is json_schema",
            ),
            (
                route.replace("format: avro", "key_format: protobuf"),
                "schema_registry.url",
                "routes[0].key_format is protobuf",
            ),
            (
                format!(
                    "sink:\n  key_format: avro\n{}",
                    route.replace("format: avro", "format: json")
                ),
                "sink.key_format",
                "applies to the implicit route only",
            ),
            (
                "schema_registry:\n  url: registry:8081\n".to_owned(),
                "schema_registry.url",
                "not an http:// or https:// URL",
            ),
            (
                "schema_registry:\n  url: http://\n".to_owned(),
                "schema_registry.url",
                "not an http:// or https:// URL",
            ),
            (
                format!("sink:\n  format: avro\n{route}"),
                "sink.format",
                "applies to the implicit route only",
            ),
            (
                "schema_registry:\n  url: http://r:8081\n  username: u\n".to_owned(),
                "schema_registry.username",
                "set both or neither",
            ),
            (
                "schema_registry:\n  url: http://r:8081\n  timeout_ms: 0\n".to_owned(),
                "schema_registry.timeout_ms",
                "must be above 0",
            ),
        ] {
            let err = load_yaml(&yaml, vec![]).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{key}`")) && err.contains(problem),
                "{err}"
            );
        }
        let fine = "sink:\n  format: avro\nschema_registry:\n  url: http://a:8081, https://b\n";
        load_yaml(fine, vec![]).expect("a registry URL list is valid");
    }

    #[test]
    fn password_is_masked_and_debug_hides_the_url() {
        for (url, masked) in [
            (
                "postgres://app:s3cret@db:5432/x",
                "postgres://app:***@db:5432/x",
            ),
            (
                "postgres://app:s3/cr@t@db/x?sslmode=require",
                "postgres://app:***@db/x?sslmode=require",
            ),
            (
                "postgres://db/x?user=app&password=s3cret&sslmode=disable",
                "postgres://db/x?user=app&password=***&sslmode=disable",
            ),
            ("postgres://db:5432/x", "postgres://db:5432/x"),
            ("postgres://app:pa#ss@db/x", "postgres://app:***@db/x"),
            ("postgres://app:p@ss#1@db", "postgres://app:***@db"),
            (
                "postgres://db/x?password=s3cr@t",
                "postgres://db/x?password=***",
            ),
            (
                "postgres://db/x?sslpassword=s3cret",
                "postgres://db/x?sslpassword=***",
            ),
            ("app:s3cret@db/x", "app:***@db/x"),
            ("http://registry:8081", "http://registry:8081"),
        ] {
            assert_eq!(mask_url(url), masked, "{url}");
        }
        let c = Config::load(
            None,
            vec![(
                "KAFKA_PG_INGEST__POSTGRES__URL".to_owned(),
                "postgres://a:s3cret@h/d".to_owned(),
            )],
            &Overrides::default(),
        )
        .expect("loads");
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!c.database_url_masked().contains("s3cret"));
    }

    #[test]
    fn standard_otel_variables_override_the_otel_section() {
        let yaml = "otel:\n  service_name: from-file\n  exporter_otlp_protocol: grpc\n";
        let env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ];
        let c = load_yaml(yaml, env).expect("loads");
        let otel = &c.otel;
        assert_eq!(otel.service_name, "from-file");
        assert_eq!(
            otel.exporter_otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );
        assert_eq!(otel.exporter_otlp_protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(otel.traces_sampler, TracesSampler::Traceidratio);
        assert_eq!(otel.traces_sampler_arg, Some(0.25));
    }

    #[test]
    fn bad_otel_settings_name_the_key() {
        let cases = [
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "collector:4317",
                "otel.exporter_otlp_endpoint",
            ),
            (
                "OTEL_TRACES_SAMPLER",
                "traceidratio",
                "otel.traces_sampler_arg",
            ),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "env=prod,oops",
                "otel.resource_attributes",
            ),
        ];
        for (var, value, key) in cases {
            let err = load_yaml("{}", vec![(var, value)]).unwrap_err();
            assert!(err.to_string().contains(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn secrets_come_from_files_named_by_file_variables() {
        let dir = std::env::temp_dir().join(format!("kpi-secret-{}", uuid::Uuid::new_v4()));
        std::fs::write(&dir, "postgres://app:s3cret@db:5432/ingest\n").expect("writable");
        let path = dir.to_str().expect("UTF-8 path");
        for var in ["DATABASE_URL_FILE", "KAFKA_PG_INGEST__POSTGRES__URL_FILE"] {
            let c = load_yaml("{}", vec![(var, path)]).expect("loads");
            assert_eq!(
                c.postgres.url.expose_secret(),
                "postgres://app:s3cret@db:5432/ingest",
                "{var}"
            );
            assert!(!format!("{c:?}").contains("s3cret"));
        }
        let _ = std::fs::remove_file(&dir);
        let err = load_yaml("{}", vec![("DATABASE_URL_FILE", "/nonexistent/kpi")]).unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL_FILE"), "{err}");
    }
}
