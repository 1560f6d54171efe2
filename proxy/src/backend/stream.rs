//! A backend socket: TCP (Left), or (Right) a unix socket for a server on the same host
//! (Left) or TCP with TLS (`use_ssl`, Right). Plain TCP, the common case, is one match
//! away; the TLS halves share their stream through tokio's split.

use crate::protocol::either::Either;
use std::io;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{tcp, unix, TcpStream};

pub type TlsConn = tokio_rustls::client::TlsStream<TcpStream>;
pub type BackendRead = Either<tcp::OwnedReadHalf, Either<unix::OwnedReadHalf, ReadHalf<TlsConn>>>;
pub type BackendWrite = Either<tcp::OwnedWriteHalf, Either<unix::OwnedWriteHalf, WriteHalf<TlsConn>>>;

impl BackendRead {
    /// Non-blocking read (no syscall when the socket is not known to be readable). A TLS
    /// half cannot be read past rustls: WouldBlock, and the connection checks its socket
    /// with a peek instead (`BackendConn::looks_alive`).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Either::Left(r) => r.try_read(buf),
            Either::Right(Either::Left(r)) => r.try_read(buf),
            Either::Right(Either::Right(_)) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}
