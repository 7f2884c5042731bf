//! A minimal Confluent-compatible Schema Registry (`dev registry`, and the bench's and
//! the tests'): schemas registered under a subject (`POST /subjects/{subject}/versions`
//! with the schema's text and `schemaType`, answering the id: the same text the same id),
//! writer schemas by id (`GET /schemas/ids/{id}` with their `schemaType`, a 404 with
//! error code 40403 for an id it does not hold), a subject's latest version
//! (`GET /subjects/{subject}/versions/latest`), counting the `GET`s, and a switch that
//! makes it answer 503 (an outage). It keeps schemas in memory only, and serves each as
//! it was registered: a Protobuf schema must be registered as a serialized descriptor
//! (as Confluent's serializers do), which is what `?format=serialized` asks for.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

/// A registry serving on 127.0.0.1 until dropped.
pub struct DevRegistry {
    /// Its base URL.
    pub url: String,
    /// `GET` requests answered so far.
    requests: Arc<AtomicU64>,
    /// While set, every request is answered 503 (the tests' registry outage).
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub down: Arc<AtomicBool>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for DevRegistry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A schema as registered: its type (`AVRO`, `PROTOBUF`, `JSON`) and text.
#[derive(Clone, PartialEq, Eq)]
struct Stored {
    schema_type: String,
    text: String,
}

#[derive(Clone)]
struct Served {
    schemas: Arc<RwLock<HashMap<u32, Stored>>>,
    /// Each subject's versions: the ids registered under it, in order.
    subjects: Arc<RwLock<HashMap<String, Vec<u32>>>>,
    requests: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
}

async fn schema_by_id(State(served): State<Served>, Path(id): Path<u32>) -> impl IntoResponse {
    served.requests.fetch_add(1, Ordering::SeqCst);
    let (status, body) = if served.down.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, json!({"error_code": 50301}))
    } else {
        let schemas = served.schemas.read().unwrap_or_else(|p| p.into_inner());
        match schemas.get(&id) {
            Some(stored) => (
                StatusCode::OK,
                json!({ "schema": stored.text, "schemaType": stored.schema_type }),
            ),
            None => (
                StatusCode::NOT_FOUND,
                json!({"error_code": 40403, "message": "Schema not found"}),
            ),
        }
    };
    answer(status, &body)
}

fn answer(status: StatusCode, body: &serde_json::Value) -> impl IntoResponse + use<> {
    let content_type = "application/vnd.schemaregistry.v1+json";
    (
        status,
        [(axum::http::header::CONTENT_TYPE, content_type)],
        body.to_string(),
    )
}

/// The latest version registered under a subject.
async fn latest(State(served): State<Served>, Path(subject): Path<String>) -> impl IntoResponse {
    served.requests.fetch_add(1, Ordering::SeqCst);
    // In the order `register` takes them.
    let schemas = served.schemas.read().unwrap_or_else(|p| p.into_inner());
    let subjects = served.subjects.read().unwrap_or_else(|p| p.into_inner());
    let found = subjects.get(&subject).and_then(|versions| {
        let id = *versions.last()?;
        Some((versions.len(), id, schemas.get(&id)?))
    });
    let (status, body) = match found {
        Some((version, id, stored)) => (
            StatusCode::OK,
            json!({
                "subject": subject, "version": version, "id": id,
                "schema": stored.text, "schemaType": stored.schema_type,
            }),
        ),
        None => (
            StatusCode::NOT_FOUND,
            json!({"error_code": 40401, "message": "Subject not found"}),
        ),
    };
    answer(status, &body)
}

/// Registers a schema under a subject: its id, the existing one for a text it holds.
async fn register(
    State(served): State<Served>,
    Path(subject): Path<String>,
    body: String,
) -> impl IntoResponse {
    let body = serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default();
    let Some(text) = body["schema"].as_str() else {
        let refusal = json!({"error_code": 42201, "message": "no schema in the request"});
        return answer(StatusCode::UNPROCESSABLE_ENTITY, &refusal);
    };
    let stored = Stored {
        schema_type: body["schemaType"].as_str().unwrap_or("AVRO").to_owned(),
        text: text.to_owned(),
    };
    let mut schemas = served.schemas.write().unwrap_or_else(|p| p.into_inner());
    let id = match schemas.iter().find(|(_, s)| **s == stored) {
        Some((id, _)) => *id,
        None => {
            let id = schemas.keys().max().map_or(1, |max| max + 1);
            schemas.insert(id, stored);
            id
        }
    };
    let mut subjects = served.subjects.write().unwrap_or_else(|p| p.into_inner());
    let versions = subjects.entry(subject).or_default();
    if !versions.contains(&id) {
        versions.push(id);
    }
    answer(StatusCode::OK, &json!({ "id": id }))
}

impl DevRegistry {
    /// Serves `schemas` (id -> schema text) of `schema_type` (`AVRO`, `PROTOBUF`,
    /// `JSON`) and what is registered later.
    pub async fn start(schema_type: &str, schemas: HashMap<u32, String>) -> std::io::Result<Self> {
        let schemas = schemas
            .into_iter()
            .map(|(id, text)| {
                let schema_type = schema_type.to_owned();
                (id, Stored { schema_type, text })
            })
            .collect();
        let served = Served {
            schemas: Arc::new(RwLock::new(schemas)),
            subjects: Arc::default(),
            requests: Arc::new(AtomicU64::new(0)),
            down: Arc::new(AtomicBool::new(false)),
        };
        let (requests, down) = (served.requests.clone(), served.down.clone());
        let app = axum::Router::new()
            .route("/schemas/ids/{id}", axum::routing::get(schema_by_id))
            .route(
                "/subjects/{subject}/versions",
                axum::routing::post(register),
            )
            .route(
                "/subjects/{subject}/versions/latest",
                axum::routing::get(latest),
            )
            .with_state(served);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url,
            requests,
            down,
            server,
        })
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Runs a registry until `shutdown`; prints its URL as the first line of stdout.
pub async fn serve(shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    let registry = DevRegistry::start("AVRO", HashMap::new()).await?;
    println!("{}", registry.url);
    shutdown.cancelled().await;
    Ok(())
}

/// Registers the website-metrics schema of `format` under `{topic}-value` at the
/// registry `url` (any Confluent-compatible one): its id.
pub async fn register_website_metric(
    url: &str,
    topic: &str,
    format: crate::config::ValueFormat,
) -> anyhow::Result<u32> {
    use anyhow::Context;
    let (schema_type, schema) = crate::sample::Framer::schema(format)
        .with_context(|| format!("{} is no registry format", format.name()))?;
    crate::security::install_rustls_provider();
    let subject = crate::registry::encode_path(topic);
    let response = reqwest::Client::new()
        .post(format!("{}/subjects/{subject}-value/versions", url.trim_end_matches('/')))
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/vnd.schemaregistry.v1+json",
        )
        .body(json!({ "schema": schema, "schemaType": schema_type }).to_string())
        .send()
        .await
        .with_context(|| format!("cannot reach the schema registry at {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "the schema registry refused the schema ({status}): {body}");
    body["id"]
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .with_context(|| format!("the schema registry answered no id: {body}"))
}
