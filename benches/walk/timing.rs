//! Interleaved timing: every method of a group runs once per round (order
//! rotated each round), so a noisy machine shifts all of them alike; ratios
//! are medians of per-round ratios. A sample during which another process
//! took the CPU (thread CPU time under 90% of the wall time) is retaken.

use std::time::{Duration, Instant};

/// Runs its body `iters` times.
pub type Body<'a> = Box<dyn FnMut(u64) + 'a>;

/// One measured method.
pub struct Method<'a> {
    /// Series name (PLOT).
    pub series: &'static str,
    /// Pages one call covers.
    pub pages: u64,
    run: Body<'a>,
    iters: u64,
    /// ns per page, one per round.
    samples: Vec<f64>,
}

/// Methods measured against each other, interleaved.
#[derive(Default)]
pub struct Group<'a> {
    methods: Vec<Method<'a>>,
    /// Samples taken, retaken after a preemption, and kept preempted.
    pub preemption: Preemption,
}

/// How often samples were disturbed by other processes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Preemption {
    /// Samples kept.
    pub samples: u64,
    /// Samples retaken because the thread was preempted.
    pub retaken: u64,
    /// Samples kept although preempted (every try was).
    pub kept_preempted: u64,
}

/// Tries per sample before keeping the least preempted one.
pub const TRIES: usize = 4;
/// Share of the wall time the thread must have run for a sample to count.
const MIN_CPU_SHARE: f64 = 0.9;

impl<'a> Group<'a> {
    /// Adds a method covering `pages` pages per call.
    pub fn add(&mut self, series: &'static str, pages: u64, run: Body<'a>) {
        self.methods.push(Method { series, pages, run, iters: 1, samples: Vec::new() });
    }

    /// Calibrates each method to about `target` per sample, then measures
    /// `rounds` interleaved rounds.
    pub fn run(&mut self, rounds: usize, target: Duration) {
        for m in &mut self.methods {
            m.iters = calibrate(&mut m.run, target);
        }
        let n = self.methods.len();
        for r in 0..rounds {
            for k in 0..n {
                let m = &mut self.methods[(r + k) % n];
                let t = sample(&mut m.run, m.iters, &mut self.preemption);
                m.samples.push(t.as_nanos() as f64 / (m.iters * m.pages) as f64);
            }
        }
    }

    /// The methods, in insertion order.
    pub fn methods(&self) -> &[Method<'a>] {
        &self.methods
    }

    fn get(&self, series: &str) -> Option<&Method<'a>> {
        self.methods.iter().find(|m| m.series == series)
    }

    /// Median ns per page of `series`.
    pub fn ns_per_page(&self, series: &str) -> Option<f64> {
        self.get(series).map(|m| median(m.samples.clone()))
    }

    /// Median over rounds of `a`'s ns per page over `b`'s.
    pub fn ratio(&self, a: &str, b: &str) -> Option<f64> {
        let (a, b) = (self.get(a)?, self.get(b)?);
        Some(median(a.samples.iter().zip(&b.samples).map(|(x, y)| x / y).collect()))
    }
}

impl Method<'_> {
    /// Median ns per page.
    pub fn median(&self) -> f64 {
        median(self.samples.clone())
    }
}

fn time(run: &mut Body<'_>, iters: u64) -> Duration {
    let t = Instant::now();
    run(iters);
    t.elapsed()
}

/// This thread's CPU time (user + system).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_THREAD_CPUTIME_ID");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall time of `iters` calls, retaken while another process held the CPU
/// for more than a tenth of it; after [`TRIES`], the least preempted try.
fn sample(run: &mut Body<'_>, iters: u64, stats: &mut Preemption) -> Duration {
    let mut best = (0.0, Duration::MAX);
    for _ in 0..TRIES {
        let cpu = thread_cpu();
        let wall = time(run, iters);
        let share = (thread_cpu() - cpu).as_secs_f64() / wall.as_secs_f64().max(1e-9);
        if share > best.0 {
            best = (share, wall);
        }
        if share >= MIN_CPU_SHARE {
            break;
        }
        stats.retaken += 1;
    }
    stats.samples += 1;
    stats.kept_preempted += u64::from(best.0 < MIN_CPU_SHARE);
    best.1
}

/// Iterations per sample reaching about `target` (after a warm-up call).
fn calibrate(run: &mut Body<'_>, target: Duration) -> u64 {
    run(1);
    let mut iters = 1u64;
    loop {
        let t = time(run, iters).max(Duration::from_nanos(1));
        if t >= target / 8 || iters >= 1 << 30 {
            return ((iters as f64 * target.as_secs_f64() / t.as_secs_f64()).ceil() as u64).max(1);
        }
        iters *= 8;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
