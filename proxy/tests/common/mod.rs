//! Helpers shared by the end-to-end tests: start a proxy process on a free port with its own
//! configuration, talk to it and to the lab with real clients.
#![allow(dead_code)]

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const PRIMARY: u16 = 3307;
pub const REPLICAS: [u16; 2] = [3308, 3309];

/// Tests that read server-wide counters or put heavy load on the lab take this lock, so
/// their numbers are not disturbed by each other.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

pub struct Proxy {
    pub port: u16,
    /// The admin HTTP interface (JSON API, /metrics, /topology).
    pub admin_port: u16,
    /// The MySQL-protocol admin interface (admin/admin).
    pub admin_sql_port: u16,
    /// The admin API's bearer token (`--admin-token`).
    pub token: String,
    child: Option<Child>,
    pub log: Arc<Mutex<Vec<String>>>,
    _dir: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    nobody: bool,
}

impl Proxy {
    /// Start with the embedded default config plus flags.
    pub fn start(args: &[&str]) -> Proxy {
        Self::start_with(None, args)
    }

    /// Start with a TOML config (written to a temp file) plus flags. The failover
    /// controller is off (tests that share the lab must not change its topology) unless
    /// `args` turn it on.
    pub fn start_with(config: Option<&str>, args: &[&str]) -> Proxy {
        Self::spawn(config, args, false)
    }

    /// Start as user nobody (uid 65534) from a copy of the binary, so nftables can cut
    /// this process (and only it) off from a server with `meta skuid 65534`.
    pub fn start_as_nobody(config: Option<&str>, args: &[&str]) -> Proxy {
        Self::spawn(config, args, true)
    }

    /// Start with a config (None: the embedded default), flags and environment variables.
    pub fn start_env(config: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let mut p = Self::prepare(config, args, false);
        p.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        p.launch();
        p
    }

    fn spawn(config: Option<&str>, args: &[&str], nobody: bool) -> Proxy {
        let mut p = Self::prepare(config, args, nobody);
        p.launch();
        p
    }

    fn prepare(config: Option<&str>, args: &[&str], nobody: bool) -> Proxy {
        let port = free_port();
        let admin_port = free_port();
        let admin_sql_port = free_port();
        let d = std::env::temp_dir().join(format!("bw-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        if nobody {
            use std::os::unix::fs::PermissionsExt;
            let bin = d.join("breakwater-proxy");
            std::fs::copy(env!("CARGO_BIN_EXE_breakwater-proxy"), &bin).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut all: Vec<String> = Vec::new();
        if let Some(toml) = config {
            let f = d.join("breakwater.toml");
            std::fs::write(&f, toml).unwrap();
            all.extend(["--config".to_string(), f.display().to_string()]);
        }
        if !args.contains(&"--failover") {
            all.extend(["--failover".into(), "off".into()]);
        }
        all.extend(["--admin-listen".into(), format!("127.0.0.1:{admin_port}")]);
        let token = format!("test-token-{port}-{}", std::process::id());
        if !args.contains(&"--admin-token") {
            all.extend(["--admin-token".into(), token.clone()]);
        }
        all.extend(["--admin-mysql-listen".into(), format!("127.0.0.1:{admin_sql_port}")]);
        all.extend(["--listen".into(), format!("127.0.0.1:{port}"), "--log-level".into(), "info,breakwater_proxy=debug".into()]);
        all.extend(["--monitor-interval-ms".into(), "300".into()]);
        all.extend(args.iter().map(|a| a.to_string()));
        Proxy { port, admin_port, admin_sql_port, token, child: None, log: Arc::new(Mutex::new(Vec::new())), _dir: Some(d), args: all, env: Vec::new(), nobody }
    }

    /// Start the process (again) with the same ports, flags and environment.
    fn launch(&mut self) {
        let d = self.dir();
        let mut cmd = if self.nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(d.join("breakwater-proxy"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_breakwater-proxy"))
        };
        cmd.env_remove("BREAKWATER_ADMIN_TOKEN").env_remove("BREAKWATER_FAILOVER_PAUSE_AT");
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.args(&self.args).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn breakwater-proxy");
        if let Some(out) = child.stdout.take() {
            let log = self.log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        let t = Instant::now();
        // The client port is bound first; the admin ports come up last.
        for p in [self.port, self.admin_port, self.admin_sql_port] {
            while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
                assert!(t.elapsed() < Duration::from_secs(10), "proxy did not start listening on {p}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.child = Some(child);
    }

    /// kill -9 the process, then start it again on the same ports with the same flags and
    /// files, and `env` as its environment variables.
    pub fn kill9_and_restart(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        self.log.lock().unwrap().push("---- restart ----".into());
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.launch();
    }

    /// kill -9 the process (its files stay).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn opts(&self, user: &str, pass: &str, db: Option<&str>) -> Opts {
        OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(self.port)
            .user(Some(user))
            .pass(Some(pass))
            .db_name(db)
            .prefer_socket(false)
            .into()
    }

    pub async fn conn(&self) -> Conn {
        Conn::new(self.opts("app", "app", Some("sbtest"))).await.expect("connect through proxy")
    }

    /// GET/POST on the admin interface; the body parsed as JSON (or a JSON string).
    pub async fn admin(&self, method: &str, path: &str) -> (u16, serde_json::Value) {
        let addr = format!("127.0.0.1:{}", self.admin_port);
        let (code, body) = breakwater_proxy::admin::client::call(&addr, method, path, Some(&self.token), Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("admin {method} {path}: {e}"));
        (code, serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)))
    }

    /// Run SQL on the admin interface with the mariadb client; tab-separated rows, or the
    /// client's error text.
    pub fn admin_sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-h127.0.0.1", "-uadmin", "-padmin", "-N", "-B"])
            .arg(format!("-P{}", self.admin_sql_port))
            .args(["-e", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The directory holding this proxy's config (writable by the proxy, also as nobody).
    pub fn dir(&self) -> PathBuf {
        self._dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Wait until a log line contains every needle.
    pub fn wait_log(&self, needles: &[&str], limit: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.log.lock().unwrap().iter().any(|l| needles.iter().all(|n| l.contains(n))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status();
    }

    /// Wait for the process to exit; returns whether it did within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = &self._dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub fn lab_opts(port: u16) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some("monitor"))
        .pass(Some("monitor"))
        .prefer_socket(false)
}

/// A direct connection to a lab server as the monitor user (all privileges).
pub async fn lab(port: u16) -> Conn {
    Conn::new(lab_opts(port)).await.unwrap_or_else(|e| panic!("lab server {port} not reachable (cargo xtask lab up): {e}"))
}

pub async fn global_status(port: u16, name: &str) -> u64 {
    let mut c = lab(port).await;
    let row: Option<(String, String)> = c
        .query_first(format!("SHOW GLOBAL STATUS LIKE '{name}'"))
        .await
        .unwrap();
    let _ = c.disconnect().await;
    row.and_then(|(_, v)| v.parse().ok()).unwrap_or(0)
}

/// Wait until every replica has applied everything the primary has.
pub async fn wait_replicas_caught_up() {
    let mut p = lab(PRIMARY).await;
    let pos: String = p.query_first("SELECT @@gtid_binlog_pos").await.unwrap().unwrap_or_default();
    for port in REPLICAS {
        let mut r = lab(port).await;
        let ok: Option<i64> = r
            .query_first(format!("SELECT MASTER_GTID_WAIT('{pos}', 30)"))
            .await
            .unwrap();
        assert_eq!(ok, Some(0), "replica {port} did not catch up with {pos}");
    }
}

/// Create a fresh schema for one test (tests never share schemas).
pub async fn fresh_schema(name: &str) {
    let mut p = lab(PRIMARY).await;
    p.query_drop(format!("DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}")).await.unwrap();
    // Reads go to replicas: the schema must be there before the test reads through the proxy.
    wait_replicas_caught_up().await;
}

/// A fresh schema with one table `t (id INT PRIMARY KEY, v INT)` holding `rows` (SQL
/// values such as "(1, 10), (2, 20)"), on every replica before it returns.
pub async fn fresh_table(schema: &str, rows: &str) {
    let mut p = lab(PRIMARY).await;
    p.query_drop(format!(
        "DROP DATABASE IF EXISTS {schema}; CREATE DATABASE {schema}; CREATE TABLE {schema}.t (id INT PRIMARY KEY, v INT); INSERT INTO {schema}.t VALUES {rows}"
    ))
    .await
    .unwrap();
    wait_replicas_caught_up().await;
}

/// A lab user for one test, so server-side connection counts are the proxy's alone.
pub async fn fresh_user(name: &str, password: &str) {
    let mut p = lab(PRIMARY).await;
    p.query_drop(format!(
        "DROP USER IF EXISTS '{name}'@'%'; CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'; \
         GRANT ALL ON `sbtest%`.* TO '{name}'@'%'"
    ))
    .await
    .unwrap();
    wait_replicas_caught_up().await;
}

/// The embedded default configuration with extra TOML appended (for extra users).
pub fn default_config_with(extra: &str) -> String {
    format!("{}\n{extra}\n", breakwater_proxy::config::DEFAULT_TOML)
}

pub fn server_code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

pub fn lab_dir() -> PathBuf {
    std::env::var_os("BREAKWATER_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.lab"))
}

/// `breakwater-proxy <group> <args>` (group: failover or access) against this proxy's admin
/// interface, with its token: (exit 0, stdout and stderr).
fn admin_cli(p: &Proxy, group: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater-proxy"))
        .args([group, "--admin", &format!("127.0.0.1:{}", p.admin_port)])
        .env("BREAKWATER_ADMIN_TOKEN", &p.token)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run breakwater-proxy {group}: {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

pub fn failover_cli(p: &Proxy, args: &[&str]) -> (bool, String) {
    admin_cli(p, "failover", args)
}

pub fn access_cli(p: &Proxy, args: &[&str]) -> (bool, String) {
    admin_cli(p, "access", args)
}

/// An empty directory of this test process for `name` (removed first if left over).
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bw-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn nft(script: &str) {
    let st = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().and_then(|mut c| {
        use std::io::Write;
        c.stdin.take().expect("stdin").write_all(script.as_bytes())?;
        c.wait()
    });
    assert!(st.is_ok_and(|s| s.success()), "nft -f failed for:\n{script}");
}

/// An nftables table of output rules, deleted when dropped (also when the test fails).
pub struct NftTable(&'static str);

impl NftTable {
    /// `rules` in an output filter chain of table `inet <name>`.
    pub fn on(name: &'static str, rules: &str) -> NftTable {
        let _ = Command::new("nft").args(["delete", "table", "inet", name]).stderr(Stdio::null()).status();
        nft(&format!("table inet {name} {{\n chain out {{\n type filter hook output priority 0; policy accept;\n {rules}\n }}\n}}\n"));
        NftTable(name)
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", self.0]).status();
    }
}

/// Drop the packets of uid 65534 (a proxy started with `Proxy::start_as_nobody`) to `port`;
/// everyone else passes.
pub fn cut_nobody_off(port: u16) -> NftTable {
    NftTable::on("bw_nobody_cut", &format!("meta skuid 65534 tcp dport {port} drop"))
}

/// How many accounts named `account` each lab server has (3307, 3308, 3309).
pub async fn account_counts(account: &str) -> Vec<i64> {
    let mut v = Vec::new();
    for port in [PRIMARY, REPLICAS[0], REPLICAS[1]] {
        let mut c = lab(port).await;
        let n: Option<i64> = c.exec_first("SELECT COUNT(*) FROM mysql.user WHERE User = ?", (account,)).await.unwrap();
        v.push(n.unwrap_or(-1));
    }
    v
}

/// kill -9 a lab node.
pub fn kill_node(port: u16) {
    let pid = std::fs::read_to_string(lab_dir().join(format!("node{port}/mysqld.pid"))).expect("lab node pid file");
    let st = Command::new("kill").args(["-9", pid.trim()]).status().unwrap();
    assert!(st.success(), "kill -9 {}", pid.trim());
}

/// Start a lab node again with its recorded command line and wait until it answers.
pub async fn start_node(port: u16) {
    let st = Command::new("sh").arg(lab_dir().join(format!("node{port}/start.sh"))).status().unwrap();
    assert!(st.success());
    let t = Instant::now();
    loop {
        if let Ok(c) = Conn::new(lab_opts(port)).await {
            let _ = c.disconnect().await;
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "node {port} did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Send one payload (split at 16 MiB as the protocol says) starting at sequence `seq`.
pub fn raw_send(s: &mut std::net::TcpStream, seq: u8, payload: &[u8]) {
    use std::io::Write;
    let mut w = breakwater_proxy::protocol::packet::PacketWriter::new(Vec::new());
    w.push(seq, payload);
    s.write_all(w.buf_mut()).unwrap();
}

/// Read one packet: (sequence id, payload).
pub fn raw_read(s: &mut std::net::TcpStream) -> (u8, Vec<u8>) {
    use std::io::Read;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    let mut p = vec![0u8; u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize];
    s.read_exact(&mut p).unwrap();
    (head[3], p)
}

/// Log in over a raw socket as app/app (mysql_native_password) into `db`.
pub fn raw_login(port: u16, db: &str) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (_, g) = raw_read(&mut s);
    let g = breakwater_proxy::protocol::handshake::parse_greeting(&g).unwrap();
    let token = breakwater_proxy::protocol::auth::native_token(b"app", &g.scramble[..20]);
    let resp = breakwater_proxy::protocol::handshake::handshake_response(
        breakwater_proxy::protocol::caps::PROXY_BACKEND,
        45,
        "app",
        &token,
        Some(db),
        "mysql_native_password",
    );
    raw_send(&mut s, 1, &resp);
    let (_, ok) = raw_read(&mut s);
    assert_eq!(ok[0], 0, "logged in: {}", String::from_utf8_lossy(&ok));
    s
}
