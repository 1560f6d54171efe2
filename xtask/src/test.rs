//! `cargo xtask test`: install what is missing, start the lab, run every test, stop what it started.
//!
//! Tests that share the lab run first, in parallel; each uses its own schema (sbtest_<name>) and
//! its own proxy process on its own port. Tests that kill lab nodes run afterwards, one at a time.

use crate::{deps, lab, proc};
use anyhow::Result;

/// Test targets that must have the lab to themselves (kill -9 a node; count every
/// connection on a port in the kernel): they run serially, last. (package, target)
const SERIAL: &[(&str, &str)] = &[("breakwater-proxy", "faults"), ("breakwater-agent", "agent"), ("breakwater-proxy", "adaptive")];

/// Tests that change the lab's topology (promotions): last, from and back to a fresh lab.
const TOPOLOGY: &[(&str, &str)] = &[("breakwater-proxy", "failover")];

pub fn run(extra: &[&str]) -> Result<()> {
    deps::ensure()?;
    let was_running = lab_running();
    lab::up()?;
    if !lab::is_initial() {
        println!("xtask: the lab is not in its initial topology (a drill?): resetting it");
        lab::reset()?;
    }
    let result = run_tests(extra);
    if !was_running {
        println!("xtask: stopping the lab it started");
        lab::down()?;
    }
    result
}

fn lab_running() -> bool {
    lab::PORTS.iter().all(|p| lab::sql(*p, "SELECT 1").is_ok())
}

fn run_tests(extra: &[&str]) -> Result<()> {
    // One build of everything, debug.
    proc::cargo(&["build", "--workspace", "--all-targets"])?;
    let mut shared = vec!["test", "--workspace"];
    shared.extend_from_slice(&["--lib", "--bins", "--test", "e2e", "--test", "clients"]);
    shared.push("--");
    shared.extend_from_slice(extra);
    proc::cargo(&shared)?;
    for (package, target) in SERIAL {
        let mut args = vec!["test", "-p", package, "--test", target, "--", "--test-threads=1"];
        args.extend_from_slice(extra);
        proc::cargo(&args)?;
    }
    for (package, target) in TOPOLOGY {
        lab::reset()?;
        let mut args = vec!["test", "-p", package, "--test", target, "--", "--test-threads=1", "--nocapture"];
        args.extend_from_slice(extra);
        let r = proc::cargo(&args);
        lab::reset()?;
        r?;
    }
    Ok(())
}
