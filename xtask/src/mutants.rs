//! Mutation testing for `cargo xtask verify --long`: cargo-mutants over the
//! files that carry the fault / invalidation protocol, against the fast host
//! tests (no loom, no Miri, no proptest), with a per-mutant timeout so a
//! mutant that hangs counts as a timeout instead of stalling the run.
//!
//! Outcomes come from cargo-mutants' `mutants.out/{caught,missed,timeout,
//! unviable}.txt`. Mutants listed in `xtask/mutants-equivalent.txt` (one
//! per line, the name as cargo-mutants prints it, then ` # reason`) behave
//! exactly like the original code; they are taken out of the missed ones
//! and of the score. The line number of an entry is ignored (it moves when
//! code above is edited); the column must match.
//!
//! Environment: `HMM_MUTANTS_FILES` (comma-separated) replaces [`FILES`] for
//! a partial run; `HMM_MUTANTS_JOBS` sets cargo-mutants' `--jobs` (default 1).

use crate::verify_tools::run_captured;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Files whose mutants are tested.
pub const FILES: &[&str] = &[
    "src/notifier/registry.rs",
    "src/notifier/mod.rs",
    "src/fault.rs",
    "src/mirror/mod.rs",
    "src/mirror/fault.rs",
    "src/pt/mirror_table.rs",
    "src/pt/walk.rs",
];

/// Test files (`tests/<name>.rs`) built and run against every mutant: the
/// deterministic host tests that exercise those files and fail fast. Files
/// that do not exist (an older checkout) are left out. Not here: loom,
/// Miri, the proptests (minutes each), and the threaded race tests
/// (`hmm_races`, `alloc_free`): under a mutant that breaks them they wait
/// for their watchdog, so nearly every mutant would cost a full timeout;
/// `protocol_edges` checks the retry budgets they measure, deterministically.
const TESTS: &[&str] = &[
    "protocol_edges",
    "notifier_registry",
    "walker",
    "miri_smoke",
    "model_kernel",
    "hmm_bad_input",
    "bad_input_matrix",
    "hmm_selftests",
    // Deterministic counts, 0.1 s; a mutant that never gives up waiting
    // times out (caught) instead of passing.
    "retry_budget",
    "geometry",
    "fault_injection",
];

/// Tests left out of those files: each takes seconds (thousands of rounds
/// or 1 GiB of simulated memory) or runs threads that wait for each other,
/// and checks nothing a faster test of the same file does not.
const SKIP: &[&str] = &[
    "anon_teardown",
    "hugetlbfs_1g",
    "hugetlb_1g",
    "ten_thousand",
    "overlap_lookup_matches_brute_force",
    "frame_allocator_failing_at_every_allocation",
    "exhausted_allocator_at_every_allocation",
    "non_blockable_invalidation_refused_while_a_fault_commits",
];

/// The list of equivalent mutants, relative to the repository root.
pub const EQUIVALENT: &str = "xtask/mutants-equivalent.txt";

/// A mutant's test run may take this many times the unmutated run (and at
/// least [`MIN_TEST_TIMEOUT`] s) before it counts as a timeout.
const TIMEOUT_MULTIPLIER: &str = "3";
const MIN_TEST_TIMEOUT: &str = "30";
/// One mutant's build.
const BUILD_TIMEOUT: &str = "900";
/// The whole run (six files, a few hundred mutants, one at a time).
const RUN_LIMIT: Duration = Duration::from_secs(6 * 3600);
const INSTALL_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Installs cargo-mutants if missing, runs it, and returns the score line
/// "mutants: N viable, C caught, T timeout, M missed (score X%)" plus the
/// equivalent and unviable counts. Fails if cargo-mutants cannot run or its
/// unmutated baseline fails; missed mutants are listed, not fatal.
pub fn mutants(root: &Path) -> Result<String, String> {
    let started = Instant::now();
    let have = Command::new("cargo")
        .args(["mutants", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        println!("verify: installing cargo-mutants (a few minutes)");
        let out = run_captured(root, "cargo", &["install", "cargo-mutants", "--locked"], &[], INSTALL_LIMIT)?;
        if !out.success() {
            return Err("cargo install cargo-mutants --locked failed".to_string());
        }
    }
    let files: Vec<String> = match std::env::var("HMM_MUTANTS_FILES") {
        Ok(list) if !list.trim().is_empty() => list.split(',').map(|f| f.trim().to_string()).collect(),
        _ => FILES.iter().map(|f| f.to_string()).collect(),
    };
    let jobs = std::env::var("HMM_MUTANTS_JOBS").unwrap_or_else(|_| "1".to_string());
    let out_dir = root.join("target").join("mutants");
    let args = command(&files, &jobs, out_dir.to_str().ok_or("non-UTF-8 repository path")?, |t| {
        root.join("tests").join(format!("{t}.rs")).exists()
    });
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_captured(root, "cargo", &argv, &[], RUN_LIMIT)?;
    if let Some(limit) = out.timed_out {
        return Err(format!("cargo mutants timed out after {} s", limit.as_secs()));
    }
    let status = out.status.and_then(|s| s.code());
    // 0: all caught, 2: some missed, 3: some timed out; 4 is a failing
    // baseline, 1 a usage error.
    match status {
        Some(0 | 2 | 3) => {}
        Some(4) => return Err("mutants: the tests fail without any mutation (baseline); fix them first".into()),
        other => return Err(format!("cargo mutants failed (exit {other:?})")),
    }
    let read = |name: &str| std::fs::read_to_string(out_dir.join("mutants.out").join(name)).unwrap_or_default();
    let outcomes =
        Outcomes::parse(&read("caught.txt"), &read("missed.txt"), &read("timeout.txt"), &read("unviable.txt"));
    let equivalent = std::fs::read_to_string(root.join(EQUIVALENT)).unwrap_or_default();
    let score = outcomes.score(&equivalent);
    for m in &score.missed {
        println!("verify: MISSED {m}");
    }
    for e in &score.stale {
        println!("verify: note: {EQUIVALENT} lists `{e}`, which was not missed in this run");
    }
    Ok(format!("{} over {} files in {} s", score.line(), files.len(), started.elapsed().as_secs()))
}

/// The cargo-mutants command line (after `cargo`).
fn command(files: &[String], jobs: &str, out_dir: &str, exists: impl Fn(&str) -> bool) -> Vec<String> {
    let mut args: Vec<String> =
        ["mutants", "--no-shuffle", "--jobs", jobs, "--output", out_dir].iter().map(|s| s.to_string()).collect();
    for (flag, value) in [
        ("--timeout-multiplier", TIMEOUT_MULTIPLIER),
        ("--minimum-test-timeout", MIN_TEST_TIMEOUT),
        ("--build-timeout", BUILD_TIMEOUT),
    ] {
        args.extend([flag.to_string(), value.to_string()]);
    }
    for f in files {
        args.extend(["--file".to_string(), f.clone()]);
    }
    // `--test` goes to every cargo invocation, so the mutant's build also
    // compiles only these test files (not loom, the proptests, benches).
    for t in TESTS.iter().filter(|t| exists(t)) {
        args.push(format!("--cargo-arg=--test={t}"));
    }
    // What follows goes to `cargo test`, and after its `--` to libtest.
    args.extend(["--".to_string(), "--".to_string()]);
    for s in SKIP {
        args.extend(["--skip".to_string(), s.to_string()]);
    }
    args
}

/// A mutant name split up: "src/fault.rs:157:22: replace < with <= in
/// next_page" -> ("src/fault.rs", Some(22), "replace < with <= in
/// next_page"). The line is dropped (it moves when code above is edited);
/// the column stays, to tell apart two mutants of one line that have the
/// same description. An equivalent-list entry may omit line and column.
fn key(name: &str) -> (String, Option<u32>, String) {
    let name = name.trim();
    let Some((file, rest)) = name.split_once(':') else { return (String::new(), None, name.to_string()) };
    let mut numbers = Vec::new();
    let mut rest = rest;
    while numbers.len() < 2 {
        match rest.split_once(':') {
            Some((n, tail)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                numbers.push(n.parse::<u32>().unwrap_or(0));
                rest = tail;
            }
            _ => break,
        }
    }
    let col = if numbers.len() == 2 { Some(numbers[1]) } else { None };
    (file.to_string(), col, rest.trim().to_string())
}

/// Whether the equivalent-list entry `entry` names the mutant `missed`.
fn covers(entry: &(String, Option<u32>, String), missed: &str) -> bool {
    let m = key(missed);
    entry.0 == m.0 && entry.2 == m.2 && (entry.1.is_none() || entry.1 == m.1)
}

#[derive(Debug, Default)]
struct Outcomes {
    caught: Vec<String>,
    missed: Vec<String>,
    timeout: Vec<String>,
    unviable: Vec<String>,
}

#[derive(Debug)]
struct Score {
    caught: usize,
    timeout: usize,
    /// Missed and not listed as equivalent.
    missed: Vec<String>,
    equivalent: usize,
    unviable: usize,
    /// Entries of the equivalent list that matched no missed mutant.
    stale: Vec<String>,
}

impl Outcomes {
    fn parse(caught: &str, missed: &str, timeout: &str, unviable: &str) -> Self {
        let lines = |s: &str| s.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        Self { caught: lines(caught), missed: lines(missed), timeout: lines(timeout), unviable: lines(unviable) }
    }

    /// Takes the mutants of `equivalent` (the list file's text) out of the
    /// missed ones.
    fn score(&self, equivalent: &str) -> Score {
        let listed: Vec<(String, Option<u32>, String)> = equivalent
            .lines()
            .map(|l| l.split(" # ").next().unwrap_or("").trim())
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(key)
            .collect();
        let (eq, missed): (Vec<&String>, Vec<&String>) =
            self.missed.iter().partition(|m| listed.iter().any(|e| covers(e, m)));
        let stale = listed
            .iter()
            .filter(|e| !self.missed.iter().any(|m| covers(e, m)))
            .map(|(file, col, desc)| match col {
                Some(c) => format!("{file}:_:{c}: {desc}"),
                None => format!("{file}: {desc}"),
            })
            .collect();
        Score {
            caught: self.caught.len(),
            timeout: self.timeout.len(),
            missed: missed.into_iter().cloned().collect(),
            equivalent: eq.len(),
            unviable: self.unviable.len(),
            stale,
        }
    }
}

impl Score {
    fn viable(&self) -> usize {
        self.caught + self.timeout + self.missed.len()
    }

    /// "mutants: N viable, C caught, T timeout, M missed (score X%); E
    /// equivalent, U unviable". The score is (caught + timeout) / viable.
    fn line(&self) -> String {
        let viable = self.viable();
        let score = if viable == 0 { 100.0 } else { 100.0 * (self.caught + self.timeout) as f64 / viable as f64 };
        format!(
            "mutants: {viable} viable, {} caught, {} timeout, {} missed (score {score:.1}%); {} equivalent, {} unviable",
            self.caught,
            self.timeout,
            self.missed.len(),
            self.equivalent,
            self.unviable
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_drop_the_line_and_keep_the_column() {
        let k = |f: &str, c: Option<u32>, d: &str| (f.to_string(), c, d.to_string());
        assert_eq!(
            key("src/fault.rs:157:22: replace < with <= in next_page"),
            k("src/fault.rs", Some(22), "replace < with <= in next_page")
        );
        assert_eq!(
            key("src/fault.rs: replace < with <= in next_page"),
            k("src/fault.rs", None, "replace < with <= in next_page")
        );
        assert!(covers(&key("src/a.rs:1:51: delete ! in f"), "src/a.rs:293:51: delete ! in f"));
        assert!(!covers(&key("src/a.rs:1:51: delete ! in f"), "src/a.rs:293:20: delete ! in f"));
        assert!(covers(&key("src/a.rs: delete ! in f"), "src/a.rs:293:20: delete ! in f"));
        assert!(!covers(&key("src/b.rs: delete ! in f"), "src/a.rs:293:20: delete ! in f"));
    }

    #[test]
    fn equivalents_leave_the_missed_and_the_score() {
        let o = Outcomes::parse(
            "src/a.rs:1:1: replace f -> bool with true\nsrc/a.rs:2:1: replace f -> bool with false\n",
            "src/a.rs:9:5: replace >= with == in g\nsrc/a.rs:12:5: replace + with * in h\n",
            "src/a.rs:4:4: replace += with *= in g\n",
            "src/a.rs:5:5: replace g -> u32 with 0\n\n",
        );
        let eq = "# comment\n\nsrc/a.rs:8:5: replace >= with == in g # counts up by one from 0\nsrc/b.rs: gone # old\n";
        let s = o.score(eq);
        assert_eq!(s.missed, ["src/a.rs:12:5: replace + with * in h"]);
        assert_eq!(s.stale, ["src/b.rs: gone"]);
        assert_eq!(
            s.line(),
            "mutants: 4 viable, 2 caught, 1 timeout, 1 missed (score 75.0%); 1 equivalent, 1 unviable"
        );
        let s = o.score("src/a.rs:9:6: replace >= with == in g # another column\n");
        assert_eq!((s.missed.len(), s.equivalent), (2, 0));
        assert_eq!(s.stale, ["src/a.rs:_:6: replace >= with == in g"]);
        assert_eq!(
            Outcomes::default().score("").line().split(" (").next(),
            Some("mutants: 0 viable, 0 caught, 0 timeout, 0 missed")
        );
    }

    #[test]
    fn command_lists_files_existing_tests_and_skips() {
        let args = command(&["src/fault.rs".to_string()], "1", "/tmp/out", |t| t != "protocol_edges");
        let s = args.join(" ");
        assert!(s.starts_with("mutants --no-shuffle --jobs 1 --output /tmp/out "), "{s}");
        assert!(
            s.contains("--file src/fault.rs --cargo-arg=--test=notifier_registry --cargo-arg=--test=walker"),
            "{s}"
        );
        assert!(!s.contains("protocol_edges"));
        assert!(s.contains("--cargo-arg=--test=fault_injection -- -- --skip anon_teardown --skip hugetlbfs_1g"), "{s}");
        assert!(s.ends_with("--skip non_blockable_invalidation_refused_while_a_fault_commits"), "{s}");
    }
}
