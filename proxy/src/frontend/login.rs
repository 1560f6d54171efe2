//! The client's login: greeting, handshake response, optional auth switch, verification
//! against the proxy's user table (hashes only), and the final OK or error 1045.

use crate::protocol::packet::{PacketError, PacketReader, PacketWriter};
use crate::protocol::{auth, caps, codec, errcode, handshake};
use crate::runtime::User;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

pub struct Login {
    pub user: Arc<User>,
    pub capabilities: u32,
    pub collation: u8,
    pub database: Option<String>,
    pub scramble: [u8; 20],
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Packet(#[from] PacketError),
    #[error("client sent a malformed handshake response")]
    Malformed,
    #[error("access denied for user '{0}'")]
    Denied(String),
    #[error("client requires TLS, which this listener does not offer")]
    TlsRequested,
}

/// Greet and authenticate one client on a plain connection (the admin interface). On
/// failure the error has already been sent to the client.
pub async fn login<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut PacketReader<R>,
    wr: &mut PacketWriter<W>,
    server_version: &str,
    users: &(dyn Fn(&str) -> Option<Arc<User>> + Sync),
    conn_id: u32,
    peer_ip: &str,
) -> Result<Login, LoginError> {
    let scramble = auth::new_scramble();
    wr.push(0, &handshake::greeting(server_version, conn_id, &scramble, auth::NATIVE, 45, 0));
    wr.flush().await.map_err(PacketError::from)?;
    let mut buf = Vec::new();
    let seq = rd.read_payload(&mut buf, 1 << 20).await?;
    if is_ssl_request(&buf) {
        send_err(wr, seq.wrapping_add(1), 1043, "08S01", "TLS was requested but this Breakwater listener has no TLS configured").await;
        return Err(LoginError::TlsRequested);
    }
    authenticate(rd, wr, buf, seq, scramble, users, peer_ip).await
}

/// An SSLRequest: the 32-byte head of a handshake response with CLIENT_SSL set.
pub fn is_ssl_request(p: &[u8]) -> bool {
    p.len() == 32 && u32::from_le_bytes([p[0], p[1], p[2], p[3]]) & caps::SSL != 0
}

/// Check a handshake response (`buf`, read with sequence id `seq`) against the users;
/// switch the client's auth plugin when needed; send OK or the error.
pub async fn authenticate<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut PacketReader<R>,
    wr: &mut PacketWriter<W>,
    mut buf: Vec<u8>,
    seq: u8,
    scramble: [u8; 20],
    users: &(dyn Fn(&str) -> Option<Arc<User>> + Sync),
    peer_ip: &str,
) -> Result<Login, LoginError> {
    let mut next = seq.wrapping_add(1);
    let Some(resp) = handshake::parse_handshake_response(&buf) else {
        send_err(wr, next, 1043, "08S01", "Bad handshake").await;
        return Err(LoginError::Malformed);
    };
    let denied = |name: &str, with_pw: bool| {
        format!(
            "Access denied for user '{name}'@'{peer_ip}' (using password: {})",
            if with_pw { "YES" } else { "NO" }
        )
    };
    let Some(user) = users(&resp.username) else {
        send_err(wr, next, errcode::ACCESS_DENIED, "28000", &denied(&resp.username, !resp.auth_response.is_empty())).await;
        return Err(LoginError::Denied(resp.username));
    };

    // Verify with the user's preferred plugin; switch the client to it when it used another.
    let client_plugin = resp.plugin.clone().unwrap_or_else(|| auth::NATIVE.to_string());
    let target = if user.can_verify(user.plugin) { user.plugin } else if user.can_verify(auth::CACHING_SHA2) { auth::CACHING_SHA2 } else { auth::NATIVE };
    let mut token = resp.auth_response.clone();
    // An empty first answer means the client wants the exchange restarted for its plugin
    // (libmariadb's caching_sha2_password does this when the greeting named another plugin).
    if client_plugin != target || token.is_empty() {
        if resp.capabilities & caps::PLUGIN_AUTH == 0 {
            send_err(wr, next, errcode::ACCESS_DENIED, "28000", &format!("Client does not support authentication plugin {target}")).await;
            return Err(LoginError::Denied(resp.username));
        }
        wr.push(next, &handshake::auth_switch_request(target, &scramble));
        wr.flush().await.map_err(PacketError::from)?;
        let seq = rd.read_payload(&mut buf, 1 << 16).await?;
        next = seq.wrapping_add(1);
        token = buf.clone();
    }
    if !user.verify(target, &token, &scramble) {
        send_err(wr, next, errcode::ACCESS_DENIED, "28000", &denied(&resp.username, !token.is_empty())).await;
        return Err(LoginError::Denied(resp.username));
    }
    if target == auth::CACHING_SHA2 {
        // fast_auth_success: the proxy verified the scramble from its stored hash.
        next = wr.push(next, &[0x01, 0x03]);
    }
    wr.push(next, &codec::ok_packet(0, 0, crate::protocol::status::AUTOCOMMIT, 0));
    wr.flush().await.map_err(PacketError::from)?;
    let database = resp.database.or_else(|| user.default_schema.clone());
    Ok(Login { user, capabilities: resp.capabilities, collation: resp.collation, database, scramble })
}

pub async fn send_err<W: AsyncWrite + Unpin>(wr: &mut PacketWriter<W>, seq: u8, code: u16, state: &str, msg: &str) {
    wr.push(seq, &codec::err_packet(code, state, msg));
    let _ = wr.flush().await;
}

/// Greeting, optional TLS upgrade (SSLRequest), handshake response and authentication.
/// The first packet is read with exact reads on the socket, so the TLS ClientHello that
/// follows an SSLRequest is left for rustls.
use super::stream::{ClientRead, ClientWrite};
use crate::protocol::either::Either;
use crate::runtime::Runtime;
use tokio::net::TcpStream;

pub(super) async fn handshake_and_login(
    mut stream: TcpStream,
    rt: &Runtime,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conn_id: u32,
    peer_ip: &str,
) -> Result<(PacketReader<ClientRead>, PacketWriter<ClientWrite>, Login), LoginError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let scramble = crate::protocol::auth::new_scramble();
    let extra = if tls.is_some() { caps::SSL } else { 0 };
    let greeting = handshake::greeting(&rt.cfg.proxy.server_version, conn_id, &scramble, crate::protocol::auth::NATIVE, 45, extra);
    let mut out = Vec::with_capacity(greeting.len() + 4);
    out.extend_from_slice(&(greeting.len() as u32).to_le_bytes()[..3]);
    out.push(0);
    out.extend_from_slice(&greeting);
    stream.write_all(&out).await.map_err(PacketError::from)?;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await.map_err(PacketError::from)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
    if len > 1 << 20 {
        return Err(LoginError::Malformed);
    }
    let mut first = vec![0u8; len];
    stream.read_exact(&mut first).await.map_err(PacketError::from)?;
    let users = |n: &str| rt.user(n);
    if is_ssl_request(&first) {
        let Some(acceptor) = tls else {
            let (_, w) = stream.into_split();
            let mut wr: PacketWriter<ClientWrite> = PacketWriter::new(Either::Left(w));
            send_err(&mut wr, head[3].wrapping_add(1), 1043, "08S01", "TLS was requested but this Breakwater listener has no TLS configured").await;
            return Err(LoginError::TlsRequested);
        };
        let tls_stream = acceptor.accept(stream).await.map_err(PacketError::from)?;
        let (r, w) = tokio::io::split(tls_stream);
        let mut rd = PacketReader::new(Either::Right(r));
        let mut wr = PacketWriter::new(Either::Right(w));
        let mut buf = Vec::new();
        let seq = rd.read_payload(&mut buf, 1 << 20).await?;
        let l = authenticate(&mut rd, &mut wr, buf, seq, scramble, &users, peer_ip).await?;
        return Ok((rd, wr, l));
    }
    let (r, w) = stream.into_split();
    let mut rd = PacketReader::new(Either::Left(r));
    let mut wr = PacketWriter::new(Either::Left(w));
    let l = authenticate(&mut rd, &mut wr, first, head[3], scramble, &users, peer_ip).await?;
    Ok((rd, wr, l))
}
