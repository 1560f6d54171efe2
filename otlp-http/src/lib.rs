//! OTLP/HTTP export, shared by the proxy and the agent: POST one protobuf-encoded export
//! request to a collector (plain `http://`), under one deadline for connect, send and reply,
//! so a collector that never answers cannot hold an export loop for the kernel's connect
//! timeout.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// POST `body` (an encoded OTLP export request) to `url`; `default_path` when the URL has
/// none (e.g. "/v1/metrics"). Ok for a 200 or 202 answer; else what went wrong, for the log.
pub async fn post_protobuf(url: &str, default_path: &str, body: &[u8], deadline: Duration) -> Result<(), String> {
    post_protobuf_auth(url, default_path, body, deadline, None).await
}

/// `post_protobuf` with `Authorization: Bearer <token>` when a token is given (the proxy's
/// OTLP receiver takes the agents' signals only with its `[signals] token`).
pub async fn post_protobuf_auth(url: &str, default_path: &str, body: &[u8], deadline: Duration, token: Option<&str>) -> Result<(), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs are supported for OTLP/HTTP")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, default_path),
    };
    if token.is_some_and(|t| t.contains(['\r', '\n'])) {
        return Err("the OTLP token must not contain line breaks".into());
    }
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(hostport).await?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await?;
        Ok::<_, std::io::Error>(resp)
    };
    let resp = tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = String::from_utf8_lossy(resp.split(|b| *b == b'\n').next().unwrap_or(&[])).to_string();
    if status.contains(" 200") || status.contains(" 202") {
        Ok(())
    } else {
        Err(format!("collector answered {}", status.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::post_protobuf;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server answering `status`; returns its port and the request it got.
    async fn server(status: &'static str) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            // Read the whole request: the head, then Content-Length bytes of body.
            let mut req = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if req.len() >= end + 4 + len {
                        break;
                    }
                }
                let n = s.read(&mut chunk).await.expect("read");
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&chunk[..n]);
            }
            let _ = s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
            req
        });
        (port, h)
    }

    #[tokio::test]
    async fn posts_and_reads_the_status() {
        let (port, h) = server("200 OK").await;
        post_protobuf(&format!("http://127.0.0.1:{port}"), "/v1/metrics", b"abc", Duration::from_secs(5)).await.expect("200");
        let req = String::from_utf8(h.await.expect("join")).expect("utf8");
        assert!(req.starts_with("POST /v1/metrics HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Content-Length: 3\r\n") && req.ends_with("\r\n\r\nabc"), "{req}");

        let (port, _h) = server("503 Service Unavailable").await;
        let err = post_protobuf(&format!("http://127.0.0.1:{port}/x"), "/", b"", Duration::from_secs(5)).await.unwrap_err();
        assert!(err.contains("503"), "{err}");
        assert!(post_protobuf("https://example", "/", b"", Duration::from_secs(1)).await.is_err());
    }
}
