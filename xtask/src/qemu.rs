//! Builds the bare-metal demo kernel (`examples/bare-metal`) and runs it
//! under QEMU. Standard library only.
//!
//! Entry point: [`run_kernel`]. The steps, each with a clear error message:
//!
//! 1. make sure the `x86_64-unknown-none` Rust target is installed (rustup);
//! 2. `cargo build --release` inside `examples/bare-metal` (its own
//!    `.cargo/config.toml` and `[workspace]`; cargo only reads that config when
//!    started from inside the directory, so `current_dir` is set there);
//! 3. make sure `qemu-system-x86_64` exists (installs `qemu-system-x86` with
//!    apt-get when running as root, otherwise says what to run);
//! 4. boots the kernel ELF via PVH on the `microvm` machine, TCG, with the
//!    mode and CPU count on the kernel command line (`-append "mode=.. cpus=.."`,
//!    delivered through `hvm_start_info.cmdline_paddr`), serial on stdio,
//!    a wall-clock timeout, and `isa-debug-exit` for the verdict:
//!    exit status 33 = kernel reported success, 35 = kernel reported failure,
//!    0 = guest reset/shutdown (e.g. triple fault with `-no-reboot`).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const TARGET: &str = "x86_64-unknown-none";
const KERNEL_DIR: &str = "examples/bare-metal";
const KERNEL_BIN: &str = "hmm-bare-metal";
const QEMU: &str = "qemu-system-x86_64";
const QEMU_APT_PACKAGE: &str = "qemu-system-x86";
/// Guest RAM; the kernel falls back to the same size if the loader passes no
/// memory map.
const GUEST_MEMORY: &str = "256M";
/// The kernel supports at most this many CPUs (`smp::MAX_CPUS`).
const MAX_CPUS: u32 = 8;
/// A run normally takes well under a second; this only catches hangs.
const TIMEOUT: Duration = Duration::from_secs(60);
/// QEMU's status when the kernel writes 0x10 to isa-debug-exit: (0x10 << 1) | 1.
const EXIT_SUCCESS: i32 = 33;
/// QEMU's status when the kernel writes 0x11 (panic, CPU exception, failed test).
const EXIT_FAILURE: i32 = 35;

/// Builds `examples/bare-metal` and boots it in QEMU with `mode` (`demo` or
/// `test`) on `cpus` CPUs. `Ok` only if the kernel ended the run with the
/// success code (QEMU exit status 33).
pub fn run_kernel(repo_root: &Path, mode: &str, cpus: u32) -> Result<(), String> {
    run_kernel_output(repo_root, mode, cpus).map(drop)
}

/// As [`run_kernel`], returning the kernel's serial output (stdout).
pub fn run_kernel_output(repo_root: &Path, mode: &str, cpus: u32) -> Result<String, String> {
    run_kernel_output_with(repo_root, mode, cpus, &[])
}

/// As [`run_kernel_output`], with extra QEMU arguments (e.g. `-icount`).
pub fn run_kernel_output_with(repo_root: &Path, mode: &str, cpus: u32, extra: &[&str]) -> Result<String, String> {
    if mode.is_empty() || !mode.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("invalid kernel mode {mode:?} (expected e.g. demo or test)"));
    }
    if !(1..=MAX_CPUS).contains(&cpus) {
        return Err(format!("cpus must be 1..={MAX_CPUS}, got {cpus}"));
    }
    let kernel_dir = repo_root.join(KERNEL_DIR);
    if !kernel_dir.join("Cargo.toml").is_file() {
        return Err(format!("kernel crate not found at {}", kernel_dir.display()));
    }
    ensure_rust_target(&kernel_dir, TARGET)?;
    let kernel = build_kernel(&kernel_dir, TARGET, KERNEL_BIN)?;
    ensure_qemu(QEMU, QEMU_APT_PACKAGE)?;
    run_qemu(&kernel, mode, cpus, extra)
}

/// Installs a Rust target with rustup unless it is already there (`dir`
/// selects the toolchain through its `rust-toolchain.toml`).
pub(crate) fn ensure_rust_target(dir: &Path, target: &str) -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output();
    match installed {
        Ok(out) if out.status.success() => {
            if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == target) {
                return Ok(());
            }
        }
        Ok(out) => {
            return Err(format!("`rustup target list --installed` failed ({})", out.status));
        }
        Err(e) => {
            // No rustup (e.g. a distro toolchain): let the build say whether
            // the target's standard library is available.
            eprintln!("xtask: warning: cannot run rustup ({e}); assuming {target} is installed");
            return Ok(());
        }
    }
    eprintln!("xtask: installing Rust target {target}: rustup target add {target}");
    let status = Command::new("rustup")
        .args(["target", "add", target])
        .current_dir(dir)
        .status()
        .map_err(|e| format!("cannot run `rustup target add {target}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`rustup target add {target}` failed ({status})"))
    }
}

/// `cargo build --release --target target` in the kernel directory (its
/// own `.cargo/config.toml` and `[workspace]`); returns the ELF `bin`.
pub(crate) fn build_kernel(kernel_dir: &Path, target: &str, bin: &str) -> Result<PathBuf, String> {
    let target_dir = kernel_dir.join("target");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(kernel_dir).args(["build", "--release", "--target", target, "--target-dir"]).arg(&target_dir);
    clear_outer_cargo_env(&mut cmd);
    eprintln!("xtask: building kernel: (cd {} && cargo build --release --target {target})", kernel_dir.display());
    let status = cmd.status().map_err(|e| format!("cannot run cargo in {}: {e}", kernel_dir.display()))?;
    if !status.success() {
        return Err(format!("kernel build failed ({status})"));
    }
    let elf = target_dir.join(target).join("release").join(bin);
    if elf.is_file() {
        Ok(elf)
    } else {
        Err(format!("kernel build succeeded but {} is missing", elf.display()))
    }
}

/// Removes the settings the outer cargo (or the user) may have exported for
/// the host workspace that would break or relocate a bare-metal build. A
/// kernel's rustflags come from its own .cargo/config.toml, which RUSTFLAGS
/// and friends would silently replace.
pub(crate) fn clear_outer_cargo_env(cmd: &mut Command) {
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
}

/// Whether this process runs as root (uid 0), read from /proc.
pub(crate) fn running_as_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            if let Some(ids) = line.strip_prefix("Uid:") {
                return ids.split_whitespace().nth(1) == Some("0"); // effective uid
            }
        }
    }
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Checks that `program` (a QEMU binary) runs; installs the Debian `package`
/// that holds it with apt-get if it is missing and we are root.
pub(crate) fn ensure_qemu(program: &str, package: &str) -> Result<(), String> {
    if qemu_runs(program) {
        return Ok(());
    }
    let manual = format!("sudo apt-get update && sudo apt-get install -y {package}");
    if !running_as_root() {
        return Err(format!("{program} not found; install it with: {manual}"));
    }
    apt_get(program, &["update"], &manual)?;
    // The machine's qemu-utils may be newer than the distribution's QEMU,
    // which breaks it: installed alone, a qemu-system package makes apt
    // remove qemu-utils (qemu-img) silently. Ask for the matching qemu-utils
    // so qemu-img stays (at the QEMU release's version).
    let utils = candidate_version(package).map(|v| format!("qemu-utils={v}"));
    let mut args = vec!["install", "-y", "--no-install-recommends", "--allow-downgrades", package];
    args.extend(utils.as_deref());
    apt_get(program, &args, &manual)?;
    if qemu_runs(program) {
        Ok(())
    } else {
        Err(format!("{program} still not runnable after installing {package}"))
    }
}

/// The version apt would install of `package` ("Candidate:" of apt-cache policy).
pub(crate) fn candidate_version(package: &str) -> Option<String> {
    let out = Command::new("apt-cache").args(["policy", package]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.lines().find_map(|l| l.trim().strip_prefix("Candidate:"))?.trim().to_string();
    (v != "(none)" && !v.is_empty()).then_some(v)
}

/// Runs `apt-get args` non-interactively (to install `program`).
fn apt_get(program: &str, args: &[&str], manual: &str) -> Result<(), String> {
    eprintln!("xtask: {program} not found, running: apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| format!("cannot run apt-get ({e}); install QEMU with: {manual}"))?;
    if !status.success() {
        return Err(format!("`apt-get {}` failed ({status}); install QEMU with: {manual}", args.join(" ")));
    }
    Ok(())
}

/// Whether `program --version` runs successfully.
fn qemu_runs(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|out| out.status.success())
}

/// The QEMU invocation. `microvm`: no PCI, no SeaBIOS; its qboot firmware
/// boots the PVH ELF directly (~0.05 s) and INIT/SIPI work as on `q35`.
/// TCG rather than KVM: KVM on these hosts cannot run SSE in the guest, and
/// TCG runs the vCPUs in parallel threads anyway.
fn qemu_command(kernel: &Path, mode: &str, cpus: u32, extra: &[&str]) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-M", "microvm", "-accel", "tcg", "-m", GUEST_MEMORY])
        .args(extra)
        .args(["-smp", &cpus.to_string()])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", &format!("mode={mode} cpus={cpus}")]);
    cmd
}

/// Copies a child's output stream to ours while keeping a transcript.
pub(crate) fn tee<R, W>(source: R, mut sink: W, transcript: Arc<Mutex<String>>) -> JoinHandle<()>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    thread::spawn(move || {
        let mut reader = BufReader::new(source);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    line.retain(|&b| b != b'\r');
                    let _ = sink.write_all(&line);
                    let _ = sink.flush();
                    if let Ok(mut t) = transcript.lock() {
                        t.push_str(&String::from_utf8_lossy(&line));
                    }
                }
            }
        }
    })
}

/// Waits for `child` up to `timeout`; kills it on expiry (returns `None`).
pub(crate) fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>, String> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Some(status)),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for QEMU failed: {e}")),
        }
    }
}

/// The last `n` lines of `text`, indented, for error messages.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].iter().map(|l| format!("    | {l}\n")).collect()
}

fn run_qemu(kernel: &Path, mode: &str, cpus: u32, extra: &[&str]) -> Result<String, String> {
    let mut cmd = qemu_command(kernel, mode, cpus, extra);
    let shown: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a.into_owned()
            }
        })
        .collect();
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
        child.stdout.take().map(|s| tee(s, std::io::stdout(), Arc::clone(&out_log))),
        child.stderr.take().map(|s| tee(s, std::io::stderr(), Arc::clone(&err_log))),
    ];
    let status = wait_with_timeout(&mut child, TIMEOUT)?;
    for reader in readers.into_iter().flatten() {
        let _ = reader.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let output = out_log.lock().map(|s| s.clone()).unwrap_or_default();
    let errors = err_log.lock().map(|s| s.clone()).unwrap_or_default();

    let Some(status) = status else {
        return Err(format!(
            "kernel timed out: QEMU killed after {} s (hang or deadlock). Last output:\n{}",
            TIMEOUT.as_secs(),
            tail(&output, 15)
        ));
    };
    match status.code() {
        Some(EXIT_SUCCESS) => {
            if mode == "test" && !output.contains(" passed, 0 failed") {
                return Err(format!(
                    "kernel exited with the success code but printed no `N passed, 0 failed` line:\n{}",
                    tail(&output, 15)
                ));
            }
            eprintln!("xtask: kernel ({mode}, {cpus} cpus) succeeded in {elapsed:.2} s (QEMU exit status 33)");
            Ok(output)
        }
        Some(EXIT_FAILURE) => Err(format!(
            "kernel reported failure (QEMU exit status 35: panic, CPU exception or failed test) after {elapsed:.2} s. Last output:\n{}",
            tail(&output, 15)
        )),
        Some(0) => Err(format!(
            "QEMU exited with status 0 without a verdict from the kernel: the guest reset or shut down \
             (with -no-reboot a triple fault ends QEMU this way). Re-run by hand with \
             `-d int,cpu_reset -D qemu.log` to see why. Last output:\n{}",
            tail(&output, 15)
        )),
        Some(code) => Err(format!(
            "QEMU exited with unexpected status {code} (1 usually means bad arguments or a missing kernel). stderr:\n{}stdout:\n{}",
            tail(&errors, 10),
            tail(&output, 10)
        )),
        None => Err(format!("QEMU was killed by a signal ({status})")),
    }
}
