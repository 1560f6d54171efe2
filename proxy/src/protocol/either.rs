//! One of two stream types behind one type: plain TCP or TLS for clients, TCP or a unix
//! socket for backends. An enum rather than a trait object: one match per read or write,
//! no allocation.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub enum Either<A, B> {
    Left(A),
    Right(B),
}

impl<A: AsyncRead + Unpin, B: AsyncRead + Unpin> AsyncRead for Either<A, B> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Either::Left(r) => Pin::new(r).poll_read(cx, buf),
            Either::Right(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl<A: AsyncWrite + Unpin, B: AsyncWrite + Unpin> AsyncWrite for Either<A, B> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Either::Left(w) => Pin::new(w).poll_write(cx, buf),
            Either::Right(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Either::Left(w) => Pin::new(w).poll_flush(cx),
            Either::Right(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Either::Left(w) => Pin::new(w).poll_shutdown(cx),
            Either::Right(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
