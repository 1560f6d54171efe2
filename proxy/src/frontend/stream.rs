//! The client connection, plain TCP or TLS, as read and write halves.
//!
//! A client that sends an SSLRequest (and the proxy has `[proxy] tls_cert`/`tls_key`) gets
//! its connection upgraded with rustls before the handshake response; everything after that
//! (login, commands, results) goes through the TLS halves. An enum rather than a trait
//! object: one match per read or write, no allocation.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub enum ClientRead {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

pub enum ClientWrite {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

impl AsyncRead for ClientRead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientRead::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ClientRead::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientWrite {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientWrite::Plain(w) => Pin::new(w).poll_write(cx, buf),
            ClientWrite::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientWrite::Plain(w) => Pin::new(w).poll_flush(cx),
            ClientWrite::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientWrite::Plain(w) => Pin::new(w).poll_shutdown(cx),
            ClientWrite::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

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
