//! Where cgroup v2 is mounted. No dependencies: xtask includes this file as a module too
//! (`#[path]`), so the lab and the tests agree without xtask depending on testkit.

use std::path::PathBuf;

/// Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The mount point of the cgroup v1 hierarchy that holds `controller` (hybrid hosts).
pub fn v1_mount(controller: &str) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split_whitespace();
        if r.next()? != "cgroup" {
            return None;
        }
        r.nth(1)?.split(',').any(|o| o == controller).then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// Whether the cgroup v2 tree offers `controller` (on a hybrid host it usually does not).
fn v2_has(controller: &str) -> bool {
    cgroup2_root()
        .and_then(|r| std::fs::read_to_string(r.join("cgroup.controllers")).ok())
        .is_some_and(|c| c.split_whitespace().any(|x| x == controller))
}

/// The cgroup directories a lab node runs in (`breakwater-lab/node<port>`): the v2 one, and
/// where the v2 tree lacks the cpu or memory controller, the v1 one of that controller, so
/// that a node's CPU and memory can be limited on either kind of host.
pub fn node_dirs(port: u16) -> Vec<PathBuf> {
    let rel = format!("breakwater-lab/node{port}");
    let mut out: Vec<PathBuf> = cgroup2_root().map(|r| r.join(&rel)).into_iter().collect();
    for c in ["cpu", "memory"] {
        if !v2_has(c) {
            if let Some(m) = v1_mount(c) {
                out.push(m.join(&rel));
            }
        }
    }
    out
}

/// Limit a lab node's CPU to `cores` (None lifts the limit): `cpu.max` where the v2 tree has
/// the cpu controller, else the v1 `cpu.cfs_quota_us`.
pub fn set_cpu_limit(port: u16, cores: Option<f64>) -> std::io::Result<()> {
    let rel = format!("breakwater-lab/node{port}");
    let period = 100_000u64;
    if v2_has("cpu") {
        let dir = cgroup2_root().ok_or_else(|| std::io::Error::other("no cgroup v2"))?.join(rel);
        let v = match cores {
            Some(c) => format!("{} {period}", ((c * period as f64) as u64).max(1000)),
            None => format!("max {period}"),
        };
        return std::fs::write(dir.join("cpu.max"), v);
    }
    let dir = v1_mount("cpu").ok_or_else(|| std::io::Error::other("no cpu controller (v1 or v2)"))?.join(rel);
    std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string())?;
    let quota = match cores {
        Some(c) => ((c * period as f64) as i64).max(1000),
        None => -1,
    };
    std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())
}

/// Limit a lab node's memory to `bytes` (None lifts the limit): `memory.max` where the v2
/// tree has the memory controller, else the v1 `memory.limit_in_bytes`. The kernel then
/// reclaims and, when nothing can be reclaimed, OOM-kills inside the node's cgroup only.
pub fn set_memory_limit(port: u16, bytes: Option<u64>) -> std::io::Result<()> {
    let rel = format!("breakwater-lab/node{port}");
    if v2_has("memory") {
        let dir = cgroup2_root().ok_or_else(|| std::io::Error::other("no cgroup v2"))?.join(rel);
        return std::fs::write(dir.join("memory.max"), bytes.map(|b| b.to_string()).unwrap_or_else(|| "max".into()));
    }
    let dir = v1_mount("memory").ok_or_else(|| std::io::Error::other("no memory controller (v1 or v2)"))?.join(rel);
    std::fs::write(dir.join("memory.limit_in_bytes"), bytes.map(|b| b.to_string()).unwrap_or_else(|| "-1".into()))
}

/// Memory charged to a lab node's cgroup now (memory.current, or v1 memory.usage_in_bytes).
pub fn memory_usage(port: u16) -> Option<u64> {
    let rel = format!("breakwater-lab/node{port}");
    let read = |p: PathBuf| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse().ok());
    if v2_has("memory") {
        return read(cgroup2_root()?.join(rel).join("memory.current"));
    }
    read(v1_mount("memory")?.join(rel).join("memory.usage_in_bytes"))
}

/// Anonymous memory of a lab node's cgroup (v2 memory.stat `anon`, v1 `total_rss`): what
/// the kernel cannot reclaim without killing (no swap), unlike the page cache in its usage.
pub fn memory_anon(port: u16) -> Option<u64> {
    let rel = format!("breakwater-lab/node{port}");
    let (dir, key) = if v2_has("memory") { (cgroup2_root()?.join(rel), "anon ") } else { (v1_mount("memory")?.join(rel), "total_rss ") };
    let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    stat.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok())
}
