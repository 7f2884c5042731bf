//! Transport security: TLS and SASL to Kafka, TLS to Postgres.
//!
//! The typed keys here are the only way to set these librdkafka and libpq properties:
//! `kafka.options` refuses them, so a password or key passphrase is always held as a
//! secret and every file it names is checked when the configuration loads.

use std::path::{Path, PathBuf};

use rdkafka::ClientConfig;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::config::{ConfigError, KafkaConfig, PostgresConfig, invalid};

/// How the worker talks to the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[default]
    #[serde(alias = "PLAINTEXT")]
    #[serde(rename = "plaintext")]
    Plaintext,
    /// TLS, optionally with a client certificate (mutual TLS).
    #[serde(alias = "SSL")]
    #[serde(rename = "ssl")]
    Ssl,
    /// SASL over a plain connection: credentials cross the network as the mechanism
    /// sends them (PLAIN sends the password as is).
    #[serde(alias = "SASL_PLAINTEXT")]
    #[serde(rename = "sasl_plaintext")]
    SaslPlaintext,
    /// SASL over TLS.
    #[serde(alias = "SASL_SSL")]
    #[serde(rename = "sasl_ssl")]
    SaslSsl,
}

impl SecurityProtocol {
    fn librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// TLS to the brokers (`kafka.ssl`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSsl {
    /// PEM file of the CA(s) that signed the brokers' certificates; the system's trust
    /// store when unset.
    pub ca_location: Option<PathBuf>,
    /// PEM client certificate, for brokers that require mutual TLS.
    pub certificate_location: Option<PathBuf>,
    /// PEM private key of `certificate_location`.
    pub key_location: Option<PathBuf>,
    /// Passphrase of an encrypted `key_location`.
    pub key_password: Option<SecretString>,
    /// Check that a broker's certificate names the host it was reached at.
    pub verify_hostname: bool,
}

/// A SASL mechanism librdkafka implements itself (no Cyrus SASL library needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    fn librdkafka(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// SASL authentication to the brokers (`kafka.sasl`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    pub mechanism: Option<SaslMechanism>,
    pub username: Option<String>,
    /// Read from `KAFKA_PG_INGEST__KAFKA__SASL__PASSWORD(_FILE)` in deployments.
    pub password: Option<SecretString>,
}

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

/// Checks the Kafka security keys against each other and the files they name.
pub fn validate_kafka(kafka: &KafkaConfig) -> Result<(), ConfigError> {
    let (protocol, ssl, sasl) = (kafka.security_protocol, &kafka.ssl, &kafka.sasl);
    for (option, key) in TYPED_KAFKA_OPTIONS {
        if kafka.options.contains_key(option) {
            return Err(invalid(
                &format!("kafka.options.{option}"),
                format!(
                    "is set by `{key}`: move it there (secrets and files are checked and masked only there)"
                ),
            ));
        }
    }
    let files = [
        ("kafka.ssl.ca_location", &ssl.ca_location),
        ("kafka.ssl.certificate_location", &ssl.certificate_location),
        ("kafka.ssl.key_location", &ssl.key_location),
    ];
    let uses_tls = files.iter().any(|(_, f)| f.is_some()) || ssl.key_password.is_some();
    if uses_tls && !protocol.tls() {
        return Err(invalid(
            "kafka.security_protocol",
            format!(
                "is {}, but kafka.ssl names files: use ssl or sasl_ssl, or remove the kafka.ssl keys",
                protocol.librdkafka()
            ),
        ));
    }
    for (key, file) in files {
        if let Some(path) = file {
            readable(key, path)?;
        }
    }
    if ssl.certificate_location.is_some() != ssl.key_location.is_some() {
        return Err(invalid(
            "kafka.ssl.key_location",
            "and kafka.ssl.certificate_location go together: a client certificate needs its key",
        ));
    }
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
        let paths = [
            ("ssl.ca.location", &ssl.ca_location),
            ("ssl.certificate.location", &ssl.certificate_location),
            ("ssl.key.location", &ssl.key_location),
        ];
        for (property, path) in paths {
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

/// libpq's `sslmode`, for `postgres.sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl From<SslMode> for PgSslMode {
    fn from(mode: SslMode) -> Self {
        match mode {
            SslMode::Disable => Self::Disable,
            SslMode::Allow => Self::Allow,
            SslMode::Prefer => Self::Prefer,
            SslMode::Require => Self::Require,
            SslMode::VerifyCa => Self::VerifyCa,
            SslMode::VerifyFull => Self::VerifyFull,
        }
    }
}

/// Checks the Postgres TLS keys and the files they name.
pub fn validate_postgres(tls: &PostgresConfig) -> Result<(), ConfigError> {
    let files = [
        ("postgres.sslrootcert", &tls.sslrootcert),
        ("postgres.sslcert", &tls.sslcert),
        ("postgres.sslkey", &tls.sslkey),
    ];
    for (key, file) in files {
        if let Some(path) = file {
            readable(key, path)?;
        }
    }
    if tls.sslcert.is_some() != tls.sslkey.is_some() {
        return Err(invalid(
            "postgres.sslkey",
            "and postgres.sslcert go together: a client certificate needs its key",
        ));
    }
    if tls.sslmode == Some(SslMode::Disable) && files.iter().any(|(_, f)| f.is_some()) {
        return Err(invalid(
            "postgres.sslmode",
            "is disable, but TLS files are set: use verify-full, or remove postgres.sslrootcert/sslcert/sslkey",
        ));
    }
    Ok(())
}

/// Applies the Postgres TLS keys over what the URL said.
pub fn apply_postgres(tls: &PostgresConfig, mut options: PgConnectOptions) -> PgConnectOptions {
    if let Some(mode) = tls.sslmode {
        options = options.ssl_mode(mode.into());
    }
    if let Some(path) = &tls.sslrootcert {
        options = options.ssl_root_cert(path);
    }
    if let Some(path) = &tls.sslcert {
        options = options.ssl_client_cert(path);
    }
    if let Some(path) = &tls.sslkey {
        options = options.ssl_client_key(path);
    }
    options
}

/// Whether an I/O error is a TLS peer's certificate or protocol being refused: a setting
/// to change, never a network fault that a retry could outlast. A connection cut during
/// the handshake is a plain I/O error and stays transient.
pub fn is_tls_rejection(err: &std::io::Error) -> bool {
    use rustls::{AlertDescription as Alert, Error as Tls};
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Tls>()) else {
        return false;
    };
    match tls {
        Tls::InvalidCertificate(_)
        | Tls::NoCertificatesPresented
        | Tls::UnsupportedNameType
        | Tls::PeerIncompatible(_) => true,
        Tls::AlertReceived(alert) => matches!(
            alert,
            Alert::BadCertificate
                | Alert::UnsupportedCertificate
                | Alert::CertificateRevoked
                | Alert::CertificateExpired
                | Alert::CertificateUnknown
                | Alert::CertificateRequired
                | Alert::UnknownCA
                | Alert::AccessDenied
                | Alert::HandshakeFailure
                | Alert::ProtocolVersion
        ),
        _ => false,
    }
}

fn readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        invalid(
            key,
            format!("names {}, which cannot be read: {e}", path.display()),
        )
    })
}
