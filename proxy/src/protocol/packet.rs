//! Packet framing: a 3-byte little-endian length, a 1-byte sequence id, then the payload.
//! Payloads of 16 MiB - 1 or more are split into several packets; a packet shorter than
//! that ends the logical payload.

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

pub const MAX_PACKET: usize = 0xff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("packet of {0} bytes exceeds max_allowed_packet ({1})")]
    TooLarge(usize, usize),
    #[error("packets out of order (expected sequence {expected}, got {got})")]
    OutOfOrder { expected: u8, got: u8 },
}

/// Reads packets from a buffered socket half.
pub struct PacketReader<R> {
    inner: BufReader<R>,
    first_seq: u8,
}

impl<R: AsyncRead + Unpin> PacketReader<R> {
    pub fn new(r: R) -> Self {
        Self { inner: BufReader::with_capacity(32 * 1024, r), first_seq: 0 }
    }

    async fn header(&mut self) -> Result<(usize, u8), PacketError> {
        let mut h = [0u8; 4];
        match self.inner.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(PacketError::Closed),
            Err(e) => return Err(e.into()),
        }
        Ok((u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize, h[3]))
    }

    /// Read one logical payload into `buf` (cleared first), joining split packets.
    /// Returns the sequence id of the last packet read (the first is `seq - (parts - 1)`;
    /// [`Self::first_seq`] has it).
    pub async fn read_payload(&mut self, buf: &mut Vec<u8>, max: usize) -> Result<u8, PacketError> {
        buf.clear();
        let mut expected: Option<u8> = None;
        loop {
            let (len, seq) = self.header().await?;
            match expected {
                Some(exp) if seq != exp => return Err(PacketError::OutOfOrder { expected: exp, got: seq }),
                Some(_) => {}
                None => self.first_seq = seq,
            }
            let total = buf.len() + len;
            if total > max {
                return Err(PacketError::TooLarge(total, max));
            }
            let start = buf.len();
            // Exactly what is needed: a 23 MiB statement read in two packets must not
            // leave a 32 MiB buffer behind (or copy 16 MiB twice on the way).
            buf.reserve_exact(len);
            buf.resize(total, 0);
            self.inner.read_exact(&mut buf[start..]).await?;
            if len < MAX_PACKET {
                return Ok(seq);
            }
            expected = Some(seq.wrapping_add(1));
        }
    }

    /// Append one physical packet (header included) to `out`, as it came off the wire.
    /// Returns (sequence id, payload length); the payload is `out[out.len()-len..]`.
    pub async fn read_raw_into(&mut self, out: &mut Vec<u8>) -> Result<(u8, usize), PacketError> {
        let (len, seq) = self.header().await?;
        let start = out.len();
        out.reserve(len + 4);
        out.extend_from_slice(&[len as u8, (len >> 8) as u8, (len >> 16) as u8, seq]);
        out.resize(start + 4 + len, 0);
        self.inner.read_exact(&mut out[start + 4..]).await?;
        Ok((seq, len))
    }

    /// Sequence id of the first packet of the last payload read.
    pub fn first_seq(&self) -> u8 {
        self.first_seq
    }

    pub fn get_ref(&self) -> &R {
        self.inner.get_ref()
    }

    /// Bytes already buffered but not yet consumed (a response should leave none).
    pub fn buffered(&self) -> usize {
        self.inner.buffer().len()
    }
}

/// Buffers outgoing packets and writes them with one syscall on flush.
pub struct PacketWriter<W> {
    inner: W,
    buf: Vec<u8>,
    capture: Option<Capture>,
    /// A peer that does not take what is written within this long is given up on.
    write_timeout: Option<std::time::Duration>,
}

/// A write bounded by `t` when there is one.
async fn timed<T>(t: Option<std::time::Duration>, f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    match t {
        None => f.await,
        Some(t) => tokio::time::timeout(t, f)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "the peer did not read what was sent within the write timeout"))),
    }
}

/// The packets of one payload: (header, chunk) pairs, split at 16 MiB - 1; a payload that
/// is empty or an exact multiple of 16 MiB - 1 ends with an empty packet.
fn frames(seq: u8, payload: &[u8]) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    let n = payload.len() / MAX_PACKET + 1;
    (0..n).map(move |i| {
        let chunk = payload.get(i * MAX_PACKET..((i + 1) * MAX_PACKET).min(payload.len())).unwrap_or(&[]);
        let len = chunk.len();
        ([len as u8, (len >> 8) as u8, (len >> 16) as u8, seq.wrapping_add(i as u8)], chunk)
    })
}

/// Copies of what is written to the client during one command (for the query cache).
struct Capture {
    data: Vec<u8>,
    /// Bytes already buffered when the capture started (not part of it).
    skip: usize,
    limit: usize,
    overflow: bool,
    /// Capture only: nothing reaches the peer (a cache refresh nobody is waiting for).
    discard: bool,
}

impl<W: AsyncWrite + Unpin> PacketWriter<W> {
    pub fn new(w: W) -> Self {
        Self { inner: w, buf: Vec::with_capacity(16 * 1024), capture: None, write_timeout: None }
    }

    /// Bound every flush and send (client_write_timeout_ms on client connections).
    pub fn set_write_timeout(&mut self, t: Option<std::time::Duration>) {
        self.write_timeout = t;
    }

    /// Queue a payload with sequence id `seq`, splitting at 16 MiB. Returns the next sequence id.
    pub fn push(&mut self, seq: u8, payload: &[u8]) -> u8 {
        let mut next = seq;
        for (head, chunk) in frames(seq, payload) {
            self.buf.extend_from_slice(&head);
            self.buf.extend_from_slice(chunk);
            next = head[3].wrapping_add(1);
        }
        next
    }

    /// Send a payload now. A large one (a bulk INSERT) is written straight from the
    /// caller's buffer, packet header by packet header, instead of being copied into the
    /// outgoing buffer first: forwarding a 20 MiB statement costs no second 20 MiB.
    pub async fn send(&mut self, seq: u8, payload: &[u8]) -> io::Result<u8> {
        timed(self.write_timeout, self.send_inner(seq, payload)).await
    }

    async fn send_inner(&mut self, seq: u8, payload: &[u8]) -> io::Result<u8> {
        if payload.len() < 64 * 1024 || self.capture.is_some() {
            let next = self.push(seq, payload);
            self.flush_inner().await?;
            return Ok(next);
        }
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf).await?;
            self.buf.clear();
        }
        let mut next = seq;
        for (head, chunk) in frames(seq, payload) {
            self.inner.write_all(&head).await?;
            self.inner.write_all(chunk).await?;
            next = head[3].wrapping_add(1);
        }
        self.inner.flush().await?;
        Ok(next)
    }

    /// Direct access to the outgoing buffer, for forwarding raw packets.
    pub fn buf_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Start copying everything written from now on, up to `limit` bytes; with `discard`,
    /// nothing is sent to the peer until [`Self::end_capture`].
    pub fn start_capture(&mut self, limit: usize, discard: bool) {
        self.capture = Some(Capture { data: Vec::new(), skip: self.buf.len(), limit, overflow: false, discard });
    }

    /// What was written since `start_capture` (None when it passed the limit).
    pub fn end_capture(&mut self) -> Option<Vec<u8>> {
        let mut c = self.capture.take()?;
        self.take_into(&mut c);
        if c.discard {
            self.buf.truncate(c.skip.min(self.buf.len()));
        }
        (!c.overflow).then_some(c.data)
    }

    fn take_into(&self, c: &mut Capture) {
        let new = self.buf.get(c.skip..).unwrap_or(&[]);
        if c.data.len() + new.len() > c.limit {
            c.overflow = true;
        } else if !c.overflow {
            c.data.extend_from_slice(new);
        }
        c.skip = self.buf.len();
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        timed(self.write_timeout, self.flush_inner()).await
    }

    async fn flush_inner(&mut self) -> io::Result<()> {
        if let Some(mut c) = self.capture.take() {
            let pre = c.skip;
            self.take_into(&mut c);
            if c.discard {
                self.buf.truncate(pre.min(self.buf.len()));
            }
            // The buffer is empty after this flush.
            c.skip = 0;
            self.capture = Some(c);
        }
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf).await?;
            self.buf.clear();
            if self.buf.capacity() > 1 << 20 {
                self.buf.shrink_to(64 * 1024);
            }
        }
        self.inner.flush().await
    }

    pub fn discard(&mut self) {
        self.buf.clear();
    }

    pub async fn shutdown(&mut self) {
        let _ = self.inner.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn split_and_join_large_payloads() {
        for size in [0usize, 10, MAX_PACKET - 1, MAX_PACKET, MAX_PACKET + 5, 2 * MAX_PACKET] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut w = PacketWriter::new(Vec::new());
            let next = w.push(3, &payload);
            let bytes = std::mem::take(w.buf_mut());
            let packets = size / MAX_PACKET + 1;
            assert_eq!(next, 3 + packets as u8, "size {size}");
            let mut r = PacketReader::new(&bytes[..]);
            let mut buf = Vec::new();
            let seq = r.read_payload(&mut buf, 64 << 20).await.unwrap();
            assert_eq!(seq, 3 + packets as u8 - 1);
            assert_eq!(buf, payload);
        }
    }

    #[tokio::test]
    async fn rejects_oversized_and_out_of_order() {
        let mut w = PacketWriter::new(Vec::new());
        w.push(0, &[1u8; 100]);
        let bytes = std::mem::take(w.buf_mut());
        let mut buf = Vec::new();
        let err = PacketReader::new(&bytes[..]).read_payload(&mut buf, 50).await.unwrap_err();
        assert!(matches!(err, PacketError::TooLarge(100, 50)));

        let mut bad = vec![0xff, 0xff, 0xff, 0];
        bad.extend(std::iter::repeat_n(0, MAX_PACKET));
        bad.extend_from_slice(&[1, 0, 0, 7, 9]);
        let err = PacketReader::new(&bad[..]).read_payload(&mut buf, 64 << 20).await.unwrap_err();
        assert!(matches!(err, PacketError::OutOfOrder { expected: 1, got: 7 }));

        let err = PacketReader::new(&[5u8, 0][..]).read_payload(&mut buf, 100).await.unwrap_err();
        assert!(matches!(err, PacketError::Closed));
    }
}
