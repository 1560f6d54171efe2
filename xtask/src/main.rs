//! `cargo xtask …`: everything a person runs around Breakwater.
//!
//! - `deps`   install the Debian packages the lab, tests and benches need
//! - `lab`    up | down | status | reset: a 3-node MariaDB GTID replication lab on 127.0.0.1:3307-3309
//! - `demo`   lab + proxy on its embedded default config, in the foreground
//! - `test`   deps, lab, every test, then stop what it started
//! - `bench`  sysbench direct vs through the proxy, interleaved, with ratios and p95

mod bench;
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
        _ => {
            eprintln!(
                "usage: cargo xtask <deps | lab up|down|status|reset | demo | test | bench>"
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
    println!("Stop with Ctrl-C; stop the lab with: cargo xtask lab down");
    println!();
    let status = std::process::Command::new(bin).status()?;
    if !status.success() {
        bail!("proxy exited with {status}");
    }
    Ok(())
}
