//! `cargo xtask …`: everything a person runs around Breakwater.
//!
//! - `deps`   install the Debian packages the lab, tests and benches need
//! - `lab`    up [--etcd] | down | status | reset: a 3-node MariaDB GTID replication lab on 127.0.0.1:3307-3309
//!   (and with --etcd one etcd on 127.0.0.1:2379 for several proxies)
//! - `demo`   lab + proxy on its embedded default config, in the foreground
//! - `test`   deps, lab, every test, then stop what it started
//! - `bench`  sysbench direct vs through the proxy, interleaved, with ratios and p95
//! - `drill failover`  kill -9 the lab's primary under a writer loop through the proxy; print the timeline
//! - `drill cascade`   the seed's outage replayed under the orchestrator and the breakwater failover
//!   policy, side by side (see `proxy/tests/cascade.rs`)

mod bench;
mod etcd;
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
                "usage: cargo xtask <deps | lab up [--etcd]|down|status|reset | demo | test | bench | drill failover [--async] | drill cascade [--policy P] [--json] [--keep] [--short]>"
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
    println!(
        "Admin API token (commands need it): the proxy writes one to {0}.admin-token; for the CLI: export BREAKWATER_ADMIN_TOKEN=$(cat {0}.admin-token)",
        admin_db.display()
    );
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
///
/// `cargo xtask drill cascade [--policy orchestrator|breakwater] [--json] [--keep] [--short]`:
/// the seed's outage, once per policy from a fresh lab (both by default, orchestrator first).
fn drill(args: &[&str]) -> Result<()> {
    match args.first().copied() {
        Some("failover") => {}
        Some("cascade") => return drill_cascade(&args[1..]),
        _ => bail!("usage: cargo xtask drill failover [--async] | drill cascade [--policy orchestrator|breakwater] [--json] [--keep] [--short]"),
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

/// One policy's run of the cascade drill, as the test printed it.
struct CascadeRun {
    policy: String,
    /// (seconds from the kill, or None for a summary line; text)
    timeline: Vec<(Option<f64>, String)>,
    json: serde_json::Value,
}

impl CascadeRun {
    /// What the drill requires of this policy's run.
    fn passed(&self) -> bool {
        let verdict = self.json["verdict"].as_str().unwrap_or("");
        match self.policy.as_str() {
            "orchestrator" => verdict.starts_with("cascade reproduced"),
            _ => verdict.starts_with("cascade stopped"),
        }
    }
}

fn drill_cascade(args: &[&str]) -> Result<()> {
    let mut policies: Vec<String> = vec!["orchestrator".into(), "breakwater".into()];
    let (mut json, mut keep, mut short) = (false, false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--json" => json = true,
            "--keep" => keep = true,
            "--short" => short = true,
            "--policy" => policies = vec![it.next().map(|p| p.to_string()).unwrap_or_default()],
            p if p.starts_with("--policy=") => policies = vec![p["--policy=".len()..].to_string()],
            other => bail!("drill cascade: unknown argument {other:?}"),
        }
    }
    if let Some(p) = policies.iter().find(|p| *p != "orchestrator" && *p != "breakwater") {
        bail!("drill cascade: --policy {p:?}: expected orchestrator or breakwater");
    }
    deps::ensure()?;
    proc::cargo(&["build", "-p", "breakwater-agent", "-p", "breakwater-proxy", "--bins"])?;
    let (warmup, after) = if short { ("12", "30") } else { ("20", "60") };
    let mut runs = Vec::new();
    for policy in &policies {
        lab::reset()?;
        eprintln!("xtask: drill cascade, policy {policy}: {warmup} s of load, kill -9 of the primary, {after} s more");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(cargo)
            .args(["test", "-p", "breakwater-proxy", "--test", "cascade", "--", "--ignored", "--nocapture", "--exact", "drill"])
            .current_dir(proc::root())
            .env("BREAKWATER_DRILL_POLICY", policy)
            .env("BREAKWATER_DRILL_KEEP", if keep { "1" } else { "0" })
            .env("BREAKWATER_DRILL_WARMUP_S", warmup)
            .env("BREAKWATER_DRILL_AFTER_S", after)
            .stderr(std::process::Stdio::inherit())
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut run = CascadeRun { policy: policy.clone(), timeline: Vec::new(), json: serde_json::Value::Null };
        for line in stdout.lines() {
            if let Some(rest) = line.strip_prefix("DRILL-TIMELINE ") {
                let mut f = rest.splitn(3, '\t');
                let (_, t, text) = (f.next(), f.next().unwrap_or("-"), f.next().unwrap_or(""));
                run.timeline.push((t.parse().ok(), text.to_string()));
            } else if let Some(j) = line.strip_prefix("DRILL-JSON ") {
                run.json = serde_json::from_str(j)?;
            }
        }
        if run.json.is_null() {
            eprintln!("{stdout}");
            bail!("drill cascade: the {policy} run printed no result ({})", out.status);
        }
        runs.push(run);
    }
    if !keep {
        lab::reset()?;
    }
    let text = side_by_side(&runs);
    if json {
        eprint!("{text}");
        for r in &runs {
            println!("{}", r.json);
        }
    } else {
        print!("{text}");
        println!();
        for r in &runs {
            println!("{}", r.json);
        }
    }
    let failed: Vec<&str> = runs.iter().filter(|r| !r.passed()).map(|r| r.policy.as_str()).collect();
    if !failed.is_empty() {
        bail!("drill cascade: not what the drill requires from {}", failed.join(", "));
    }
    Ok(())
}

/// The runs' timelines in columns, merged by time from the kill.
fn side_by_side(runs: &[CascadeRun]) -> String {
    const W: usize = 66;
    let wrap = |s: &str| -> Vec<String> {
        let mut lines = Vec::new();
        let mut cur = String::new();
        for word in s.split(' ') {
            if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > W {
                lines.push(std::mem::take(&mut cur));
                cur.push_str("    ");
            }
            if !cur.is_empty() && !cur.ends_with("    ") {
                cur.push(' ');
            }
            cur.push_str(word);
        }
        lines.push(cur);
        lines
    };
    let mut out = String::new();
    let head: Vec<String> = runs.iter().map(|r| format!("policy {}", r.policy)).collect();
    out.push_str(&format!("\n{:>8}  {}\n", "t (s)", head.iter().map(|h| format!("{h:<W$}")).collect::<Vec<_>>().join(" | ")));
    out.push_str(&format!("{}\n", "-".repeat(10 + runs.len() * (W + 3))));
    let mut rows: Vec<(f64, usize, &str)> = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        for (t, text) in &r.timeline {
            if let Some(t) = t {
                rows.push((*t, i, text));
            }
        }
    }
    rows.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1)));
    for (t, i, text) in rows {
        for (k, part) in wrap(text).into_iter().enumerate() {
            let cols: Vec<String> = (0..runs.len()).map(|j| if j == i { format!("{part:<W$}") } else { " ".repeat(W) }).collect();
            let tcol = if k == 0 { format!("{t:>+8.2}") } else { " ".repeat(8) };
            out.push_str(&format!("{tcol}  {}\n", cols.join(" | ").trim_end()));
        }
    }
    for r in runs {
        out.push_str(&format!("\npolicy {}:\n", r.policy));
        for (t, text) in &r.timeline {
            if t.is_none() {
                out.push_str(&format!("  {text}\n"));
            }
        }
        let j = &r.json;
        out.push_str(&format!(
            "  promoted {}, crashes {}, writes unavailable {} s, reads served {:.2}%\n",
            j["promoted"],
            j["crashes"],
            j["write_unavailable_seconds"],
            j["reads_served_ratio"].as_f64().unwrap_or(0.0) * 100.0
        ));
        out.push_str(&format!("  verdict: {}\n", j["verdict"].as_str().unwrap_or("?")));
    }
    out
}
