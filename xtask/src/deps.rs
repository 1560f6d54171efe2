//! Installs the Debian packages Breakwater's lab, tests and benchmarks need, only when missing.

use crate::proc;
use anyhow::{bail, Result};
use std::process::Command;

/// (binary, or absolute path of a file, that proves the package is there; package name)
const NEEDED: &[(&str, &str)] = &[
    ("mariadbd", "mariadb-server"),
    ("mariadb", "mariadb-client"),
    ("sysbench", "sysbench"),
    ("nft", "nftables"),
    ("prometheus", "prometheus"),
    ("chromium", "chromium"),
    ("openssl", "openssl"),
    ("curl", "curl"),
    // etcd for the proxies' leader election ([cluster]); protoc and the well-known protobuf
    // types to build the etcd-client crate.
    ("etcd", "etcd-server"),
    ("protoc", "protobuf-compiler"),
    ("/usr/include/google/protobuf/descriptor.proto", "libprotobuf-dev"),
];

pub fn ensure() -> Result<()> {
    ensure_packages()?;
    ensure_python_client()?;
    ensure_ebpf_toolchain()
}

/// mysql-connector-python (pure Python), the independent client of the data-path tests
/// (proxy/tests/clients.rs): it speaks the protocol its own way and finds what the mariadb
/// CLI and mysql_async hide.
const PY_CLIENT: &str = "mysql-connector-python==9.1.0";

fn ensure_python_client() -> Result<()> {
    let have = Command::new("python3")
        .args(["-c", "import mysql.connector, sys; sys.exit(0 if mysql.connector.__version__ == '9.1.0' else 1)"])
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    if !proc::have("python3") {
        apt_get(&["update", "-qq"])?;
        apt_get(&["install", "-y", "-qq", "--no-install-recommends", "python3", "python3-pip"])?;
    }
    println!("xtask: installing {PY_CLIENT} (pip)");
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "install", "-q", "--disable-pip-version-check", PY_CLIENT]);
    if proc::run_inherit(&mut cmd).is_err() {
        // Debian's own python3 refuses pip installs into the system (PEP 668) unless told.
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "--break-system-packages", PY_CLIENT]);
        proc::run_inherit(&mut cmd)?;
    }
    Ok(())
}

fn ensure_packages() -> Result<()> {
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

/// `perf` (Debian's linux-perf), for `cargo xtask bench` only.
pub fn ensure_perf() -> Result<()> {
    if proc::have("perf") {
        return Ok(());
    }
    println!("xtask: installing linux-perf");
    apt_get(&["update", "-qq"])?;
    apt_get(&["install", "-y", "-qq", "--no-install-recommends", "linux-perf"])?;
    if !proc::have("perf") {
        bail!("linux-perf was installed but perf is still missing");
    }
    Ok(())
}

/// Where the eBPF toolchain is unpacked (agent/build.rs looks here too).
pub const EBPF_TOOLCHAIN: &str = "/opt/breakwater/ebpf-toolchain";

fn apt_get(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    proc::run_inherit(&mut cmd)
}

fn cargo_home() -> std::path::PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo"))
}

/// The toolchain that builds agent-ebpf (see ../shared/ebpf-notes.md): Debian's rustc-web
/// with its prebuilt libcore for bpfel-unknown-none, unpacked (not installed: it conflicts
/// with rustup), LLVM 22 to match it, and bpf-linker built against that LLVM.
fn ensure_ebpf_toolchain() -> Result<()> {
    let root = std::path::Path::new(EBPF_TOOLCHAIN);
    let llvm_config = std::path::Path::new("/usr/lib/llvm-22/bin/llvm-config");
    let linker = cargo_home().join("bin/bpf-linker");
    if root.join("usr/lib/rustlib/bpfel-unknown-none").exists() && llvm_config.exists() && linker.exists() {
        return Ok(());
    }
    println!("xtask: installing the eBPF toolchain (rustc-web + libcore for BPF, LLVM 22, bpf-linker)");
    apt_get(&["update", "-qq"])?;
    if !llvm_config.exists() {
        apt_get(&["install", "-y", "-qq", "--no-install-recommends", "llvm-22-dev", "libpolly-22-dev", "libzstd-dev"])?;
    }
    if !root.join("usr/lib/rustlib/bpfel-unknown-none").exists() {
        // libstd-rust-web-dev depends on libstd-rust-web-<version>: resolve it from apt's
        // metadata so the four packages stay at one version.
        let show = proc::output(Command::new("apt-cache").args(["show", "--no-all-versions", "libstd-rust-web-dev"]))?;
        let text = String::from_utf8_lossy(&show.stdout);
        let libstd = text
            .lines()
            .find(|l| l.starts_with("Depends:"))
            .and_then(|l| l.split([',', ' ']).find(|w| w.starts_with("libstd-rust-web-1")))
            .map(str::to_string);
        let Some(libstd) = libstd else { bail!("cannot find libstd-rust-web-dev's libstd-rust-web-<version> dependency in apt metadata") };
        let dl = std::env::temp_dir().join("breakwater-ebpf-debs");
        let _ = std::fs::remove_dir_all(&dl);
        std::fs::create_dir_all(&dl)?;
        proc::run_inherit(
            Command::new("apt-get")
                .current_dir(&dl)
                .args(["download", "rustc-web", "libstd-rust-web-dev-bpf", "libstd-rust-web-dev"])
                .arg(&libstd),
        )?;
        let tmp = root.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        for deb in std::fs::read_dir(&dl)? {
            let deb = deb?.path();
            proc::run_inherit(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
        }
        let _ = std::fs::remove_dir_all(root);
        std::fs::rename(&tmp, root)?;
    }
    if !linker.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        proc::run_inherit(
            Command::new(cargo)
                .args(["install", "bpf-linker@0.13.0", "--locked", "--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }
    Ok(())
}
