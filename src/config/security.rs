//! The typed transport security keys (`kafka.security_protocol`, `kafka.ssl`,
//! `kafka.sasl`, `postgres.sslmode`): data only. `crate::security` checks them (and the
//! files they name) and applies them to the clients.

use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;
use sqlx::postgres::PgSslMode;

/// How the worker talks to the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
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
    pub(crate) fn librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    pub(crate) fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    pub(crate) fn sasl(self) -> bool {
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
    #[serde(default, deserialize_with = "super::secret_text")]
    pub key_password: Option<SecretString>,
    /// Check that a broker's certificate names the host it was reached at.
    pub verify_hostname: bool,
}

impl KafkaSsl {
    /// The files, each with its key and the librdkafka property it becomes.
    pub(crate) fn files(&self) -> [(&'static str, &'static str, &Option<PathBuf>); 3] {
        [
            (
                "kafka.ssl.ca_location",
                "ssl.ca.location",
                &self.ca_location,
            ),
            (
                "kafka.ssl.certificate_location",
                "ssl.certificate.location",
                &self.certificate_location,
            ),
            (
                "kafka.ssl.key_location",
                "ssl.key.location",
                &self.key_location,
            ),
        ]
    }
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
    pub(crate) fn librdkafka(self) -> &'static str {
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
    #[serde(default, deserialize_with = "super::secret_text")]
    pub password: Option<SecretString>,
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
