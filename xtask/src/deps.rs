//! Installs the Debian packages Breakwater's lab, tests and benchmarks need, only when missing.

use crate::proc;
use anyhow::{bail, Result};
use std::process::Command;

/// (binary that proves the package is there, package name)
const NEEDED: &[(&str, &str)] = &[
    ("mariadbd", "mariadb-server"),
    ("mariadb", "mariadb-client"),
    ("sysbench", "sysbench"),
];

pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(bin, _)| !proc::have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        proc::run_inherit(&mut cmd)
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)?;
    for (bin, pkg) in NEEDED {
        if !proc::have(bin) {
            bail!("{pkg} was installed but {bin} is still missing");
        }
    }
    Ok(())
}
