//! The OTLP metrics receiver: the agents' signals into the proxy (`adaptive::signals`).
//! OTLP/HTTP with a protobuf body (`POST /v1/metrics` on the admin HTTP listener, gzip or
//! identity) and OTLP/gRPC (`[signals] otlp_grpc_listen`). A collector in between works the
//! same: this is a plain OTLP receiver. A bad payload gets a 400 (gRPC: INVALID_ARGUMENT) and
//! is counted; nothing a sender does can panic or stall the proxy (bounded size and time).

use super::http::{Admin, Response};
use crate::runtime::Proxy;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{MetricsService, MetricsServiceServer};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use prost::Message;
use std::io::Read;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Whether a sender may feed signals: with `[signals] token`, it must present it (a bearer
/// token, compared in constant time); without one, only loopback senders are taken.
pub fn authorize(token: &str, authorization: Option<&str>, peer: IpAddr) -> Result<(), String> {
    if token.is_empty() {
        return if peer.is_loopback() {
            Ok(())
        } else {
            Err(format!("OTLP metrics from {peer} refused: without [signals] token only loopback senders are accepted (set it, and the agents' --otlp-token)"))
        };
    }
    let given = crate::admin::http::bearer(authorization).unwrap_or("");
    if crate::admin::http::same_secret(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err("OTLP metrics need Authorization: Bearer <[signals] token> (the agent's --otlp-token)".into())
    }
}

fn reject(proxy: &Proxy, status: u16, msg: String) -> Response {
    proxy.signals.rejected.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(status, error = %msg, "OTLP metrics refused");
    Response::text(status, msg + "\n")
}

/// One OTLP/HTTP request: `head` is the request head, `body` what was read past it.
pub(super) async fn http(admin: &Admin, stream: &mut TcpStream, head: &str, mut body: Vec<u8>, peer: IpAddr) -> Response {
    let proxy = &admin.proxy;
    let rt = proxy.runtime();
    if let Err(e) = authorize(&rt.cfg.signals.token, header(head, "authorization"), peer) {
        return reject(proxy, 401, e);
    }
    let max = rt.cfg.signals.max_request_bytes;
    let ctype = header(head, "content-type").unwrap_or("");
    if !ctype.starts_with("application/x-protobuf") {
        return reject(proxy, 415, format!("OTLP/HTTP needs Content-Type application/x-protobuf (got '{ctype}')"));
    }
    let Some(len) = header(head, "content-length").and_then(|v| v.parse::<usize>().ok()) else {
        return reject(proxy, 400, "OTLP/HTTP needs a Content-Length".into());
    };
    if len > max {
        return reject(proxy, 413, format!("request body of {len} bytes is over [signals] max_request_bytes ({max})"));
    }
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = vec![0u8; 16 * 1024];
        while body.len() < len {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) || body.len() < len {
        return reject(proxy, 400, format!("request body ended after {} of {len} bytes", body.len()));
    }
    body.truncate(len);
    let raw = match header(head, "content-encoding").map(str::to_ascii_lowercase).as_deref() {
        None | Some("identity") | Some("") => body,
        Some("gzip") => {
            let mut out = Vec::new();
            let mut dec = flate2::read::GzDecoder::new(&body[..]).take(max as u64 + 1);
            if let Err(e) = dec.read_to_end(&mut out) {
                return reject(proxy, 400, format!("bad gzip body: {e}"));
            }
            if out.len() > max {
                return reject(proxy, 413, format!("decompressed body is over [signals] max_request_bytes ({max})"));
            }
            out
        }
        Some(other) => return reject(proxy, 415, format!("Content-Encoding '{other}' is not supported (gzip or identity)")),
    };
    match take(proxy, &raw, peer) {
        Ok(()) => Response { status: 200, content_type: "application/x-protobuf", body: ExportMetricsServiceResponse::default().encode_to_vec() },
        Err(e) => reject(proxy, 400, e),
    }
}

fn take(proxy: &Proxy, raw: &[u8], peer: IpAddr) -> Result<(), String> {
    let req = ExportMetricsServiceRequest::decode(raw).map_err(|e| format!("not an OTLP ExportMetricsServiceRequest: {e}"))?;
    proxy.signals.ingest(&req, peer)?;
    proxy.signals.accepted.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

struct Grpc(Arc<Proxy>);

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(&self, req: tonic::Request<ExportMetricsServiceRequest>) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let peer = req.remote_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let auth = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        if let Err(e) = authorize(&self.0.runtime().cfg.signals.token, auth, peer) {
            self.0.signals.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "OTLP/gRPC metrics refused");
            return Err(tonic::Status::unauthenticated(e));
        }
        match self.0.signals.ingest(req.get_ref(), peer) {
            Ok(_) => {
                self.0.signals.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
            }
            Err(e) => {
                self.0.signals.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "OTLP/gRPC metrics refused");
                Err(tonic::Status::invalid_argument(e))
            }
        }
    }
}

/// Serve OTLP/gRPC metrics on `listener` until `shutdown`.
pub async fn grpc(listener: tokio::net::TcpListener, proxy: Arc<Proxy>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let max = proxy.runtime().cfg.signals.max_request_bytes;
    let svc = MetricsServiceServer::new(Grpc(proxy)).max_decoding_message_size(max);
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let r = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(10))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "OTLP/gRPC receiver stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::authorize;
    use std::net::IpAddr;

    #[test]
    fn senders_need_the_token_or_loopback() {
        let lo: IpAddr = [127, 0, 0, 1].into();
        let remote: IpAddr = [10, 1, 2, 3].into();
        assert!(authorize("", None, lo).is_ok(), "no token: loopback is taken");
        assert!(authorize("", Some("Bearer x"), remote).unwrap_err().contains("only loopback"));
        assert!(authorize("s3cret", Some("Bearer s3cret"), remote).is_ok());
        assert!(authorize("s3cret", Some("Bearer s3cre"), lo).is_err(), "with a token, loopback needs it too");
        assert!(authorize("s3cret", None, lo).is_err());
        assert!(authorize("s3cret", Some("s3cret"), lo).is_err(), "a bearer token, not a bare one");
    }
}
