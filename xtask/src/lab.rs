//! The local lab: three MariaDB servers from Debian's packages with GTID replication.
//!
//! 127.0.0.1:3307 is the primary, 3308 and 3309 replicate from it (read_only=1,
//! MASTER_USE_GTID=slave_pos), semi-synchronously (AFTER_SYNC, 10 s timeout): a write the
//! primary acknowledged is on a replica, so a failover loses none. Data lives in `<repo>/.lab/node<port>`; each node has a
//! `start.sh` with its exact command line, so tests and drills can kill -9 a node and bring
//! it back the same way. Everything is idempotent: `up` on a running lab takes milliseconds.
//!
//! The nodes offer TLS with certificates from a lab CA (`<lab>/tls/ca.pem`, made with the
//! openssl CLI; the server certificate names 127.0.0.1 only, so a client that reaches it as
//! `localhost` sees a name mismatch), and the proxy's `use_ssl` and both verification modes
//! are tested against real servers.

use crate::{deps, proc};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const PORTS: [u16; 3] = [3307, 3308, 3309];
pub const PRIMARY: u16 = 3307;

pub fn command(args: &[&str]) -> Result<()> {
    match args.first().copied() {
        Some("up") => {
            deps::ensure()?;
            up()?;
            if args.contains(&"--etcd") {
                crate::etcd::up()?;
            }
            Ok(())
        }
        Some("down") => {
            crate::etcd::down();
            down()
        }
        Some("status") => {
            status()?;
            println!("{}", crate::etcd::status());
            Ok(())
        }
        Some("reset") => {
            deps::ensure()?;
            reset()
        }
        _ => bail!("usage: cargo xtask lab up [--etcd]|down|status|reset"),
    }
}

pub fn lab_dir() -> PathBuf {
    std::env::var_os("BREAKWATER_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| proc::root().join(".lab"))
}

fn node_dir(port: u16) -> PathBuf {
    lab_dir().join(format!("node{port}"))
}

pub fn socket(port: u16) -> PathBuf {
    node_dir(port).join("mysqld.sock")
}

/// Run SQL as root over the node's unix socket and return tab-separated output.
pub fn sql(port: u16, query: &str) -> Result<String> {
    let out = proc::output(
        Command::new("mariadb")
            .args(["--no-defaults", "-uroot", "-N", "-B"])
            .arg(format!("--socket={}", socket(port).display()))
            .args(["-e", query]),
    )
    .with_context(|| format!("SQL on {port}: {query}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The lab's TLS files: ca.pem (the CA clients trust), server.pem / server-key.pem.
pub fn tls_dir() -> PathBuf {
    lab_dir().join("tls")
}

/// Make the lab CA and the servers' certificate (ECDSA P-256, ten years, SAN IP 127.0.0.1)
/// when they are missing. Keys are 0600.
fn ensure_certs() -> Result<()> {
    let d = tls_dir();
    if d.join("server.pem").exists() && d.join("ca.pem").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&d)?;
    let ssl = |args: &[&str]| -> Result<()> {
        proc::output(Command::new("openssl").args(args).current_dir(&d)).map(|_| ()).context("openssl (the lab's TLS certificates)")
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "3650", "-subj", "/CN=Breakwater lab CA", "-keyout", "ca-key.pem", "-out", "ca.pem"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    ssl(&ca)?;
    let mut csr = vec!["req", "-subj", "/CN=breakwater-lab-node", "-keyout", "server-key.pem", "-out", "server.csr"];
    csr.extend_from_slice(&ec);
    ssl(&csr)?;
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )?;
    ssl(&[
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "3650", "-out",
        "server.pem", "-extfile", "server.ext",
    ])?;
    use std::os::unix::fs::PermissionsExt;
    for k in ["ca-key.pem", "server-key.pem"] {
        std::fs::set_permissions(d.join(k), std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn node_pid(port: u16) -> Option<i32> {
    let s = std::fs::read_to_string(node_dir(port).join("mysqld.pid")).ok()?;
    let pid: i32 = s.trim().parse().ok()?;
    proc::pid_alive(pid).then_some(pid)
}

fn node_ready(port: u16) -> bool {
    node_pid(port).is_some() && sql(port, "SELECT 1").is_ok()
}

/// The exact command line of a node, also written to its start.sh. Each node runs in its
/// own cgroup (breakwater-lab/node<port>), as a systemd service would: the agent attaches
/// its programs there, so they see the servers' sockets and not the clients'.
fn start_script(port: u16, primary: bool) -> String {
    let dir = node_dir(port);
    let d = dir.display();
    let server_id = port as u32 - 3300;
    let cgroup: String = crate::cgroup2::node_dirs(port)
        .iter()
        .map(|cg| format!("(mkdir -p {cg} && echo $$ > {cg}/cgroup.procs) 2>/dev/null || true\n", cg = cg.display()))
        .collect();
    let tls = tls_dir();
    let t = tls.display();
    format!(
        "#!/bin/sh\n# Starts lab node {port}; written by cargo xtask lab up.\n{cgroup}\
exec setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir={d}/data --port={port} \
--bind-address=127.0.0.1 --socket={d}/mysqld.sock --pid-file={d}/mysqld.pid --log-error={d}/error.log \
--server-id={server_id} --log-bin=mysql-bin --relay-log=relay-bin --log-slave-updates --binlog-format=ROW \
--gtid-strict-mode=1 --read-only={ro} --skip-name-resolve --max-connections=2000 --max-allowed-packet=64M \
--innodb-buffer-pool-size=96M --innodb-log-file-size=48M --innodb-flush-log-at-trx-commit=2 --sync-binlog=0 \
--performance-schema=OFF --userstat=1 --thread-cache-size=64 --table-open-cache=400 \
--rpl-semi-sync-master-enabled={semi} --rpl-semi-sync-master-wait-point=AFTER_SYNC --rpl-semi-sync-master-timeout=10000 \
--rpl-semi-sync-slave-enabled=1 --slave-net-timeout=5 \
--report-host=127.0.0.1 --report-port={port} --ssl-ca={t}/ca.pem --ssl-cert={t}/server.pem --ssl-key={t}/server-key.pem </dev/null >>{d}/stdout.log 2>&1 &\n",
        ro = if primary { 0 } else { 1 },
        semi = if primary { 1 } else { 0 }
    )
}

fn start_node(port: u16) -> Result<()> {
    if node_ready(port) {
        return Ok(());
    }
    let script = node_dir(port).join("start.sh");
    proc::run_inherit(Command::new("sh").arg(&script).stdout(Stdio::null()))?;
    wait_ready(port, Duration::from_secs(60))
}

fn wait_ready(port: u16, limit: Duration) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if node_ready(port) {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(3) && node_pid(port).is_none() {
            break; // the server exited; its log says why
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(node_dir(port).join("error.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    bail!(
        "node {port} did not become ready in {limit:?}; error.log tail:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

fn init_datadir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    proc::output(
        Command::new("mariadb-install-db")
            .args(["--no-defaults", "--user=root", "--skip-test-db"])
            .arg(format!("--datadir={}", dir.display()))
            .args(["--auth-root-authentication-method=socket"]),
    )?;
    Ok(())
}

pub fn up() -> Result<()> {
    let t = Instant::now();
    let ready_marker = lab_dir().join("ready");
    if !ready_marker.exists() {
        return create();
    }
    ensure_certs()?;
    for port in PORTS {
        // A lab made by an older xtask (before TLS, before the v1 cgroups): the new command
        // line, and a restart. The role (read_only) stays what the node's script said.
        let script = node_dir(port).join("start.sh");
        let old = std::fs::read_to_string(&script).unwrap_or_default();
        let primary = if old.is_empty() { port == PRIMARY } else { !old.contains("--read-only=1") };
        let new = start_script(port, primary);
        if old != new {
            println!("xtask: node {port}: its command line changed (restart)");
            std::fs::write(&script, new)?;
            stop_node(port);
        }
        start_node(port)?;
    }
    println!("xtask: lab up in {:.1}s (3307 primary, 3308/3309 replicas)", t.elapsed().as_secs_f64());
    Ok(())
}

/// Build the lab from nothing: one initialised data directory copied three times.
fn create() -> Result<()> {
    let t = Instant::now();
    down()?;
    let lab = lab_dir();
    if lab.exists() {
        std::fs::remove_dir_all(&lab).with_context(|| format!("removing {}", lab.display()))?;
    }
    let template = lab.join("template");
    init_datadir(&template)?;
    ensure_certs()?;
    for port in PORTS {
        let dir = node_dir(port);
        std::fs::create_dir_all(&dir)?;
        proc::run_inherit(
            Command::new("cp").arg("-a").arg(&template).arg(dir.join("data")),
        )?;
        std::fs::write(dir.join("start.sh"), start_script(port, port == PRIMARY))?;
    }
    std::fs::remove_dir_all(&template)?;
    for port in PORTS {
        start_node(port)?;
    }
    // No replica is connected yet: without this every commit below would wait out the
    // semi-sync timeout first. On again once the replicas follow.
    sql(PRIMARY, "SET GLOBAL rpl_semi_sync_master_enabled = 0")?;
    sql(
        PRIMARY,
        "CREATE USER 'repl'@'%' IDENTIFIED BY 'repl'; GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%'; \
         CREATE USER 'app'@'%' IDENTIFIED BY 'app'; GRANT ALL ON `sbtest%`.* TO 'app'@'%'; \
         CREATE USER 'monitor'@'%' IDENTIFIED BY 'monitor'; GRANT ALL ON *.* TO 'monitor'@'%' WITH GRANT OPTION; \
         CREATE DATABASE sbtest;",
    )?;
    for port in PORTS.iter().copied().filter(|p| *p != PRIMARY) {
        point_replica(port, PRIMARY)?;
    }
    for port in PORTS.iter().copied().filter(|p| *p != PRIMARY) {
        wait_caught_up(port)?;
    }
    // sysbench tables used by tests and benchmarks.
    proc::output(Command::new("sysbench").args([
        "oltp_read_write",
        "--db-driver=mysql",
        "--mysql-host=127.0.0.1",
        "--mysql-port=3307",
        "--mysql-user=app",
        "--mysql-password=app",
        "--mysql-db=sbtest",
        "--tables=4",
        "--table-size=10000",
        "prepare",
    ]))?;
    for port in PORTS.iter().copied().filter(|p| *p != PRIMARY) {
        wait_caught_up(port)?;
    }
    semi_sync_on()?;
    std::fs::write(lab_dir().join("ready"), "ok\n")?;
    println!("xtask: lab created in {:.1}s (3307 primary, 3308/3309 replicas)", t.elapsed().as_secs_f64());
    Ok(())
}

/// Semi-synchronous replication on the primary (AFTER_SYNC: a commit is acknowledged once a
/// replica has it), with both replicas registered as its semi-sync clients.
fn semi_sync_on() -> Result<()> {
    sql(PRIMARY, "SET GLOBAL rpl_semi_sync_master_enabled = 1")?;
    for port in PORTS.iter().copied().filter(|p| *p != PRIMARY) {
        // The IO thread registers as a semi-sync client when it starts.
        sql(port, "STOP SLAVE IO_THREAD; START SLAVE IO_THREAD")?;
    }
    let t = Instant::now();
    loop {
        let out = sql(PRIMARY, "SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_clients'")?;
        let n: u32 = out.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        if n as usize == PORTS.len() - 1 {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("semi-sync: {n} replica(s) registered on {PRIMARY}, expected {}", PORTS.len() - 1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn point_replica(port: u16, primary: u16) -> Result<()> {
    sql(
        port,
        &format!(
            "STOP SLAVE; SET GLOBAL gtid_slave_pos=''; CHANGE MASTER TO MASTER_HOST='127.0.0.1', \
             MASTER_PORT={primary}, MASTER_USER='repl', MASTER_PASSWORD='repl', \
             MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1; START SLAVE;"
        ),
    )?;
    Ok(())
}

/// Wait until the replica has applied everything the primary has written.
fn wait_caught_up(port: u16) -> Result<()> {
    let target = sql(PRIMARY, "SELECT @@gtid_binlog_pos")?.trim().to_string();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        let pos = sql(port, "SELECT @@gtid_slave_pos")?.trim().to_string();
        if pos == target {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = sql_vertical(port, "SHOW SLAVE STATUS").unwrap_or_default();
    bail!("replica {port} did not catch up with {target}: {st}")
}

/// Stop one node (TERM, then KILL after 30 s).
fn stop_node(port: u16) {
    if let Some(pid) = node_pid(port) {
        proc::stop(pid, Duration::from_secs(30));
    }
}

pub fn down() -> Result<()> {
    for port in PORTS {
        stop_node(port);
    }
    // The nodes' cgroups, once empty (a cgroup with processes left is not removed).
    for port in PORTS {
        for dir in crate::cgroup2::node_dirs(port) {
            let _ = std::fs::remove_dir(&dir);
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
    Ok(())
}

/// 3307 writable and replicating from nobody, 3308 and 3309 replicating from it: what
/// `create` builds and what the tests expect (a failover drill leaves something else).
pub fn is_initial() -> bool {
    let primary_ok = sql(PRIMARY, "SELECT @@read_only").is_ok_and(|s| s.trim() == "0")
        && sql(PRIMARY, "SHOW SLAVE STATUS").is_ok_and(|s| s.trim().is_empty());
    primary_ok
        && PORTS.iter().filter(|p| **p != PRIMARY).all(|p| {
            sql_vertical(*p, "SHOW SLAVE STATUS").is_ok_and(|st| {
                st.contains(&format!("Master_Port: {PRIMARY}")) && st.contains("Slave_IO_Running: Yes") && st.contains("Slave_SQL_Running: Yes")
            })
        })
}

pub fn reset() -> Result<()> {
    down()?;
    let _ = std::fs::remove_file(lab_dir().join("ready"));
    create()
}

pub fn status() -> Result<()> {
    println!("{:<6} {:<8} {:<6} {:<10} {:<10} {:<8} gtid_current_pos", "port", "pid", "up", "read_only", "repl", "lag");
    for port in PORTS {
        let pid = node_pid(port);
        let up = pid.is_some() && node_ready(port);
        let (ro, repl, lag, gtid) = if up {
            let ro = sql(port, "SELECT @@read_only").unwrap_or_default().trim().to_string();
            let gtid = sql(port, "SELECT @@gtid_current_pos").unwrap_or_default().trim().to_string();
            let st = sql_vertical(port, "SHOW SLAVE STATUS").unwrap_or_default();
            let field = |name: &str| {
                st.lines()
                    .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")).map(str::to_string))
                    .unwrap_or_else(|| "-".into())
            };
            let repl = if st.trim().is_empty() {
                "primary".to_string()
            } else {
                format!("{}/{}", field("Slave_IO_Running"), field("Slave_SQL_Running"))
            };
            (ro, repl, field("Seconds_Behind_Master"), gtid)
        } else {
            ("-".into(), "-".into(), "-".into(), "-".into())
        };
        println!(
            "{:<6} {:<8} {:<6} {:<10} {:<10} {:<8} {}",
            port,
            pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            up,
            ro,
            repl,
            lag,
            gtid
        );
    }
    Ok(())
}

/// Run a query and return its vertical (\G) output with column names.
fn sql_vertical(port: u16, query: &str) -> Result<String> {
    let out = proc::output(
        Command::new("mariadb")
            .args(["--no-defaults", "-uroot", "-E"])
            .arg(format!("--socket={}", socket(port).display()))
            .args(["-e", query]),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
