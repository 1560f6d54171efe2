//! The client connection, plain TCP or TLS, as read and write halves.
//!
//! A client that sends an SSLRequest (and the proxy has `[proxy] tls_cert`/`tls_key`) gets
//! its connection upgraded with rustls before the handshake response; everything after that
//! (login, commands, results) goes through the TLS halves.

use crate::protocol::either::Either;
use std::io;
use std::sync::Arc;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Plain TCP (Left) or TLS (Right).
pub type ClientRead = Either<OwnedReadHalf, ReadHalf<TlsStream<TcpStream>>>;
pub type ClientWrite = Either<OwnedWriteHalf, WriteHalf<TlsStream<TcpStream>>>;

/// The TLS server configuration from PEM files (certificate chain and private key).
pub fn acceptor(cert: &str, key: &str) -> Result<tokio_rustls::TlsAcceptor, String> {
    let certs = {
        let f = std::fs::File::open(cert).map_err(|e| format!("cannot read tls_cert {cert}: {e}"))?;
        rustls_pemfile::certs(&mut io::BufReader::new(f)).collect::<Result<Vec<_>, _>>().map_err(|e| format!("tls_cert {cert}: {e}"))?
    };
    if certs.is_empty() {
        return Err(format!("tls_cert {cert} holds no certificate"));
    }
    let key = {
        let f = std::fs::File::open(key).map_err(|e| format!("cannot read tls_key {key}: {e}"))?;
        rustls_pemfile::private_key(&mut io::BufReader::new(f)).map_err(|e| format!("tls_key {key}: {e}"))?.ok_or_else(|| format!("tls_key {key} holds no private key"))?
    };
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate/key: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
