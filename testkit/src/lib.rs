//! Helpers shared by Breakwater's integration tests (proxy and agent): run Debian's
//! Prometheus against an endpoint and query it, read the dashboards' queries, plain HTTP GET.
//! Test code: failures panic with a message saying what was missing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod cgroup2;
pub use cgroup2::{cgroup2_root, memory_anon, memory_usage, node_dirs, set_cpu_limit, set_memory_limit};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// GET a path on 127.0.0.1:port; the body, or None when nothing answered.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// A Prometheus server (Debian's package) scraping one target every second.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    pub web_port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A one-member etcd (Debian's etcd-server) on free loopback ports, with its own data dir.
pub struct Etcd {
    child: Child,
    dir: PathBuf,
    pub port: u16,
    /// http://127.0.0.1:<port>
    pub url: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Etcd {
    /// Start it (plain http) and wait until it is healthy (20 s at most).
    pub fn start() -> Etcd {
        Self::spawn(false)
    }

    /// Start it with TLS and client-certificate checks: certificates made with the openssl
    /// CLI in its directory (`ca.pem`; the server's for IP 127.0.0.1; a client's,
    /// `client.pem` / `client-key.pem`, see [`Etcd::file`]).
    pub fn start_tls() -> Etcd {
        Self::spawn(true)
    }

    /// A file of its directory (the TLS material).
    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn spawn(tls: bool) -> Etcd {
        let (port, peer) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("bw-etcd-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd dir");
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd log");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "bw-test", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bw-test={peer_url}")]);
        if tls {
            make_certs(&dir);
            cmd.current_dir(&dir).args(["--cert-file", "server.pem", "--key-file", "server-key.pem", "--client-cert-auth", "--trusted-ca-file", "ca.pem"]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("etcd (apt-get install etcd-server; cargo xtask deps does)");
        let e = Etcd { child, dir, port, url };
        let t = std::time::Instant::now();
        while !e.healthy(tls) {
            assert!(t.elapsed() < Duration::from_secs(20), "etcd did not become healthy: {}", std::fs::read_to_string(e.dir.join("etcd.log")).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }

    fn healthy(&self, tls: bool) -> bool {
        let body = if tls {
            Command::new("curl")
                .args(["-s", "--max-time", "2", "--cacert", &self.file("ca.pem"), "--cert", &self.file("client.pem"), "--key", &self.file("client-key.pem")])
                .arg(format!("{}/health", self.url))
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            http_get(self.port, "/health")
        };
        body.is_some_and(|b| b.contains("\"health\":\"true\""))
    }
}

/// A CA, a server certificate for IP 127.0.0.1 and a client certificate, in `dir`.
fn make_certs(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bw test etcd CA", "-keyout", "ca-key.pem", "-out", "ca.pem"]);
    for (name, cn, ext) in [
        ("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "breakwater-proxy", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext file");
        openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", &format!("/CN={cn}"), "-keyout", &format!("{name}-key.pem"), "-out", &format!("{name}.csr")]);
        openssl(&[
            "x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "2",
            "-extfile", &format!("{name}.ext"), "-out", &format!("{name}.pem"),
        ]);
    }
}

fn encode(e: &str) -> String {
    e.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"_.-".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

impl Prometheus {
    pub fn start(job: &str, target_port: u16) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("bw-prom-{job}-{}-{target_port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"),
        )
        .expect("prometheus config");
        let web_port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (apt-get install prometheus; cargo xtask deps does)");
        Prometheus { child, dir, web_port }
    }

    /// The query API's answer for `expr` (JSON).
    pub fn query(&self, expr: &str) -> serde_json::Value {
        let body = http_get(self.web_port, &format!("/api/v1/query?query={}", encode(expr))).unwrap_or_default();
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    }

    /// Wait until `expr` has a value and return the first one.
    pub fn value(&self, expr: &str, limit: Duration) -> f64 {
        let t = Instant::now();
        loop {
            let v = self.query(expr);
            if let Some(x) = v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse().ok()) {
                return x;
            }
            assert!(t.elapsed() < limit, "prometheus never returned {expr}: {v}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Every expression must be valid and return data within `limit` (dashboards).
    pub fn all_have_data(&self, exprs: &[String], limit: Duration) {
        let t = Instant::now();
        for e in exprs {
            loop {
                let v = self.query(e);
                assert_ne!(v["status"], "error", "query fails in Prometheus: {e}: {v}");
                if v["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
                    break;
                }
                assert!(t.elapsed() < limit, "query returns no data: {e}: {v}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// Every Prometheus expression of one Grafana dashboard file.
pub fn dashboard_queries(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    for p in v["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push(e.to_string());
            }
        }
    }
    out
}

/// Requests an HTTP receiver got: (lowercased request head, body).
pub type HttpRequests = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal HTTP/1.1 receiver (one request per connection, answers 200): enough for an
/// OTLP/HTTP collector in tests; the test decodes the protobuf bodies it wants.
pub async fn http_receiver(listener: tokio::net::TcpListener, got: HttpRequests) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let got = got.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            let (head, head_end, len) = loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                    let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0);
                    break (head, i + 4, len);
                }
            };
            while buf.len() < head_end + len {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            got.lock().unwrap_or_else(|p| p.into_inner()).push((head, buf[head_end..head_end + len].to_vec()));
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        });
    }
}
