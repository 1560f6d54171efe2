//! Builds the kernel programs in ../agent-ebpf for bpfel-unknown-none with the eBPF
//! toolchain `cargo xtask deps` installs (Debian's rustc-web + its prebuilt libcore for
//! BPF, and bpf-linker), and hands the object to the agent through OUT_DIR.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let ebpf_dir = manifest.join("../agent-ebpf");
    for p in ["../agent-ebpf/src", "../agent-ebpf/Cargo.toml", "../agent-common/src"] {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=BREAKWATER_EBPF_TOOLCHAIN");
    let tc = PathBuf::from(
        std::env::var("BREAKWATER_EBPF_TOOLCHAIN").unwrap_or_else(|_| "/opt/breakwater/ebpf-toolchain".into()),
    );
    let rustc = tc.join("usr/bin/rustc");
    if !rustc.exists() {
        panic!(
            "the eBPF toolchain is missing ({} not found): run `cargo xtask deps` (it unpacks Debian's \
             rustc-web and libstd-rust-web-dev-bpf there and installs bpf-linker)",
            rustc.display()
        );
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| "target".into()));
    let target_dir = out.join("ebpf-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ld = format!("{}:{}", tc.join("usr/lib/x86_64-linux-gnu").display(), tc.join("usr/lib").display());
    let home_bin = std::env::var("CARGO_HOME")
        .map(|h| Path::new(&h).join("bin"))
        .unwrap_or_else(|_| PathBuf::from("/root/.cargo/bin"));
    let path = format!("{}:{}", home_bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf_dir)
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .env("LD_LIBRARY_PATH", ld)
        .env("PATH", path);
    for v in ["CARGO_ENCODED_RUSTFLAGS", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "CARGO_BUILD_TARGET", "CARGO_TARGET_DIR", "RUSTDOCFLAGS"] {
        cmd.env_remove(v);
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_FEATURE_") || k.starts_with("CARGO_CFG_") || k == "TARGET" || k == "HOST" || k == "OPT_LEVEL" || k == "PROFILE" || k == "DEBUG" {
            cmd.env_remove(k);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("running cargo for agent-ebpf: {e}"));
    if !status.success() {
        panic!("building the eBPF programs failed ({status})");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/breakwater-agent-ebpf");
    let dest = out.join("breakwater-agent-ebpf.o");
    std::fs::copy(&obj, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", obj.display()));
}
