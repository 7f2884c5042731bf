//! Error classes and backoff.
//!
//! Postgres errors are classified by SQLSTATE, never by message text: connection,
//! availability, serialization and deadlock failures are transient (retry the same
//! batch), data errors are the record's fault (isolate it into a dead letter), and the
//! rest (permissions, missing objects, bad configuration) stop the worker.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::RetryConfig;

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry the same work after a backoff.
    Transient,
    /// The data is at fault: dead-letter the offending record.
    Data,
    /// Stop with a clear message.
    Fatal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Data => "data",
            Self::Fatal => "fatal",
        }
    }
}

/// Classifies a SQLSTATE.
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    const TRANSIENT_CLASSES: [&str; 4] = ["08", "53", "57P", "58"];
    const TRANSIENT_CODES: [&str; 4] = ["40001", "40P01", "55P03", "57014"];
    if TRANSIENT_CODES.contains(&code) || TRANSIENT_CLASSES.iter().any(|c| code.starts_with(c)) {
        ErrorClass::Transient
    } else if code.starts_with("22") || code.starts_with("23") {
        ErrorClass::Data
    } else {
        ErrorClass::Fatal
    }
}

/// Classifies any sqlx error: I/O and pool exhaustion are transient, a database error
/// goes by its SQLSTATE, and everything else (configuration, TLS, decoding) is fatal.
/// A refused certificate arrives as an I/O error from the TLS handshake: it is fatal.
pub fn classify(err: &sqlx::Error) -> ErrorClass {
    match err {
        sqlx::Error::Database(db) => db
            .code()
            .map_or(ErrorClass::Fatal, |c| classify_sqlstate(&c)),
        sqlx::Error::Io(io) if is_tls_rejection(io) => ErrorClass::Fatal,
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::BeginFailed => ErrorClass::Transient,
        _ => ErrorClass::Fatal,
    }
}

/// Whether an I/O error is a TLS peer's certificate or protocol being refused: a setting
/// to change, never a network fault that a retry could outlast. A connection cut during
/// the handshake is a plain I/O error and stays transient. The `rustls` this downcasts
/// to must be the one sqlx uses (Cargo.lock holds one); were they to differ, a refused
/// certificate would be retried, which the verify-full host-name test catches.
fn is_tls_rejection(err: &std::io::Error) -> bool {
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

/// The SQLSTATE of an error, when Postgres gave one.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Delays of a capped exponential backoff with jitter; unbounded in count, so the caller
/// decides when to give up.
pub fn backoff(config: &RetryConfig) -> impl Iterator<Item = Duration> + use<> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(config.initial_delay_ms))
        .with_max_delay(Duration::from_millis(config.max_delay_ms))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The next wait of a retry loop bounded by `limit` since `started`: `None` once the
/// limit has passed, else the next backoff delay clipped to what remains, so the last
/// attempt falls at the limit rather than a whole delay before it.
pub fn next_delay(
    delays: &mut impl Iterator<Item = Duration>,
    started: Instant,
    limit: Duration,
) -> Option<Duration> {
    let remaining = limit.checked_sub(started.elapsed())?;
    Some(delays.next().unwrap_or(remaining).min(remaining))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified_by_class_and_code() {
        for code in [
            "08006", "08001", "57P01", "57P03", "53300", "40001", "40P01", "55P03", "57014",
        ] {
            assert_eq!(classify_sqlstate(code), ErrorClass::Transient, "{code}");
        }
        for code in ["22P02", "22021", "23514", "23502", "23505"] {
            assert_eq!(classify_sqlstate(code), ErrorClass::Data, "{code}");
        }
        for code in ["42501", "42P01", "42703", "28P01", "3D000"] {
            assert_eq!(classify_sqlstate(code), ErrorClass::Fatal, "{code}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let config = RetryConfig {
            initial_delay_ms: 100,
            max_delay_ms: 1000,
            claim_limit_secs: Some(1),
        };
        let delays: Vec<Duration> = backoff(&config).take(12).collect();
        assert_eq!(delays.len(), 12, "never runs out");
        // Jitter adds up to one more delay; the growth is still visible past the jitter.
        assert!(delays[0] < Duration::from_millis(250), "{delays:?}");
        assert!(delays[5] >= Duration::from_millis(1000), "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= Duration::from_millis(2000)),
            "{delays:?}"
        );
    }

    #[test]
    fn retries_stop_at_the_limit_with_the_last_wait_clipped() {
        let mut delays = [Duration::from_secs(10)].into_iter();
        let limit = Duration::from_secs(3);
        let wait = next_delay(&mut delays, Instant::now(), limit).expect("within the limit");
        assert!(wait <= limit && wait > Duration::from_secs(2), "{wait:?}");
        let long_ago = Instant::now() - Duration::from_secs(4);
        assert_eq!(next_delay(&mut delays, long_ago, limit), None);
    }
}
