//! `cargo xtask test`: install what is missing, start the lab, run every test, stop what it started.
//!
//! Tests that share the lab run first, in parallel; each uses its own schema (sbtest_<name>) and
//! its own proxy process on its own port. Tests that kill lab nodes run afterwards, one at a time.

use crate::{deps, lab, proc};
use anyhow::Result;

/// Test targets that must have the lab to themselves (kill -9 a node; count every
/// connection on a port in the kernel): they run serially, last. (package, target)
const SERIAL: &[(&str, &str)] = &[("breakwater-proxy", "faults"), ("breakwater-agent", "agent"), ("breakwater-proxy", "adaptive")];

/// Tests that change the lab's topology (promotions) or limit its nodes: last, each from and
/// back to a fresh lab. (package, target, one test by its exact name or all of the target)
const TOPOLOGY: &[(&str, &str, Option<&str>)] = &[
    ("breakwater-proxy", "failover", Some("admin_added_server_joins_the_controller")),
    ("breakwater-proxy", "failover", Some("cluster_survives_primary_failures")),
    ("breakwater-proxy", "failover", Some("restarted_proxy_keeps_its_decisions")),
    ("breakwater-proxy", "failover", Some("proxy_killed_after_step_chosen")),
    ("breakwater-proxy", "failover", Some("proxy_killed_after_step_caught_up")),
    ("breakwater-proxy", "failover", Some("proxy_killed_after_step_promoted")),
    ("breakwater-proxy", "failover", Some("proxy_killed_after_step_switched")),
    ("breakwater-proxy", "failover", Some("proxy_killed_after_step_repointed")),
    ("breakwater-proxy", "failover", Some("proxy_killed_during_switchover")),
    // Several proxies through etcd (each test starts its own etcd on free ports).
    ("breakwater-proxy", "failover", Some("three_proxies_one_promotion")),
    ("breakwater-proxy", "failover", Some("leader_killed_mid_recovery")),
    ("breakwater-proxy", "failover", Some("cut_off_from_etcd_never_promotes")),
    ("breakwater-proxy", "failover", Some("etcd_over_tls_with_users")),
    ("breakwater-proxy", "cascade", Some("only_unfit_candidates_nothing_is_promoted_until_a_person_acts")),
    // The short cascade drill, once per policy (`cargo xtask drill cascade` is the long one).
    ("breakwater-proxy", "cascade", Some("short_drill_orchestrator_cascades")),
    ("breakwater-proxy", "cascade", Some("short_drill_breakwater_stops_the_cascade")),
];

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
    for (package, target, only) in TOPOLOGY {
        lab::reset()?;
        let mut args = vec!["test", "-p", package, "--test", target, "--", "--test-threads=1", "--nocapture"];
        if let Some(name) = only {
            args.extend_from_slice(&["--exact", name]);
        }
        args.extend_from_slice(extra);
        if let Err(e) = proc::cargo(&args) {
            lab::reset()?;
            return Err(e);
        }
    }
    // Back to the initial topology, the nodes' limits lifted.
    lab::reset()
}
