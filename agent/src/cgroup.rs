//! Which cgroups the MySQL servers run in, so the cgroup_skb programs run for the servers'
//! sockets only (a systemd service has its own cgroup: mariadb.service, mysql.service).
//!
//! A server socket belongs to the cgroup of the process that created the listening socket.
//! The agent finds, per watched port, the listening socket's inode in /proc/net/tcp{,6},
//! the process holding it, and that process's cgroup v2 path. A port with no listener yet
//! (the server starts after the agent) gets the root cgroup: every socket on the host then
//! runs the programs, which still count exactly.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Where cgroup v2 is mounted: /sys/fs/cgroup on unified systems, /sys/fs/cgroup/unified on
/// hybrid ones. Mounted under /run/breakwater/cgroup2 when it is not mounted anywhere.
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in info.lines() {
        // ... mount-point ... - fstype source options
        let Some((left, right)) = line.split_once(" - ") else { continue };
        if right.split_whitespace().next() == Some("cgroup2") {
            if let Some(mp) = left.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mp));
            }
        }
    }
    let dir = PathBuf::from("/run/breakwater/cgroup2");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = std::ffi::CString::new("/run/breakwater/cgroup2")?;
    let fstype = std::ffi::CString::new("cgroup2")?;
    // SAFETY: plain mount(2) with NUL-terminated strings that outlive the call.
    let r = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        bail!("cgroup v2 is not mounted and mounting it failed: {}", std::io::Error::last_os_error());
    }
    Ok(dir)
}

/// Inodes of the sockets listening on `port` (IPv4 and IPv6).
fn listening_inodes(port: u16) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        out.extend(crate::procfs::sockets(&text, v6, crate::procfs::TCP_LISTEN, &[port]).iter().map(|k| k.3));
    }
    out
}

/// The process holding one of `inodes` open, by scanning /proc/*/fd.
fn owner_of(inodes: &BTreeSet<u64>) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse::<u64>().ok()) {
                if inodes.contains(&inode) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// A process's cgroup v2 path ("0::/system.slice/mariadb.service" -> that path).
fn cgroup_of(pid: u32) -> Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("process {pid} has no cgroup v2 path"))
}

/// Where a server's load is read: its cgroup v2 directory, and on a hybrid host (cgroup v1
/// controllers beside a v2 tree without them) its v1 `cpu` and `memory` directories.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerCgroup {
    pub v2: PathBuf,
    pub v1_cpu: Option<PathBuf>,
    pub v1_memory: Option<PathBuf>,
}

/// The cgroups of the server listening on `port`, None when nothing listens.
pub fn server_cgroup(root: &std::path::Path, port: u16) -> Option<ServerCgroup> {
    let pid = owner_of(&listening_inodes(port))?;
    let cg = cgroup_of(pid).ok()?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let v1 = |controller: &str| {
        let path = text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls.split(',').any(|c| c == controller).then(|| path.to_string())
        })?;
        v1_mount(&mounts, controller).map(|m| m.join(path.trim_start_matches('/')))
    };
    Some(ServerCgroup { v2: root.join(cg.trim_start_matches('/')), v1_cpu: v1("cpu"), v1_memory: v1("memory") })
}

/// The mount point of the cgroup v1 hierarchy holding `controller` (its super options list it).
fn v1_mount(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_whitespace();
        if r.next() != Some("cgroup") {
            return None;
        }
        let opts = r.nth(1)?;
        opts.split(',').any(|o| o == controller).then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap_or("/")))
    })
}

/// The cgroup directories to attach to for `ports`, each once, with what was found for the
/// log: (directory, description).
pub fn server_cgroups(ports: &[u16]) -> Result<Vec<(PathBuf, String)>> {
    let root = cgroup2_root()?;
    let mut out: Vec<(PathBuf, String)> = Vec::new();
    for &port in ports {
        let inodes = listening_inodes(port);
        let found = owner_of(&inodes).map(|pid| cgroup_of(pid).map(|cg| (pid, cg)));
        let (dir, why) = match found {
            Some(Ok((pid, cg))) => (root.join(cg.trim_start_matches('/')), format!("{port}: pid {pid} in {cg}")),
            Some(Err(e)) => (root.clone(), format!("{port}: {e:#}; root cgroup")),
            None => (root.clone(), format!("{port}: no listener yet; root cgroup")),
        };
        match out.iter_mut().find(|(d, _)| *d == dir) {
            Some((_, w)) => {
                w.push_str(", ");
                w.push_str(&why);
            }
            None => out.push((dir, why)),
        }
    }
    // A cgroup's programs also run for its descendants: attached to both a cgroup and one
    // below it, the programs would see the same packet twice.
    let all: Vec<(PathBuf, String)> = out.clone();
    out.retain(|(d, _)| !all.iter().any(|(a, _)| a != d && d.starts_with(a)));
    for (dir, why) in out.iter_mut() {
        for (d, w) in &all {
            if d != dir && d.starts_with(&*dir) {
                why.push_str(", ");
                why.push_str(w);
            }
        }
    }
    Ok(out)
}
