//! The core is architecture-neutral: no module outside `src/arch/` names an
//! architecture (in code or docs). Formats live in `src/arch/`, and the
//! generic code reaches them only through `PteFormat` / `PagingGeometry`.

use std::path::{Path, PathBuf};

/// Words that name an architecture or one of its paging modes.
const ARCH_WORDS: [&str; 15] = [
    "x86", "amd64", "intel", "la57", "aarch64", "arm64", "armv8", "vmsa", "lpa2", "ttbr", "riscv", "risc-v", "sv39",
    "sv48", "sv57",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_outside_arch_names_an_architecture() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let arch = src.join("arch");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let core: Vec<_> = files.into_iter().filter(|f| !f.starts_with(&arch)).collect();
    assert!(core.len() > 20, "found only {} core files under {}", core.len(), src.display());
    let mut hits = Vec::new();
    for file in &core {
        let text = std::fs::read_to_string(file).unwrap().to_lowercase();
        for (n, line) in text.lines().enumerate() {
            for word in ARCH_WORDS {
                if line.contains(word) {
                    hits.push(format!("{}:{}: {word}", file.strip_prefix(&src).unwrap().display(), n + 1));
                }
            }
        }
    }
    assert!(hits.is_empty(), "architecture named outside src/arch:\n{}", hits.join("\n"));
}
