//! Small helpers for running commands and finding paths.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Command, Output};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

pub fn target_bin(profile: &str, name: &str) -> PathBuf {
    target_dir().join(profile).join(name)
}

/// Run cargo with inherited stdio; fail on non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_inherit(Command::new(cargo).args(args).current_dir(root()))
}

pub fn run_inherit(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {desc}"))?;
    if !status.success() {
        bail!("{desc} failed with {status}");
    }
    Ok(())
}

/// Run and capture; fail with stderr on non-zero exit.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("spawning {desc}"))?;
    if !out.status.success() {
        bail!(
            "{desc} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

pub fn have(bin: &str) -> bool {
    if bin.starts_with('/') {
        return std::path::Path::new(bin).exists();
    }
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(bin).exists())
}

pub fn pid_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

pub fn kill(pid: i32, sig: &str) {
    let _ = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status();
}

/// TERM, then KILL if it is still there after `grace`.
pub fn stop(pid: i32, grace: std::time::Duration) {
    kill(pid, "TERM");
    let t = std::time::Instant::now();
    while pid_alive(pid) && t.elapsed() < grace {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if pid_alive(pid) {
        kill(pid, "KILL");
    }
}
