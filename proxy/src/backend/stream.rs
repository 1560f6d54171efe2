//! A backend socket: loopback or remote TCP (Left), or a unix socket for a server on the
//! same host (Right).

use crate::protocol::either::Either;
use std::io;
use tokio::net::{tcp, unix};

pub type BackendRead = Either<tcp::OwnedReadHalf, unix::OwnedReadHalf>;
pub type BackendWrite = Either<tcp::OwnedWriteHalf, unix::OwnedWriteHalf>;

impl BackendRead {
    /// Non-blocking read (no syscall when the socket is not known to be readable).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Either::Left(r) => r.try_read(buf),
            Either::Right(r) => r.try_read(buf),
        }
    }
}
