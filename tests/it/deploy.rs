//! The deploy files (compose, Kubernetes) name only flags, variables and keys the binary
//! really has.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kafka_pg_ingest::config::{ENV_PREFIX, Overrides};
use kafka_pg_ingest::telemetry::metrics::{Metrics, PartitionLabel};
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::helpers::BINARY;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// Variables the binary reads besides `KAFKA_PG_INGEST__*`: the `env` of its flags, the
/// log filter, and the `OTEL_*` names of the `otel` keys. `Config::load` silently skips
/// other `OTEL_*` names, so they are listed here rather than left to it.
const WORKER_VARIABLES: [&str; 11] = [
    "DATABASE_URL",
    "KAFKA_BROKERS",
    "METRICS_ADDR",
    "LOG_FORMAT",
    "RUST_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_RESOURCE_ATTRIBUTES",
];

/// Every YAML document of a file, with `<<` merge keys applied as compose applies them.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{}: bad merge key: {e}", path.display()));
            value
        })
        .collect()
}

fn k8s_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(format!("{DEPLOY}/k8s"))
        .expect("deploy/k8s exists")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The Kubernetes objects, except kustomize's own file.
fn k8s_objects() -> Vec<Value> {
    k8s_files()
        .iter()
        .flat_map(|f| documents(f))
        .filter(|o| o["kind"].as_str() != Some("Kustomization"))
        .collect()
}

fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let mut found = objects.iter().filter(|o| o["kind"].as_str() == Some(kind));
    let first = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} in deploy/k8s"));
    assert!(found.next().is_none(), "one {kind} in deploy/k8s");
    first
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A worker container: its arguments and its variables (`None`: the value comes from
/// elsewhere, e.g. a Secret).
struct Worker {
    origin: String,
    args: Vec<String>,
    env: Vec<(String, Option<String>)>,
}

impl Worker {
    fn literal_env(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
            .collect()
    }

    fn var(&self, name: &str) -> Option<String> {
        self.env.iter().find(|(k, _)| k == name)?.1.clone()
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| s.iter().map(|v| text(v).expect("a scalar")).collect())
        .unwrap_or_default()
}

/// Compose services built from deploy/Dockerfile.
fn compose_workers() -> Vec<Worker> {
    let compose = documents(Path::new(&format!("{DEPLOY}/compose.yaml"))).remove(0);
    let services = compose["services"].as_mapping().expect("services");
    let workers: Vec<Worker> = services
        .iter()
        .filter(|(_, s)| s["build"]["dockerfile"].as_str() == Some("deploy/Dockerfile"))
        .map(|(name, s)| {
            // Compose takes `environment` as a map or as a list of NAME=VALUE.
            let env = match &s["environment"] {
                Value::Mapping(m) => m
                    .iter()
                    .map(|(k, v)| (text(k).expect("a name"), text(v)))
                    .collect(),
                other => strings(other)
                    .into_iter()
                    .map(|pair| match pair.split_once('=') {
                        Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                        None => (pair, None),
                    })
                    .collect(),
            };
            Worker {
                origin: format!("compose service {}", text(name).expect("a name")),
                args: strings(&s["command"]),
                env,
            }
        })
        .collect();
    assert!(workers.len() >= 3, "compose runs three workers");
    workers
}

fn k8s_worker(deployment: &Value) -> Worker {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"]
        .as_sequence()
        .expect("the container sets env")
        .iter()
        .map(|e| (text(&e["name"]).expect("env name"), text(&e["value"])))
        .collect();
    Worker {
        origin: "k8s Deployment".into(),
        args: strings(&container["args"]),
        env,
    }
}

fn all_workers() -> Vec<Worker> {
    let mut workers = compose_workers();
    workers.push(k8s_worker(object(&k8s_objects(), "Deployment")));
    workers
}

#[test]
fn deploy_files_parse_and_the_collector_pipeline_uses_defined_components() {
    let mut files = k8s_files();
    files.push(format!("{DEPLOY}/compose.yaml").into());
    files.push(format!("{DEPLOY}/otel-collector.yaml").into());
    for file in &files {
        let docs = documents(file);
        assert!(
            !docs.is_empty() && docs.iter().all(Value::is_mapping),
            "{} holds maps",
            file.display()
        );
    }
    for object in k8s_objects() {
        assert!(
            object["apiVersion"].is_string() && object["metadata"]["name"].is_string(),
            "every Kubernetes object has apiVersion and a name: {object:?}"
        );
    }
    // The collector refuses to start when a pipeline names a component it has no
    // configuration for.
    let collector = documents(Path::new(&format!("{DEPLOY}/otel-collector.yaml"))).remove(0);
    let pipelines = collector["service"]["pipelines"]
        .as_mapping()
        .expect("service.pipelines");
    assert!(!pipelines.is_empty());
    for pipeline in pipelines.values() {
        for section in ["receivers", "processors", "exporters"] {
            for name in strings(&pipeline[section]) {
                assert!(
                    collector[section].get(name.as_str()).is_some(),
                    "the collector pipeline uses {section} `{name}`, which is not configured"
                );
            }
        }
    }
}

#[test]
fn worker_flags_in_compose_and_k8s_are_flags_of_run() {
    let help = std::process::Command::new(BINARY)
        .args(["run", "--help"])
        .output()
        .expect("the binary runs");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: BTreeSet<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--"))
        .collect();
    for worker in all_workers() {
        // The image's ENTRYPOINT is the binary, so the arguments start at the subcommand.
        assert_eq!(
            worker.args.first().map(String::as_str),
            Some("run"),
            "{}",
            worker.origin
        );
        for arg in worker.args.iter().filter(|a| a.starts_with("--")) {
            let flag = arg.split('=').next().unwrap_or(arg);
            assert!(
                flags.contains(flag),
                "{} passes {flag}, which `run` does not take:\n{help}",
                worker.origin
            );
        }
    }
}

#[test]
fn worker_environment_names_only_variables_the_binary_reads() {
    for worker in all_workers() {
        for (name, value) in &worker.env {
            if name.starts_with(ENV_PREFIX) {
                // Only a literal value can be loaded below.
                assert!(
                    value.is_some(),
                    "{}: give {name} a literal value so this test can check it",
                    worker.origin
                );
            } else {
                assert!(
                    WORKER_VARIABLES.contains(&name.as_str()),
                    "{} sets {name}, which the binary does not read",
                    worker.origin
                );
            }
        }
        // Rejects unknown KAFKA_PG_INGEST__ keys and bad OTEL_* values, naming them.
        if let Err(e) =
            kafka_pg_ingest::load_config(None, worker.literal_env(), &Overrides::default())
        {
            panic!("{}: {e}", worker.origin);
        }
        if let Some(format) = worker.var("LOG_FORMAT") {
            assert!(["text", "json"].contains(&format.as_str()), "{format}");
        }
    }
}

#[test]
fn configmap_config_file_loads_at_the_path_the_deployment_passes() {
    let objects = k8s_objects();
    let deployment = object(&objects, "Deployment");
    let worker = k8s_worker(deployment);
    let pod = &deployment["spec"]["template"]["spec"];
    let config_arg = worker
        .args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| worker.args.get(i + 1))
        .expect("the Deployment passes --config");
    let (dir, key) = config_arg.rsplit_once('/').expect("an absolute path");
    // The file must be a key of the ConfigMap mounted at that directory.
    let mount = pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
    let volume = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let configmap = objects
        .iter()
        .find(|o| {
            o["kind"].as_str() == Some("ConfigMap")
                && o["metadata"]["name"] == volume["configMap"]["name"]
        })
        .expect("the mounted ConfigMap is in deploy/k8s");
    let yaml = configmap["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("the ConfigMap has no key {key}"));
    let file = std::env::temp_dir().join(format!("kpi-deploy-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&file, yaml).expect("temp file is writable");
    // With the Deployment's variables too, as the pod loads it.
    let loaded =
        kafka_pg_ingest::load_config(Some(&file), worker.literal_env(), &Overrides::default());
    let _ = std::fs::remove_file(&file);
    if let Err(e) = loaded {
        panic!("the ConfigMap's {key} does not load: {e}");
    }
    let tree: Value = serde_yaml_ng::from_str(yaml).expect("the config is YAML");
    assert!(
        tree["postgres"]["url"].is_null(),
        "the database URL belongs in the Secret, not the ConfigMap"
    );
}

#[test]
fn probes_ask_healthz_and_readyz_on_the_port_of_metrics_addr() {
    let objects = k8s_objects();
    let deployment = object(&objects, "Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let port = |worker: &Worker| -> u64 {
        let addr = worker.var("METRICS_ADDR").expect("METRICS_ADDR is set");
        let (_, port) = addr.rsplit_once(':').expect("HOST:PORT");
        port.parse().expect("a port number")
    };
    let metrics_port = port(&k8s_worker(deployment));
    let ports = container["ports"].as_sequence().expect("container ports");
    // A probe names its port by number or by the name of a container port.
    let resolve = |p: &Value| -> Option<u64> {
        p.as_u64().or_else(|| {
            ports
                .iter()
                .find(|c| c["name"] == *p)
                .and_then(|c| c["containerPort"].as_u64())
        })
    };
    assert!(
        ports
            .iter()
            .any(|c| c["containerPort"].as_u64() == Some(metrics_port)),
        "the container declares port {metrics_port}"
    );
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &container[probe]["httpGet"];
        // A startup probe is optional; the other two are not.
        if probe == "startupProbe" && get.is_null() {
            continue;
        }
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(resolve(&get["port"]), Some(metrics_port), "{probe} port");
    }
    // Compose publishes each worker's metrics port to the host.
    let compose = documents(Path::new(&format!("{DEPLOY}/compose.yaml"))).remove(0);
    for worker in compose_workers() {
        let published = format!(":{}", port(&worker));
        let name = worker.origin.trim_start_matches("compose service ");
        assert!(
            strings(&compose["services"][name]["ports"])
                .iter()
                .any(|p| p.ends_with(&published)),
            "{} publishes its METRICS_ADDR port",
            worker.origin
        );
    }
}

#[test]
fn keda_scales_the_deployment_on_the_lag_metric_the_worker_exports() {
    let objects = k8s_objects();
    let deployment = object(&objects, "Deployment");
    let name = &deployment["metadata"]["name"];
    let scaled = object(&objects, "ScaledObject");
    let target = &scaled["spec"]["scaleTargetRef"];
    assert_eq!(&target["name"], name);
    assert!(matches!(target["kind"].as_str(), None | Some("Deployment")));
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let budget = object(&objects, "PodDisruptionBudget");
    for (key, value) in budget["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("the budget selects by labels")
    {
        assert_eq!(&pod_labels[key], value, "the budget selects the workers");
    }

    // A family without series is not encoded at all: give the per-partition gauges one,
    // as owning a partition does, then read families by their TYPE line.
    let metrics = Metrics::default();
    let owned = PartitionLabel {
        topic: "website-metrics".into(),
        partition: 0,
    };
    metrics.lag.get_or_create(&owned).set(0);
    metrics.next_offset.get_or_create(&owned).set(0);
    let exported = metrics.encode();
    let families: BTreeSet<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let triggers = scaled["spec"]["triggers"].as_sequence().expect("triggers");
    let query = triggers
        .iter()
        .find(|t| t["type"].as_str() == Some("prometheus"))
        .and_then(|t| t["metadata"]["query"].as_str())
        .expect("a prometheus trigger with a query");
    assert!(query.contains("kafka_pg_ingest_partition_lag"), "{query}");
    for metric in query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("kafka_pg_ingest_"))
    {
        assert!(
            families.contains(metric),
            "KEDA queries {metric}, which the worker does not export:\n{exported}"
        );
    }
}
