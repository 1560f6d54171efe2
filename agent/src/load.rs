//! The load of each MySQL server's cgroup (cgroup v2), read from its interface files: CPU
//! time and throttling (`cpu.stat`), pressure stall information for CPU, memory and IO
//! (`cpu.pressure`, `memory.pressure`, `io.pressure`) and memory in use (`memory.current`).
//!
//! Pressure is the share of time that tasks of the cgroup waited for a resource: "has no
//! headroom", as the host sees it, without asking MySQL. A server found in the root cgroup
//! (no cgroup of its own) reports the host's numbers; `cgroup` says which it is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const RESOURCES: [&str; 3] = ["cpu", "memory", "io"];
pub const KINDS: [&str; 2] = ["some", "full"];

/// One pressure line: the 10 s average (a ratio, 0..1) and the total stalled time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    pub avg10: f64,
    pub total_seconds: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupLoad {
    /// The cgroup's path below the cgroup v2 root ("/" for the root).
    pub cgroup: String,
    pub cpu_seconds: f64,
    pub throttled_seconds: f64,
    pub throttled_periods: u64,
    /// memory.current (absent in the root cgroup).
    pub memory_bytes: Option<u64>,
    /// The CPU limit in cores (cpu.max quota / period; v1 cfs_quota_us / cfs_period_us);
    /// None without one.
    pub cpu_limit_cores: Option<f64>,
    /// The memory limit (memory.max; v1 memory.limit_in_bytes); None without one.
    pub memory_limit_bytes: Option<u64>,
    /// [resource][kind], None where the kernel has no such line or file.
    pub pressure: [[Option<Pressure>; 2]; 3],
}

/// Parse a `*.pressure` file: "some avg10=1.50 avg60=0.20 avg300=0.05 total=123456".
pub fn parse_pressure(text: &str) -> [Option<Pressure>; 2] {
    let mut out = [None, None];
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let Some(kind) = parts.next() else { continue };
        let Some(i) = KINDS.iter().position(|k| *k == kind) else { continue };
        let mut p = Pressure::default();
        let mut seen = 0;
        for kv in parts {
            match kv.split_once('=') {
                Some(("avg10", v)) => {
                    if let Ok(x) = v.parse::<f64>() {
                        p.avg10 = x / 100.0;
                        seen += 1;
                    }
                }
                Some(("total", v)) => {
                    if let Ok(x) = v.parse::<u64>() {
                        p.total_seconds = x as f64 / 1e6;
                        seen += 1;
                    }
                }
                _ => {}
            }
        }
        if seen == 2 {
            out[i] = Some(p);
        }
    }
    out
}

/// Parse `cpu.stat`: (usage seconds, throttled seconds, throttled periods).
pub fn parse_cpu_stat(text: &str) -> (f64, f64, u64) {
    let (mut usage, mut throttled, mut periods) = (0u64, 0u64, 0u64);
    for line in text.lines() {
        let Some((k, v)) = line.split_once(' ') else { continue };
        let Ok(v) = v.trim().parse::<u64>() else { continue };
        match k {
            "usage_usec" => usage = v,
            "throttled_usec" => throttled = v,
            "nr_throttled" => periods = v,
            _ => {}
        }
    }
    (usage as f64 / 1e6, throttled as f64 / 1e6, periods)
}

/// Read a server's cgroups. None when its v2 directory has no cpu.stat (gone, or not v2).
/// Throttling and memory come from the v2 files where the v2 tree has those controllers,
/// else from the v1 `cpu` and `memory` hierarchies (a hybrid host).
pub fn read(root: &Path, cg: &crate::cgroup::ServerCgroup) -> Option<CgroupLoad> {
    let dir = &cg.v2;
    let cpu = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    let (cpu_seconds, mut throttled_seconds, mut throttled_periods) = parse_cpu_stat(&cpu);
    if !cpu.contains("nr_throttled") {
        if let Some(v1) = cg.v1_cpu.as_ref().and_then(|d| std::fs::read_to_string(d.join("cpu.stat")).ok()) {
            (throttled_seconds, throttled_periods) = parse_v1_cpu_stat(&v1);
        }
    }
    let mut pressure = [[None; 2]; 3];
    for (i, r) in RESOURCES.iter().enumerate() {
        if let Ok(text) = std::fs::read_to_string(dir.join(format!("{r}.pressure"))) {
            pressure[i] = parse_pressure(&text);
        }
    }
    let number = |p: PathBuf| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let memory_bytes = number(dir.join("memory.current")).or_else(|| cg.v1_memory.as_ref().and_then(|d| number(d.join("memory.usage_in_bytes"))));
    let cpu_limit_cores = std::fs::read_to_string(dir.join("cpu.max")).ok().and_then(|t| parse_cpu_max(&t)).or_else(|| {
        let d = cg.v1_cpu.as_ref()?;
        let quota = std::fs::read_to_string(d.join("cpu.cfs_quota_us")).ok()?;
        let period = std::fs::read_to_string(d.join("cpu.cfs_period_us")).ok()?;
        parse_cpu_max(&format!("{} {}", quota.trim(), period.trim()))
    });
    let memory_limit_bytes = std::fs::read_to_string(dir.join("memory.max"))
        .ok()
        .or_else(|| cg.v1_memory.as_ref().and_then(|d| std::fs::read_to_string(d.join("memory.limit_in_bytes")).ok()))
        .and_then(|t| parse_memory_limit(&t));
    let rel = dir.strip_prefix(root).map(|p| format!("/{}", p.display())).unwrap_or_else(|_| dir.display().to_string());
    Some(CgroupLoad { cgroup: rel, cpu_seconds, throttled_seconds, throttled_periods, memory_bytes, cpu_limit_cores, memory_limit_bytes, pressure })
}

/// `cpu.max` ("20000 100000", or "max 100000" for none) or v1's quota and period ("-1" for
/// none) as cores.
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota: i64 = it.next()?.parse().ok()?;
    let period: i64 = it.next().and_then(|p| p.parse().ok()).unwrap_or(100_000);
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

/// `memory.max` ("max" for none) or v1's `memory.limit_in_bytes` (a page-rounded
/// 2^63 - 1 for none).
pub fn parse_memory_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < 1 << 60).then_some(v)
}

/// Parse a v1 `cpu.stat`: (throttled seconds, throttled periods); throttled_time is in ns.
pub fn parse_v1_cpu_stat(text: &str) -> (f64, u64) {
    let (mut ns, mut periods) = (0u64, 0u64);
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("throttled_time", v)) => ns = v.trim().parse().unwrap_or(0),
            Some(("nr_throttled", v)) => periods = v.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    (ns as f64 / 1e9, periods)
}

/// Which cgroup serves each port, found again every `every` reads (a restarted server may
/// be in another one), and the load of each.
pub struct Watcher {
    root: Option<PathBuf>,
    ports: Vec<u16>,
    dirs: BTreeMap<u16, crate::cgroup::ServerCgroup>,
    reads: u64,
    every: u64,
}

impl Watcher {
    pub fn new(ports: &[u16], every: u64) -> Self {
        let root = crate::cgroup::cgroup2_root().ok();
        Self { root, ports: ports.to_vec(), dirs: BTreeMap::new(), reads: 0, every: every.max(1) }
    }

    /// The load of every port whose server is found (no listener: no entry).
    pub fn read(&mut self) -> BTreeMap<u16, CgroupLoad> {
        let Some(root) = self.root.clone() else { return BTreeMap::new() };
        if self.reads % self.every == 0 || self.dirs.len() < self.ports.len() && self.reads % 4 == 0 {
            self.dirs = self.ports.iter().filter_map(|p| crate::cgroup::server_cgroup(&root, *p).map(|d| (*p, d))).collect();
        }
        self.reads += 1;
        self.dirs.iter().filter_map(|(p, d)| read(&root, d).map(|l| (*p, l))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_lines() {
        let p = parse_pressure("some avg10=12.50 avg60=1.00 avg300=0.00 total=2500000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n");
        assert_eq!(p[0], Some(Pressure { avg10: 0.125, total_seconds: 2.5 }));
        assert_eq!(p[1], Some(Pressure { avg10: 0.0, total_seconds: 7e-6 }));
        assert_eq!(parse_pressure("some avg10=x total=1\n"), [None, None], "a malformed line is skipped");
        assert_eq!(parse_pressure(""), [None, None]);
    }

    #[test]
    fn cpu_stat() {
        let t = "usage_usec 3000000\nuser_usec 2000000\nsystem_usec 1000000\nnr_periods 10\nnr_throttled 4\nthrottled_usec 500000\n";
        assert_eq!(parse_cpu_stat(t), (3.0, 0.5, 4));
        assert_eq!(parse_cpu_stat("garbage\n"), (0.0, 0.0, 0));
        assert_eq!(parse_v1_cpu_stat("nr_periods 9\nnr_throttled 3\nthrottled_time 1500000000\n"), (1.5, 3));
    }

    #[test]
    fn limits() {
        assert_eq!(parse_cpu_max("20000 100000\n"), Some(0.2));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("-1 100000"), None, "v1: no quota");
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(parse_memory_limit("268435456\n"), Some(268_435_456));
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None, "v1: no limit");
    }
}
