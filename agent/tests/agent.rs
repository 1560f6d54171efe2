//! Loads the real eBPF programs into this kernel (needs root) and checks what they count
//! against a known workload on the lab's primary (3307), sent from a dedicated loopback
//! address (127.0.0.55) by a raw MySQL client, so the expected numbers are exact.
//! Runs in the serial phase of `cargo xtask test` (no other traffic on 3307 then).

use breakwater_proxy::protocol::{auth, caps, handshake};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{MetricsService, MetricsServiceServer};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message;
use std::sync::{Arc, Mutex};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait until the agent answers on its HTTP port (it has attached or fallen back).
fn wait_healthy(prom: u16) {
    let t = Instant::now();
    while http_get(prom, "/healthz").is_none() {
        assert!(t.elapsed() < Duration::from_secs(20), "agent did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

use breakwater_testkit::{free_port, http_get, Prometheus};

/// metric line (name + labels) -> value, for the lines containing all `needles`.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let body = http_get(port, "/metrics").expect("scrape /metrics");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v))))
        .collect()
}

fn get(m: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| *v)
        .sum()
}

fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut p = vec![n as u8, (n >> 8) as u8, (n >> 16) as u8, seq];
    p.extend_from_slice(payload);
    p
}

fn read_packet(s: &mut TcpStream) -> Vec<u8> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).unwrap();
    let mut p = vec![0; u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize];
    s.read_exact(&mut p).unwrap();
    p
}

/// A raw client from 127.0.0.55: login, then one command at a time.
fn connect() -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.55:0".parse::<SocketAddr>().unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut s = rt.block_on(sock.connect("127.0.0.1:3307".parse().unwrap())).unwrap().into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let g = handshake::parse_greeting(&read_packet(&mut s)).unwrap();
    let token = auth::native_token(b"app", &g.scramble[..20]);
    let resp = handshake::handshake_response(caps::PROXY_BACKEND, 45, "app", &token, Some("sbtest_agent"), auth::NATIVE);
    s.write_all(&packet(1, &resp)).unwrap();
    let ok = read_packet(&mut s);
    assert_eq!(ok[0], 0, "login: {}", String::from_utf8_lossy(&ok));
    s
}

/// Send a COM_QUERY and read the whole response; returns whether it was an ERR.
fn query(s: &mut TcpStream, sql: &str) -> bool {
    let mut p = vec![0x03];
    p.extend_from_slice(sql.as_bytes());
    s.write_all(&packet(0, &p)).unwrap();
    let first = read_packet(s);
    match first[0] {
        0x00 => false,
        0xff => true,
        _ => {
            // result set: column defs, EOF, rows, EOF
            let mut eofs = 0;
            while eofs < 2 {
                let p = read_packet(s);
                if p[0] == 0xfe && p.len() < 9 {
                    eofs += 1;
                }
                assert_ne!(p[0], 0xff);
            }
            false
        }
    }
}

type Received = Arc<Mutex<Vec<ExportMetricsServiceRequest>>>;

/// A real OTLP/gRPC receiver: opentelemetry-proto's collector service on tonic.
struct GrpcReceiver(Received);

#[tonic::async_trait]
impl MetricsService for GrpcReceiver {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// An OTLP/HTTP receiver: POST /v1/metrics with a protobuf body.
async fn http_receiver(listener: tokio::net::TcpListener, rx: Received) {
    let got: breakwater_testkit::HttpRequests = Default::default();
    tokio::spawn(breakwater_testkit::http_receiver(listener, got.clone()));
    loop {
        let reqs: Vec<(String, Vec<u8>)> = std::mem::take(&mut *got.lock().unwrap());
        for (head, body) in reqs {
            assert!(head.starts_with("post /v1/metrics"), "{head}");
            assert!(head.contains("content-type: application/x-protobuf"), "{head}");
            rx.lock().unwrap().push(ExportMetricsServiceRequest::decode(&body[..]).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn attr(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<String> {
    kvs.iter().find(|k| k.key == key).and_then(|k| match k.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        _ => None,
    })
}

/// Value of a Sum metric's data point whose attributes include every (key, value).
fn otlp_sum(req: &ExportMetricsServiceRequest, name: &str, want: &[(&str, &str)]) -> Option<i64> {
    let m = req.resource_metrics.iter().flat_map(|r| &r.scope_metrics).flat_map(|s| &s.metrics).find(|m| m.name == name)?;
    let Some(metric::Data::Sum(sum)) = &m.data else { return None };
    sum.data_points
        .iter()
        .find(|p| want.iter().all(|(k, v)| attr(&p.attributes, k).as_deref() == Some(*v)))
        .and_then(|p| match p.value {
            Some(number_data_point::Value::AsInt(v)) => Some(v),
            _ => None,
        })
}

/// Bucket counts of the latency histogram for one operation on port 3307.
fn otlp_hist(req: &ExportMetricsServiceRequest, op: &str) -> Option<(Vec<f64>, Vec<u64>, u64)> {
    let m = req
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .find(|m| m.name == "breakwater.agent.request.duration")?;
    let Some(metric::Data::Histogram(h)) = &m.data else { return None };
    let p = h.data_points.iter().find(|p| {
        attr(&p.attributes, "db.operation.name").as_deref() == Some(op) && attr(&p.attributes, "server.port").as_deref() == Some("3307")
    })?;
    Some((p.explicit_bounds.clone(), p.bucket_counts.clone(), p.count))
}

/// Every Prometheus expression of the agent's dashboard.
fn dashboard_queries() -> Vec<String> {
    breakwater_testkit::dashboard_queries(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/breakwater-agent.json"))
}

/// COM_STMT_PREPARE; returns the statement id (one parameter and one column expected).
fn prepare(s: &mut TcpStream, sql: &str) -> u32 {
    let mut p = vec![0x16];
    p.extend_from_slice(sql.as_bytes());
    s.write_all(&packet(0, &p)).unwrap();
    let ok = read_packet(s);
    assert_eq!(ok[0], 0, "prepare: {}", String::from_utf8_lossy(&ok));
    let id = u32::from_le_bytes([ok[1], ok[2], ok[3], ok[4]]);
    let mut eofs = 0;
    while eofs < 2 {
        let p = read_packet(s);
        if p[0] == 0xfe && p.len() < 9 {
            eofs += 1;
        }
    }
    id
}

/// COM_STMT_EXECUTE with one BIGINT parameter; reads the binary result set.
fn execute_one_bigint(s: &mut TcpStream, id: u32, v: i64) {
    let mut p = vec![0x17];
    p.extend_from_slice(&id.to_le_bytes());
    p.push(0); // no cursor
    p.extend_from_slice(&1u32.to_le_bytes());
    p.push(0); // null bitmap
    p.push(1); // new params bound
    p.extend_from_slice(&[0x08, 0x00]); // MYSQL_TYPE_LONGLONG
    p.extend_from_slice(&v.to_le_bytes());
    s.write_all(&packet(0, &p)).unwrap();
    let first = read_packet(s);
    assert!(first[0] != 0xff, "execute: {}", String::from_utf8_lossy(&first));
    let mut eofs = 0;
    while eofs < 2 {
        let p = read_packet(s);
        if p[0] == 0xfe && p.len() < 9 {
            eofs += 1;
        }
    }
}

/// Both hook sets see the same: cgroup_skb (the servers' TCP segments) and, the fallback,
/// the recv/send tracepoints (the servers' reads and writes).
#[test]
fn agent_counts_connections_requests_errors_and_latency_exactly() {
    counts_exactly("cgroup");
}

#[test]
fn tracepoint_hooks_count_the_same() {
    counts_exactly("tracepoints");
}

fn counts_exactly(hooks: &str) {
    // Schema first, before the agent watches.
    let out = Command::new("mariadb")
        .args(["--no-defaults", "--skip-ssl", "-h127.0.0.1", "-P3307", "-umonitor", "-pmonitor", "-e"])
        .arg("DROP DATABASE IF EXISTS sbtest_agent; CREATE DATABASE sbtest_agent; CREATE TABLE sbtest_agent.t (id INT PRIMARY KEY, v INT)")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // OTLP receivers, gRPC and HTTP, in this process.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let grpc_rx: Received = Default::default();
    let http_rx: Received = Default::default();
    let grpc_port = free_port();
    {
        let svc = MetricsServiceServer::new(GrpcReceiver(grpc_rx.clone()));
        let addr: SocketAddr = format!("127.0.0.1:{grpc_port}").parse().unwrap();
        rt.spawn(async move { tonic::transport::Server::builder().add_service(svc).serve(addr).await });
    }
    let http_listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let http_port = http_listener.local_addr().unwrap().port();
    rt.spawn(http_receiver(http_listener, http_rx.clone()));

    let prom = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_breakwater-agent"))
        .args(["--ports", "3307", "--prometheus-listen", &format!("127.0.0.1:{prom}"), "--hooks", hooks])
        .args(["--otlp-endpoint", &format!("http://127.0.0.1:{grpc_port}")])
        .args(["--otlp-http-endpoint", &format!("http://127.0.0.1:{http_port}/v1/metrics")])
        .args(["--export-interval-ms", "300"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _agent = Agent(child);
    wait_healthy(prom);
    let before = scrape(prom);
    let mode = if hooks == "cgroup" { "cgroup_skb" } else { "tracepoints" };
    assert_eq!(get(&before, "breakwater_agent_hooks_info", &[&format!("hooks=\"{mode}\"")]), 1.0, "measuring with {mode}");

    const CONNS: usize = 4;
    let mut errors = 0;
    for c in 0..CONNS {
        let mut s = connect();
        assert!(!query(&mut s, "SELECT 1"));
        assert!(!query(&mut s, "SELECT SLEEP(0.06)"));
        errors += query(&mut s, "SELECT * FROM no_such_table") as usize;
        assert!(!query(&mut s, &format!("INSERT INTO t VALUES ({c}, 1)")));
        assert!(!query(&mut s, &format!("UPDATE t SET v = 2 WHERE id = {c}")));
        assert!(!query(&mut s, &format!("/* c */ DELETE FROM t WHERE id = {c}")));
        // A prepared SELECT: PREPARE, EXECUTE (named SELECT by its statement), CLOSE (no
        // response, not a request), then a plain SELECT.
        let id = prepare(&mut s, "SELECT ? + 1");
        execute_one_bigint(&mut s, id, 41);
        let mut close = vec![0x19];
        close.extend_from_slice(&id.to_le_bytes());
        s.write_all(&packet(0, &close)).unwrap();
        assert!(!query(&mut s, "SELECT 2"));
        s.write_all(&packet(0, &[0x01])).unwrap(); // COM_QUIT
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest); // server closes
    }
    assert_eq!(errors, CONNS);
    std::thread::sleep(Duration::from_millis(1500));
    let after = scrape(prom);
    let d = |name: &str, labels: &[&str]| get(&after, name, labels) - get(&before, name, labels);
    let peer = "client_address=\"127.0.0.55\"";
    let port = "server_port=\"3307\"";
    println!("{}", http_get(prom, "/metrics").unwrap_or_default().lines().filter(|l| l.contains("127.0.0.55")).collect::<Vec<_>>().join("\n"));
    assert_eq!(d("breakwater_agent_peer_connections_opened_total", &[peer, port]), CONNS as f64);
    assert_eq!(d("breakwater_agent_peer_connections_closed_total", &[peer, port]), CONNS as f64);
    // COM_QUIT and COM_STMT_CLOSE have no response, so they are not answered requests.
    assert_eq!(d("breakwater_agent_peer_requests_total", &[peer, port]), (CONNS * 9) as f64);
    assert_eq!(d("breakwater_agent_peer_request_errors_total", &[peer, port]), CONNS as f64);
    let op = |o: &str| format!("db_operation_name=\"{o}\"");
    let count = |o: &str| d("breakwater_agent_request_duration_seconds_count", &[port, &op(o)]);
    assert_eq!(count("SELECT"), (CONNS * 5) as f64);
    assert_eq!(count("COM_STMT_PREPARE"), CONNS as f64);
    assert_eq!(count("COM_STMT_EXECUTE"), 0.0, "executes are named by their statement");
    assert_eq!(count("INSERT"), CONNS as f64);
    assert_eq!(count("UPDATE"), CONNS as f64);
    assert_eq!(count("DELETE"), CONNS as f64);
    assert_eq!(d("breakwater_agent_request_errors_total", &[port, &op("SELECT")]), CONNS as f64);
    // The SLEEP(0.06) queries, and only they, land between 50 and 100 ms.
    let bucket = |le: &str| d("breakwater_agent_request_duration_seconds_bucket", &[port, &op("SELECT"), &format!("le=\"{le}\"")]);
    assert_eq!(bucket("0.1") - bucket("0.05"), CONNS as f64, "slow queries in the (0.05, 0.1] bucket");
    assert_eq!(d("breakwater_agent_dropped_events_total", &[]), 0.0);
    // Every closed connection reported its smoothed RTT (loopback: tens of µs at most).
    assert_eq!(d("breakwater_agent_connection_rtt_seconds_count", &[port]), CONNS as f64);
    let rtt_sum = d("breakwater_agent_connection_rtt_seconds_sum", &[port]);
    assert!(rtt_sum > 0.0 && rtt_sum < 0.1 * CONNS as f64, "RTT sum {rtt_sum}");
    // Each connection lived longer than its SLEEP(0.06) and far less than 10 s.
    let lived = |le: &str| d("breakwater_agent_connection_duration_seconds_bucket", &[port, &format!("le=\"{le}\"")]);
    assert_eq!(d("breakwater_agent_connection_duration_seconds_count", &[port]), CONNS as f64);
    assert_eq!(lived("0.01"), 0.0, "no connection was shorter than its slow query");
    assert_eq!(lived("10"), CONNS as f64);
    assert!(d("breakwater_agent_connection_duration_seconds_sum", &[port]) > 0.06 * CONNS as f64);

    // A real Prometheus (Debian's package) scrapes /metrics and sees the same numbers, and
    // every query of the Grafana dashboards returns data.
    let dashboard_exprs = dashboard_queries();
    assert!(dashboard_exprs.len() >= 8, "{dashboard_exprs:?}");
    let server = Prometheus::start("breakwater-agent", prom);
    let prom_value = server.value(
        "breakwater_agent_peer_requests_total{client_address=\"127.0.0.55\",server_port=\"3307\"}",
        Duration::from_secs(30),
    );
    let dashboard_exprs: Vec<String> = dashboard_exprs.iter().map(|e| e.replace("$host", ".*")).collect();
    server.all_have_data(&dashboard_exprs, Duration::from_secs(60));
    drop(server);
    assert_eq!(prom_value, get(&scrape(prom), "breakwater_agent_peer_requests_total", &[peer, port]));

    // OTLP: the numbers received by both receivers equal the ones counted above.
    std::thread::sleep(Duration::from_millis(800));
    for (proto, rx) in [("grpc", &grpc_rx), ("http", &http_rx)] {
        let got = rx.lock().unwrap();
        let last = got.last().unwrap_or_else(|| panic!("no OTLP/{proto} export received"));
        let peer = [("client.address", "127.0.0.55"), ("server.port", "3307"), ("db.system.name", "mysql")];
        assert_eq!(otlp_sum(last, "breakwater.agent.client.connections.opened", &peer), Some(CONNS as i64), "{proto}");
        assert_eq!(otlp_sum(last, "breakwater.agent.client.connections.closed", &peer), Some(CONNS as i64), "{proto}");
        assert_eq!(otlp_sum(last, "breakwater.agent.client.requests", &peer), Some((CONNS * 9) as i64), "{proto}");
        assert_eq!(otlp_sum(last, "breakwater.agent.client.request.errors", &peer), Some(CONNS as i64), "{proto}");
        let (bounds, counts, n) = otlp_hist(last, "SELECT").unwrap_or_else(|| panic!("{proto}: no SELECT histogram"));
        assert_eq!(n, (CONNS * 5) as u64, "{proto}");
        let i = bounds.iter().position(|b| (*b - 0.1).abs() < 1e-9).unwrap();
        assert_eq!(counts[i], CONNS as u64, "{proto}: SLEEP(0.06) queries in the (0.05, 0.1] bucket: {bounds:?} {counts:?}");
        let res = last.resource_metrics[0].resource.as_ref().unwrap();
        assert_eq!(attr(&res.attributes, "service.name").as_deref(), Some("breakwater-agent"));
        assert!(attr(&res.attributes, "host.name").is_some());
    }
    drop(rt);

    // An open connection's requests and bytes count while it is open (the agent reads the
    // kernel's live per-connection counters), and are not counted again when it closes.
    let before = scrape(prom);
    let mut s = connect();
    for _ in 0..3 {
        assert!(!query(&mut s, "SELECT 1"));
    }
    std::thread::sleep(Duration::from_millis(800));
    let open = scrape(prom);
    let dd = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, name: &str, labels: &[&str]| get(b, name, labels) - get(a, name, labels);
    assert_eq!(dd(&before, &open, "breakwater_agent_peer_requests_total", &[peer, port]), 3.0, "live requests");
    assert!(dd(&before, &open, "breakwater_agent_received_bytes_total", &[port]) > 0.0, "live bytes in");
    assert!(dd(&before, &open, "breakwater_agent_sent_bytes_total", &[port]) > 0.0, "live bytes out");
    assert_eq!(dd(&before, &open, "breakwater_agent_connections_active", &[port]), 1.0);
    s.write_all(&packet(0, &[0x01])).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    drop(s);
    std::thread::sleep(Duration::from_millis(800));
    let closed = scrape(prom);
    assert_eq!(dd(&before, &closed, "breakwater_agent_peer_requests_total", &[peer, port]), 3.0, "counted once");
    assert_eq!(dd(&before, &closed, "breakwater_agent_peer_connections_closed_total", &[peer, port]), 1.0);
    assert!(
        dd(&open, &closed, "breakwater_agent_received_bytes_total", &[port]) >= 0.0
            && dd(&open, &closed, "breakwater_agent_sent_bytes_total", &[port]) >= 0.0,
        "byte counters never go down"
    );

    // LOAD DATA LOCAL INFILE: the file the client streams after the server's 0xFB request is
    // not counted as requests; the statements after it are.
    let csv = std::env::temp_dir().join(format!("bw-agent-{}.csv", std::process::id()));
    std::fs::write(&csv, "100,1\n101,2\n102,3\n").unwrap();
    let before = scrape(prom);
    let out = Command::new("mariadb")
        .args(["--no-defaults", "--skip-ssl", "--local-infile=1", "-h127.0.0.1", "-P3307", "-uapp", "-papp", "sbtest_agent", "-e"])
        .arg(format!(
            "LOAD DATA LOCAL INFILE '{}' INTO TABLE t FIELDS TERMINATED BY ','; SELECT COUNT(*) FROM t; DELETE FROM t WHERE id >= 100; SELECT 1",
            csv.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains('3'), "3 rows loaded");
    std::thread::sleep(Duration::from_millis(800));
    let after = scrape(prom);
    let ops = |o: &str| dd(&before, &after, "breakwater_agent_request_duration_seconds_count", &[port, &op(o)]);
    assert_eq!((ops("OTHER"), ops("SELECT"), ops("DELETE")), (1.0, 2.0, 1.0), "LOAD DATA, 2 SELECTs, DELETE");
    let _ = std::fs::remove_file(&csv);

    // Retransmits: drop the server's segments to 127.0.0.55 for a moment (nftables).
    let before = scrape(prom);
    let snmp_before = retrans_segs();
    let mut s = connect();
    let guard = DropRule::add();
    let t0 = Instant::now();
    let q = std::thread::spawn(move || query(&mut s, "SELECT 1"));
    std::thread::sleep(Duration::from_millis(900));
    let counters = Command::new("nft").args(["list", "table", "inet", "bwtest"]).output().unwrap();
    drop(guard);
    assert!(!q.join().unwrap(), "the query completes once segments flow again");
    println!("query took {:?}; kernel RetransSegs +{}; {}", t0.elapsed(), retrans_segs() - snmp_before, String::from_utf8_lossy(&counters.stdout));
    std::thread::sleep(Duration::from_millis(500));
    let after = scrape(prom);
    let retrans = get(&after, "breakwater_agent_tcp_retransmits_total", &[port]) - get(&before, "breakwater_agent_tcp_retransmits_total", &[port]);
    println!("retransmits counted: {retrans}\n{}", http_get(prom, "/metrics").unwrap_or_default().lines().filter(|l| l.contains("retransmits_total{")).collect::<Vec<_>>().join("\n"));
    assert!(retrans >= 1.0, "retransmits seen: {retrans}");
    // The retransmitted response answered one request, counted once, and no bytes were
    // missed on the way.
    let d = |name: &str, labels: &[&str]| get(&after, name, labels) - get(&before, name, labels);
    assert_eq!(d("breakwater_agent_peer_requests_total", &[peer, port]), 1.0, "one request despite the retransmits");
    assert_eq!(d("breakwater_agent_dropped_events_total", &[]), 0.0);
}

/// The kernel's own count of retransmitted segments (/proc/net/snmp Tcp: RetransSegs).
fn retrans_segs() -> i64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// An nftables rule dropping 3307 -> 127.0.0.55 data segments on the receive path (pure ACKs
/// pass, so the server, not the client, has to retransmit; a drop on the output path would
/// only make the server's send fail locally, which TCP does not count as a retransmit),
/// removed on drop.
struct DropRule;

impl DropRule {
    fn add() -> Self {
        let _ = Command::new("nft").args(["delete", "table", "inet", "bwtest"]).stderr(Stdio::null()).status();
        for args in [
            vec!["add", "table", "inet", "bwtest"],
            vec!["add", "chain", "inet", "bwtest", "out", "{ type filter hook input priority 0 ; }"],
            vec!["add", "rule", "inet", "bwtest", "out", "ip", "daddr", "127.0.0.55", "tcp", "sport", "3307", "ip", "length", ">", "64", "counter", "drop"],
        ] {
            let st = Command::new("nft").args(&args).status().expect("nft (apt-get install nftables)");
            assert!(st.success(), "nft {args:?}");
        }
        DropRule
    }
}

impl Drop for DropRule {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", "bwtest"]).status();
    }
}

/// Without root, one clear error line and a non-zero exit, no stack trace.
#[test]
fn without_root_one_clear_error_line() {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_breakwater-agent"))
        .args(["--ports", "3307", "--prometheus-listen", "127.0.0.1:0"])
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("must run as root"), "{stderr}");
}

/// Connections opened before the agent started (a proxy's warm pool) are seen: counted open
/// at start, their requests counted from the next one on, with both hook kinds; a restarted
/// agent counts them again from zero, each request once; one that closes without a byte
/// seen is counted closed.
#[test]
fn connections_older_than_the_agent_are_counted() {
    for hooks in ["cgroup", "tracepoints"] {
        older_connections(hooks);
    }
}

fn start_agent(hooks: &str, prom: u16) -> Agent {
    let child = Command::new(env!("CARGO_BIN_EXE_breakwater-agent"))
        .args(["--ports", "3307", "--prometheus-listen", &format!("127.0.0.1:{prom}"), "--hooks", hooks])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let a = Agent(child);
    wait_healthy(prom);
    a
}

fn older_connections(hooks: &str) {
    let out = Command::new("mariadb")
        .args(["--no-defaults", "--skip-ssl", "-h127.0.0.1", "-P3307", "-umonitor", "-pmonitor", "-e"])
        .arg("CREATE DATABASE IF NOT EXISTS sbtest_agent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    const K: usize = 3;
    const Q: usize = 5;
    // A warm pool: logged in, used, idle when the agent starts; and one more connection that
    // closes without sending anything while the agent watches.
    let mut pool: Vec<TcpStream> = (0..K).map(|_| connect()).collect();
    for s in pool.iter_mut() {
        assert!(!query(s, "SELECT 1"));
    }
    let mut idle = Some(connect());
    let labels = ["client_address=\"127.0.0.55\"", "server_port=\"3307\""];
    for round in 0..2 {
        // Round 1: the agent restarted, the same connections still open.
        let prom = free_port();
        let agent = start_agent(hooks, prom);
        std::thread::sleep(Duration::from_millis(600));
        let m = |name: &str| get(&scrape(prom), name, &labels);
        let open = K + idle.is_some() as usize;
        assert_eq!(m("breakwater_agent_peer_connections_opened_total"), open as f64, "{hooks} round {round}: connections open at start");
        let selects_before = get(&scrape(prom), "breakwater_agent_request_duration_seconds_count", &["server_port=\"3307\"", "db_operation_name=\"SELECT\""]);
        assert_eq!(selects_before, 0.0, "{hooks} round {round}: nothing counted before the next request");
        for s in pool.iter_mut() {
            for i in 0..Q {
                assert!(!query(s, &format!("SELECT {i}")));
            }
        }
        assert!(query(&mut pool[0], "SELECT * FROM no_such_table"));
        if let Some(s) = idle.take() {
            drop(s); // closes with no byte sent while the agent watched
        }
        std::thread::sleep(Duration::from_millis(1500));
        let after = scrape(prom);
        let requests = get(&after, "breakwater_agent_peer_requests_total", &labels);
        let errors = get(&after, "breakwater_agent_peer_request_errors_total", &labels);
        let selects = get(&after, "breakwater_agent_request_duration_seconds_count", &["server_port=\"3307\"", "db_operation_name=\"SELECT\""]);
        println!("{hooks} round {round}: {requests} requests, {errors} errors, {selects} SELECTs");
        assert_eq!(requests, (K * Q + 1) as f64, "{hooks} round {round}: each request on the older connections, once");
        assert_eq!(selects, (K * Q + 1) as f64, "{hooks} round {round}: named and timed");
        assert_eq!(errors, 1.0);
        let closed = get(&after, "breakwater_agent_peer_connections_closed_total", &labels);
        assert_eq!(closed, if round == 0 { 1.0 } else { 0.0 }, "{hooks} round {round}: the idle connection closed unseen");
        if round == 1 {
            for mut s in pool.drain(..) {
                s.write_all(&packet(0, &[0x01])).unwrap();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            }
            std::thread::sleep(Duration::from_millis(700));
            let end = scrape(prom);
            assert_eq!(get(&end, "breakwater_agent_peer_connections_closed_total", &labels), K as f64, "{hooks}: adopted connections closed");
            assert_eq!(get(&end, "breakwater_agent_peer_requests_total", &labels), (K * Q + 1) as f64);
        }
        drop(agent);
    }
}

/// What the agent cannot read it says: a TLS connection (the mariadb CLI asks for TLS when
/// the server offers it) counts as encrypted, not as requests. And each server's cgroup load
/// (CPU, throttling, memory, pressure) is exported for its port.
#[test]
fn encrypted_connections_and_cgroup_load_are_reported() {
    let prom = free_port();
    let _agent = start_agent("auto", prom);
    let base = scrape(prom);
    let port = "server_port=\"3307\"";
    let mut cli = Command::new("mariadb")
        .args(["--no-defaults", "--ssl", "-h127.0.0.1", "-P3307", "-umonitor", "-pmonitor", "-e", "SELECT SLEEP(2)"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let during = scrape(prom);
    assert!(cli.wait().unwrap().success());
    assert_eq!(get(&during, "breakwater_agent_connections_encrypted", &[port]), 1.0, "the TLS connection is reported");
    assert_eq!(
        get(&during, "breakwater_agent_requests_in_flight", &[port]),
        0.0,
        "its SLEEP is not visible as a request in flight (encrypted)"
    );
    std::thread::sleep(Duration::from_millis(600));
    let after = scrape(prom);
    assert_eq!(get(&after, "breakwater_agent_connections_encrypted", &[port]), 0.0);
    let seen = |m: &BTreeMap<String, f64>| get(m, "breakwater_agent_request_duration_seconds_count", &[port]);
    assert_eq!(seen(&after), seen(&base), "no request counted from encrypted bytes");
    // A request in flight on a plain connection is seen as such.
    let mut s = connect();
    let t = std::thread::spawn(move || query(&mut s, "SELECT SLEEP(1.5)"));
    std::thread::sleep(Duration::from_millis(700));
    let busy = scrape(prom);
    assert!(!t.join().unwrap());
    assert!(get(&busy, "breakwater_agent_requests_in_flight", &[port]) >= 1.0, "SLEEP in flight");
    // Cgroup load of the lab node (the lab puts node 3307 in breakwater-lab/node3307).
    let text = http_get(prom, "/metrics").unwrap_or_default();
    assert!(text.contains("breakwater_agent_server_cgroup_info{") && text.contains("cgroup=\"/breakwater-lab/node3307\""), "{text}");
    assert!(get(&busy, "breakwater_agent_server_cpu_seconds_total", &[port]) > 0.0, "CPU time of the node");
    assert!(get(&busy, "breakwater_agent_server_memory_bytes", &[port]) > 1e6, "memory of the node");
    for r in ["cpu", "memory", "io"] {
        let label = format!("resource=\"{r}\"");
        assert!(
            busy.keys().any(|k| k.starts_with("breakwater_agent_server_pressure_ratio{") && k.contains(&label) && k.contains(port)),
            "{r} pressure exported"
        );
    }
}

/// Without eBPF (forced here with --procfs-only; automatic when loading fails), connections
/// are still counted, from /proc/net/tcp.
#[test]
fn procfs_fallback_counts_connections() {
    // Settings from a TOML file this time.
    let prom = free_port();
    let cfg = std::env::temp_dir().join(format!("bw-agent-{}.toml", std::process::id()));
    std::fs::write(&cfg, format!("ports = [3307]\nprocfs_only = true\nprometheus_listen = \"127.0.0.1:{prom}\"\n")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_breakwater-agent"))
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _agent = Agent(child);
    wait_healthy(prom);
    std::thread::sleep(Duration::from_millis(500)); // first poll: connections open before start are not "opened"
    let peer = "client_address=\"127.0.0.55\"";
    let before = scrape(prom);
    let mut conns: Vec<TcpStream> = (0..3).map(|_| connect()).collect();
    std::thread::sleep(Duration::from_millis(700));
    let mid = scrape(prom);
    assert_eq!(
        get(&mid, "breakwater_agent_peer_connections_opened_total", &[peer]) - get(&before, "breakwater_agent_peer_connections_opened_total", &[peer]),
        3.0
    );
    for s in conns.iter_mut() {
        s.write_all(&packet(0, &[0x01])).unwrap();
    }
    drop(conns);
    std::thread::sleep(Duration::from_millis(700));
    let after = scrape(prom);
    assert_eq!(
        get(&after, "breakwater_agent_peer_connections_closed_total", &[peer]) - get(&before, "breakwater_agent_peer_connections_closed_total", &[peer]),
        3.0
    );
}

/// Bounded memory: with room for 2 connections in the kernel's map, the 3rd and 4th are not
/// traced, counted as drops, and the kernel programs say so in the agent's log (aya-log).
#[test]
fn full_connection_map_counts_drops_and_logs() {
    let prom = free_port();
    let log = std::env::temp_dir().join(format!("bw-agent-drops-{}.log", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_breakwater-agent"))
        .args(["--ports", "3307", "--prometheus-listen", &format!("127.0.0.1:{prom}"), "--max-connections", "2"])
        .stdout(Stdio::inherit())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let agent = Agent(child);
    wait_healthy(prom);
    let before = scrape(prom);
    let mut conns: Vec<TcpStream> = (0..4).map(|_| connect()).collect();
    for s in conns.iter_mut() {
        assert!(!query(s, "SELECT 1"));
    }
    std::thread::sleep(Duration::from_millis(800));
    let after = scrape(prom);
    let d = |name: &str, labels: &[&str]| get(&after, name, labels) - get(&before, name, labels);
    let peer = "client_address=\"127.0.0.55\"";
    assert_eq!(d("breakwater_agent_dropped_events_total", &["reason=\"conns_map_full\""]), 2.0);
    assert_eq!(d("breakwater_agent_peer_connections_opened_total", &[peer]), 2.0, "only the traced ones");
    assert_eq!(d("breakwater_agent_peer_requests_total", &[peer]), 2.0);
    drop(conns);
    drop(agent);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("connection map full: a connection to port 3307 is not traced"), "{text}");
    let _ = std::fs::remove_file(log);
}

/// A bad configuration file gets one clear error line.
#[test]
fn bad_config_one_clear_error_line() {
    let cfg = std::env::temp_dir().join(format!("bw-agent-bad-{}.toml", std::process::id()));
    std::fs::write(&cfg, "portz = [1]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater-agent")).arg("--config").arg(&cfg).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid configuration") && stderr.contains("portz"), "{stderr}");
    let _ = std::fs::remove_file(cfg);
}

/// A server moved to another cgroup after it started listening keeps its sockets in the old
/// one, where the cgroup_skb programs are not attached: the agent says so (a MySQL server
/// greets every connection, so connections with no byte seen give it away).
#[test]
fn cgroup_blind_spot_is_reported() {
    let root = breakwater_testkit::cgroup2_root().expect("cgroup v2 mounted");
    let moved = root.join(format!("breakwater-test-moved-{}", std::process::id()));
    std::fs::create_dir_all(&moved).unwrap();
    // A greeting server: listens first, is moved after.
    let port = free_port();
    let script = format!(
        "import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('127.0.0.1',{port}));s.listen(16);print('ready',flush=True)\n\
         while True:\n c,_=s.accept();c.sendall(b'\\x0a\\x00\\x00\\x00\\x0agreeting');c.close()\n"
    );
    let mut server = Command::new("python3").args(["-c", &script]).stdout(Stdio::piped()).spawn().expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    std::fs::write(moved.join("cgroup.procs"), server.id().to_string()).unwrap();
    let server = Agent(server);

    let prom = free_port();
    let log = std::env::temp_dir().join(format!("bw-agent-blind-{}.log", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_breakwater-agent"))
        .args(["--ports", &port.to_string(), "--hooks", "cgroup", "--prometheus-listen", &format!("127.0.0.1:{prom}")])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let agent = Agent(child);
    wait_healthy(prom);
    for _ in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut greeting = Vec::new();
        let _ = s.read_to_end(&mut greeting);
        assert!(greeting.ends_with(b"greeting"));
    }
    std::thread::sleep(Duration::from_millis(800));
    drop(agent);
    drop(server);
    let _ = std::fs::remove_dir(&moved);
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(text.contains(&format!("in /{}", moved.file_name().unwrap().to_string_lossy())), "attached to the server's cgroup now: {text}");
    assert!(text.contains("the cgroup_skb programs see no bytes on this port's connections"), "{text}");
}
