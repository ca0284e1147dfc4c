//! `cargo xtask demo --arch riscv64`: builds the riscv64 demo kernel
//! (`examples/bare-metal-riscv64`) and boots it on QEMU `virt`. Standard
//! library only; the steps:
//!
//! 1. make sure the `riscv64gc-unknown-none-elf` Rust target is installed;
//! 2. `cargo build --release` inside the kernel directory (its own
//!    `.cargo/config.toml` and `[workspace]`);
//! 3. make sure `qemu-system-riscv64` exists (installs `qemu-system-misc`,
//!    whose `qemu-system-data` dependency ships OpenSBI, with apt-get when
//!    running as root, with the `qemu-utils` of the same version);
//! 4. boots it: `-M virt -bios default` (OpenSBI enters the kernel at
//!    0x8020_0000 in S-mode), TCG, one hart, 128 MiB, UART on stdio, a
//!    wall-clock timeout. The kernel ends the run through the SiFive test
//!    finisher: exit status 0 when every check passed, 3 when one failed.
//!    The run passes only with status 0, at least one `PASS` line, no
//!    `FAIL` line and the closing `N passed, 0 failed` line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::qemu;

const TARGET: &str = "riscv64gc-unknown-none-elf";
const KERNEL_DIR: &str = "examples/bare-metal-riscv64";
const KERNEL_BIN: &str = "hmm-bare-metal-riscv64";
const QEMU: &str = "qemu-system-riscv64";
const QEMU_APT_PACKAGE: &str = "qemu-system-misc";
/// A run takes about a second; this only catches hangs.
const TIMEOUT: Duration = Duration::from_secs(60);
/// QEMU's status when the kernel reports a failure (`exit::FAIL_STATUS`).
const EXIT_FAILURE: i32 = 3;

/// Builds and boots the riscv64 demo kernel; `Ok` only if it passed.
pub fn demo(repo_root: &Path) -> Result<(), String> {
    let kernel_dir = repo_root.join(KERNEL_DIR);
    if !kernel_dir.join("Cargo.toml").is_file() {
        return Err(format!("kernel crate not found at {}", kernel_dir.display()));
    }
    qemu::ensure_rust_target(&kernel_dir, TARGET)?;
    let kernel = build_kernel(&kernel_dir)?;
    ensure_qemu()?;
    run(&kernel)
}

/// `cargo build --release` in the kernel directory; returns the ELF path.
fn build_kernel(kernel_dir: &Path) -> Result<PathBuf, String> {
    let target_dir = kernel_dir.join("target");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(kernel_dir).args(["build", "--release", "--target", TARGET, "--target-dir"]).arg(&target_dir);
    qemu::clear_outer_cargo_env(&mut cmd);
    eprintln!("xtask: building kernel: (cd {} && cargo build --release --target {TARGET})", kernel_dir.display());
    let status = cmd.status().map_err(|e| format!("cannot run cargo in {}: {e}", kernel_dir.display()))?;
    if !status.success() {
        return Err(format!("kernel build failed ({status})"));
    }
    let elf = target_dir.join(TARGET).join("release").join(KERNEL_BIN);
    elf.is_file().then_some(elf.clone()).ok_or_else(|| format!("build succeeded but {} is missing", elf.display()))
}

/// Whether `qemu-system-riscv64 --version` runs.
fn qemu_runs() -> bool {
    Command::new(QEMU).arg("--version").output().is_ok_and(|out| out.status.success())
}

/// Checks for QEMU; installs it with apt-get if missing and we are root.
fn ensure_qemu() -> Result<(), String> {
    if qemu_runs() {
        return Ok(());
    }
    let manual = format!("sudo apt-get update && sudo apt-get install -y {QEMU_APT_PACKAGE}");
    if !qemu::running_as_root() {
        return Err(format!("{QEMU} not found; install it with: {manual}"));
    }
    apt_get(&["update"], &manual)?;
    // As for x86_64 (see `qemu::ensure_qemu`): the qemu-utils of QEMU's own
    // version, or apt removes a newer qemu-img to make room.
    let utils = qemu::candidate_version(QEMU_APT_PACKAGE).map(|v| format!("qemu-utils={v}"));
    let mut args = vec!["install", "-y", "--no-install-recommends", "--allow-downgrades", QEMU_APT_PACKAGE];
    args.extend(utils.as_deref());
    apt_get(&args, &manual)?;
    if qemu_runs() {
        Ok(())
    } else {
        Err(format!("{QEMU} still not runnable after installing {QEMU_APT_PACKAGE}"))
    }
}

/// Runs `apt-get args` non-interactively.
fn apt_get(args: &[&str], manual: &str) -> Result<(), String> {
    eprintln!("xtask: {QEMU} not found, running: apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| format!("cannot run apt-get ({e}); install QEMU with: {manual}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`apt-get {}` failed ({status}); install QEMU with: {manual}", args.join(" ")))
    }
}

/// Boots `kernel` and judges the run.
fn run(kernel: &Path) -> Result<(), String> {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-M", "virt", "-accel", "tcg", "-m", "128M", "-smp", "1", "-bios", "default"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(kernel);
    let shown: Vec<String> =
        std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy().into_owned()).collect();
    eprintln!("xtask: running: {}", shown.join(" "));
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {QEMU}: {e}"))?;
    let out_log = Arc::new(Mutex::new(String::new()));
    let err_log = Arc::new(Mutex::new(String::new()));
    let readers = [
        child.stdout.take().map(|s| qemu::tee(s, std::io::stdout(), Arc::clone(&out_log))),
        child.stderr.take().map(|s| qemu::tee(s, std::io::stderr(), Arc::clone(&err_log))),
    ];
    let status = qemu::wait_with_timeout(&mut child, TIMEOUT)?;
    for reader in readers.into_iter().flatten() {
        let _ = reader.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let output = out_log.lock().map(|s| s.clone()).unwrap_or_default();
    let errors = err_log.lock().map(|s| s.clone()).unwrap_or_default();
    let Some(status) = status else {
        return Err(format!(
            "kernel timed out after {} s. Last output:\n{}",
            TIMEOUT.as_secs(),
            qemu::tail(&output, 15)
        ));
    };
    let passes = output.lines().filter(|l| l.starts_with("PASS ")).count();
    let fails = output.lines().filter(|l| l.starts_with("FAIL ")).count();
    let closed = output.lines().any(|l| l.starts_with(&format!("{passes} passed, 0 failed")));
    match status.code() {
        Some(0) if passes > 0 && fails == 0 && closed => {
            eprintln!("xtask: riscv64 kernel passed {passes} checks in {elapsed:.2} s (QEMU exit status 0)");
            Ok(())
        }
        Some(0) => Err(format!(
            "QEMU exited with status 0 but the kernel printed {passes} PASS and {fails} FAIL lines{}:\n{}",
            if closed { "" } else { " and no closing `N passed, 0 failed` line" },
            qemu::tail(&output, 15)
        )),
        Some(EXIT_FAILURE) => Err(format!(
            "kernel reported failure (QEMU exit status {EXIT_FAILURE}: a failed check, a panic or an unexpected trap) \
             after {elapsed:.2} s, {fails} FAIL lines. Last output:\n{}",
            qemu::tail(&output, 15)
        )),
        Some(code) => Err(format!(
            "QEMU exited with unexpected status {code} (1 usually means bad arguments or missing firmware). stderr:\n{}stdout:\n{}",
            qemu::tail(&errors, 10),
            qemu::tail(&output, 10)
        )),
        None => Err(format!("QEMU was killed by a signal ({status})")),
    }
}
