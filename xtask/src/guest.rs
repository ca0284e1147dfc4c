//! What the demo kernels of other architectures share (`riscv.rs`,
//! `aarch64.rs`): each describes itself as a [`Guest`], and [`demo`] runs
//! the steps, standard library only:
//!
//! 1. make sure the kernel's Rust target is installed;
//! 2. `cargo build --release` inside the kernel directory (its own
//!    `.cargo/config.toml` and `[workspace]`);
//! 3. make sure the QEMU system emulator exists (installs its Debian package
//!    with apt-get when running as root, with the `qemu-utils` of the same
//!    version);
//! 4. boots it with the guest's QEMU arguments, TCG, one CPU, 128 MiB, the
//!    console on stdio and a wall-clock timeout. The kernel ends the run
//!    itself: exit status 0 when every check passed, [`Guest::exit_failure`]
//!    when one failed. The run passes only with status 0, at least one
//!    `PASS` line, no `FAIL` line and the closing `N passed, 0 failed` line.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::qemu;

/// A run takes about a second; this only catches hangs.
const TIMEOUT: Duration = Duration::from_secs(60);

/// One demo kernel and how QEMU boots it.
pub struct Guest {
    /// Architecture name for messages (`riscv64`).
    pub arch: &'static str,
    /// Rust target triple.
    pub target: &'static str,
    /// Kernel crate, relative to the repository root.
    pub kernel_dir: &'static str,
    /// Binary name of the kernel crate.
    pub kernel_bin: &'static str,
    /// QEMU system emulator.
    pub qemu: &'static str,
    /// Debian package that ships it.
    pub apt_package: &'static str,
    /// Machine-specific arguments (machine, CPU, firmware, exit device),
    /// placed before the shared ones.
    pub machine_args: &'static [&'static str],
    /// QEMU's status when the kernel reports a failure.
    pub exit_failure: i32,
}

/// Builds and boots `guest`'s kernel; `Ok` only if it passed.
pub fn demo(repo_root: &Path, guest: &Guest) -> Result<(), String> {
    let kernel_dir = repo_root.join(guest.kernel_dir);
    if !kernel_dir.join("Cargo.toml").is_file() {
        return Err(format!("kernel crate not found at {}", kernel_dir.display()));
    }
    qemu::ensure_rust_target(&kernel_dir, guest.target)?;
    let kernel = qemu::build_kernel(&kernel_dir, guest.target, guest.kernel_bin)?;
    qemu::ensure_qemu(guest.qemu, guest.apt_package)?;
    run(guest, &kernel)
}

/// Boots `kernel` and judges the run.
fn run(guest: &Guest, kernel: &Path) -> Result<(), String> {
    let mut cmd = Command::new(guest.qemu);
    cmd.args(guest.machine_args)
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
        .map_err(|e| format!("cannot start {}: {e}", guest.qemu))?;
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
            eprintln!("xtask: {} kernel passed {passes} checks in {elapsed:.2} s (QEMU exit status 0)", guest.arch);
            Ok(())
        }
        Some(0) => Err(format!(
            "QEMU exited with status 0 but the kernel printed {passes} PASS and {fails} FAIL lines{}:\n{}",
            if closed { "" } else { " and no closing `N passed, 0 failed` line" },
            qemu::tail(&output, 15)
        )),
        Some(code) if code == guest.exit_failure => Err(format!(
            "kernel reported failure (QEMU exit status {code}: a failed check, a panic or an unexpected trap) \
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
