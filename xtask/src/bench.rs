//! `cargo xtask bench`: sysbench direct to the primary vs through the proxy, interleaved in one run.
//!
//! Prints QPS per target, the ratio proxied/direct, p95 latency, and the proxy's peak RSS.
//! A benchmark, not a test: nothing here asserts timings.

use crate::{deps, lab, proc};
use anyhow::{bail, Context, Result};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Run {
    qps: f64,
    p95_ms: f64,
    errors: u64,
}

fn sysbench(workload: &str, port: u16, threads: u32, secs: u32, extra: &[&str]) -> Result<Run> {
    let out = proc::output(
        Command::new("sysbench")
            .arg(workload)
            .args([
                "--db-driver=mysql",
                "--mysql-host=127.0.0.1",
                "--mysql-user=app",
                "--mysql-password=app",
                "--mysql-db=sbtest",
                "--tables=4",
                "--table-size=10000",
                "--percentile=95",
                "--report-interval=0",
            ])
            .arg(format!("--mysql-port={port}"))
            .arg(format!("--threads={threads}"))
            .arg(format!("--time={secs}"))
            .args(extra)
            .arg("run"),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_sysbench(&text).with_context(|| format!("parsing sysbench output:\n{text}"))
}

fn parse_sysbench(text: &str) -> Result<Run> {
    let mut qps = None;
    let mut p95 = None;
    let mut errors = 0;
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("queries:") {
            // "queries:                             123456 (12345.67 per sec.)"
            qps = rest
                .split('(')
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok());
        } else if let Some(rest) = l.strip_prefix("95th percentile:") {
            p95 = rest.trim().parse().ok();
        } else if let Some(rest) = l.strip_prefix("ignored errors:") {
            errors = rest.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0);
        }
    }
    match (qps, p95) {
        (Some(qps), Some(p95_ms)) => Ok(Run { qps, p95_ms, errors }),
        _ => bail!("no queries/95th percentile lines"),
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Proxy(Child);
impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fail when something already listens on `port` (a stray process would be measured instead).
fn ensure_free(port: u16) -> Result<()> {
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        anyhow::bail!("127.0.0.1:{port} is already in use: stop what listens there first");
    }
    Ok(())
}

fn wait_port(port: u16) -> Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listening on {port}")
}

/// Interleave direct (3307) and proxied runs twice each; print the means and the ratio.
fn compare(workload: &str, label: &str, threads: u32, proxy_port: u16, secs: u32, extra: &[&str], note: &str) -> Result<()> {
    let mut d = Vec::new();
    let mut p = Vec::new();
    for _ in 0..2 {
        d.push(sysbench(workload, 3307, threads, secs / 2, extra)?);
        p.push(sysbench(workload, proxy_port, threads, secs / 2, extra)?);
    }
    let mean = |v: &[Run], f: fn(&Run) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    let (dq, pq) = (mean(&d, |r| r.qps), mean(&p, |r| r.qps));
    println!(
        "{:<20} {:>7} {:>12.0} {:>12.0} {:>8.2} {:>9.2}ms {:>9.2}ms {:>7}{note}",
        label,
        threads,
        dq,
        pq,
        pq / dq,
        mean(&d, |r| r.p95_ms),
        mean(&p, |r| r.p95_ms),
        p.iter().map(|r| r.errors).sum::<u64>()
    );
    Ok(())
}

pub fn run(args: &[&str]) -> Result<()> {
    let secs: u32 = args
        .iter()
        .find_map(|a| a.strip_prefix("--time="))
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    deps::ensure()?;
    lab::up()?;
    proc::cargo(&["build", "--release", "-p", "breakwater-proxy"])?;
    let bin = proc::target_bin("release", "breakwater-proxy");
    for port in [6033, 6034, 9435] {
        ensure_free(port)?;
    }
    // `cargo xtask bench agent` / `bench cache`: one part only.
    match args.iter().find(|a| !a.starts_with("--")).copied() {
        Some("agent") => return agent_overhead(secs),
        Some("cache") => return cache_hit(&bin, secs),
        Some(other) => anyhow::bail!("unknown bench part {other:?} (agent, cache, or none for all)"),
        None => {}
    }
    let child = Command::new(&bin)
        // One worker thread: on a 2-core box shared with sysbench and three servers, a
        // second proxy thread only adds context switches (measured: ~10% fewer QPS).
        .args(["--listen", "127.0.0.1:6033", "--log-level", "warn", "--worker-threads", "1"])
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let proxy = Proxy(child);
    wait_port(6033)?;
    std::thread::sleep(Duration::from_secs(2)); // first health checks

    println!("\n{:<20} {:>7} {:>12} {:>12} {:>8} {:>11} {:>11} {:>7}",
        "workload", "threads", "direct qps", "proxy qps", "ratio", "direct p95", "proxy p95", "errors");
    for workload in ["oltp_point_select", "oltp_read_only"] {
        for threads in [8u32, 32] {
            compare(workload, workload, threads, 6033, secs, &[], "")?;
        }
    }
    println!("\nproxy peak RSS: {:.1} MiB (release build, --worker-threads 1)", peak_rss_kib(proxy.0.id()) as f64 / 1024.0);
    println!("direct = sysbench to 3307; proxy = sysbench to 6033 (reads to 3308/3309 by the default rules)");
    drop(proxy);
    cache_hit(&bin, secs)?;
    agent_overhead(secs)
}

/// point_select over the text protocol through a caching query rule vs direct, 32 threads.
fn cache_hit(bin: &std::path::Path, secs: u32) -> Result<()> {
    let base = std::fs::read_to_string(proc::root().join("proxy/breakwater.toml"))?;
    let cfg = format!(
        "{base}\n[[query_rules]]\nrule_id = 10\nmatch_digest = '^SELECT c FROM sbtest'\ndestination_hostgroup = 20\ncache_ttl = 600000\napply = true\n"
    );
    let path = proc::root().join("target/bench-cache.toml");
    std::fs::write(&path, cfg)?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(&path)
        .args(["--listen", "127.0.0.1:6034", "--admin-listen", "", "--failover", "off", "--log-level", "warn", "--worker-threads", "1"])
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let proxy = Proxy(child);
    wait_port(6034)?;
    std::thread::sleep(Duration::from_secs(2));
    let text = ["--db-ps-mode=disable"];
    // Warm the cache (40000 distinct keys).
    sysbench("oltp_point_select", 6034, 32, 5, &text)?;
    compare("oltp_point_select", "point_select cached", 32, 6034, secs, &text, "   (query cache hits, text protocol; target ratio >= 2.0)")?;
    println!("proxy (cache) peak RSS: {:.1} MiB", peak_rss_kib(proxy.0.id()) as f64 / 1024.0);
    Ok(())
}

/// (run_time_ns, run_cnt) summed over the BPF programs a process holds, from
/// /proc/PID/fdinfo (filled while kernel.bpf_stats_enabled=1).
fn bpf_prog_stats(pid: u32) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return total };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        if !text.contains("prog_type:") {
            continue;
        }
        for l in text.lines() {
            let mut it = l.split_whitespace();
            match (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) {
                (Some("run_time_ns:"), Some(v)) => total.0 += v,
                (Some("run_cnt:"), Some(v)) => total.1 += v,
                _ => {}
            }
        }
    }
    total
}

/// One sysbench oltp_point_select run on 3307, with or without the agent attached.
struct AgentSample {
    qps: f64,
    /// BPF run time per query (kernel.bpf_stats_enabled), with the agent.
    bpf_ns: f64,
    /// The agent process's own CPU, in % of one core.
    agent_cpu: f64,
    /// Busy CPU of the whole host per query, µs.
    host_us: f64,
}

const AGENT_ARGS: &[&str] = &["--ports", "3307", "--prometheus-listen", "127.0.0.1:9435", "--log-level", "warn"];
const NOOP_ARGS: &[&str] = &["--calibrate-noop", "--prometheus-listen", "127.0.0.1:9435"];

fn agent_sample(bin: &std::path::Path, agent_args: Option<&[&str]>, secs: u32, extra: &[&str]) -> Result<AgentSample> {
    let agent = if let Some(args) = agent_args {
        let child = Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let agent = Proxy(child);
        wait_port(9435)?;
        Some(agent)
    } else {
        None
    };
    let pid = agent.as_ref().map(|a| a.0.id()).unwrap_or(0);
    let (bpf0, cpu0, host0) = (bpf_prog_stats(pid), cpu_ticks(pid), host_busy_ticks());
    let run = sysbench("oltp_point_select", 3307, 32, secs, extra)?;
    let (bpf1, cpu1, host1) = (bpf_prog_stats(pid), cpu_ticks(pid), host_busy_ticks());
    let queries = (run.qps * secs as f64).max(1.0);
    Ok(AgentSample {
        qps: run.qps,
        bpf_ns: (bpf1.0 - bpf0.0) as f64 / queries,
        agent_cpu: cpu1.saturating_sub(cpu0) as f64 / secs as f64, // ticks are 1/100 s
        host_us: host1.saturating_sub(host0) as f64 * 10_000.0 / queries,
    })
}

/// The eBPF agent's cost on 3307: sysbench oltp_point_select at full speed, 32 threads, runs
/// with and without the agent alternating (without/with, with/without, ...) so drift favours
/// neither. Single runs on this 2-core VM differ by several per cent either way, so eight
/// pairs are averaged. Also the BPF run time per query (kernel.bpf_stats_enabled), the host's
/// busy CPU per query and the agent process's own CPU. (A fixed-rate run to compare CPU per
/// query does not work here: sysbench's rate limiter keeps the cores busy by itself.)
fn agent_overhead(secs: u32) -> Result<()> {
    proc::cargo(&["build", "--release", "-p", "breakwater-agent"])?;
    let bin = proc::target_bin("release", "breakwater-agent");
    proc::run_inherit(Command::new("sysctl").args(["-q", "-w", "kernel.bpf_stats_enabled=1"]))?;
    let run_secs = (secs / 3).max(3);
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..8 {
        for attached in if round % 2 == 0 { [false, true] } else { [true, false] } {
            let s = agent_sample(&bin, attached.then_some(AGENT_ARGS), run_secs, &[])?;
            if attached { with.push(s) } else { without.push(s) }
        }
    }
    let mean = |v: &[AgentSample], f: fn(&AgentSample) -> f64| v.iter().map(f).sum::<f64>() / v.len().max(1) as f64;
    let (a, b) = (mean(&without, |s| s.qps), mean(&with, |s| s.qps));
    // The same hooks with programs that do nothing: what running any program there costs,
    // bpf_stats accounting included (the local sysbench client's own socket calls fire them too).
    let mut noop = Vec::new();
    for _ in 0..2 {
        noop.push(agent_sample(&bin, Some(NOOP_ARGS), run_secs, &[])?);
    }
    let _ = Command::new("sysctl").args(["-q", "-w", "kernel.bpf_stats_enabled=0"]).status();
    let bpf_ns = mean(&with, |s| s.bpf_ns);
    let agent_cpu = mean(&with, |s| s.agent_cpu);
    let (hu0, hu1) = (mean(&without, |s| s.host_us), mean(&with, |s| s.host_us));
    println!("\nagent overhead: sysbench oltp_point_select on 3307, 32 threads, {} alternating pairs of {run_secs} s", without.len());
    println!("{:<34} {:>12} {:>12} {:>9}   target", "", "without", "with agent", "change");
    println!("{:<34} {:>12.0} {:>12.0} {:>8.1}%   loss < 3%", "QPS", a, b, (b - a) / a * 100.0);
    println!("{:<34} {:>12.1} {:>12.1} {:>8.1}%", "host busy CPU per query (us)", hu0, hu1, (hu1 - hu0) / hu0 * 100.0);
    println!("{:<34} {:>12} {:>12.0} {:>9}   < 1000 ns", "BPF run time per query (ns)", "", bpf_ns, "");
    println!("{:<34} {:>12} {:>12.0}", "  same hooks, empty programs (ns)", "", mean(&noop, |s| s.bpf_ns));
    println!("{:<34} {:>12} {:>11.1}%", "agent process CPU (% of a core)", "", agent_cpu);
    let pairs: Vec<String> = without.iter().zip(&with).map(|(w, x)| format!("{:.0}/{:.0}", w.qps, x.qps)).collect();
    println!("saturated pairs (without/with): {}", pairs.join(", "));
    Ok(())
}

/// Busy CPU ticks of the whole host (all but idle and iowait), from /proc/stat.
fn host_busy_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return 0 };
    let Some(line) = stat.lines().next() else { return 0 };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    [0usize, 1, 2, 5, 6, 7].iter().filter_map(|i| v.get(*i)).sum()
}

/// utime + stime of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // Fields after the command name (which may contain spaces): state is field 3.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    num(11) + num(12) // utime, stime (fields 14 and 15)
}
