//! Logs and traces: human-readable logs by default, JSON on request, `RUST_LOG` filters
//! them; spans go to an OTLP collector when `otel.exporter_otlp_endpoint` is set.

use std::io::IsTerminal;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::config::{Config, OtlpProtocol, TracesSampler};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The installed trace pipeline; [`Telemetry::shutdown`] flushes it.
#[must_use = "spans still buffered are lost unless shutdown is called"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports every span still buffered, then stops the exporter. Blocks until the
    /// collector answered or the export timed out.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = tokio::task::block_in_place(|| provider.shutdown())
        {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// Installs the global subscriber: logs to stderr (stdout stays for results) and, when
/// `config` names an OTLP endpoint, spans of this crate to that collector.
pub fn init(format: LogFormat, config: Option<&Config>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn"));
    // Colours only for a terminal: log files and collectors get plain text.
    let logs = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let provider = config.map(tracer_provider).transpose()?.flatten();
    // Traces do not depend on RUST_LOG: quieting logs must not cut spans.
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("kafka-pg-ingest"))
            .with_filter(Targets::new().with_target("kafka_pg_ingest", tracing::Level::INFO))
    });
    let result = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces)
        .try_init();
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
    Ok(Telemetry { provider })
}

/// The OTLP trace pipeline `config.otel` asks for, or `None` when no endpoint is set.
fn tracer_provider(config: &Config) -> anyhow::Result<Option<SdkTracerProvider>> {
    let otel = &config.otel;
    let Some(endpoint) = &otel.exporter_otlp_endpoint else {
        return Ok(None);
    };
    crate::security::install_rustls_provider();
    // The blocking HTTP client and the gRPC channel are built on the runtime's threads
    // but used from the batch processor's own thread.
    let exporter = tokio::task::block_in_place(|| match otel.exporter_otlp_protocol {
        OtlpProtocol::Grpc => SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
        OtlpProtocol::HttpProtobuf => SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build(),
    })
    .map_err(|e| anyhow::anyhow!("otel.exporter_otlp_endpoint `{endpoint}`: {e}"))?;
    let ratio = otel.traces_sampler_arg.unwrap_or(1.0);
    let sampler = match otel.traces_sampler {
        TracesSampler::AlwaysOn => Sampler::AlwaysOn,
        TracesSampler::AlwaysOff => Sampler::AlwaysOff,
        TracesSampler::Traceidratio => Sampler::TraceIdRatioBased(ratio),
        TracesSampler::ParentbasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        TracesSampler::ParentbasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        TracesSampler::ParentbasedTraceidratio => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
        }
    };
    let attributes = otel
        .resource_attributes
        .iter()
        .flat_map(|a| a.split(','))
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| KeyValue::new(k.trim().to_owned(), v.trim().to_owned()));
    let resource = Resource::builder()
        .with_attributes(attributes)
        .with_service_name(otel.service_name.clone())
        .build();
    // Every record of a batch may carry its producer's trace: keep one link per record.
    let max_links = u32::try_from(config.batch.max_records).unwrap_or(u32::MAX);
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_max_links_per_span(max_links)
            .with_resource(resource)
            .build(),
    ))
}

pub mod http;
pub mod metrics;
pub mod outage;
pub mod spans;
