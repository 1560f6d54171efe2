//! A minimal HTTP/1.1 responder: one request per connection, bounded header size and time.
//!
//! Locked down: every request but the agents' OTLP must carry a Host header that is an IP
//! literal, localhost or one of `[admin] allowed_hosts` (a page on another name reaching
//! this address through DNS rebinding is refused); state-changing requests and those whose
//! answers carry secrets (`/api/access`) need `Authorization: Bearer <[admin] token>` (401
//! without it) and, when a browser sends an Origin, the same origin (403 for a cross-site
//! POST). `/metrics`, `/healthz`, `/readyz`, the topology page and its GETs stay open.

use crate::failover::{Request, Shared};
use crate::runtime::Proxy;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::warn;

const PAGE: &str = include_str!("topology.html");

pub struct Admin {
    pub proxy: Arc<Proxy>,
    pub failover: Option<Arc<Shared>>,
    /// The bearer token state-changing requests must carry.
    pub token: String,
}

/// The API's token: the configured one (`[admin] token`, `--admin-token`,
/// BREAKWATER_ADMIN_TOKEN), else one made now and written to the token file (0600, its
/// directory made 0700), where the CLI reads it. Warns when the config file holding a token
/// can be read by others.
pub fn token(cfg: &crate::config::AdminConfig, config_file: Option<&std::path::Path>) -> Result<String, String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if !cfg.token.is_empty() {
        if let Some(f) = config_file {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            let mode = std::fs::metadata(f).map(|m| m.permissions().mode()).unwrap_or(0);
            if text.contains(&cfg.token) && mode & 0o077 != 0 {
                warn!(file = %f.display(), mode = format!("{:o}", mode & 0o777), "the config file holds the admin token and others can read it: chmod 600");
            }
        }
        return Ok(cfg.token.clone());
    }
    use rand::Rng;
    let t: String = rand::thread_rng().sample_iter(&rand::distributions::Alphanumeric).take(40).map(char::from).collect();
    let path = cfg.token_path();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    // A new file each start (no one else's file or link is written through).
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    use std::io::Write;
    f.write_all(format!("{t}\n").as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::info!(file = %path.display(), "admin API token made for this run (the CLI reads it from there; set [admin] token to choose one)");
    Ok(t)
}

/// The request's headers we look at (names lowercased).
struct Headers<'a> {
    host: Option<&'a str>,
    origin: Option<&'a str>,
    authorization: Option<&'a str>,
}

fn headers(text: &str) -> Headers<'_> {
    let mut h = Headers { host: None, origin: None, authorization: None };
    for line in text.split("\r\n").skip(1).take_while(|l| !l.is_empty()) {
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "host" => h.host = Some(v),
            "origin" => h.origin = Some(v),
            "authorization" => h.authorization = Some(v),
            _ => {}
        }
    }
    h
}

/// An IP literal, localhost, or a name the operator allowed.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map(|(h, _)| h).unwrap_or(rest)
    } else {
        host.rsplit_once(':').filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit())).map(|(h, _)| h).unwrap_or(host)
    };
    name.parse::<std::net::IpAddr>().is_ok() || name.eq_ignore_ascii_case("localhost") || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// The token of an `Authorization: Bearer <token>` header value.
pub(crate) fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization.and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer "))).map(str::trim)
}

/// Byte-wise comparison in time independent of where they differ.
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request is refused before it is routed: (status, message).
fn refuse(admin: &Admin, method: &str, path: &str, h: &Headers<'_>) -> Option<(u16, String)> {
    let allowed = &admin.proxy.rt.cfg.admin.allowed_hosts;
    let host = h.host.unwrap_or("");
    if !host_allowed(host, allowed) {
        return Some((403, format!("Host {host:?} is not an address of this proxy (add it to [admin] allowed_hosts)")));
    }
    let guarded = !matches!(method, "GET" | "HEAD") || path.starts_with("/api/access");
    if !guarded {
        return None;
    }
    if let Some(o) = h.origin {
        let same = o.strip_prefix("http://").or_else(|| o.strip_prefix("https://")).is_some_and(|rest| rest.eq_ignore_ascii_case(host));
        if !same {
            return Some((403, format!("cross-origin request from {o} refused")));
        }
    }
    match bearer(h.authorization) {
        Some(t) if same_secret(t.as_bytes(), admin.token.as_bytes()) => None,
        Some(_) => Some((401, "wrong admin token".into())),
        None => Some((401, "this request needs the admin token: Authorization: Bearer <token> ([admin] token, BREAKWATER_ADMIN_TOKEN, or the token file the proxy wrote)".into())),
    }
}

pub async fn run(listener: TcpListener, admin: Arc<Admin>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let admin = admin.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, &admin).await {
                        warn!(error = %e, "admin request failed");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub(super) struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, v: &impl serde::Serialize) -> Self {
        let body = serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        Self { status, content_type: "application/json", body: body.into_bytes() }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self { status, content_type: "text/plain; charset=utf-8", body: body.into().into_bytes() }
    }
}

async fn serve(mut stream: TcpStream, admin: &Admin) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if buf.len() > 16 * 1024 {
                return Ok(false);
            }
        }
    })
    .await;
    let resp = match head {
        Ok(Ok(true)) => {
            let text = String::from_utf8_lossy(&buf).into_owned();
            let mut parts = text.lines().next().unwrap_or("").split_whitespace();
            let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let peer = stream.peer_addr().map(|a| a.ip()).unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
            let local_peer = peer.is_loopback();
            if method == "POST" && target.split('?').next() == Some("/v1/metrics") {
                // OTLP/HTTP from the agents (on the database hosts: any peer).
                let body_start = buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(buf.len(), |i| i + 4);
                let already = buf[body_start..].to_vec();
                super::otlp_receiver::http(admin, &mut stream, &text, already, peer).await
            } else if method != "GET" && !local_peer {
                // Commands (failover, access grants) only from this host; reads may be remote
                // (a Prometheus server scraping /metrics).
                Response::json(403, &serde_json::json!({"error": "commands are accepted from loopback clients only"}))
            } else if let Some((status, why)) = refuse(admin, method, target.split('?').next().unwrap_or(""), &headers(&text)) {
                warn!(method, path = target.split('?').next().unwrap_or(""), status, reason = %why, "admin request refused");
                Response::json(status, &serde_json::json!({"error": why}))
            } else {
                route(admin, method, target).await
            }
        }
        Ok(Ok(false)) => Response::text(400, "bad request\n"),
        Ok(Err(e)) => return Err(e),
        Err(_) => Response::text(408, "request timeout\n"),
    };
    let reason = match resp.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let challenge = if resp.status == 401 { "WWW-Authenticate: Bearer realm=\"breakwater-admin\"\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\n{challenge}Content-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        resp.status,
        resp.content_type,
        resp.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&resp.body).await?;
    stream.shutdown().await
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(h * 16 + l);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name && !v.is_empty()).then(|| percent_decode(v))
    })
}

async fn route(admin: &Admin, method: &str, target: &str) -> Response {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (method, path) {
        ("GET", "/healthz") => Response::text(200, "ok\n"),
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: super::metrics::render(&admin.proxy, admin.failover.as_deref()).into_bytes(),
        },
        ("GET", "/readyz") => {
            // Ready when every hostgroup has an ONLINE server or an open gate to wait on.
            let routing = admin.proxy.runtime().routing();
            let down: Vec<u32> = routing.hostgroups.values().filter(|h| !h.any_online()).map(|h| h.id).collect();
            if down.is_empty() {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, format!("no ONLINE server in hostgroups {down:?}\n"))
            }
        }
        ("GET", "/api/cache") => Response::json(200, &admin.proxy.cache.stats()),
        ("GET", "/api/digests") => Response::json(200, &admin.proxy.digests.snapshot()),
        ("POST", "/api/digests/reset") => {
            admin.proxy.digests.reset();
            Response::json(200, &serde_json::json!({"ok": true}))
        }
        ("GET", "/" | "/topology") => Response { status: 200, content_type: "text/html; charset=utf-8", body: PAGE.as_bytes().to_vec() },
        ("GET", "/api/backends") => Response::json(200, &crate::adaptive::view::backends(&admin.proxy)),
        (_, p) if p.starts_with("/api/access") => access(admin, method, p, query).await,
        (_, p) if p.starts_with("/api/failover") => {
            let Some(f) = &admin.failover else {
                return Response::json(503, &serde_json::json!({"error": "the failover controller is disabled ([failover] enabled = false)"}));
            };
            let req = match (method, p) {
                ("GET", "/api/failover") => return Response::json(200, &f.view()),
                ("GET", "/api/failover/events") => return Response::json(200, &f.view().events),
                ("POST", "/api/failover/switchover") => Request::Switchover { to: param(query, "to") },
                ("POST", "/api/failover/failover") => Request::Failover { to: param(query, "to") },
                ("POST", "/api/failover/ack") => Request::Ack { by: param(query, "by").unwrap_or_else(|| "admin api".into()) },
                ("POST", "/api/failover/rejoin") => match param(query, "addr") {
                    Some(addr) => Request::Rejoin { addr },
                    None => return Response::json(400, &serde_json::json!({"error": "rejoin needs ?addr=HOST:PORT"})),
                },
                ("GET", _) => return Response::json(404, &serde_json::json!({"error": format!("no such resource {p}")})),
                _ => return Response::json(405, &serde_json::json!({"error": format!("{method} {p} is not supported")})),
            };
            match f.request(req).await {
                Ok(msg) => Response::json(200, &serde_json::json!({"ok": true, "message": msg})),
                Err(e) => Response::json(409, &serde_json::json!({"ok": false, "error": e})),
            }
        }
        _ => Response::text(404, "not found\n"),
    }
}


async fn access(admin: &Admin, method: &str, path: &str, query: &str) -> Response {
    let Some(a) = admin.proxy.access.get() else {
        return Response::json(503, &serde_json::json!({"error": "temporary access is disabled: set [admin] db_file (or --admin-db) for its store"}));
    };
    let need = |k: &str| param(query, k).ok_or_else(|| format!("missing ?{k}="));
    let by = param(query, "by").unwrap_or_else(|| "admin api".into());
    let res: Result<serde_json::Value, String> = match (method, path) {
        ("GET", "/api/access") => a.list().map(|v| serde_json::to_value(v).unwrap_or_default()),
        ("POST", "/api/access/grant") => {
            let req = (|| {
                Ok::<_, String>(crate::access::GrantRequest {
                    user: need("user")?,
                    ttl_seconds: crate::access::parse_ttl(&need("ttl")?)?,
                    role: param(query, "role").unwrap_or_else(|| "read_only".into()),
                    schema: param(query, "schema"),
                    reason: param(query, "reason").unwrap_or_default(),
                    by: by.clone(),
                })
            })();
            match req {
                Ok(r) => a.grant(r).await.map(|g| serde_json::to_value(g).unwrap_or_default()),
                Err(e) => Err(e),
            }
        }
        ("POST", "/api/access/revoke") => match need("user") {
            Ok(u) => a.revoke(&u, "revoked", &by).await.map(|m| serde_json::json!({"ok": true, "message": m})),
            Err(e) => Err(e),
        },
        ("POST", "/api/access/extend") => match (need("user"), need("ttl").and_then(|t| crate::access::parse_ttl(&t))) {
            (Ok(u), Ok(ttl)) => a.extend(&u, ttl, &by).await.map(|m| serde_json::json!({"ok": true, "message": m})),
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
        _ => return Response::json(404, &serde_json::json!({"error": format!("no such resource {method} {path}")})),
    };
    match res {
        Ok(v) => Response::json(200, &v),
        Err(e) => Response::json(409, &serde_json::json!({"ok": false, "error": e})),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts_and_secrets() {
        let allowed = vec!["proxy.internal".to_string()];
        for ok in ["127.0.0.1:6070", "localhost:6070", "[::1]:6070", "10.0.0.5", "proxy.internal:6070", "LOCALHOST"] {
            assert!(super::host_allowed(ok, &allowed), "{ok}");
        }
        for bad in ["evil.example:6070", "", "attacker.test", "127.0.0.1.nip.io:6070"] {
            assert!(!super::host_allowed(bad, &allowed), "{bad}");
        }
        assert!(super::same_secret(b"abc", b"abc"));
        assert!(!super::same_secret(b"abc", b"abd") && !super::same_secret(b"abc", b"ab"));
        let h = super::headers("POST /x HTTP/1.1\r\nhOsT: 127.0.0.1:1\r\nOrigin: http://a\r\nAuthorization: Bearer t\r\n\r\n");
        assert_eq!((h.host, h.origin, h.authorization), (Some("127.0.0.1:1"), Some("http://a"), Some("Bearer t")));
    }

    #[test]
    fn params() {
        assert_eq!(super::param("to=127.0.0.1%3A3308&x=1", "to").as_deref(), Some("127.0.0.1:3308"));
        assert_eq!(super::param("by=a+b", "by").as_deref(), Some("a b"));
        assert_eq!(super::param("to=", "to"), None);
        assert_eq!(super::percent_decode("%zz%4"), "%zz%4");
    }
}
