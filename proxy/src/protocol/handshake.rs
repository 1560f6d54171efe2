//! The connection phase: the server greeting (HandshakeV10), the client's
//! HandshakeResponse41, and AuthSwitchRequest. Used in both directions: the proxy is the
//! server for clients and the client for backends.

use super::caps;
use super::codec::{put_lenenc_str, read_lenenc_str, read_nul_str};

/// Build the greeting the proxy sends to a new client (`extra_caps`: CLIENT_SSL when TLS is
/// configured).
pub fn greeting(server_version: &str, conn_id: u32, scramble: &[u8; 20], plugin: &str, collation: u8, extra_caps: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(128);
    p.push(10);
    p.extend_from_slice(server_version.as_bytes());
    p.push(0);
    p.extend_from_slice(&conn_id.to_le_bytes());
    p.extend_from_slice(&scramble[..8]);
    p.push(0);
    let c = caps::PROXY_SERVER | extra_caps;
    p.extend_from_slice(&(c as u16).to_le_bytes());
    p.push(collation);
    p.extend_from_slice(&super::status::AUTOCOMMIT.to_le_bytes());
    p.extend_from_slice(&((c >> 16) as u16).to_le_bytes());
    p.push(21);
    p.extend_from_slice(&[0u8; 10]);
    p.extend_from_slice(&scramble[8..]);
    p.push(0);
    p.extend_from_slice(plugin.as_bytes());
    p.push(0);
    p
}

/// A server greeting as seen by the proxy when it connects to a backend.
#[derive(Debug)]
pub struct ServerGreeting {
    pub server_version: String,
    pub connection_id: u32,
    pub capabilities: u32,
    pub scramble: Vec<u8>,
    pub plugin: String,
}

pub fn parse_greeting(p: &[u8]) -> Option<ServerGreeting> {
    if p.first() != Some(&10) {
        return None;
    }
    let mut pos = 1;
    let server_version = String::from_utf8_lossy(read_nul_str(p, &mut pos)).into_owned();
    let connection_id = u32::from_le_bytes(p.get(pos..pos + 4)?.try_into().ok()?);
    pos += 4;
    let mut scramble = p.get(pos..pos + 8)?.to_vec();
    pos += 9;
    let cap_lo = u16::from_le_bytes(p.get(pos..pos + 2)?.try_into().ok()?) as u32;
    pos += 2 + 1 + 2; // capabilities low, charset, status
    let cap_hi = u16::from_le_bytes(p.get(pos..pos + 2)?.try_into().ok()?) as u32;
    pos += 2;
    let auth_len = *p.get(pos)? as usize;
    pos += 1 + 10;
    let capabilities = cap_lo | (cap_hi << 16);
    let part2 = auth_len.saturating_sub(8).max(13);
    let rest = p.get(pos..(pos + part2).min(p.len()))?;
    // part 2 is NUL-terminated
    let rest = rest.split(|b| *b == 0).next().unwrap_or(rest);
    scramble.extend_from_slice(rest);
    pos += part2;
    let plugin = String::from_utf8_lossy(read_nul_str(p, &mut pos)).into_owned();
    Some(ServerGreeting { server_version, connection_id, capabilities, scramble, plugin })
}

/// The client's HandshakeResponse41.
#[derive(Debug, Clone)]
pub struct HandshakeResponse {
    pub capabilities: u32,
    pub max_packet: u32,
    pub collation: u8,
    pub username: String,
    pub auth_response: Vec<u8>,
    pub database: Option<String>,
    pub plugin: Option<String>,
}

/// Parse a HandshakeResponse41. Returns None for malformed input or a pre-4.1 client.
pub fn parse_handshake_response(p: &[u8]) -> Option<HandshakeResponse> {
    let capabilities = u32::from_le_bytes(p.get(0..4)?.try_into().ok()?);
    if capabilities & caps::PROTOCOL_41 == 0 {
        return None;
    }
    let max_packet = u32::from_le_bytes(p.get(4..8)?.try_into().ok()?);
    let collation = *p.get(8)?;
    let mut pos = 32;
    if p.len() < pos {
        return None;
    }
    let username = String::from_utf8_lossy(read_nul_str(p, &mut pos)).into_owned();
    let auth_response = if capabilities & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        read_lenenc_str(p, &mut pos)?.to_vec()
    } else {
        read_auth_response(p, &mut pos, capabilities)?
    };
    let database = if capabilities & caps::CONNECT_WITH_DB != 0 && pos < p.len() {
        let db = read_nul_str(p, &mut pos);
        (!db.is_empty()).then(|| String::from_utf8_lossy(db).into_owned())
    } else {
        None
    };
    let plugin = if capabilities & caps::PLUGIN_AUTH != 0 && pos < p.len() {
        Some(String::from_utf8_lossy(read_nul_str(p, &mut pos)).into_owned())
    } else {
        None
    };
    Some(HandshakeResponse { capabilities, max_packet, collation, username, auth_response, database, plugin })
}

/// An auth response prefixed by a 1-byte length (SECURE_CONNECTION), else NUL-terminated.
fn read_auth_response(p: &[u8], pos: &mut usize, capabilities: u32) -> Option<Vec<u8>> {
    if capabilities & caps::SECURE_CONNECTION != 0 {
        let len = *p.get(*pos)? as usize;
        let v = p.get(*pos + 1..*pos + 1 + len)?.to_vec();
        *pos += 1 + len;
        Some(v)
    } else {
        Some(read_nul_str(p, pos).to_vec())
    }
}

/// Build the HandshakeResponse41 the proxy sends to a backend.
pub fn handshake_response(
    capabilities: u32,
    collation: u8,
    username: &str,
    auth: &[u8],
    database: Option<&str>,
    plugin: &str,
) -> Vec<u8> {
    let mut c = capabilities;
    if database.is_some() {
        c |= caps::CONNECT_WITH_DB;
    }
    let mut p = Vec::with_capacity(96);
    p.extend_from_slice(&c.to_le_bytes());
    p.extend_from_slice(&(64u32 << 20).to_le_bytes());
    p.push(collation);
    p.extend_from_slice(&[0u8; 23]);
    p.extend_from_slice(username.as_bytes());
    p.push(0);
    put_lenenc_str(&mut p, auth);
    if let Some(db) = database {
        p.extend_from_slice(db.as_bytes());
        p.push(0);
    }
    p.extend_from_slice(plugin.as_bytes());
    p.push(0);
    p
}

/// AuthSwitchRequest: 0xfe, plugin name, NUL, plugin data (scramble + NUL).
pub fn auth_switch_request(plugin: &str, scramble: &[u8; 20]) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + plugin.len() + 21);
    p.push(0xfe);
    p.extend_from_slice(plugin.as_bytes());
    p.push(0);
    p.extend_from_slice(scramble);
    p.push(0);
    p
}

/// Parse an AuthSwitchRequest sent by a backend: (plugin, scramble).
pub fn parse_auth_switch(p: &[u8]) -> Option<(String, Vec<u8>)> {
    if p.first() != Some(&0xfe) {
        return None;
    }
    let mut pos = 1;
    let plugin = String::from_utf8_lossy(read_nul_str(p, &mut pos)).into_owned();
    let data = p.get(pos..).unwrap_or(&[]);
    let data = data.strip_suffix(&[0]).unwrap_or(data).to_vec();
    Some((plugin, data))
}

/// COM_CHANGE_USER payload as the client sends it.
#[derive(Debug)]
pub struct ChangeUser {
    pub username: String,
    pub auth_response: Vec<u8>,
    pub database: Option<String>,
    pub collation: Option<u8>,
    pub plugin: Option<String>,
}

pub fn parse_change_user(p: &[u8], client_caps: u32) -> Option<ChangeUser> {
    let mut pos = 1;
    let username = String::from_utf8_lossy(read_nul_str(p, &mut pos)).into_owned();
    let auth_response = read_auth_response(p, &mut pos, client_caps)?;
    let db = read_nul_str(p, &mut pos);
    let database = (!db.is_empty()).then(|| String::from_utf8_lossy(db).into_owned());
    let collation = p.get(pos..pos + 2).map(|b| b[0]);
    if collation.is_some() {
        pos += 2;
    }
    let plugin = if client_caps & caps::PLUGIN_AUTH != 0 && pos < p.len() {
        Some(String::from_utf8_lossy(read_nul_str(p, &mut pos)).into_owned())
    } else {
        None
    };
    Some(ChangeUser { username, auth_response, database, collation, plugin })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_roundtrip() {
        let s = crate::protocol::auth::new_scramble();
        let g = parse_greeting(&greeting("5.5.5-10.11.6-MariaDB", 42, &s, "mysql_native_password", 45, 0)).unwrap();
        assert_eq!(g.connection_id, 42);
        assert_eq!(g.scramble, s.to_vec());
        assert_eq!(g.plugin, "mysql_native_password");
        assert_eq!(g.capabilities, caps::PROXY_SERVER);
    }

    #[test]
    fn handshake_response_roundtrip() {
        let p = handshake_response(caps::PROXY_BACKEND, 45, "app", &[1, 2, 3], Some("sbtest"), "mysql_native_password");
        let r = parse_handshake_response(&p).unwrap();
        assert_eq!(r.username, "app");
        assert_eq!(r.auth_response, vec![1, 2, 3]);
        assert_eq!(r.database.as_deref(), Some("sbtest"));
        assert_eq!(r.plugin.as_deref(), Some("mysql_native_password"));
        // Truncated and garbage input never panics.
        for n in 0..p.len() {
            let _ = parse_handshake_response(&p[..n]);
        }
        assert!(parse_handshake_response(&[0xff; 3]).is_none());
    }
}
