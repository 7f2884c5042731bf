//! A client of a Confluent-compatible Schema Registry: the writer schemas of the ids a
//! batch carries, each fetched once per process into the routes' [`SchemaCache`].
//!
//! It uses the REST subset every such registry serves: `GET /schemas/ids/{id}` (the
//! schema, its type, its references) and `GET /subjects/{subject}/versions/{version}`
//! (a referenced schema). A registry that does not answer, or answers 5xx or 429, is a
//! transient failure: the caller waits and asks again, and nothing is decided about the
//! records. A 404 is an answer: the id is unknown and its records become dead letters.
//! Refused credentials (401, 403) stop the worker, naming the keys to fix.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::{
    ColumnMapping, ColumnType, Config, Envelope, SchemaRegistryConfig, ValueFormat,
};
use crate::decode::framed::{Field, Lookup, Referenced, SchemaCache, WriterSchema};
use crate::decode::framed::pointer_tokens;
use crate::route::{Column, Source, TimeFormat};
use crate::record::Record;
use crate::retry::ErrorClass;
use crate::routes::Routes;

/// The writer schema ids that decoding `records` through `routes` needs, each with the
/// format its route reads it in.
pub fn schema_ids<'a>(
    routes: &Routes,
    records: impl Iterator<Item = &'a Record>,
) -> Vec<(u32, ValueFormat)> {
    let decoders = routes.decoders();
    records
        .filter_map(|r| Some(decoders.get(routes.route_of(&r.topic)?)?.schema_ids(r)))
        .flatten()
        .collect()
}

/// The largest registry answer read: a schema larger than this is not one to decode with.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// The most schemas one schema may reference, directly or not.
const MAX_REFERENCES: usize = 256;

/// A response's body, read whole unless it passes [`MAX_ANSWER_BYTES`] (`None`).
async fn read_bounded(mut response: reqwest::Response) -> reqwest::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// `config` with the value columns of each route of a registry format (the implicit one,
/// or each of `routes` naming a topic) taken from the latest schema of its subject
/// (`{topic}-value`, the default naming): one column per top-level field, named and typed
/// after it, then the route's columns of record metadata (`@...`, the coordinates among
/// them) as configured. What `schema --from-registry` prints.
pub async fn columns_from_latest(config: &Config) -> Result<Config, String> {
    let registry = Registry::new(
        &config.schema_registry,
        Arc::default(),
        Counter::default(),
    )?;
    let mut config = config.clone();
    if config.routes.is_empty() {
        let sink = &config.sink;
        if sink.format.framed() {
            let topic = config.kafka.topics.first();
            let kept: Vec<ColumnMapping> =
                sink.columns.iter().filter(|c| c.field.starts_with('@')).cloned().collect();
            let sc = &sink.source_columns;
            let taken: Vec<&str> = kept
                .iter()
                .map(|c| c.column.as_str())
                .chain([sc.topic.as_str(), sc.partition.as_str(), sc.offset.as_str()])
                .collect();
            let mut mapped =
                latest_columns(&registry, sink.format, topic, "kafka.topics", &taken).await?;
            mapped.extend(kept);
            config.sink.columns = mapped;
        }
        return Ok(config);
    }
    for (i, route) in config.routes.iter_mut().enumerate() {
        if !route.format.framed() {
            continue;
        }
        if route.envelope == Envelope::Debezium {
            // The schema's top-level fields are the envelope's, not the row's.
            return Err(format!(
                "routes[{i}] reads Debezium events: its columns are the row image inside the \
                 envelope, which --from-registry does not map; write them by hand (see \
                 docs/mapping.md, Mirroring a database with Debezium)"
            ));
        }
        let key = format!("routes[{i}].topic");
        let kept: Vec<ColumnMapping> =
            route.columns.iter().filter(|c| c.field.starts_with('@')).cloned().collect();
        let taken: Vec<&str> = kept.iter().map(|c| c.column.as_str()).collect();
        let mut mapped =
            latest_columns(&registry, route.format, route.topic.as_ref(), &key, &taken).await?;
        mapped.extend(kept);
        route.columns = mapped;
    }
    Ok(config)
}

/// What `check` finds wrong between each route of a registry format (naming a topic)
/// and the latest schema of its subject: a column reading a top-level field the schema
/// does not have, or one of a type its values cannot take. Empty when all fit.
pub async fn check_latest(config: &Config, routes: &Routes) -> Result<Vec<String>, String> {
    let registry = Registry::new(&config.schema_registry, Arc::default(), Counter::default())?;
    let mut problems = Vec::new();
    // A regex route's subjects are not known until its topics are.
    // A Debezium route's columns read the row image, not the envelope's top-level
    // fields this compares with.
    for route in routes.iter().filter(|r| {
        r.format.framed() && r.named_topic().is_some() && r.envelope == Envelope::None
    }) {
        let topic = route.named_topic();
        let fields = latest_fields(&registry, route.format, topic, &route.key).await?;
        let subject = format!("{}-value", topic.map_or("", String::as_str));
        for column in &route.columns {
            // A field, or the first step of a pointer (whose type is checked only when
            // it is the whole pointer).
            let (name, whole) = match &column.source {
                Source::Field(name) => (name.clone(), true),
                Source::Pointer(pointer) => match pointer_tokens(pointer).as_deref() {
                    Some([first, rest @ ..]) => (first.clone(), rest.is_empty()),
                    _ => continue,
                },
                _ => continue,
            };
            let found = fields
                .iter()
                .find(|f| f.name == name || f.json_name.as_deref() == Some(name.as_str()));
            match found {
                None => problems.push(format!(
                    "{}: column `{}` reads `{name}`, which the latest schema of {subject} does \
                     not have (its fields: {})",
                    route.key,
                    column.name,
                    fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
                )),
                Some(field) if whole && !takes(column, field.kind) => problems.push(format!(
                    "{}: column `{}` is {}, and `{name}` of the latest schema of {subject} \
                     holds {} values",
                    route.key,
                    column.name,
                    column.kind.sql_name(),
                    field.kind.sql_name()
                )),
                Some(_) => {}
            }
        }
    }
    Ok(problems)
}

/// Whether `column` takes the values of a field whose own column type is `field`: the
/// same kind of value (any number for a number, an instant or date for either, a number
/// for an epoch timestamp or an interval's seconds); text and jsonb columns take
/// anything, and a text or jsonb field (of several types) may hold what the column reads.
fn takes(column: &Column, field: ColumnType) -> bool {
    use ColumnType::*;
    let number = matches!(field, Int2 | Int4 | Int8 | Float4 | Float8 | Numeric);
    let epoch = matches!(
        column.format,
        TimeFormat::EpochS | TimeFormat::EpochMs | TimeFormat::EpochUs
    );
    match column.kind {
        Text | Jsonb => true,
        _ if matches!(field, Text | Jsonb) => true,
        Int2 | Int4 | Int8 | Float4 | Float8 | Numeric => number,
        Timestamptz | Date => matches!(field, Timestamptz | Date) || (number && epoch),
        Interval => field == Interval || number,
        other => field == other,
    }
}

/// The top-level fields of the latest schema under `{topic}-value`; `key` names the
/// configuration that lacks the topic.
async fn latest_fields(
    registry: &Registry,
    format: ValueFormat,
    topic: Option<&String>,
    key: &str,
) -> Result<Vec<Field>, String> {
    let topic = topic.ok_or_else(|| {
        format!("{key}: name a topic, whose subject `{{topic}}-value` holds the schema")
    })?;
    let subject = format!("{topic}-value");
    let schema = match registry.latest(&subject, format).await {
        Ok(Lookup::Found(schema)) => schema,
        Ok(Lookup::Unknown(why, _)) => return Err(format!("subject {subject}: {why}")),
        Err(e) => return Err(format!("subject {subject}: {e}")),
    };
    schema.fields().map_err(|e| format!("subject {subject}: {e}"))
}

/// A column for each top-level field of the latest schema under `{topic}-value`, named
/// after it unless `taken` holds the name (then `{name}_value`); `key` names the
/// configuration that lacks the topic.
async fn latest_columns(
    registry: &Registry,
    format: ValueFormat,
    topic: Option<&String>,
    key: &str,
    taken: &[&str],
) -> Result<Vec<ColumnMapping>, String> {
    let fields = latest_fields(registry, format, topic, key).await?;
    Ok(fields
        .into_iter()
        .map(|f| ColumnMapping {
            column: if taken.contains(&f.name.as_str()) {
                format!("{}_value", f.name)
            } else {
                f.name.clone()
            },
            // A name that reads as metadata (`@timestamp`) or a pointer, or none, is
            // addressed as the pointer to it.
            field: if f.name.is_empty() || f.name.starts_with(['@', '/']) {
                format!("/{}", f.name.replace('~', "~0").replace('/', "~1"))
            } else {
                f.name
            },
            kind: f.kind,
            required: f.required,
            default: None,
            coerce: false,
            format: None,
        })
        .collect())
}

/// Why the registry gave no answer to act on.
#[derive(Debug, thiserror::Error)]
#[error("schema registry: {message}")]
pub struct RegistryError {
    pub class: ErrorClass,
    pub message: String,
}

impl RegistryError {
    fn transient(message: String) -> Self {
        Self {
            class: ErrorClass::Transient,
            message,
        }
    }
}

/// A schema as `GET /schemas/ids/{id}` and `GET /subjects/.../versions/...` return it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaBody {
    /// Given by `GET /subjects/.../versions/...`.
    #[serde(default)]
    id: Option<u32>,
    schema: String,
    /// Absent for Avro.
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

/// A registry's error answer.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error_code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct Reference {
    /// The name the schema imports it by.
    name: String,
    subject: String,
    version: i64,
}

/// The registry, and the cache it fills.
pub struct Registry {
    urls: Vec<String>,
    client: reqwest::Client,
    username: Option<String>,
    password: Option<SecretString>,
    cache: Arc<SchemaCache>,
    /// One fetch at a time: a second caller missing the same id waits, then finds it.
    fetching: tokio::sync::Mutex<()>,
    /// Counts every request sent (the worker's metric, or a counter of its own).
    requests: Counter,
}

impl Registry {
    /// A client of the configured registry filling the routes' cache, if a route reads
    /// a registry format.
    pub fn for_routes(
        config: &SchemaRegistryConfig,
        routes: &Routes,
        requests: Counter,
    ) -> Result<Option<Self>, String> {
        routes
            .read_registry()
            .then(|| Self::new(config, routes.schemas().clone(), requests))
            .transpose()
    }

    /// A client of the configured registry filling `cache`, counting its requests in
    /// `requests`.
    pub fn new(
        config: &SchemaRegistryConfig,
        cache: Arc<SchemaCache>,
        requests: Counter,
    ) -> Result<Self, String> {
        let urls: Vec<String> = config
            .url
            .iter()
            .flat_map(|u| u.split(','))
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        crate::security::install_rustls_provider();
        let mut builder = reqwest::Client::builder()
            // A redirect would drop the credentials, or leave https: it is reported.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms));
        if let Some(path) = &config.ca_location {
            let pem = std::fs::read(path).map_err(|e| {
                format!("schema_registry.ca_location: cannot read {path}: {e}")
            })?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!("schema_registry.ca_location: {path} is not a PEM bundle: {e}")
            })?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder
            .build()
            .map_err(|e| format!("schema registry client: {e}"))?;
        Ok(Self {
            urls,
            client,
            username: config.username.clone(),
            password: config.password.clone(),
            cache,
            fetching: tokio::sync::Mutex::new(()),
            requests,
        })
    }

    /// Makes sure the cache holds an answer for every id in `ids`, each fetched as its
    /// format needs.
    pub async fn resolve(
        &self,
        ids: impl IntoIterator<Item = (u32, ValueFormat)>,
    ) -> Result<(), RegistryError> {
        let mut missing: Vec<(u32, ValueFormat)> = ids
            .into_iter()
            .filter(|(id, format)| self.cache.get(*id, *format).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable_by_key(|(id, format)| (*id, format.name()));
        missing.dedup();
        let _one = self.fetching.lock().await;
        for (id, format) in missing {
            if self.cache.get(id, format).is_none() {
                let lookup = self.fetch(id, format).await?;
                self.cache.insert(id, format, lookup);
            }
        }
        Ok(())
    }

    async fn fetch(&self, id: u32, format: ValueFormat) -> Result<Lookup, RegistryError> {
        // Registries number schemas with 32-bit signed integers.
        if id > i32::MAX as u32 {
            return Ok(Lookup::unknown(format!(
                "schema id {id} is beyond what a registry numbers (2^31 - 1)"
            )));
        }
        self.schema(&format!("/schemas/ids/{id}"), id, format)
            .await
    }

    /// The latest schema registered under `subject` (for `schema --from-registry`), read
    /// as `format` needs it.
    pub async fn latest(
        &self,
        subject: &str,
        format: ValueFormat,
    ) -> Result<Lookup, RegistryError> {
        let path = format!("/subjects/{}/versions/latest", encode_path(subject));
        self.schema(&path, 0, format).await
    }

    /// The schema at `path` (schema `id`, or 0 for the id the answer names), with what it
    /// references.
    async fn schema(
        &self,
        path: &str,
        id: u32,
        format: ValueFormat,
    ) -> Result<Lookup, RegistryError> {
        // Protobuf schemas are read as serialized descriptors, not .proto text, which
        // would take a compiler.
        let query = match format {
            ValueFormat::Protobuf => "?format=serialized",
            _ => "",
        };
        let body = match self.get(&format!("{path}{query}")).await? {
            Answer::Found(body) => body,
            Answer::Missing(why) => {
                return Ok(Lookup::unknown(format!("schema id {id}: {why}")));
            }
        };
        let id = if id == 0 { body.id.unwrap_or(0) } else { id };
        let kind = body.schema_type.as_deref().unwrap_or("AVRO");
        let mut references = Vec::new();
        if let Err(why) = self
            .references(&body.references, query, &mut references, &mut Vec::new())
            .await?
        {
            return Ok(Lookup::unknown(format!("schema id {id}: {why}")));
        }
        Ok(match WriterSchema::parse(id, kind, &body.schema, &references) {
            Ok(schema) => Lookup::Found(Arc::new(schema)),
            Err(e) => Lookup::unknown(format!("schema id {id} is not read: {e}")),
        })
    }

    /// Appends `wanted` and what they reference, dependencies first, each once (`seen`
    /// holds subject and version), asked for with `query`; the inner `Err` says why a
    /// reference cannot be had.
    async fn references(
        &self,
        wanted: &[Reference],
        query: &str,
        texts: &mut Vec<Referenced>,
        seen: &mut Vec<(String, i64)>,
    ) -> Result<Result<(), String>, RegistryError> {
        for reference in wanted {
            let key = (reference.subject.clone(), reference.version);
            if seen.contains(&key) {
                continue;
            }
            if seen.len() >= MAX_REFERENCES {
                return Ok(Err(format!(
                    "it references more than {MAX_REFERENCES} schemas"
                )));
            }
            seen.push(key);
            let path = format!(
                "/subjects/{}/versions/{}{query}",
                encode_path(&reference.subject),
                reference.version
            );
            let body = match self.get(&path).await? {
                Answer::Found(body) => body,
                Answer::Missing(why) => {
                    return Ok(Err(format!(
                        "its reference {} version {}: {why}",
                        reference.subject, reference.version
                    )));
                }
            };
            if let Err(why) =
                Box::pin(self.references(&body.references, query, texts, seen)).await?
            {
                return Ok(Err(why));
            }
            texts.push(Referenced {
                name: reference.name.clone(),
                text: body.schema,
            });
        }
        Ok(Ok(()))
    }

    /// `GET path` from the registries in turn, until one answers with the schema. A
    /// registry's "not found" (404 with its error code), or another refusal of the
    /// request itself (4xx), is believed once every registry has said so; no answer,
    /// 5xx, 408, 429 or a 404 that is no registry's (a wrong URL) is transient.
    async fn get(&self, path: &str) -> Result<Answer, RegistryError> {
        let mut failures = Vec::new();
        let mut missing = None;
        for url in &self.urls {
            self.requests.inc();
            let mut request = self.client.get(format!("{url}{path}")).header(
                reqwest::header::ACCEPT,
                "application/vnd.schemaregistry.v1+json, application/json",
            );
            if let Some(username) = &self.username {
                request = request.basic_auth(
                    username,
                    self.password.as_ref().map(|p| p.expose_secret().to_owned()),
                );
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) => {
                    failures.push(format!("{url}: {e}"));
                    continue;
                }
            };
            let status = response.status();
            match status.as_u16() {
                // An answer read whole that is no schema (or too large to be one) is the
                // registry's word; one cut off on the way is no answer.
                200 => match read_bounded(response).await {
                    Ok(Some(bytes)) => {
                        return Ok(match serde_json::from_slice::<SchemaBody>(&bytes) {
                            Ok(body) => Answer::Found(body),
                            Err(e) => {
                                Answer::Missing(format!("the registry's answer is no schema: {e}"))
                            }
                        });
                    }
                    Ok(None) => {
                        return Ok(Answer::Missing(format!(
                            "the registry's answer is above {MAX_ANSWER_BYTES} bytes"
                        )));
                    }
                    Err(e) => failures.push(format!("{url}{path}: {e}")),
                },
                401 | 403 => {
                    return Err(RegistryError {
                        class: ErrorClass::Fatal,
                        message: format!(
                            "{url} refused the credentials ({status}): check \
                             schema_registry.username and schema_registry.password"
                        ),
                    });
                }
                300..=399 => {
                    let to = response
                        .headers()
                        .get(reqwest::header::LOCATION)
                        .and_then(|l| l.to_str().ok())
                        .unwrap_or("elsewhere")
                        .to_owned();
                    return Err(RegistryError {
                        class: ErrorClass::Fatal,
                        message: format!(
                            "{url}{path} redirects ({status}) to {to}: set schema_registry.url \
                             to the registry's own base URL"
                        ),
                    });
                }
                404 => match read_bounded(response)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|b| serde_json::from_slice::<ErrorBody>(&b).ok())
                {
                    Some(ErrorBody {
                        error_code: 40400..=40499,
                        message,
                    }) => missing = Some(format!("not found ({message})")),
                    _ => failures.push(format!(
                        "{url}{path}: 404 without a registry error code (is {url} the \
                         registry's base URL? schema_registry.url)"
                    )),
                },
                408 | 429 => failures.push(format!("{url}{path}: {status}")),
                400..=499 => missing = Some(format!("the registry refuses the request ({status})")),
                _ => failures.push(format!("{url}{path}: {status}")),
            }
        }
        match missing {
            Some(why) if failures.is_empty() => Ok(Answer::Missing(why)),
            _ => Err(RegistryError::transient(failures.join("; "))),
        }
    }
}

/// What a registry said of a schema.
enum Answer {
    Found(SchemaBody),
    /// It does not have it, or refuses to give it: why.
    Missing(String),
}

/// A subject name as one URL path segment.
pub(crate) fn encode_path(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server on 127.0.0.1 that answers every request with `head` and then `body`
    /// (`repeat` times), then closes the connection; its base URL.
    async fn answering(head: String, body: &'static [u8], repeat: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let url = format!("http://{}", listener.local_addr().expect("an address"));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let head = head.clone();
                tokio::spawn(async move {
                    let mut request = [0; 4096];
                    let _ = socket.read(&mut request).await;
                    let _ = socket.write_all(head.as_bytes()).await;
                    for _ in 0..repeat {
                        if socket.write_all(body).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        url
    }

    fn registry(url: String) -> Registry {
        let config = SchemaRegistryConfig {
            url: Some(url),
            username: None,
            password: None,
            ca_location: None,
            timeout_ms: 2_000,
        };
        Registry::new(&config, Arc::default(), Counter::default()).expect("a client")
    }

    #[test]
    fn check_takes_what_a_column_reads_from_a_fields_values() {
        use ColumnType::*;
        let column = |kind: ColumnType, format: TimeFormat| Column {
            name: "c".to_owned(),
            field: "f".to_owned(),
            source: Source::Field("f".to_owned()),
            kind,
            required: false,
            default: None,
            coerce: false,
            format,
        };
        let iso = || TimeFormat::Iso8601;
        for (kind, format, field, fits) in [
            (Int8, iso(), Int4, true),
            (Numeric, iso(), Float8, true),
            (Bool, iso(), Int4, false),
            (Bool, iso(), Text, true),
            (Int4, iso(), Jsonb, true),
            (Text, iso(), Bytea, true),
            (Timestamptz, iso(), Date, true),
            (Timestamptz, iso(), Int8, false),
            (Timestamptz, TimeFormat::EpochMs, Int8, true),
            (Interval, iso(), Float8, true),
            (Uuid, iso(), Bytea, false),
        ] {
            assert_eq!(takes(&column(kind, format), field), fits, "{kind:?} of {field:?}");
        }
    }

    #[tokio::test]
    async fn an_answer_cut_off_on_the_way_is_transient_and_decides_nothing() {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
        let registry = registry(answering(head.to_owned(), br#"{"schema": "#, 1).await);
        let err = registry
            .resolve([(1, ValueFormat::Avro)])
            .await
            .expect_err("no answer");
        assert_eq!(err.class, ErrorClass::Transient, "{err}");
        assert!(registry.cache.get(1, ValueFormat::Avro).is_none());
    }

    #[tokio::test]
    async fn an_answer_above_the_bound_is_an_unknown_schema_not_a_memory_cost() {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                    Transfer-Encoding: identity\r\nConnection: close\r\n\r\n";
        let chunk: &'static [u8] = &[b' '; 1 << 16];
        let repeat = MAX_ANSWER_BYTES / chunk.len() + 2;
        let registry = registry(answering(head.to_owned(), chunk, repeat).await);
        registry
            .resolve([(1, ValueFormat::Avro)])
            .await
            .expect("an answer");
        let Some(Lookup::Unknown(why, _)) = registry.cache.get(1, ValueFormat::Avro) else {
            panic!("unknown")
        };
        assert!(why.contains("above"), "{why}");
    }
}
