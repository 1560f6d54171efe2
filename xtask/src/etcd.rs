//! `cargo xtask lab up --etcd`: one etcd (Debian's etcd-server 3.4) on 127.0.0.1:2379 for
//! proxies started with `--etcd http://127.0.0.1:2379` (leader election, shared failover
//! state). Data and log in `.lab-etcd` (beside `.lab`); `lab down` stops it.

use crate::{lab, proc};
use anyhow::{bail, Result};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const URL: &str = "http://127.0.0.1:2379";
const PORT: u16 = 2379;

/// Beside the lab's directory, not in it: `lab reset` rebuilds the MariaDB nodes only.
fn dir() -> PathBuf {
    PathBuf::from(format!("{}-etcd", lab::lab_dir().display()))
}

/// Whether an etcd answers healthy on 127.0.0.1:2379.
pub fn healthy() -> bool {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], PORT).into(), Duration::from_millis(500)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:2379\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}

fn pid() -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir().join("etcd.pid")).ok()?.trim().parse().ok()?;
    proc::pid_alive(pid).then_some(pid)
}

pub fn up() -> Result<()> {
    if healthy() {
        println!("xtask: etcd already answers on {URL}");
        return Ok(());
    }
    let d = dir();
    std::fs::create_dir_all(&d)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(d.join("etcd.log"))?;
    let child = Command::new("setsid")
        .arg("etcd")
        .args(["--name", "lab", "--data-dir"])
        .arg(d.join("data"))
        .args(["--listen-client-urls", URL, "--advertise-client-urls", URL])
        .args(["--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
        .args(["--initial-cluster", "lab=http://127.0.0.1:2380"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    std::fs::write(d.join("etcd.pid"), format!("{}\n", child.id()))?;
    let t = Instant::now();
    while !healthy() {
        if t.elapsed() > Duration::from_secs(20) {
            let log = std::fs::read_to_string(d.join("etcd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            bail!("etcd did not become healthy on {URL} in 20 s; etcd.log tail:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("xtask: etcd up on {URL} in {:.1}s (start proxies with --etcd {URL})", t.elapsed().as_secs_f64());
    Ok(())
}

/// Stop the etcd `up` started (one started otherwise is left alone).
pub fn down() {
    if let Some(pid) = pid() {
        proc::stop(pid, Duration::from_secs(10));
    }
}

pub fn status() -> String {
    match (healthy(), pid()) {
        (true, Some(p)) => format!("etcd: healthy on {URL} (pid {p}, cargo xtask lab up --etcd)"),
        (true, None) => format!("etcd: healthy on {URL} (not started by xtask)"),
        (false, _) => "etcd: not running (cargo xtask lab up --etcd starts it)".into(),
    }
}
