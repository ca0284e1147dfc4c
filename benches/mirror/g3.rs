//! G3: a device fault of unpopulated memory costs little more than the
//! kernel's own fault handler doing the same work.
//!
//! Baseline: `AddressSpace::handle_fault` over the range under the read
//! lock (taking and dropping the lock timed too): what the kernel does for
//! the fault anyway. Measured: `Mirror::fault` of the same range and
//! access, which also walks the CPU tables, calls that handler once for
//! the missing run, walks again and maps every page. Before each operation
//! the range is zapped (`ModelSpace::clear`, i.e. MADV_DONTNEED: the CPU
//! frees the pages, the mirror drops them), untimed; the CPU keeps its page
//! tables, the mirror frees its emptied leaf tables (one per 2 MiB) and
//! allocates them again, a pinned page keeping the directories above.

use crate::kit::*;
use hmm_core::{AddressSpace, VaRange};
use hmm_testkit::{ModelSpace, RegionKind};
use std::time::Duration;

const BASE: u64 = 4 * GIB;

/// `n` zap-then-operation rounds over `r`; the time of the operations.
fn batch(space: &ModelSpace, r: VaRange, n: u64, op: &dyn Fn()) -> Duration {
    (0..n)
        .map(|_| {
            space.clear(r).unwrap();
            timed(op)
        })
        .sum()
}

pub fn run(mode: Mode) {
    let (alloc, space) = kernel(160 * MIB);
    // Page 0 faulted alone, page 1 pinned, block 1 as 512 pages, blocks 2..
    // as 16,384 pages.
    let region = space.map(BASE, 2 * HUGE + 16384 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let pin = range(BASE + PAGE, PAGE);
    space.write_bytes(pin.start(), &[1]).unwrap();
    let m = mirror(&space, &alloc, region);
    m.fault(pin, false).unwrap();
    let sizes = [
        (1, range(BASE, PAGE), 200),
        (512, range(BASE + HUGE, HUGE), 4),
        (16384, range(BASE + 2 * HUGE, 16384 * PAGE), 1),
    ];
    let rounds = mode.rounds();
    for write in [true, false] {
        let access = if write { "write" } else { "read" };
        for &(pages, r, n) in &sizes {
            let rounds = if pages > 512 { rounds.min(9) } else { rounds };
            let handler = || {
                let guard = space.read_lock();
                space.handle_fault(&guard, r, write).unwrap();
            };
            let p = interleaved(rounds, n, &mut |n| batch(&space, r, n, &handler), &mut |n| {
                batch(&space, r, n, &|| m.fault(r, write).unwrap())
            });
            if pages == 512 {
                ratio(
                    &format!("g3_mirror_fault_vs_handler_{access}"),
                    p.ratio,
                    if write { "<= 1.10" } else { "<= 1.25" },
                    &format!(
                        "Mirror::fault ({access}) of 512 unpopulated 4 KiB pages: {:.0} ns ({:.0} ns/page)",
                        p.b,
                        p.b / 512.0
                    ),
                    &format!(
                        "handle_fault ({access}) of the same 512 pages under the read lock: {:.0} ns ({:.0} ns/page)",
                        p.a,
                        p.a / 512.0
                    ),
                );
            }
            figure(format!(
                "g3 {access} fault of {pages} unpopulated page(s): Mirror::fault {:.0} ns, handle_fault alone {:.0} \
                 ns, ratio {} (over summed times {})",
                p.b,
                p.a,
                num(p.ratio),
                num(p.total_ratio)
            ));
        }
    }
    handler_calls(&space, &m, range(BASE + 2 * HUGE, 16384 * PAGE));
}

/// Handler calls for one fault of a 16,384-page missing run.
fn handler_calls(space: &ModelSpace, m: &M<'_>, run: VaRange) {
    space.clear(run).unwrap();
    let (kernel0, mirror0, retries0) = (space.handle_fault_calls(), m.stats().handler_calls, m.stats().retries);
    m.fault(run, true).unwrap();
    let calls = m.stats().handler_calls - mirror0;
    ratio(
        "g3_handler_calls_per_run",
        calls as f64,
        "== 1",
        &format!(
            "Mirror::fault (write) of a 16,384-page missing run: {calls} handler call(s) (MirrorStats::handler_calls; \
             the model kernel counted {}; {} retries)",
            space.handle_fault_calls() - kernel0,
            m.stats().retries - retries0
        ),
        "a CPU fault per page: 16,384 calls",
    );
}
