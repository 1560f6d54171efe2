//! A backend socket: loopback or remote TCP, or a unix socket for a server on the same host.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{tcp, unix};

pub enum BackendRead {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
}

pub enum BackendWrite {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
}

impl BackendRead {
    /// Non-blocking read (no syscall when the socket is not known to be readable).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BackendRead::Tcp(r) => r.try_read(buf),
            BackendRead::Unix(r) => r.try_read(buf),
        }
    }
}

impl AsyncRead for BackendRead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendRead::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            BackendRead::Unix(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendWrite {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendWrite::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            BackendWrite::Unix(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendWrite::Tcp(w) => Pin::new(w).poll_flush(cx),
            BackendWrite::Unix(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendWrite::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            BackendWrite::Unix(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
