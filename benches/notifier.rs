//! Notifier registry costs (placeholder; filled in by the benchmark work of issue 10).

fn main() {}
