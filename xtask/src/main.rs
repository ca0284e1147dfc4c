//! Project tasks: `cargo xtask demo`, `cargo xtask test`.

mod qemu;

use std::path::{Path, PathBuf};
use std::process::{exit, Command};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = repo_root();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(&root),
        Some("test") => test(&root),
        _ => {
            eprintln!("usage: cargo xtask <demo|test>");
            exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: {e}");
        exit(1);
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the repo").to_path_buf()
}

/// Runs a command in `dir`, failing with its exit status.
fn run(dir: &Path, program: &str, args: &[&str]) -> Result<(), String> {
    println!("xtask: {program} {}", args.join(" "));
    let status =
        Command::new(program).args(args).current_dir(dir).status().map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {} failed: {status}", args.join(" ")))
    }
}

/// Boots the bare-metal kernel in QEMU in demo mode on two cores.
fn demo(root: &Path) -> Result<(), String> {
    qemu::run_kernel(root, "demo", 2)
}

fn test(root: &Path) -> Result<(), String> {
    run(root, "cargo", &["test", "--workspace", "--all-targets"])?;
    run(root, "cargo", &["test", "--workspace", "--doc"])?;
    println!("xtask: booting the bare-metal kernel in test mode (2 cores)");
    qemu::run_kernel(root, "test", 2)
}
