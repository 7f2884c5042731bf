//! A minimal Confluent-compatible Schema Registry for the bench and the tests: writer
//! schemas by id (`GET /schemas/ids/{id}`, a 404 with error code 40403 for an id it does
//! not hold), counting requests, and a switch that makes it answer 503 (an outage).

use std::collections::HashMap;
use std::sync::Arc;
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

#[derive(Clone)]
struct Served {
    schemas: Arc<HashMap<u32, String>>,
    requests: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
}

async fn schema_by_id(State(served): State<Served>, Path(id): Path<u32>) -> impl IntoResponse {
    served.requests.fetch_add(1, Ordering::SeqCst);
    let (status, body) = if served.down.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, json!({"error_code": 50301}))
    } else {
        match served.schemas.get(&id) {
            Some(schema) => (StatusCode::OK, json!({ "schema": schema })),
            None => (
                StatusCode::NOT_FOUND,
                json!({"error_code": 40403, "message": "Schema not found"}),
            ),
        }
    };
    let content_type = "application/vnd.schemaregistry.v1+json";
    (
        status,
        [(axum::http::header::CONTENT_TYPE, content_type)],
        body.to_string(),
    )
}

impl DevRegistry {
    /// Serves `schemas` (id -> Avro schema text).
    pub async fn start(schemas: HashMap<u32, String>) -> std::io::Result<Self> {
        let served = Served {
            schemas: Arc::new(schemas),
            requests: Arc::new(AtomicU64::new(0)),
            down: Arc::new(AtomicBool::new(false)),
        };
        let (requests, down) = (served.requests.clone(), served.down.clone());
        let app = axum::Router::new()
            .route("/schemas/ids/{id}", axum::routing::get(schema_by_id))
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
