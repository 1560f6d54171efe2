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
    /// Latency at the percentile sysbench was asked for (95, or 99 with --percentile=99).
    pct_ms: f64,
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
        } else if let Some((_, rest)) = l.split_once("th percentile:") {
            // 95th by default; 99th where a row asks for --percentile=99.
            p95 = rest.trim().parse().ok();
        } else if let Some(rest) = l.strip_prefix("ignored errors:") {
            errors = rest.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0);
        }
    }
    match (qps, p95) {
        (Some(qps), Some(pct_ms)) => Ok(Run { qps, pct_ms, errors }),
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
        mean(&d, |r| r.pct_ms),
        mean(&p, |r| r.pct_ms),
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
    // `--baseline=PATH`: also run point_select through another proxy binary in this run.
    let baseline: Option<String> = args.iter().find_map(|a| a.strip_prefix("--baseline=")).map(str::to_string);
    if baseline.is_some() {
        ensure_free(6035)?;
    }
    // `cargo xtask bench agent` / `bench cache` / `bench big`: one part only.
    match args.iter().find(|a| !a.starts_with("--")).copied() {
        Some("agent") => return agent_overhead(secs),
        Some("cache") => return cache_hit(&bin, secs),
        Some("big") => {
            let proxy = start_main_proxy(&bin)?;
            return big_statement(proxy.0.id(), 6033);
        }
        Some("adaptive") => return adaptive(&bin, secs),
        Some("proxy") => {}
        Some(other) => anyhow::bail!("unknown bench part {other:?} (proxy, adaptive, agent, cache, big, or none for all)"),
        None => {}
    }
    let proxy_only = args.contains(&"proxy");
    let proxy = start_main_proxy(&bin)?;

    println!("\n{:<20} {:>7} {:>12} {:>12} {:>8} {:>11} {:>11} {:>7}",
        "workload", "threads", "direct qps", "proxy qps", "ratio", "direct p95", "proxy p95", "errors");
    for workload in ["oltp_point_select", "oltp_read_only"] {
        for threads in [8u32, 32] {
            compare(workload, workload, threads, 6033, secs, &[], "")?;
        }
    }
    if let Some(base) = &baseline {
        // The same rows through another build (e.g. the previous commit's), in this run.
        let child = Command::new(base)
            .args(["--listen", "127.0.0.1:6035", "--admin-listen", "", "--admin-mysql-listen", "", "--failover", "off"])
            .args(["--log-level", "warn", "--worker-threads", "1"])
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {base}"))?;
        let _b = Proxy(child);
        wait_port(6035)?;
        std::thread::sleep(Duration::from_secs(2));
        for threads in [8u32, 32] {
            compare("oltp_point_select", "point_select base", threads, 6035, secs, &[], "   (--baseline build)")?;
            compare("oltp_point_select", "oltp_point_select", threads, 6033, secs, &[], "   (this build, again)")?;
        }
    }
    println!("\nproxy peak RSS: {:.1} MiB (release build, --worker-threads 1)", peak_rss_kib(proxy.0.id()) as f64 / 1024.0);
    println!("direct = sysbench to 3307; proxy = sysbench to 6033 (reads to 3308/3309 by the default rules)");
    big_statement(proxy.0.id(), 6033)?;
    drop(proxy);
    if proxy_only {
        return Ok(());
    }
    adaptive(&bin, secs)?;
    cache_hit(&bin, secs)?;
    agent_overhead(secs)
}

/// The adaptive loop's cost and benefit, in one run: the main proxy (adaptive reader choice and
/// concurrency limits, the defaults) on 6033 and the same build with `--balance weighted
/// --adaptive-limit false` on 6036.
/// 1. point_select ratio against direct for both, interleaved: what the machinery costs.
/// 2. p99 of proxied point selects while replica 3308 is held to 0.1 of a CPU core (its
///    cgroup's CPU limit), adaptive vs weighted, interleaved: what it buys. No agent runs
///    here (the proxy's own latency view only); with one, its penalty adds to it.
fn adaptive(bin: &std::path::Path, secs: u32) -> Result<()> {
    ensure_free(6036)?;
    let proxy = start_main_proxy(bin)?;
    let child = Command::new(bin)
        .args(["--listen", "127.0.0.1:6036", "--admin-listen", "", "--admin-mysql-listen", "", "--failover", "off"])
        .args(["--balance", "weighted", "--adaptive-limit", "false", "--log-level", "warn", "--worker-threads", "1"])
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let weighted = Proxy(child);
    wait_port(6036)?;
    std::thread::sleep(Duration::from_secs(2));
    println!("
adaptive loop: 6033 = balance adaptive + adaptive_limit (defaults), 6036 = balance weighted, no limit; same build");
    println!("{:<20} {:>7} {:>12} {:>12} {:>8} {:>11} {:>11} {:>7}", "workload", "threads", "direct qps", "proxy qps", "ratio", "direct p95", "proxy p95", "errors");
    for threads in [8u32, 32] {
        compare("oltp_point_select", "point_select adapt", threads, 6033, secs, &[], "")?;
        compare("oltp_point_select", "point_select weight", threads, 6036, secs, &[], "")?;
    }
    // One replica slow: its cgroup held to 0.1 of a core.
    crate::cgroup2::set_cpu_limit(3308, Some(0.1)).context("limiting replica 3308's CPU (cgroup)")?;
    let result = (|| {
        let mut rows = Vec::new();
        for _ in 0..2 {
            for (label, port) in [("adaptive", 6033u16), ("weighted", 6036)] {
                rows.push((label, sysbench("oltp_point_select", port, 8, secs / 2, &["--percentile=99"])?));
            }
        }
        Ok::<_, anyhow::Error>(rows)
    })();
    let _ = crate::cgroup2::set_cpu_limit(3308, None);
    let rows = result?;
    println!("
proxied point_select, 8 threads, replica 3308 held to 0.1 CPU (two interleaved runs each):");
    println!("{:<10} {:>12} {:>10} {:>7}", "balance", "qps", "p99", "errors");
    let mut p99 = std::collections::BTreeMap::new();
    for label in ["adaptive", "weighted"] {
        let r: Vec<&Run> = rows.iter().filter(|(l, _)| *l == label).map(|(_, r)| r).collect();
        let mean = |f: fn(&Run) -> f64| r.iter().map(|x| f(x)).sum::<f64>() / r.len() as f64;
        let errors: u64 = r.iter().map(|x| x.errors).sum();
        println!("{label:<10} {:>12.0} {:>8.2}ms {errors:>7}", mean(|x| x.qps), mean(|x| x.pct_ms));
        p99.insert(label, mean(|x| x.pct_ms));
    }
    println!("p99 adaptive / weighted: {:.3} (target: at most 0.333)", p99["adaptive"] / p99["weighted"]);
    drop(weighted);
    drop(proxy);
    Ok(())
}

/// The proxy under test on 6033, on its embedded default, after its first health checks.
fn start_main_proxy(bin: &std::path::Path) -> Result<Proxy> {
    let child = Command::new(bin)
        // One worker thread: on a 2-core box shared with sysbench and three servers, a
        // second proxy thread only adds context switches (measured: ~10% fewer QPS).
        .args(["--listen", "127.0.0.1:6033", "--log-level", "warn", "--worker-threads", "1"])
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let proxy = Proxy(child);
    wait_port(6033)?;
    std::thread::sleep(Duration::from_secs(2)); // first health checks
    Ok(proxy)
}

/// A 24 MiB multi-row INSERT through the proxy (the mariadb client sends it): the proxy's
/// peak RSS before and after. The statement is analysed on its first
/// query_digests_max_query_length bytes and forwarded without a copy, so the peak grows by
/// about the statement's own size (the one read buffer).
fn big_statement(pid: u32, port: u16) -> Result<()> {
    lab::sql(3307, "DROP DATABASE IF EXISTS sbtest_bench_big; CREATE DATABASE sbtest_bench_big; \
        CREATE TABLE sbtest_bench_big.t (id INT AUTO_INCREMENT PRIMARY KEY, a INT, b VARCHAR(64))")?;
    let mut sql = String::with_capacity(25 << 20);
    sql.push_str("INSERT INTO t (a, b) VALUES ");
    let mut n = 0u64;
    while sql.len() < 24 << 20 {
        if n > 0 {
            sql.push(',');
        }
        use std::fmt::Write;
        let _ = write!(sql, "({n}, 'row {n} of a bulk insert through the proxy')");
        n += 1;
    }
    sql.push_str(";\n");
    let file = proc::root().join("target/bench-big-insert.sql");
    std::fs::write(&file, &sql)?;
    let before = peak_rss_kib(pid);
    let t = std::time::Instant::now();
    let out = Command::new("mariadb")
        .args(["--no-defaults", "-h127.0.0.1", "-uapp", "-papp", "--max-allowed-packet=64M", "sbtest_bench_big"])
        .arg(format!("-P{port}"))
        .stdin(std::fs::File::open(&file)?)
        .output()?;
    let took = t.elapsed();
    let after = peak_rss_kib(pid);
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        bail!("the 24 MiB INSERT failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rows = lab::sql(3307, "SELECT COUNT(*) FROM sbtest_bench_big.t")?;
    println!(
        "\n24 MiB INSERT ({n} rows, {} stored) through the proxy in {:.2} s: proxy peak RSS {:.1} -> {:.1} MiB (+{:.1} MiB)",
        rows.trim(),
        took.as_secs_f64(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        after.saturating_sub(before) as f64 / 1024.0
    );
    lab::sql(3307, "DROP DATABASE sbtest_bench_big")?;
    Ok(())
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

/// One sysbench oltp_point_select run on 3307 with the agent (or the empty programs)
/// attached the whole time, kernel.bpf_stats_enabled on.
struct AgentSample {
    /// BPF run time per query.
    bpf_ns: f64,
    /// The agent process's own CPU, in % of one core.
    agent_cpu: f64,
}

const AGENT_ARGS: &[&str] = &["--ports", "3307", "--prometheus-listen", "127.0.0.1:9435", "--log-level", "warn"];
const NOOP_ARGS: &[&str] = &["--calibrate-noop", "--ports", "3307", "--prometheus-listen", "127.0.0.1:9435", "--log-level", "warn"];
const TRACEPOINT_ARGS: &[&str] =
    &["--ports", "3307", "--hooks", "tracepoints", "--prometheus-listen", "127.0.0.1:9435", "--log-level", "warn"];

fn start_agent(bin: &std::path::Path, args: &[&str]) -> Result<Proxy> {
    let child = Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let agent = Proxy(child);
    // The agent listens on 9435 once its programs are attached. Loading them (BTF, the
    // verifier) takes about 150 ms of CPU, many times that while sysbench saturates both
    // cores.
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if std::net::TcpStream::connect(("127.0.0.1", 9435)).is_ok() {
            return Ok(agent);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("the agent did not come up on 9435 within 30 s")
}

fn agent_sample(bin: &std::path::Path, agent_args: &[&str], secs: u32) -> Result<AgentSample> {
    let agent = start_agent(bin, agent_args)?;
    let pid = agent.0.id();
    let (bpf0, cpu0) = (bpf_prog_stats(pid), cpu_ticks(pid));
    let run = sysbench("oltp_point_select", 3307, 32, secs, &[])?;
    let (bpf1, cpu1) = (bpf_prog_stats(pid), cpu_ticks(pid));
    let queries = (run.qps * secs as f64).max(1.0);
    Ok(AgentSample {
        bpf_ns: (bpf1.0 - bpf0.0) as f64 / queries,
        agent_cpu: cpu1.saturating_sub(cpu0) as f64 / secs as f64, // ticks are 1/100 s
    })
}

/// Kernel symbols of the agent's cost: its programs, the tracepoint-to-BPF dispatch, and the
/// helpers and map code its programs call. (Not shared ones such as read_tsc or retpoline
/// thunks, which the rest of the kernel uses as much.)
const AGENT_SYMBOLS: &[&str] = &[
    "bpf_prog_",
    "bpf_trace_run",
    "__bpf_trace_sock",
    "__traceiter_sock",
    "call_trace_sock_",
    "__cgroup_bpf_run_filter_skb",
    "__bpf_prog_run_save_cb",
    "bpf_skb_load_bytes",
    "lookup_nulls_elem_raw",
    "htab_map_hash",
    "__htab_map_lookup_elem",
    "htab_map_lookup_elem",
    "copy_from_user_nofault",
    "copy_from_kernel_nofault",
    "bpf_probe_read_",
    "bpf_task_pt_regs",
    "bpf_get_current_task",
    "bpf_ktime_get_ns",
    "ktime_get_mono_fast_ns",
];

/// Share (%) of all CPU samples in the agent's kernel code while sysbench saturates the
/// host: `perf record -a` for 5 s. In a CPU-bound run that share is the QPS the agent takes
/// away, measured in one run instead of between runs whose speed drifts.
fn agent_cpu_share(bin: &std::path::Path, args: &[&str]) -> Result<f64> {
    let _agent = start_agent(bin, args)?;
    let data = proc::root().join("target/bench-agent.perf");
    let mut load = Command::new("sysbench")
        .arg("oltp_point_select")
        .args(["--db-driver=mysql", "--mysql-host=127.0.0.1", "--mysql-port=3307", "--mysql-user=app", "--mysql-password=app"])
        .args(["--mysql-db=sbtest", "--tables=4", "--table-size=10000", "--threads=32", "--time=9", "run"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting sysbench")?;
    std::thread::sleep(Duration::from_secs(2));
    let rec = Command::new("perf")
        .args(["record", "-a", "-F", "999", "-o"])
        .arg(&data)
        .args(["--", "sleep", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("perf record")?;
    let _ = load.wait();
    if !rec.success() {
        bail!("perf record failed");
    }
    let out = Command::new("perf").args(["report", "--stdio", "--no-children", "--sort", "sym", "-i"]).arg(&data).output().context("perf report")?;
    let _ = std::fs::remove_file(&data);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut share = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut f = line.split_whitespace();
        let (Some(pct), Some(_), Some(sym)) = (f.next(), f.next(), f.next()) else { continue };
        if let Ok(p) = pct.trim_end_matches('%').parse::<f64>() {
            if AGENT_SYMBOLS.iter().any(|s| sym.starts_with(s)) {
                share += p;
            }
        }
    }
    Ok(share)
}

/// The server's count of client statements (status variable Questions), read over one
/// persistent `mariadb` session: the window edges of the toggled measurement are exact to a
/// few milliseconds, whatever sysbench's report interval.
struct Questions {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Questions {
    fn open(port: u16) -> Result<Questions> {
        let mut child = Command::new("mariadb")
            .args(["--no-defaults", "-uroot", "-N", "-B", "--unbuffered"])
            .arg(format!("--socket={}", lab::socket(port).display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting mariadb for the status counter")?;
        let Some(out) = child.stdout.take() else { bail!("no mariadb stdout") };
        Ok(Questions { child, out: std::io::BufReader::new(out) })
    }

    /// (Questions, when it was read).
    fn read(&mut self) -> Result<(u64, std::time::Instant)> {
        use std::io::{BufRead, Write};
        let Some(stdin) = self.child.stdin.as_mut() else { bail!("no mariadb stdin") };
        stdin.write_all(b"SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'QUESTIONS';\n")?;
        stdin.flush()?;
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        let n = line.trim().parse().with_context(|| format!("Questions: {line:?}"))?;
        Ok((n, std::time::Instant::now()))
    }
}

impl Drop for Questions {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// QPS with and without the agent, from ONE sysbench run during which the agent is started
/// and stopped: `cycles` windows of `window` with the agent attached, each between two
/// windows without it (A-B-A-B-...-A). The VM's speed drifts by tens of per cent within
/// seconds (other tenants; the guest sees no steal time), so separate runs cannot resolve a
/// few per cent; adjacent windows of one run can, and comparing each attached window with
/// the mean of its two neighbours also cancels a steady drift. Windows are timed by the
/// server's statement counter, from the moment the agent is attached (its start-up is not
/// counted) to just before it is stopped.
///
/// Returns the QPS of each window: (without, with), `without` having one more.
fn agent_toggled(bin: &std::path::Path, args: &[&str], cycles: u32, window: Duration) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut counter = Questions::open(3307)?;
    let total = (cycles as f64 * (2.0 * window.as_secs_f64() + 1.0) + 10.0) as u64;
    let load = Command::new("sysbench")
        .arg("oltp_point_select")
        .args(["--db-driver=mysql", "--mysql-host=127.0.0.1", "--mysql-port=3307", "--mysql-user=app", "--mysql-password=app"])
        .args(["--mysql-db=sbtest", "--tables=4", "--table-size=10000", "--threads=32"])
        .arg(format!("--time={total}"))
        .arg("run")
        .stdout(Stdio::null())
        .spawn()
        .context("starting sysbench")?;
    let _load = Proxy(load); // stopped when measured
    std::thread::sleep(Duration::from_secs(3)); // connections and warm-up
    let rate = |counter: &mut Questions| -> Result<f64> {
        let (q0, t0) = counter.read()?;
        std::thread::sleep(window);
        let (q1, t1) = counter.read()?;
        Ok(q1.saturating_sub(q0) as f64 / (t1 - t0).as_secs_f64())
    };
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..cycles {
        without.push(rate(&mut counter)?);
        let agent = start_agent(bin, args)?;
        with.push(rate(&mut counter)?);
        drop(agent); // kill + wait: detached once it has exited
    }
    without.push(rate(&mut counter)?);
    Ok((without, with))
}

/// Per attached window, its QPS change (%) against the mean of the windows either side.
fn window_changes(without: &[f64], with: &[f64]) -> Vec<f64> {
    with.iter()
        .enumerate()
        .filter_map(|(i, w)| {
            let base = (without.get(i)? + without.get(i + 1)?) / 2.0;
            Some((w - base) / base * 100.0)
        })
        .collect()
}

/// (mean, median, standard error of the mean) of per-window changes.
fn change_stats(changes: &[f64]) -> (f64, f64, f64) {
    let mut sorted = changes.to_vec();
    sorted.sort_by(|x, y| x.total_cmp(y));
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let n = sorted.len() as f64;
    let mean = sorted.iter().sum::<f64>() / n;
    let se = (sorted.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0) / n).sqrt();
    (mean, median, se)
}

/// The eBPF agent's cost on 3307, sysbench oltp_point_select at full speed, 32 threads:
/// - QPS with and without the agent, alternating every 3 s inside one sysbench run
///   (kernel.bpf_stats_enabled off, as in production: its clock reads cost too);
/// - the BPF run time per query (kernel.bpf_stats_enabled on), and what empty programs
///   on the same hooks cost;
/// - the agent process's own CPU.
fn agent_overhead(secs: u32) -> Result<()> {
    proc::cargo(&["build", "--release", "-p", "breakwater-agent"])?;
    let bin = proc::target_bin("release", "breakwater-agent");
    let perf = crate::deps::ensure_perf();
    let window = Duration::from_millis(500);
    let cycles = (secs * 6).max(100);
    // (label, agent arguments, windows): the agent with the hooks it picks here (cgroup_skb
    // on the server's cgroup), empty programs on the same hooks, and the tracepoint
    // fallback.
    let runs: [(&str, &[&str], u32); 3] = [
        ("agent, cgroup_skb hooks", AGENT_ARGS, cycles),
        ("  empty programs, same hooks", NOOP_ARGS, cycles / 2),
        ("agent, tracepoint hooks (fallback)", TRACEPOINT_ARGS, cycles / 2),
    ];
    let mut rows = Vec::new();
    for (label, args, n) in runs {
        let _ = Command::new("sysctl").args(["-q", "-w", "kernel.bpf_stats_enabled=0"]).status();
        let (without, with) = agent_toggled(&bin, args, n, window)?;
        let changes = window_changes(&without, &with);
        let share = match &perf {
            Ok(()) => agent_cpu_share(&bin, args).map(|s| format!("{s:.2}%")).unwrap_or_else(|e| format!("({e})")),
            Err(_) => "(no perf)".to_string(),
        };
        proc::run_inherit(Command::new("sysctl").args(["-q", "-w", "kernel.bpf_stats_enabled=1"]))?;
        let samples = [agent_sample(&bin, args, 5)?, agent_sample(&bin, args, 5)?];
        let _ = Command::new("sysctl").args(["-q", "-w", "kernel.bpf_stats_enabled=0"]).status();
        rows.push((label, n, change_stats(&changes), share, samples, without, with));
    }
    println!(
        "\nagent overhead: sysbench oltp_point_select on 3307, 32 threads. QPS: one sysbench run per row, the agent attached for\n\
         `windows` windows of {} ms, each compared with the windows without it on either side. BPF time: kernel.bpf_stats_enabled,\n\
         two 5 s runs. CPU share: perf record -a, 5 s, the agent's programs and the kernel code that runs them.",
        window.as_millis()
    );
    println!("{:<36} {:>7} {:>10} {:>6} {:>8} {:>10} {:>10} {:>8}", "", "windows", "QPS", "± SE", "median", "BPF ns/q", "CPU share", "agent");
    for (label, n, (mean, median, se), share, samples, _, _) in &rows {
        let bpf = samples.iter().map(|s| s.bpf_ns).sum::<f64>() / samples.len() as f64;
        let cpu = samples.iter().map(|s| s.agent_cpu).sum::<f64>() / samples.len() as f64;
        println!("{label:<36} {n:>7} {mean:>+9.1}% {se:>5.1}% {median:>+7.1}% {bpf:>10.0} {share:>10} {cpu:>7.1}%");
    }
    println!("targets: QPS loss < 3%, BPF run time < 1000 ns per query. `agent`: the agent process's own CPU, % of one core.");
    if let Some((_, _, _, _, _, without, with)) = rows.first() {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        println!("first row: {:.0} QPS without, {:.0} with (means of the windows)", mean(without), mean(with));
    }
    Ok(())
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
