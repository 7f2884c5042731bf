//! Transport security: TLS and SASL to Kafka, TLS to Postgres.
//!
//! The typed keys here are the only way to set these librdkafka and libpq properties:
//! `kafka.options` refuses them, so a password or key passphrase is always held as a
//! secret and every file it names is checked when the configuration loads.

use std::path::{Path, PathBuf};

use rdkafka::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::config::{Config, ConfigError, KafkaConfig, PostgresConfig, invalid};

/// librdkafka properties that only the typed keys may set, with the key to use.
const TYPED_KAFKA_OPTIONS: [(&str, &str); 10] = [
    ("security.protocol", "kafka.security_protocol"),
    ("ssl.ca.location", "kafka.ssl.ca_location"),
    ("ssl.certificate.location", "kafka.ssl.certificate_location"),
    ("ssl.key.location", "kafka.ssl.key_location"),
    ("ssl.key.password", "kafka.ssl.key_password"),
    (
        "ssl.endpoint.identification.algorithm",
        "kafka.ssl.verify_hostname",
    ),
    ("sasl.mechanism", "kafka.sasl.mechanism"),
    ("sasl.mechanisms", "kafka.sasl.mechanism"),
    ("sasl.username", "kafka.sasl.username"),
    ("sasl.password", "kafka.sasl.password"),
];

/// librdkafka properties `kafka.options` refuses although no typed key sets them: they
/// hold a secret that options would keep as plain text, or switch certificate checks off.
const REFUSED_KAFKA_OPTIONS: [(&str, &str); 5] = [
    (
        "ssl.key.pem",
        "holds a private key, which kafka.options keeps as plain text: give its file as kafka.ssl.key_location",
    ),
    (
        "ssl.keystore.password",
        "is a secret, which kafka.options keeps as plain text: give PEM files with kafka.ssl.*",
    ),
    (
        "ssl.keystore.location",
        "needs ssl.keystore.password, a secret kafka.options cannot hold: give PEM files with kafka.ssl.*",
    ),
    (
        "sasl.oauthbearer.client.secret",
        "is a secret, which kafka.options keeps as plain text (OAUTHBEARER is not supported)",
    ),
    (
        "enable.ssl.certificate.verification",
        "would switch off the brokers' certificate checks: give their CA as kafka.ssl.ca_location",
    ),
];

/// Checks the transport security keys of both clients and the files they name.
/// Makes ring the process's rustls provider unless one is set: the HTTP clients (the
/// OTLP exporter's, the schema registry's) build their TLS from the process default,
/// and rustls picks none by itself when several could serve.
pub fn install_rustls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn validate(config: &Config) -> Result<(), ConfigError> {
    validate_kafka(&config.kafka)?;
    validate_postgres(&config.postgres)
}

/// Checks the Kafka security keys against each other and the files they name.
fn validate_kafka(kafka: &KafkaConfig) -> Result<(), ConfigError> {
    let (protocol, ssl, sasl) = (kafka.security_protocol, &kafka.ssl, &kafka.sasl);
    let typed = TYPED_KAFKA_OPTIONS.iter().map(|&(option, key)| {
        (
            option,
            format!(
                "is set by `{key}`: move it there (secrets and files are checked and masked only there)"
            ),
        )
    });
    let refused = REFUSED_KAFKA_OPTIONS
        .iter()
        .map(|&(option, problem)| (option, problem.to_owned()));
    if let Some((option, problem)) = typed
        .chain(refused)
        .find(|(option, _)| kafka.options.contains_key(*option))
    {
        return Err(invalid(&format!("kafka.options.{option}"), problem));
    }
    let files = ssl.files().map(|(key, _, path)| (key, path));
    let uses_tls = files.iter().any(|(_, f)| f.is_some()) || ssl.key_password.is_some();
    if uses_tls && !protocol.tls() {
        return Err(invalid(
            "kafka.security_protocol",
            format!(
                "is {}, but kafka.ssl is set: use ssl or sasl_ssl, or remove the kafka.ssl keys",
                protocol.librdkafka()
            ),
        ));
    }
    check_files(files)?;
    let uses_sasl = sasl.mechanism.is_some() || sasl.username.is_some() || sasl.password.is_some();
    if uses_sasl && !protocol.sasl() {
        return Err(invalid(
            "kafka.security_protocol",
            format!(
                "is {}, but kafka.sasl is set: use sasl_ssl (or sasl_plaintext), or remove the kafka.sasl keys",
                protocol.librdkafka()
            ),
        ));
    }
    if protocol.sasl() {
        let missing = [
            ("kafka.sasl.mechanism", sasl.mechanism.is_none()),
            ("kafka.sasl.username", sasl.username.is_none()),
            ("kafka.sasl.password", sasl.password.is_none()),
        ];
        if let Some((key, _)) = missing.iter().find(|(_, absent)| *absent) {
            return Err(invalid(
                key,
                format!(
                    "is required when kafka.security_protocol is {}: give PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with a username and password",
                    protocol.librdkafka()
                ),
            ));
        }
    }
    Ok(())
}

/// Sets librdkafka's security properties from the typed keys.
pub fn apply_kafka(client: &mut ClientConfig, kafka: &KafkaConfig) {
    let (protocol, ssl, sasl) = (kafka.security_protocol, &kafka.ssl, &kafka.sasl);
    client.set("security.protocol", protocol.librdkafka());
    if protocol.tls() {
        for (_, property, path) in ssl.files() {
            if let Some(path) = path {
                client.set(property, path.to_string_lossy());
            }
        }
        if let Some(password) = &ssl.key_password {
            client.set("ssl.key.password", password.expose_secret());
        }
        client.set(
            "ssl.endpoint.identification.algorithm",
            if ssl.verify_hostname { "https" } else { "none" },
        );
    }
    // validate_kafka requires all three under a SASL protocol.
    if protocol.sasl()
        && let (Some(mechanism), Some(username), Some(password)) =
            (sasl.mechanism, &sasl.username, &sasl.password)
    {
        client
            .set("sasl.mechanism", mechanism.librdkafka())
            .set("sasl.username", username)
            .set("sasl.password", password.expose_secret());
    }
}

/// TLS alerts by which a peer refuses this client's certificate or handshake on purpose
/// (RFC 8446 numbers): bad/unsupported/revoked/expired/unknown certificate, unknown CA,
/// access denied, handshake failure, protocol version, certificate required.
const REFUSAL_ALERTS: [u32; 10] = [40, 42, 43, 44, 45, 46, 48, 49, 70, 116];

/// The keys to check when librdkafka reports that the brokers refused this client:
/// a configuration to change, which its own reconnecting would hide forever. `None` for
/// everything a retry can outlast, a connection cut at any point included.
pub fn refusal_hint(code: RDKafkaErrorCode, reason: &str) -> Option<&'static str> {
    // librdkafka words a socket failure during TLS as "SSL transport error" (under
    // __SSL) and a hang-up or timeout as its transport error text (under either code).
    const NETWORK: [&str; 4] = [
        "SSL transport error",
        "Disconnected",
        "Local: Broker transport failure",
        "Local: Timed out",
    ];
    if NETWORK.iter().any(|n| reason.contains(n)) {
        return None;
    }
    // OpenSSL quotes an alert the broker sent as "SSL alert number N"; librdkafka
    // reports one after the handshake as a transport failure.
    let alert = reason
        .split("SSL alert number ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u32>().ok());
    match (code, alert) {
        (_, Some(n)) if REFUSAL_ALERTS.contains(&n) => Some(
            "a broker refused this client's TLS handshake; check kafka.ssl.certificate_location and kafka.ssl.key_location (brokers that require mutual TLS need a client certificate their CA signed)",
        ),
        (_, Some(_)) => None,
        (RDKafkaErrorCode::SSL, None) if reason.contains("certificate verify failed") => Some(
            "the brokers' TLS certificate did not verify; check kafka.ssl.ca_location (the CA that signed the brokers' certificates) and kafka.ssl.verify_hostname",
        ),
        (RDKafkaErrorCode::SSL, None) => {
            Some("TLS to the brokers failed; check kafka.security_protocol and the kafka.ssl keys")
        }
        (RDKafkaErrorCode::Authentication, None) => Some(
            "SASL authentication to the brokers failed; check kafka.sasl.mechanism (one the brokers offer), kafka.sasl.username and kafka.sasl.password",
        ),
        _ => None,
    }
}

/// Checks the Postgres TLS keys and the files they name.
fn validate_postgres(pg: &PostgresConfig) -> Result<(), ConfigError> {
    check_files([
        ("postgres.sslrootcert", &pg.sslrootcert),
        ("postgres.sslcert", &pg.sslcert),
        ("postgres.sslkey", &pg.sslkey),
    ])?;
    // The mode that will apply: the typed key's, else the URL's (or PGSSLMODE's, which
    // sqlx reads while parsing). A URL that does not parse is reported when connecting.
    let mode = pg.sslmode.map(PgSslMode::from).or_else(|| {
        pg.url
            .expose_secret()
            .parse::<PgConnectOptions>()
            .ok()
            .map(|o| o.get_ssl_mode())
    });
    let verifies = matches!(mode, Some(PgSslMode::VerifyCa | PgSslMode::VerifyFull));
    if pg.sslrootcert.is_some() && !verifies {
        return Err(invalid(
            "postgres.sslmode",
            "must be verify-full (or verify-ca) when postgres.sslrootcert is set: below them the server's certificate is not checked at all",
        ));
    }
    if matches!(mode, Some(PgSslMode::Disable)) && pg.sslcert.is_some() {
        return Err(invalid(
            "postgres.sslmode",
            "is disable, but postgres.sslcert is set: use verify-full, or remove postgres.sslcert and postgres.sslkey",
        ));
    }
    Ok(())
}

/// Applies the Postgres TLS keys over what the URL said.
pub fn apply_postgres(pg: &PostgresConfig, mut options: PgConnectOptions) -> PgConnectOptions {
    if let Some(mode) = pg.sslmode {
        options = options.ssl_mode(mode.into());
    }
    if let Some(path) = &pg.sslrootcert {
        options = options.ssl_root_cert(path);
    }
    if let Some(path) = &pg.sslcert {
        options = options.ssl_client_cert(path);
    }
    if let Some(path) = &pg.sslkey {
        options = options.ssl_client_key(path);
    }
    options
}

/// Checks that each file (CA, client certificate, client key) can be read, and that the
/// certificate and its key are given together.
fn check_files(files: [(&str, &Option<PathBuf>); 3]) -> Result<(), ConfigError> {
    for (key, file) in files {
        if let Some(path) = file {
            readable(key, path)?;
        }
    }
    let [_, (cert_key, cert), (key_key, key)] = files;
    if cert.is_some() != key.is_some() {
        return Err(invalid(
            key_key,
            format!("and {cert_key} go together: a client certificate needs its key"),
        ));
    }
    Ok(())
}

fn readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        invalid(
            key,
            format!("names {}, which cannot be read: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    /// Reasons as librdkafka 2.12 words them (from its logs and sources).
    #[test]
    fn only_refusals_by_the_brokers_stop_the_worker() {
        let refused = [
            (
                RDKafkaErrorCode::SSL,
                "ssl://127.0.0.1:45115/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (install ca-certificates package) (after 2ms in state SSL_HANDSHAKE)",
                "kafka.ssl.ca_location",
            ),
            (
                RDKafkaErrorCode::BrokerTransportFailure,
                "ssl://127.0.0.1:33287/bootstrap: Receive failed: error:0A00045C:SSL routines::tlsv13 alert certificate required: SSL alert number 116 (after 0ms in state APIVERSION_QUERY)",
                "kafka.ssl.certificate_location",
            ),
            (
                RDKafkaErrorCode::Authentication,
                "sasl_ssl://b:9093/1: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-256 (after 5ms in state AUTH_REQ)",
                "kafka.sasl.password",
            ),
        ];
        for (code, reason, key) in refused {
            let hint = refusal_hint(code, reason).unwrap_or_else(|| panic!("fatal: {reason}"));
            assert!(hint.contains(key), "{hint}");
        }
        let retried = [
            (
                RDKafkaErrorCode::SSL,
                "ssl://b:9093/1: SSL handshake failed: SSL transport error: Connection timed out (after 30000ms in state SSL_HANDSHAKE)",
            ),
            (
                RDKafkaErrorCode::BrokerTransportFailure,
                "ssl://b:9093/1: SSL handshake failed: Disconnected: connection reset by peer: connecting to a PLAINTEXT broker listener? (after 1ms in state SSL_HANDSHAKE)",
            ),
            (
                RDKafkaErrorCode::BrokerTransportFailure,
                "ssl://b:9093/1: Receive failed: error:0A000438:SSL routines::tlsv1 alert internal error: SSL alert number 80",
            ),
            (
                RDKafkaErrorCode::Authentication,
                "sasl_ssl://b:9093/1: SASL SCRAM-SHA-256 mechanism handshake failed: Local: Broker transport failure: broker's supported mechanisms: ",
            ),
            (
                RDKafkaErrorCode::Authentication,
                "sasl_ssl://b:9093/1: SASL PLAIN mechanism handshake failed: Local: Timed out: broker's supported mechanisms: ",
            ),
            (RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down"),
        ];
        for (code, reason) in retried {
            assert_eq!(refusal_hint(code, reason), None, "{reason}");
        }
    }

    fn load_yaml(yaml: &str, env: Vec<(&str, &str)>) -> Result<Config, ConfigError> {
        let env = env.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned()));
        crate::config::with_yaml_file(yaml, |file| {
            crate::load_config(Some(file), env, &Overrides::default())
        })
    }

    #[test]
    fn security_keys_that_cannot_work_name_the_key_to_change() {
        let ca = std::env::temp_dir().join(format!("kpi-ca-{}", uuid::Uuid::new_v4()));
        std::fs::write(&ca, "not read until a handshake").expect("writable");
        let ca = ca.to_str().expect("UTF-8 path").to_owned();
        let cases = [
            (
                format!("kafka: {{ssl: {{ca_location: {ca}}}}}"),
                "kafka.security_protocol",
            ),
            (
                format!("kafka: {{security_protocol: ssl, ssl: {{certificate_location: {ca}}}}}"),
                "kafka.ssl.key_location",
            ),
            (
                "kafka: {security_protocol: ssl, ssl: {ca_location: /nonexistent/ca.pem}}".into(),
                "kafka.ssl.ca_location",
            ),
            (
                "kafka: {security_protocol: sasl_ssl, sasl: {mechanism: PLAIN, username: u}}"
                    .into(),
                "kafka.sasl.password",
            ),
            (
                "kafka: {sasl: {mechanism: SCRAM-SHA-512}}".into(),
                "kafka.security_protocol",
            ),
            (
                "kafka: {options: {sasl.password: x}}".into(),
                "kafka.options.sasl.password",
            ),
            (format!("postgres: {{sslcert: {ca}}}"), "postgres.sslkey"),
            (
                "postgres: {sslrootcert: /nonexistent/root.crt}".into(),
                "postgres.sslrootcert",
            ),
            (
                format!("postgres: {{sslmode: disable, sslrootcert: {ca}}}"),
                "postgres.sslmode",
            ),
            (
                format!("postgres: {{sslrootcert: {ca}}}"),
                "postgres.sslmode",
            ),
            (
                "kafka: {options: {enable.ssl.certificate.verification: false}}".into(),
                "kafka.options.enable.ssl.certificate.verification",
            ),
        ];
        for (yaml, key) in cases {
            let err = load_yaml(&yaml, vec![]).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{yaml}: {err}");
        }
        let _ = std::fs::remove_file(&ca);
    }

    #[test]
    fn security_keys_become_librdkafka_and_libpq_settings_and_secrets_stay_hidden() {
        let pem = std::env::temp_dir().join(format!("kpi-pem-{}", uuid::Uuid::new_v4()));
        std::fs::write(&pem, "PEM").expect("writable");
        let path = pem.to_str().expect("UTF-8 path");
        let yaml = format!(
            "kafka: {{security_protocol: SASL_SSL, ssl: {{ca_location: {path}, certificate_location: {path}, key_location: {path}, key_password: k3y-pass, verify_hostname: false}}, sasl: {{mechanism: SCRAM-SHA-512, username: ingest}}}}\n\
             postgres: {{sslmode: verify-full, sslrootcert: {path}}}"
        );
        let c = load_yaml(
            &yaml,
            vec![("KAFKA_PG_INGEST__KAFKA__SASL__PASSWORD", "sa5l-pass")],
        )
        .expect("loads");
        let mut client = rdkafka::ClientConfig::new();
        apply_kafka(&mut client, &c.kafka);
        for (property, value) in [
            ("security.protocol", "sasl_ssl"),
            ("ssl.ca.location", path),
            ("ssl.certificate.location", path),
            ("ssl.key.location", path),
            ("ssl.key.password", "k3y-pass"),
            ("ssl.endpoint.identification.algorithm", "none"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "ingest"),
            ("sasl.password", "sa5l-pass"),
        ] {
            assert_eq!(client.get(property), Some(value), "{property}");
        }
        let options = apply_postgres(&c.postgres, "postgres://u@db/x".parse().expect("a URL"));
        assert!(format!("{options:?}").contains("VerifyFull"), "{options:?}");
        let printed = format!("{c:?}");
        assert!(!printed.contains("k3y-pass") && !printed.contains("sa5l-pass"));
        // Secrets from the environment are text as written, never YAML.
        for password in ["123456", "~", "\"quoted\"", "null"] {
            let c = load_yaml(
                "kafka: {security_protocol: sasl_ssl, sasl: {mechanism: PLAIN, username: u}}",
                vec![("KAFKA_PG_INGEST__KAFKA__SASL__PASSWORD", password)],
            )
            .expect("loads");
            let got = c
                .kafka
                .sasl
                .password
                .as_ref()
                .map(|p| p.expose_secret().to_owned());
            assert_eq!(got.as_deref(), Some(password));
        }
        let _ = std::fs::remove_file(&pem);
    }
}
