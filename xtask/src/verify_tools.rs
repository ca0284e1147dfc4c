//! Miri and fuzzing runs for the xtask: each function installs what it
//! uses (a fresh machine has only the stable toolchain), runs its commands
//! with a time limit, echoes their output, and returns a one-line summary
//! for the README figures.
//!
//! - [`miri`]: `cargo +nightly miri test` over the tests that exercise
//!   hmm-core's raw-pointer code, in its own target directory
//!   (`target/miri`) so it never invalidates the normal build.
//! - [`fuzz`]: `cargo +nightly fuzz run` of every target in `fuzz/` (a
//!   cargo-fuzz project outside the root workspace).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// One `cargo miri test` invocation.
struct MiriRun {
    /// Integration test file (`tests/<name>.rs`), or `None` for the doctests.
    test: Option<&'static str>,
    /// Arguments after `--` (a filter and `--skip`s).
    args: &'static [&'static str],
    /// `MIRIFLAGS`.
    flags: &'static str,
    /// What the run covers, for the progress line.
    what: &'static str,
}

/// Default Miri checks plus strict provenance (no integer-to-pointer casts).
const STRICT: &str = "-Zmiri-strict-provenance";

/// For tests on hmm-testkit's model kernel: Stacked Borrows is off because
/// `SimPhys::ptr`/`word` borrow the whole simulated RAM (`&self.mem[..]`,
/// `self.mem.as_ptr()` on a `Box<[AtomicU64]>`) on every access, and Miri
/// retags that whole range each time: minutes per test instead of seconds.
/// Data races, out-of-bounds, use-after-free, alignment and uninitialised
/// reads are still checked. Drop `-Zmiri-disable-stacked-borrows` once
/// `SimPhys` keeps a raw base pointer instead of a `Box`.
const MODEL: &str = "-Zmiri-strict-provenance -Zmiri-disable-stacked-borrows";

/// Quick mode: a few minutes on two cores.
const QUICK: &[MiriRun] = &[
    MiriRun {
        test: Some("miri_smoke"),
        args: &["--skip", "model_", "--skip", "long_"],
        flags: STRICT,
        what: "walker, snapshot, mirror table, registry over small arenas",
    },
    MiriRun {
        test: Some("miri_smoke"),
        args: &["model_", "--skip", "long_"],
        flags: MODEL,
        what: "Mirror fault/invalidate/fork/teardown on a small model kernel",
    },
    MiriRun {
        test: Some("walker"),
        // The cheap literal tests (the others snapshot up to 1 GiB, 262,144
        // entries: minutes under Miri; they run in long mode).
        args: &[
            "empty_table",
            "holes_at_every_level",
            "malformed_entries",
            "prot_none_and_specials",
            "range_ending_at_the_top",
            "ranges_the_walker_never_sees",
            "snapshot_rejects",
            "snapshot_reports_each_kind",
            "visitor_can_stop",
            "walk_and_snapshot_reject",
        ],
        flags: STRICT,
        what: "walker literal tests over a heap arena",
    },
    MiriRun { test: None, args: &[], flags: STRICT, what: "README and API doctests" },
];

/// Long mode adds these.
const LONG: &[MiriRun] = &[
    MiriRun {
        test: Some("walker"),
        args: &["directory_permissions", "five_level_tables", "high_half", "huge_leaves", "ranges_crossing"],
        flags: STRICT,
        what: "walker tests over large spans",
    },
    MiriRun { test: Some("miri_smoke"), args: &["long_"], flags: MODEL, what: "transparent huge page mirror" },
    MiriRun {
        test: Some("notifier_registry"),
        args: &["--skip", "ten_thousand", "--skip", "overlap_lookup_matches_brute_force"],
        flags: STRICT,
        what: "notifier registry (RawCell, deferred insert/remove, threads)",
    },
    MiriRun {
        test: Some("range_and_alloc"),
        args: &["--skip", "set_operations_match_brute_force", "--skip", "allocator_matches_a_set"],
        flags: STRICT,
        what: "VaRange and BitmapFrameAllocator (with threads)",
    },
    MiriRun {
        test: Some("hmm_bad_input"),
        args: &["--skip", "exhausted_allocator_at_every_allocation"],
        flags: MODEL,
        what: "bad input to Mirror on the model kernel (16 MiB RAM)",
    },
];

/// Time limit of one Miri invocation (compilation included).
const MIRI_RUN_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Runs hmm-core's raw-pointer tests under Miri: [`QUICK`] (a few minutes),
/// plus [`LONG`] with `long`. Returns e.g. "miri: 23 tests in 4 runs over 3
/// files passed (1 ignored) in 212 s".
pub fn miri(root: &Path, long: bool) -> Result<String, String> {
    let started = Instant::now();
    ensure_nightly(&["miri", "rust-src"])?;
    run_checked(root, "cargo", &["+nightly", "miri", "setup"], &[], Duration::from_secs(20 * 60))?;
    let target = root.join("target").join("miri");
    let target = target.to_str().ok_or("non-UTF-8 repository path")?.to_string();
    let runs: Vec<&MiriRun> = QUICK.iter().chain(if long { LONG } else { &[] }).collect();
    let (mut passed, mut ignored, mut files, mut ran) = (0u64, 0u64, Vec::new(), 0usize);
    for (i, run) in runs.iter().enumerate() {
        if let Some(t) = run.test {
            if !root.join("tests").join(format!("{t}.rs")).exists() {
                println!("verify: miri [{}/{}] tests/{t}.rs is gone, skipped", i + 1, runs.len());
                continue;
            }
        }
        let mut args = vec!["+nightly", "miri", "test", "-p", "hmm-core"];
        match run.test {
            Some(t) => args.extend(["--test", t]),
            None => args.push("--doc"),
        }
        args.push("--");
        args.extend(run.args);
        let name = run.test.map_or("doctests".to_string(), |t| format!("tests/{t}.rs"));
        println!("verify: miri [{}/{}] {name} {}: {}", i + 1, runs.len(), run.args.join(" "), run.what);
        let t0 = Instant::now();
        let env = [("MIRIFLAGS", run.flags), ("CARGO_TARGET_DIR", target.as_str())];
        let out = run_captured(root, "cargo", &args, &env, MIRI_RUN_LIMIT)?;
        let counts = test_counts(&out.text);
        if let Some(ice) = tool_crash(&out.text) {
            return Err(format!(
                "miri: the Miri interpreter itself crashed (an internal compiler error, a bug in the tool, not a \
                 failing test) running {name} {}:\n  {ice}\n  Find the access pattern that triggers it; if it is \
                 purely Miri's bug, run that test with a narrower MIRIFLAGS and a comment quoting this panic.",
                run.args.join(" ")
            ));
        }
        if !out.success() || counts.failed > 0 || counts.results == 0 {
            let ub: Vec<&str> = out
                .text
                .lines()
                .filter(|l| l.contains("Undefined Behavior") || l.contains("panicked at") || l.contains("-->"))
                .take(12)
                .collect();
            return Err(format!(
                "miri: {name} {} {} ({} passed, {} failed){}{}",
                run.args.join(" "),
                out.describe(),
                counts.passed,
                counts.failed,
                if ub.is_empty() { "" } else { ":\n  " },
                ub.join("\n  ")
            ));
        }
        println!(
            "verify: miri [{}/{}] {name}: {} passed, {} ignored in {} s",
            i + 1,
            runs.len(),
            counts.passed,
            counts.ignored,
            t0.elapsed().as_secs()
        );
        passed += counts.passed;
        ignored += counts.ignored;
        ran += 1;
        if !files.contains(&name) {
            files.push(name);
        }
    }
    let ignored = if ignored > 0 { format!(" ({ignored} ignored)") } else { String::new() };
    Ok(format!(
        "miri ({}): {passed} tests in {ran} runs over {} files passed{ignored} in {} s",
        if long { "long" } else { "quick" },
        files.len(),
        started.elapsed().as_secs()
    ))
}

/// The panic message of a crash of the tool itself (rustc/Miri ICE), if the
/// output shows one: "thread 'rustc' panicked at .../weak_memory.rs:233:26:"
/// plus the message line after it.
fn tool_crash(text: &str) -> Option<String> {
    if !text.contains("the compiler unexpectedly panicked") && !text.contains("caused an ICE") {
        return None;
    }
    let mut lines = text.lines();
    Some(match lines.find(|l| l.starts_with("thread 'rustc'")) {
        Some(at) => format!("{at} {}", lines.next().unwrap_or("").trim()),
        None => "internal compiler error (no panic line in the output)".to_string(),
    })
}

/// Fuzz targets, in the order they run.
const FUZZ_TARGETS: &[&str] = &["api", "decode"];

/// Fuzzes every target for `seconds` each (libFuzzer through cargo-fuzz on
/// nightly). Returns e.g. "fuzz: api 41000 executions in 60 s, decode
/// 2100000 executions in 60 s, 0 crashes". A crash fails with the path of
/// the reproducer (`fuzz/artifacts/<target>/crash-*`); rerun it with
/// `cargo +nightly fuzz run <target> <path>`.
pub fn fuzz(root: &Path, seconds: u64) -> Result<String, String> {
    let seconds = seconds.max(1);
    ensure_nightly(&[])?;
    let has_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_fuzz {
        println!("verify: installing cargo-fuzz (a few minutes)");
        run_checked(root, "cargo", &["install", "cargo-fuzz", "--locked"], &[], Duration::from_secs(30 * 60))?;
    }
    let mut parts = Vec::new();
    for (i, target) in FUZZ_TARGETS.iter().enumerate() {
        println!("verify: fuzz [{}/{}] building {target}", i + 1, FUZZ_TARGETS.len());
        run_checked(root, "cargo", &["+nightly", "fuzz", "build", target], &[], Duration::from_secs(30 * 60))?;
        let total = format!("-max_total_time={seconds}");
        println!("verify: fuzz [{}/{}] running {target} for {seconds} s", i + 1, FUZZ_TARGETS.len());
        // libFuzzer stops itself at -max_total_time; the limit only guards a hang.
        let limit = Duration::from_secs(seconds + 600);
        let args = ["+nightly", "fuzz", "run", target, "--", total.as_str(), "-max_len=1024", "-print_final_stats=1"];
        let out = run_captured(root, "cargo", &args, &[], limit)?;
        let execs = fuzz_executions(&out.text);
        if !out.success() {
            let artifact = out
                .text
                .lines()
                .find_map(|l| l.split("Test unit written to ").nth(1))
                .map_or(String::new(), |p| format!("; reproducer {}", p.trim()));
            let cause: Vec<&str> = out
                .text
                .lines()
                .filter(|l| l.contains("panicked at") || l.contains("ERROR: libFuzzer") || l.contains("SUMMARY"))
                .take(6)
                .collect();
            return Err(format!(
                "fuzz {target}: crash after {} executions ({}){artifact}\n  {}",
                execs.map_or("?".to_string(), |e| e.to_string()),
                out.describe(),
                cause.join("\n  ")
            ));
        }
        let execs = execs.ok_or_else(|| format!("fuzz {target}: no execution count in libFuzzer's output"))?;
        println!("verify: fuzz [{}/{}] {target}: {execs} executions in {} s", i + 1, FUZZ_TARGETS.len(), seconds);
        parts.push(format!("{target} {execs} executions in {seconds} s"));
    }
    Ok(format!("fuzz: {}, 0 crashes", parts.join(", ")))
}

/// Makes sure a nightly toolchain with `components` exists. An existing
/// nightly is kept (not updated, so others' nightly builds stay valid); only
/// a machine without one downloads it.
fn ensure_nightly(components: &[&str]) -> Result<(), String> {
    let have = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let here = Path::new(".");
    if have {
        if components.is_empty() {
            return Ok(());
        }
        let mut args = vec!["component", "add", "--toolchain", "nightly"];
        args.extend(components);
        if run_checked(here, "rustup", &args, &[], Duration::from_secs(20 * 60)).is_ok() {
            return Ok(());
        }
        println!("verify: this nightly lacks {}; installing the latest nightly", components.join(", "));
    }
    let list = components.join(",");
    let mut args = vec!["toolchain", "install", "nightly", "--profile", "minimal"];
    if !components.is_empty() {
        args.extend(["--component", list.as_str()]);
    }
    run_checked(here, "rustup", &args, &[], Duration::from_secs(30 * 60))
}

/// Output of a finished command (stdout and stderr interleaved by line).
pub(crate) struct Captured {
    pub(crate) status: Option<ExitStatus>,
    pub(crate) timed_out: Option<Duration>,
    pub(crate) text: String,
}

impl Captured {
    pub(crate) fn success(&self) -> bool {
        self.timed_out.is_none() && self.status.is_some_and(|s| s.success())
    }

    fn describe(&self) -> String {
        match (self.timed_out, self.status) {
            (Some(limit), _) => format!("timed out after {} s", limit.as_secs()),
            (None, Some(s)) => format!("exited with {s}"),
            (None, None) => "ended without a status".to_string(),
        }
    }
}

/// Runs a command, echoing its output, and fails unless it succeeds in time.
fn run_checked(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Result<(), String> {
    let out = run_captured(dir, program, args, env, limit)?;
    if out.success() {
        Ok(())
    } else {
        let tail: Vec<&str> = out.text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        Err(format!("{program} {} {}:\n{}", args.join(" "), out.describe(), tail.join("\n")))
    }
}

/// Runs a command in its own process group, echoing and capturing its
/// output; past `limit` the whole group is killed.
pub(crate) fn run_captured(
    dir: &Path,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> Result<Captured, String> {
    let shown: Vec<String> = env.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k}='{v}' ")).collect();
    println!("verify: {}{program} {}", shown.concat(), args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(dir).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {program}: {e}"))?;
    let text = Arc::new(Mutex::new(String::new()));
    let readers = [echo(child.stdout.take(), &text), echo(child.stderr.take(), &text)];
    let deadline = Instant::now() + limit;
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (Some(status), None),
            Ok(None) if Instant::now() >= deadline => {
                kill_group(&mut child);
                break (child.wait().ok(), Some(limit));
            }
            Ok(None) => thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("waiting for {program}: {e}")),
        }
    };
    for r in readers.into_iter().flatten() {
        let _ = r.join();
    }
    let text = std::mem::take(&mut *text.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Captured { status, timed_out, text })
}

/// Copies a pipe to our stdout line by line and into `into`.
fn echo(pipe: Option<impl Read + Send + 'static>, into: &Arc<Mutex<String>>) -> Option<JoinHandle<()>> {
    let pipe = pipe?;
    let into = into.clone();
    Some(thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let s = String::from_utf8_lossy(&line);
            // libFuzzer's per-input status lines are many; keep them out of
            // the terminal but in the capture.
            if !s.starts_with('#') || s.contains("DONE") {
                print!("{s}");
            }
            into.lock().unwrap_or_else(|e| e.into_inner()).push_str(&s);
            line.clear();
        }
    }))
}

/// Ends the child and everything it started (its process group).
fn kill_group(child: &mut Child) {
    #[cfg(unix)]
    {
        let group = format!("-{}", child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        thread::sleep(Duration::from_secs(2));
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
    }
    let _ = child.kill();
}

#[derive(Debug, Default, PartialEq, Eq)]
struct TestCounts {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// "test result:" lines seen.
    results: u64,
}

/// Sums libtest's "test result: ok. 8 passed; 0 failed; 1 ignored; ..." lines.
fn test_counts(text: &str) -> TestCounts {
    let mut c = TestCounts::default();
    for line in text.lines() {
        let Some(rest) = line.split("test result: ").nth(1) else { continue };
        c.results += 1;
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            if let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) {
                match what {
                    "passed" => c.passed += n,
                    "failed" => c.failed += n,
                    "ignored" => c.ignored += n,
                    _ => {}
                }
            }
        }
    }
    c
}

/// The executions libFuzzer reports at the end ("Done 123 runs in 60
/// second(s)", or the last "#123" status line, or "stat::number_of_executed_units").
fn fuzz_executions(text: &str) -> Option<u64> {
    let done = text.lines().rev().find_map(|l| {
        let rest = l.strip_prefix("Done ")?;
        rest.split_whitespace().next()?.parse().ok()
    });
    let stat =
        || text.lines().rev().find_map(|l| l.strip_prefix("stat::number_of_executed_units:")?.trim().parse().ok());
    let status =
        || text.lines().rev().find_map(|l| l.strip_prefix('#')?.split_whitespace().next()?.parse::<u64>().ok());
    done.or_else(stat).or_else(status)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_miri_ice_is_named_as_a_tool_crash() {
        let out = "test model_x ... \nthread 'rustc' (3679) panicked at src/tools/miri/src/concurrency/weak_memory.rs:233:26:\n\
                   cannot have empty store buffer when previous write was atomic: ()\nstack backtrace:\n\
                   error: the compiler unexpectedly panicked. This is a bug\n";
        let ice = super::tool_crash(out).expect("an ICE");
        assert!(ice.contains("weak_memory.rs:233") && ice.contains("cannot have empty store buffer"), "{ice}");
        assert_eq!(super::tool_crash("test result: FAILED. 1 passed; 1 failed\nthread 'x' panicked at a.rs"), None);
    }

    use super::*;

    #[test]
    fn counts_libtest_results() {
        let text = "test a ... ok\ntest result: ok. 8 passed; 0 failed; 1 ignored; 0 measured; 4 filtered out; \
                    finished in 16.91s\ntest result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured\n";
        assert_eq!(test_counts(text), TestCounts { passed: 10, failed: 1, ignored: 1, results: 2 });
    }

    #[test]
    fn reads_libfuzzer_counts() {
        assert_eq!(fuzz_executions("#30867\tDONE   cov: 2172\nDone 30867 runs in 46 second(s)\n"), Some(30867));
        assert_eq!(fuzz_executions("#512\tpulse  cov: 1\n#1024\tNEW cov: 2\n"), Some(1024));
        assert_eq!(fuzz_executions("stat::number_of_executed_units: 77\n"), Some(77));
        assert_eq!(fuzz_executions("nothing"), None);
    }
}
