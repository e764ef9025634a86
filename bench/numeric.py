#!/usr/bin/env python3
"""The log-sum-exp over a vocabulary-sized row (`src/numeric.rs`), which every sampled token's
log-probability and every position of the training loss needs, against a plain loop (libm's
`exp`, summed in f64), in the same run, as a ratio.

`src/numeric.rs` is compiled on its own with rustc, twice: as the dev profile builds it
(opt-level 2, overflow checks on: the tests and benchmarks) and as the release profile does
(opt-level 3: `cargo run --release`). Each figure is the best of 20 × 100 calls on a row of
151,936 logits (the default model's vocabulary).

    python3 bench/numeric.py
"""
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
#[path = "%s"]
mod numeric;

fn best(f: &dyn Fn(&[f32]) -> f64, row: &[f32]) -> (f64, f64) {
    let (mut best, mut value) = (f64::MAX, 0.0);
    for _ in 0..20 {
        let started = std::time::Instant::now();
        for _ in 0..100 {
            value = f(std::hint::black_box(row));
        }
        best = best.min(started.elapsed().as_secs_f64() / 100.0);
    }
    (best, value)
}

fn main() {
    // Logits spread over [-15, 15], in no order.
    let row: Vec<f32> =
        (0..151_936u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 8) as f32 / 16_777_216.0 * 30.0 - 15.0).collect();
    let (ours, value) = best(&|row| numeric::log_sum_exp(row), &row);
    let plain = |row: &[f32]| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        f64::from(max) + row.iter().map(|&x| f64::from(x - max).exp()).sum::<f64>().ln()
    };
    let (theirs, exact) = best(&plain, &row);
    println!("{} {} {} {}", ours * 1e6, theirs * 1e6, value, exact);
}
"""


def main():
    profiles = {"dev (opt-level 2, overflow checks)": ["-C", "opt-level=2", "-C", "overflow-checks=on", "-C", "debug-assertions=on"],
                "release (opt-level 3)": ["-C", "opt-level=3"]}
    print("log-sum-exp of 151,936 logits, µs (best of 20 × 100 calls)")
    print(f"{'build':>36} {'seedflow':>9} {'plain loop':>10} {'ratio':>6}  difference")
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "bench.rs"
        source.write_text(PROGRAM % (ROOT / "src" / "numeric.rs"))
        for name, flags in profiles.items():
            binary = Path(work) / "bench"
            subprocess.run(["rustc", "--edition=2024", "-A", "dead_code", *flags, source, "-o", binary], check=True)
            ours, theirs, value, exact = map(float, subprocess.run([binary], check=True, capture_output=True, text=True).stdout.split())
            print(f"{name:>36} {ours:>9.1f} {theirs:>10.1f} {theirs / ours:>5.1f}x  {abs(value - exact):.1e}")
    print("ratio = plain loop / seedflow (higher is faster); difference = |seedflow − plain loop's value|")


if __name__ == "__main__":
    main()
