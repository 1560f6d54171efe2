//! Loads the real eBPF programs into this kernel (needs root) and checks what they count
//! against a known workload on the lab's primary (3307), sent from a dedicated loopback
//! address (127.0.0.55) by a raw MySQL client, so the expected numbers are exact.
//! Runs in the serial phase of `cargo xtask test` (no other traffic on 3307 then).

use breakwater_proxy::protocol::{auth, caps, handshake};
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

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
    let std_sock = std::net::TcpStream::from({
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(sock.connect("127.0.0.1:3307".parse().unwrap())).unwrap().into_std().unwrap()
    });
    let mut s = std_sock;
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

#[test]
fn agent_counts_connections_requests_errors_and_latency_exactly() {
    // Schema first, before the agent watches.
    let out = Command::new("mariadb")
        .args(["--no-defaults", "-h127.0.0.1", "-P3307", "-umonitor", "-pmonitor", "-e"])
        .arg("DROP DATABASE IF EXISTS sbtest_agent; CREATE DATABASE sbtest_agent; CREATE TABLE sbtest_agent.t (id INT PRIMARY KEY, v INT)")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let prom = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_breakwater-agent"))
        .args(["--ports", "3307", "--prometheus-listen", &format!("127.0.0.1:{prom}")])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _agent = Agent(child);
    let t = Instant::now();
    while http_get(prom, "/healthz").is_none() {
        assert!(t.elapsed() < Duration::from_secs(20), "agent did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = scrape(prom);

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
    // COM_QUIT has no response, so it is not an answered request.
    assert_eq!(d("breakwater_agent_peer_requests_total", &[peer, port]), (CONNS * 6) as f64);
    assert_eq!(d("breakwater_agent_peer_request_errors_total", &[peer, port]), CONNS as f64);
    let op = |o: &str| format!("db_operation_name=\"{o}\"");
    let count = |o: &str| d("breakwater_agent_request_duration_seconds_count", &[port, &op(o)]);
    assert_eq!(count("SELECT"), (CONNS * 3) as f64);
    assert_eq!(count("INSERT"), CONNS as f64);
    assert_eq!(count("UPDATE"), CONNS as f64);
    assert_eq!(count("DELETE"), CONNS as f64);
    assert_eq!(d("breakwater_agent_request_errors_total", &[port, &op("SELECT")]), CONNS as f64);
    // The SLEEP(0.06) queries, and only they, land between 50 and 100 ms.
    let bucket = |le: &str| d("breakwater_agent_request_duration_seconds_bucket", &[port, &op("SELECT"), &format!("le=\"{le}\"")]);
    assert_eq!(bucket("0.1") - bucket("0.05"), CONNS as f64, "slow queries in the (0.05, 0.1] bucket");
    assert_eq!(d("breakwater_agent_dropped_events_total", &[]), 0.0);
}
