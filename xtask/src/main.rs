//! `cargo xtask …`: everything a person runs around Breakwater.
//!
//! - `deps`   install the Debian packages the lab, tests and benches need
//! - `lab`    up | down | status | reset: a 3-node MariaDB GTID replication lab on 127.0.0.1:3307-3309
//! - `demo`   lab + proxy on its embedded default config, in the foreground
//! - `test`   deps, lab, every test, then stop what it started
//! - `bench`  sysbench direct vs through the proxy, interleaved, with ratios and p95
//! - `drill failover`  kill -9 the lab's primary under a writer loop through the proxy; print the timeline

mod bench;
/// Shared with the tests (testkit): one definition of where cgroup v2 is mounted.
#[path = "../../testkit/src/cgroup2.rs"]
#[allow(dead_code)]
mod cgroup2;
mod deps;
mod lab;
mod proc;
mod test;

use anyhow::{bail, Result};

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    match args.first().map(String::as_str) {
        Some("deps") => deps::ensure(),
        Some("lab") => lab::command(&rest),
        Some("demo") => demo(),
        Some("test") => test::run(&rest),
        Some("bench") => bench::run(&rest),
        Some("drill") => drill(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <deps | lab up|down|status|reset | demo | test | bench | drill failover [--async]>"
            );
            bail!("unknown or missing command")
        }
    }
}

/// Install what is missing, start the lab and run the proxy on its embedded default config.
fn demo() -> Result<()> {
    deps::ensure()?;
    lab::up()?;
    proc::cargo(&["build", "-p", "breakwater-proxy"])?;
    let bin = proc::target_bin("debug", "breakwater-proxy");
    println!();
    println!("Breakwater proxy starting on 127.0.0.1:6033 (writer hostgroup 10 = 3307, readers 20 = 3308/3309).");
    println!("Connect with:   mariadb -h127.0.0.1 -P6033 -uapp -papp sbtest");
    println!("Topology page:  http://127.0.0.1:6070/topology   (failover: cargo run -p breakwater-proxy -- failover status)");
    println!("Stop with Ctrl-C; stop the lab with: cargo xtask lab down");
    println!();
    let admin_db = lab::lab_dir().join("breakwater-admin.db");
    println!("Admin (SQL):    mariadb -h127.0.0.1 -P6032 -uadmin -padmin   (saved config and access grants: {})", admin_db.display());
    println!("Temporary user: cargo run -p breakwater-proxy -- access grant --user alice --ttl 1h --role read_only --schema sbtest");
    let status = std::process::Command::new(bin).arg("--admin-db").arg(&admin_db).status()?;
    if !status.success() {
        bail!("proxy exited with {status}");
    }
    Ok(())
}

/// `cargo xtask drill failover [--async]`: from a fresh lab, kill -9 the primary while a
/// writer loop runs through the proxy; prints detected / promoted / first write and the
/// events. With --async the lab's semi-synchronous replication stays off and lost
/// acknowledged writes are reported instead of failing the drill.
fn drill(args: &[&str]) -> Result<()> {
    if args.first().copied() != Some("failover") {
        bail!("usage: cargo xtask drill failover [--async]");
    }
    deps::ensure()?;
    lab::reset()?;
    let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["test", "-p", "breakwater-proxy", "--test", "failover", "drill", "--", "--ignored", "--nocapture"]);
    if args.contains(&"--async") {
        cmd.env("BREAKWATER_DRILL_ASYNC", "1");
    }
    proc::run_inherit(&mut cmd)
}
