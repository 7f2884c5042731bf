//! Command line: `run` (the default), the tools (`migrate`, `check`, `schema`, `demo`,
//! `bench`, `offsets`, `dlq`) and the development helpers (`dev`).

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Layers, Overrides};
use crate::dev::LocalDatabase;
use crate::store::admin::DeadLetterFilter;
use crate::telemetry::{self, LogFormat};
use crate::{bench, demo, dev, ops, pipeline, store};

/// Moves Kafka records into PostgreSQL exactly once.
#[derive(Debug, Parser)]
#[command(
    name = "kafka-pg-ingest",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    /// Flags of `run`, which is what a bare `kafka-pg-ingest` does.
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Consume and ingest until stopped (SIGINT/SIGTERM) or --cycles polls have run
    /// since the first claim.
    Run(RunArgs),
    #[command(flatten)]
    Tool(Tool),
}

/// The commands besides `run`: they log but export no traces.
#[derive(Debug, Subcommand)]
pub(crate) enum Tool {
    /// Apply database migrations and exit.
    Migrate(CommonArgs),
    /// Check every route against the live schema (tables, columns, types, keys) and exit
    /// non-zero on a mismatch; changes nothing.
    Check(RoutedArgs),
    /// Print CREATE TABLE statements that fit the configured routes (partitioned by time
    /// with --partition-by).
    Schema(SchemaArgs),
    /// Start an in-process broker, produce sample messages, ingest them, print what landed.
    Demo(DemoArgs),
    /// Measure end-to-end throughput against Postgres' limit on one connection and a naive per-row consumer.
    Bench(BenchArgs),
    /// Development helpers: a local broker and a load generator.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Stored offsets: show them with the broker's watermarks, or rewind them to re-read.
    #[command(subcommand)]
    Offsets(OffsetsCommand),
    /// Dead letters: list, show, re-drive into the table, purge.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Print the effective configuration (built-in defaults, then --config, environment
    /// variables and flags, as `run` layers them) as YAML with secrets masked; exit
    /// non-zero naming the key and its layer when one is invalid.
    Config(ConfigArgs),
    /// Print a completion script for SHELL to stdout, e.g.
    /// `kafka-pg-ingest completions bash > /etc/bash_completion.d/kafka-pg-ingest`.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout, or write one page per command into --out-dir.
    Man {
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum OffsetsCommand {
    /// Per topic/partition: stored next offset, the broker's low and high watermarks,
    /// lag, owner, epoch, last update.
    Show {
        #[command(flatten)]
        ops: OpsArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Do not ask the broker for watermarks (LOW, HIGH and LAG stay empty).
        #[arg(long)]
        no_watermarks: bool,
    },
    /// Move a group's stored offsets so workers read again from there. Prints the plan
    /// and changes nothing without --yes. Safe while workers run.
    Rewind(RewindArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// Counts by reason, then the dead letters (oldest first).
    List {
        #[command(flatten)]
        ops: OpsArgs,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Most dead letters listed.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter in full: value (text when UTF-8, else hex), headers, reason,
    /// SQLSTATE, trace id, attempts.
    Show {
        #[command(flatten)]
        ops: OpsArgs,
        id: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Decode dead letters again with the current configuration: those that now succeed
    /// move into the target table, the rest stay with attempts + 1 and their new reason.
    Retry(RetryArgs),
    /// Delete dead letters that last failed longer ago than --older-than; without --yes
    /// only counts them.
    Purge {
        #[command(flatten)]
        ops: OpsArgs,
        /// Age, e.g. 30d, 12h, 15m, 90s.
        #[arg(long, value_name = "DURATION", value_parser = ops::parse_duration)]
        older_than: Duration,
        /// Delete (otherwise only count).
        #[arg(long)]
        yes: bool,
    },
}

/// Flags naming the database, the brokers and the group, of `run` and the operator
/// commands.
#[derive(Debug, Args, Clone)]
pub(crate) struct OpsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Kafka bootstrap servers, comma-separated.
    #[arg(long, env = "KAFKA_BROKERS", value_name = "LIST")]
    pub brokers: Option<String>,
    /// Consumer group id (default: kafka.group; `offsets show` and `dlq list|show|purge`
    /// cover every group without it).
    #[arg(long, value_name = "ID")]
    pub group: Option<String>,
}

/// Filters of `dlq list`.
#[derive(Debug, Args, Clone)]
pub(crate) struct DlqFilterArgs {
    /// Only this reason code.
    #[arg(long, value_name = "CODE")]
    pub reason: Option<String>,
    /// Only this topic.
    #[arg(long, value_name = "NAME")]
    pub topic: Option<String>,
    /// Only dead letters that last failed at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
}

/// Flags of the commands that resolve routes from the configuration.
#[derive(Debug, Args, Clone)]
pub(crate) struct RoutedArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Topic of the implicit website-metrics route, as given to `run`; repeatable.
    #[arg(long = "topic", value_name = "NAME")]
    pub topics: Vec<String>,
}

impl RoutedArgs {
    fn load(&self) -> anyhow::Result<Config> {
        self.common
            .load(Overrides {
                topics: self.topics.clone(),
                ..Overrides::default()
            })
            .map(answering)
    }
}

/// How long a command an operator waits on retries an unreachable database.
const COMMAND_CONNECT_RETRY_SECS: u64 = 5;

/// `config` for a command an operator waits on: a database that does not answer is
/// said so in seconds, not after the worker's patient retries.
fn answering(mut config: Config) -> Config {
    let retry = &mut config.postgres.connect_retry_secs;
    *retry = (*retry).min(COMMAND_CONNECT_RETRY_SECS);
    config
}

/// Flags of `schema`.
#[derive(Debug, Args, Clone)]
pub(crate) struct SchemaArgs {
    #[command(flatten)]
    pub routed: RoutedArgs,
    /// Partition each table by range of this mapped timestamptz or date column.
    #[arg(long, value_name = "COLUMN")]
    pub partition_by: Option<String>,
    /// The time range of one partition.
    #[arg(long, value_enum, default_value = "day", requires = "partition_by")]
    pub interval: store::schema::PartitionInterval,
    /// Print pg_partman's create_parent call (premaking 4 partitions) instead of the
    /// first partitions.
    #[arg(long, requires = "partition_by")]
    pub partman: bool,
    /// Map each route of a registry format from the latest schema of its subject
    /// (`{topic}-value`) at `schema_registry.url`: one column per top-level field, typed
    /// after it. The columns are printed as comments, to paste into the configuration.
    #[arg(long)]
    pub from_registry: bool,
}

/// `text` as a YAML double-quoted scalar of printable ASCII only: anything else escaped
/// (`\uXXXX`, `\UXXXXXXXX`), so no parser folds or refuses a character of a name.
fn yaml_quoted(text: &str) -> String {
    let mut out = String::from('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if u32::from(c) <= 0xffff => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push_str(&format!("\\U{:08x}", u32::from(c))),
        }
    }
    out.push('"');
    out
}

/// The columns of each route as YAML in SQL comments (`schema --from-registry`).
fn mapping_comment(config: &crate::config::Config) -> String {
    let mut out = String::new();
    let mut write = |key: &str, columns: &[crate::config::ColumnMapping]| {
        out.push_str(&format!("-- {key}.columns:\n"));
        for c in columns {
            out.push_str(&format!(
                "--   - {{ column: {}, field: {}, type: {}{} }}\n",
                yaml_quoted(&c.column),
                yaml_quoted(&c.field),
                c.kind.sql_name(),
                if c.required { ", required: true" } else { "" }
            ));
        }
    };
    if config.routes.is_empty() {
        write("sink", &config.sink.columns);
    }
    for (i, route) in config.routes.iter().enumerate() {
        write(&format!("routes[{i}]"), &route.columns);
    }
    out
}

/// Flags of `dlq retry`.
#[derive(Debug, Args, Clone)]
#[command(group = clap::ArgGroup::new("which").required(true).multiple(false))]
pub(crate) struct RetryArgs {
    #[command(flatten)]
    pub ops: OpsArgs,
    /// Topic of the implicit website-metrics route, as given to `run` (the dead letters'
    /// topics need a route to be decoded again); repeatable.
    #[arg(long = "topic", value_name = "NAME")]
    pub topics: Vec<String>,
    /// Dead letter ids; repeatable.
    #[arg(long = "id", value_name = "ID", group = "which")]
    pub ids: Vec<i64>,
    /// Every dead letter with this reason code.
    #[arg(long, value_name = "CODE", group = "which")]
    pub reason: Option<String>,
    /// Every dead letter of the group.
    #[arg(long, group = "which")]
    pub all: bool,
}

/// Flags of `offsets rewind`.
#[derive(Debug, Args, Clone)]
#[command(group = clap::ArgGroup::new("target").required(true).multiple(false))]
pub(crate) struct RewindArgs {
    #[command(flatten)]
    pub ops: OpsArgs,
    /// Topic whose offsets move.
    #[arg(long, value_name = "NAME")]
    pub topic: String,
    /// Only these partitions (default: every stored partition of the topic); repeatable.
    #[arg(long = "partition", value_name = "N")]
    pub partitions: Vec<i32>,
    /// Move to this offset (kept within the broker's watermarks).
    #[arg(long, value_name = "N", group = "target")]
    pub to_offset: Option<i64>,
    /// Move to the first record at or after this time (RFC 3339, e.g.
    /// 2026-11-29T14:00:00Z), by the broker's offsets-for-times.
    #[arg(long, value_name = "TIME", group = "target", value_parser = parse_time)]
    pub to_time: Option<DateTime<Utc>>,
    /// Move to the oldest record the broker still has.
    #[arg(long, group = "target")]
    pub to_earliest: bool,
    /// Leave rows already in the table as they are (default: re-read records replace them).
    #[arg(long)]
    pub keep: bool,
    /// Apply the plan.
    #[arg(long)]
    pub yes: bool,
    /// After applying, follow the workers' replay to its end (records, rate, time left).
    #[arg(long, requires = "yes")]
    pub wait: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl OpsArgs {
    fn load(&self) -> anyhow::Result<Config> {
        self.load_with_topics(Vec::new())
    }

    /// The configuration with `topics` as `--topic` of `run` gives them.
    fn load_with_topics(&self, topics: Vec<String>) -> anyhow::Result<Config> {
        self.common
            .load(Overrides {
                brokers: self.brokers.clone(),
                group: self.group.clone(),
                topics,
                ..Overrides::default()
            })
            .map(answering)
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum DevCommand {
    /// Run an in-process Kafka-protocol broker (librdkafka's mock cluster) until SIGINT or
    /// SIGTERM; its bootstrap address is the first line of stdout.
    Broker {
        /// Topic to create; repeatable.
        #[arg(long = "topic", default_value = "website-metrics")]
        topics: Vec<String>,
        /// Partitions of each topic.
        #[arg(long, default_value_t = 8)]
        partitions: i32,
        /// Tell clients the broker is at 127.0.0.1:PORT (a proxy in front of it) instead
        /// of its own listener, which the first line of stdout still names.
        #[arg(long, value_name = "PORT")]
        advertised_port: Option<u16>,
    },
    /// Produce sample website-metrics messages, some malformed.
    Produce(dev::ProduceOptions),
    /// Run a minimal in-memory Confluent-compatible Schema Registry until SIGINT or
    /// SIGTERM; its URL is the first line of stdout.
    Registry,
    /// Fault campaign: worker processes of this binary under kills, rebalance storms,
    /// database and broker outages; checks Postgres holds the stream exactly once and
    /// prints one summary line. Exits non-zero when it does not.
    Chaos(dev::chaos::ChaosOptions),
}

/// Flags every command that reads configuration takes.
#[derive(Debug, Args, Clone)]
pub(crate) struct CommonArgs {
    /// YAML file layered over the built-in defaults (config/service.yaml).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Postgres URL.
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Flags of `run`.
#[derive(Debug, Args, Clone)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub ops: OpsArgs,
    /// Topic to consume; repeat for several.
    #[arg(long = "topic", value_name = "NAME")]
    pub topics: Vec<String>,
    /// Number of poll cycles from the first claim of a partition, then exit 0
    /// (unlimited when absent; joining the group is not counted).
    #[arg(long, value_name = "N")]
    pub cycles: Option<u64>,
    /// Seconds to pause after a poll that returned nothing.
    #[arg(long, value_name = "SECONDS")]
    pub sleep: Option<f64>,
    /// Any librdkafka property, e.g. session.timeout.ms=6000; repeatable.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub kafka_options: Vec<(String, String)>,
    /// Serve /metrics, /healthz and /readyz on HOST:PORT.
    #[arg(long, env = "METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

/// Flags of `config`.
#[derive(Debug, Args, Clone)]
pub(crate) struct ConfigArgs {
    /// The flags of `run`, layered as `run` layers them.
    #[command(flatten)]
    pub run: RunArgs,
    /// End each key with a comment naming where its value came from.
    #[arg(long)]
    pub origin: bool,
}

impl RunArgs {
    /// What these flags set.
    fn overrides(&self) -> Overrides {
        Overrides {
            brokers: self.ops.brokers.clone(),
            group: self.ops.group.clone(),
            topics: self.topics.clone(),
            sleep_secs: self.sleep,
            kafka_options: self.kafka_options.clone(),
            metrics_addr: self.metrics_addr.clone(),
            database_url: None,
        }
    }
}

/// Flags of `demo`.
#[derive(Debug, Args, Clone)]
pub(crate) struct DemoArgs {
    #[command(flatten)]
    pub database: LocalDatabase,
    /// How many messages to produce.
    #[arg(long, default_value_t = 3000)]
    pub messages: u64,
    /// Partitions of the demo topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Flags of `bench`.
#[derive(Debug, Args, Clone)]
pub(crate) struct BenchArgs {
    /// Bench tables are created and dropped in this database.
    #[command(flatten)]
    pub database: LocalDatabase,
    /// Kafka bootstrap servers; an in-process broker when absent.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// Messages for the worker and limit measurements.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Messages for the naive (one INSERT per record) measurement.
    #[arg(long, default_value_t = 50_000)]
    pub naive_messages: u64,
    /// Partitions of the bench topics.
    #[arg(long, default_value_t = 8)]
    pub partitions: i32,
    /// Runs; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Records per batch of the worker (batch.max_records, whose default this is); the
    /// limit tries 5,000, 10,000 and 20,000.
    #[arg(long, default_value_t = 20_000)]
    pub batch_size: usize,
    /// Write mode of the measured worker: `upsert` routes the bench topic with
    /// `mode: upsert` keyed on the source coordinates (each record a new key).
    #[arg(long, value_enum, default_value = "insert")]
    pub mode: crate::config::WriteMode,
    /// With `--mode upsert`: the worker's table holds every key before the run (an older
    /// version of each row), so each record updates a row instead of adding one.
    #[arg(long)]
    pub updates: bool,
    /// Every table (the worker's and the limit's) partitioned by day on `time_stamp`, one
    /// partition per day of the bench's dates (28), its unique index on the coordinates
    /// and `time_stamp`.
    #[arg(long)]
    pub partitioned: bool,
    /// How the bench's messages are encoded: `avro` frames the same probes in the
    /// Confluent wire format, their schema served by a registry in the bench process.
    #[arg(long, value_enum, default_value = "json")]
    pub format: crate::config::ValueFormat,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

impl CommonArgs {
    fn load(&self, mut overrides: Overrides) -> anyhow::Result<Config> {
        overrides.database_url = self.database_url.clone();
        Ok(crate::load_config(
            self.config.as_deref(),
            std::env::vars(),
            &overrides,
        )?)
    }
}

impl Cli {
    /// The log format the chosen command asked for.
    pub fn log_format(&self) -> LogFormat {
        match &self.command {
            Some(Command::Run(a)) => a.ops.common.log_format,
            Some(Command::Tool(Tool::Migrate(a))) => a.log_format,
            Some(Command::Tool(Tool::Check(a))) => a.common.log_format,
            Some(Command::Tool(Tool::Schema(a))) => a.routed.common.log_format,
            Some(Command::Tool(Tool::Demo(a))) => a.log_format,
            Some(Command::Tool(Tool::Offsets(_) | Tool::Dlq(_))) => LogFormat::Text,
            Some(Command::Tool(Tool::Config(a))) => a.run.ops.common.log_format,
            Some(Command::Tool(
                Tool::Bench(_) | Tool::Dev(_) | Tool::Completions { .. } | Tool::Man { .. },
            )) => LogFormat::Text,
            None => self.run.ops.common.log_format,
        }
    }
}

/// An error with its causes, each cause left out when the text before already ends
/// with it (errors that print their source, as most of std's and the crates' do).
pub fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if !text.ends_with(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

/// Runs the parsed command.
pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    let format = cli.log_format();
    match cli.command {
        Some(Command::Run(args)) => run(args, format).await,
        None => run(cli.run, format).await,
        Some(Command::Tool(tool)) => {
            telemetry::init(format, None)?.shutdown();
            execute_tool(tool).await
        }
    }
}

async fn execute_tool(tool: Tool) -> anyhow::Result<()> {
    match tool {
        Tool::Migrate(args) => {
            let config = args.load(Overrides::default())?;
            let pool = store::connect_pool(&config).await?;
            store::migrate(&pool, &crate::routes::Routes::new(&config)?).await?;
            println!("migrations applied to {}", config.database_url_masked());
            Ok(())
        }
        Tool::Check(args) => {
            let config = args.load()?;
            let pool = store::connect_pool(&config).await?;
            let checked = store::Store::for_pool(pool, &config).await?;
            if checked.routes().read_registry() {
                let problems = crate::registry::check_latest(&config, checked.routes())
                    .await
                    .map_err(anyhow::Error::msg)?;
                anyhow::ensure!(
                    problems.is_empty(),
                    "the mapping does not fit the registry's latest schemas:\n  {}",
                    problems.join("\n  ")
                );
            }
            for route in checked.routes().iter() {
                println!(
                    "ok: {} ({} -> {}), mode {}",
                    route.key,
                    route.topics_label(),
                    route.table,
                    route.mode.name()
                );
            }
            Ok(())
        }
        Tool::Schema(args) => {
            let mut config = args.routed.load()?;
            if args.from_registry {
                config = crate::registry::columns_from_latest(&config)
                    .await
                    .map_err(anyhow::Error::msg)?;
            }
            let routes = crate::routes::Routes::new(&config)?;
            let partition_by = args.partition_by.map(|column| store::schema::PartitionBy {
                column,
                interval: args.interval,
                partman: args.partman,
            });
            let now = chrono::Utc::now().naive_utc();
            let ddl = store::schema::create_statements(routes.iter(), partition_by.as_ref(), now)
                .map_err(anyhow::Error::msg)?;
            if args.from_registry {
                print!("{}", mapping_comment(&config));
            }
            print!("{ddl}");
            Ok(())
        }
        Tool::Config(args) => {
            let common = &args.run.ops.common;
            let mut overrides = args.run.overrides();
            overrides.database_url = common.database_url.clone();
            let layers = Layers::read(common.config.as_deref(), std::env::vars(), &overrides)?;
            crate::checked(layers.config()?)?;
            print!("{}", layers.render(args.origin));
            Ok(())
        }
        Tool::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let name = command.get_name().to_owned();
            clap_complete::generate(shell, &mut command, name, &mut std::io::stdout());
            Ok(())
        }
        Tool::Man { out_dir } => {
            let command = <Cli as clap::CommandFactory>::command();
            match out_dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("create {}", dir.display()))?;
                    clap_mangen::generate_to(command, &dir)
                        .with_context(|| format!("write man pages into {}", dir.display()))?;
                    println!("man pages written to {}", dir.display());
                }
                None => clap_mangen::Man::new(command).render(&mut std::io::stdout())?,
            }
            Ok(())
        }
        Tool::Bench(args) => {
            let report = bench::run(&bench::BenchOptions {
                messages: args.messages,
                naive_messages: args.naive_messages,
                partitions: args.partitions,
                runs: args.runs,
                batch_size: args.batch_size,
                mode: args.mode,
                updates: args.updates,
                partitioned: args.partitioned,
                format: args.format,
                brokers: args.brokers,
                database_url: args.database.database_url,
            })
            .await?;
            print_report(args.json, &report, |r| r.to_string())
        }
        Tool::Dev(DevCommand::Broker {
            topics,
            partitions,
            advertised_port,
        }) => {
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            dev::broker(&topics, partitions, advertised_port, shutdown).await
        }
        Tool::Dev(DevCommand::Registry) => {
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            dev::registry::serve(shutdown).await
        }
        Tool::Dev(DevCommand::Chaos(options)) => {
            let summary = dev::chaos::run(options).await?;
            println!("{summary}");
            anyhow::ensure!(
                summary.passed(),
                "the campaign found the stream not exactly once"
            );
            Ok(())
        }
        Tool::Dev(DevCommand::Produce(mut options)) => {
            if options.format.framed() {
                let url = options.schema_registry.as_deref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "--format {} needs --schema-registry URL",
                        options.format.name()
                    )
                })?;
                let id =
                    dev::registry::register_website_metric(url, &options.topic, options.format)
                        .await?;
                options.schema_id = Some(id);
            }
            let produced = tokio::task::spawn_blocking(move || dev::produce(&options)).await??;
            let malformed: u64 = produced.malformed.values().sum();
            println!(
                "produced {} valid and {malformed} malformed messages",
                produced.valid
            );
            for (reason, n) in &produced.malformed {
                println!("  {reason:<16} {n}");
            }
            Ok(())
        }
        Tool::Offsets(command) => offsets(command).await,
        Tool::Dlq(command) => dlq(command).await,
        Tool::Demo(args) => {
            let report =
                demo::run(&args.database.database_url, args.messages, args.partitions).await?;
            print!("{report}");
            Ok(())
        }
    }
}

/// An RFC 3339 time, or an error showing one.
fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!("`{text}` is not an RFC 3339 time ({e}): give e.g. 2026-11-29T14:00:00Z")
        })
}

/// Prints `value` as pretty JSON when `json`, else as the text `text` makes of it.
fn print_report<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text(value));
    }
    Ok(())
}

async fn offsets(command: OffsetsCommand) -> anyhow::Result<()> {
    match command {
        OffsetsCommand::Show {
            ops,
            json,
            no_watermarks,
        } => {
            let config = ops.load()?;
            let statuses = ops::show(&config, ops.group.as_deref(), !no_watermarks).await?;
            print_report(json, &statuses, |s| ops::format_offsets(s))?;
        }
        OffsetsCommand::Rewind(args) => {
            // The rewound topic is also the topic of the implicit route, as for `run`.
            let config = args.ops.load_with_topics(vec![args.topic.clone()])?;
            let target = match (args.to_offset, args.to_time) {
                (Some(n), _) => ops::RewindTarget::Offset(n),
                (None, Some(at)) => ops::RewindTarget::Time(at),
                (None, None) => ops::RewindTarget::Earliest,
            };
            let plan = ops::rewind(
                &config,
                &args.topic,
                &args.partitions,
                target,
                args.keep,
                args.yes,
            )
            .await?;
            print_report(args.json, &plan, ops::format_plan)?;
            if args.wait {
                ops::wait_for_replay(&config, &plan).await?;
            }
        }
    }
    Ok(())
}

async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            ops,
            filter,
            limit,
            json,
        } => {
            let config = ops.load()?;
            let filter = DeadLetterFilter {
                group: ops.group,
                reason: filter.reason,
                topic: filter.topic,
                since: filter.since,
                ..DeadLetterFilter::default()
            };
            let listing = ops::list_dead_letters(&config, &filter, limit).await?;
            print_report(json, &listing, ops::format_listing)?;
        }
        DlqCommand::Show { ops, id, json } => {
            let config = ops.load()?;
            let letter = ops::show_dead_letter(&config, id).await?;
            print_report(json, &ops::ShownDeadLetter::from(&letter), |shown| {
                ops::format_dead_letter(shown.letter)
            })?;
        }
        DlqCommand::Retry(RetryArgs {
            ops,
            topics,
            ids,
            reason,
            ..
        }) => {
            let config = ops.load_with_topics(topics)?;
            // --all is the empty filter.
            let filter = DeadLetterFilter {
                ids,
                reason,
                ..DeadLetterFilter::default()
            };
            let done = ops::retry_dead_letters(&config, &filter).await?;
            let counted = if done.still_failing > 0 {
                " (their attempts counted, their reasons updated)"
            } else {
                ""
            };
            println!(
                "{} moved into {}, {} still failing{counted}",
                done.moved, done.tables, done.still_failing
            );
        }
        DlqCommand::Purge {
            ops,
            older_than,
            yes,
        } => {
            let config = ops.load()?;
            let pool = store::connect_pool(&config).await?;
            let n = store::admin::purge_dead_letters(&pool, ops.group.as_deref(), older_than, !yes)
                .await?;
            if yes {
                println!("{n} dead letters deleted");
            } else {
                println!("{n} dead letters would be deleted: add --yes to delete them");
            }
        }
    }
    Ok(())
}

async fn run(args: RunArgs, format: LogFormat) -> anyhow::Result<()> {
    let config = args.ops.common.load(args.overrides())?;
    let telemetry = telemetry::init(format, Some(&config))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let result = pipeline::run(config, args.cycles, shutdown).await;
    // After the loop, so the spans of the last batch are in the flush.
    telemetry.shutdown();
    result.context("worker stopped on an error")?;
    Ok(())
}

/// Cancels `shutdown` on SIGINT or SIGTERM; the loop then aborts or finishes its batch
/// and leaves the group. If that takes longer than 30 s, the process exits anyway.
async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested");
    shutdown.cancel();
    tokio::time::sleep(Duration::from_secs(30)).await;
    tracing::error!("shutdown took longer than 30 s; exiting");
    std::process::exit(1);
}

/// The docs' pages and code blocks, shared with the integration tests that run them.
#[cfg(test)]
#[path = "../tests/it/pages.rs"]
mod doc_pages;

#[cfg(test)]
mod tests {
    use super::*;

    use super::doc_pages as pages;

    /// The command lines of this binary a page shows, each with where: each line of a
    /// shell or plain code block that runs it (continued lines joined), and each inline
    /// code span that runs it with a flag (a bare `kafka-pg-ingest dev chaos` in prose
    /// may be a name). Comments, `&`, pipes and redirections after the command are left
    /// out.
    fn shown_commands(page: &str, text: &str) -> Vec<(String, String)> {
        let (blocks, prose) = pages::code_blocks(text);
        let mut commands: Vec<(String, String)> = blocks
            .iter()
            .filter(|b| b.info.is_empty() || b.info == "sh")
            .flat_map(|b| b.lines.iter().map(move |line| (b.line, line)))
            .flat_map(|(n, line)| unnest(line).into_iter().map(move |l| (n, l)))
            .filter_map(|(n, line)| Some((format!("{page}:{n}"), command_of(&line)?)))
            .collect();
        for span in prose.split('`').skip(1).step_by(2) {
            if span.contains(" --") {
                commands.extend(command_of(span).map(|args| (page.to_owned(), args)));
            }
        }
        commands
    }

    /// A line with a command substitution (`"$(...)"`) as two: the line with a number
    /// for it, and the command inside.
    fn unnest(line: &str) -> Vec<String> {
        let split = line
            .split_once("\"$(")
            .and_then(|(head, rest)| Some((head, rest.rsplit_once(")\"")?)));
        match split {
            Some((head, (inner, tail))) => vec![format!("{head}1{tail}"), inner.to_owned()],
            None => vec![line.to_owned()],
        }
    }

    /// Programs the docs pipe a command's output into (not synopsis alternatives).
    const PIPED_INTO: [&str; 2] = ["| psql", "| jq"];

    /// The arguments after the binary's name in `text`, if it runs the binary.
    fn command_of(text: &str) -> Option<String> {
        let start = [
            "kafka-pg-ingest ",
            "cargo run -- ",
            "cargo run --release -- ",
        ]
        .iter()
        .filter_map(|p| text.find(p).map(|i| i + p.len()))
        .min()?;
        let args = text[start..].split(['>', '&']).next()?.trim();
        (!args.is_empty()).then(|| args.to_owned())
    }

    /// Whether `args` is a usage synopsis (`[--flag]`, `(a | b)`, `NAME...`), not a
    /// command line (output piped into another program is cut off before).
    fn synopsis(args: &str) -> bool {
        args.contains('[') || args.contains("...") || args.contains('(') || args.contains('|')
    }

    /// Checks each `--flag` of a synopsis exists on the command it names.
    fn check_synopsis(page: &str, args: &str) {
        let mut command = <Cli as clap::CommandFactory>::command();
        let mut words = args.split_whitespace().peekable();
        while let Some(name) = words.peek().map(|w| w.trim_matches(['[', ']'])) {
            match command.find_subcommand(name) {
                Some(sub) => command = sub.clone(),
                None => break,
            }
            words.next();
        }
        for flag in words.filter_map(|w| w.trim_start_matches(['[', '(']).strip_prefix("--")) {
            let flag = flag.trim_end_matches([']', ')', '.']);
            let known = command.get_arguments().any(|a| a.get_long() == Some(flag));
            assert!(
                known,
                "{page}: `{args}`: no --{flag} on `{}`",
                command.get_name()
            );
        }
    }

    #[test]
    fn every_command_the_docs_show_parses_against_the_command_line() {
        let mut checked = 0;
        for (page, text) in pages::pages() {
            for (place, args) in shown_commands(&page, &text) {
                let page = place.as_str();
                // Output piped into another program is not ours to parse.
                let args = PIPED_INTO
                    .iter()
                    .fold(args.as_str(), |a, p| a.split(p).next().unwrap_or_default())
                    .trim();
                if synopsis(args) {
                    check_synopsis(page, args);
                } else {
                    let words = args.split_whitespace().map(|w| w.trim_matches('"'));
                    let parsed =
                        Cli::try_parse_from(std::iter::once("kafka-pg-ingest").chain(words));
                    assert!(parsed.is_ok(), "{page}: `{args}`: {}", parsed.unwrap_err());
                }
                checked += 1;
            }
        }
        assert!(checked >= 60, "found the commands: {checked}");
    }

    #[test]
    fn an_error_that_prints_its_source_says_it_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let read = crate::config::ConfigError::Read {
            path: "x.yaml".into(),
            source: io,
        };
        let error = anyhow::Error::new(read).context("loading the configuration");
        let text = error_text(&error);
        assert_eq!(text.matches("entity not found").count(), 1, "{text}");
        assert!(
            text.starts_with("loading the configuration: cannot read config file x.yaml"),
            "{text}"
        );
    }

    #[test]
    fn quoted_names_parse_back_as_written() {
        for name in [
            "plain",
            "a \"quoted\" \\ name",
            "next\u{85}line",
            "del\u{7f}",
            "\u{fffe}",
            "日本",
            "😀",
            "@timestamp",
            "new\nline: yes",
        ] {
            let yaml = format!("{{ column: {} }}", yaml_quoted(name));
            assert!(yaml.is_ascii(), "{yaml}");
            let parsed: std::collections::HashMap<String, String> =
                serde_yaml_ng::from_str(&yaml).expect("parses");
            assert_eq!(parsed["column"], name, "{yaml}");
        }
    }
}
