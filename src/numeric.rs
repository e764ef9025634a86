//! Numerics that run over a whole vocabulary per token: log-sum-exp, for a sampled token's
//! log-probability and for the training loss. Written for the compiler to vectorise (eight
//! lanes, no libm call): a plain loop over 150,000 logits costs a millisecond per token.

/// log Σ e^x over `row`: the largest value plus the log of the sum of e^(x − max). Within 1e-5
/// of the exact value for a vocabulary-sized row.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked above.
        return unsafe { log_sum_exp_avx2(row) };
    }
    log_sum_exp_lanes(row)
}

/// The same loop compiled for AVX2, whose registers hold all eight lanes (the build's x86-64
/// baseline, SSE2, holds four): twice as fast, and the same operations in the same order, so
/// the same result to the bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn log_sum_exp_avx2(row: &[f32]) -> f64 {
    log_sum_exp_lanes(row)
}

#[inline(always)]
fn log_sum_exp_lanes(row: &[f32]) -> f64 {
    const LANES: usize = 8;
    const BLOCK: usize = LANES * 64;
    let chunks = row.chunks_exact(LANES);
    let mut top = [f32::NEG_INFINITY; LANES];
    for chunk in chunks.clone() {
        for (t, &x) in top.iter_mut().zip(chunk) {
            *t = if x > *t { x } else { *t };
        }
    }
    let max = top.iter().chain(chunks.remainder()).copied().fold(f32::NEG_INFINITY, f32::max);
    // A block's terms first, in a loop of its own, then their sum: with the two in one loop,
    // opt-level 3 (release builds) vectorised the exponentials only in part (some lanes two or
    // four wide, some scalar), three times slower. Lanes of f32 sums over a block, blocks summed in f64: a long
    // f32 sum would lose the many small terms.
    let mut terms = [0f32; BLOCK];
    let mut sum = 0f64;
    for block in row.chunks(BLOCK) {
        let terms = &mut terms[..block.len()];
        for (term, &x) in terms.iter_mut().zip(block) {
            *term = exp_nonpositive(x - max);
        }
        let chunks = terms.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().sum();
        let mut lanes = [0f32; LANES];
        for chunk in chunks {
            for (lane, &term) in lanes.iter_mut().zip(chunk) {
                *lane += term;
            }
        }
        sum += lanes.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(tail);
    }
    f64::from(max) + sum.ln()
}

/// e^x for x ≤ 0, within 5e-6 relative (from rounding x · log2 e) down to e^-87 and under
/// 2e-38 below: 2^(x log2 e) as an integer power of two written into the exponent bits, times
/// the Taylor series of 2^y for the rest y in [-1/2, 1/2].
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    // Adding 1.5 · 2^23 rounds to an integer, which lands in the low bits of the mantissa.
    const ROUND: f32 = 12_582_912.0;
    let t = (x * std::f32::consts::LOG2_E).max(-126.0); // NaN becomes -126 too
    let shifted = t + ROUND;
    let whole = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32; // t rounded: -126..=0
    let y = (t - (shifted - ROUND)) * std::f32::consts::LN_2;
    // Multiplied by 1/5040, not divided by 5040: a division per eight terms would cost more
    // than the rest together.
    let fraction = 1.0
        + y * (1.0
            + y * (1.0 / 2.0
                + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0 + y * (1.0 / 5040.0)))))));
    // 1..=127, so it cannot wrap; a checked add (the dev profile's overflow checks) would keep
    // the callers' loops from being vectorised, four times slower.
    f32::from_bits((whole.wrapping_add(127) as u32) << 23) * fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_library() {
        for i in 0..=20_000 {
            let x = -(i as f32) * 0.005;
            let (ours, exact) = (exp_nonpositive(x), x.exp());
            if x >= -87.0 {
                assert!((ours - exact).abs() <= 5e-6 * exact, "e^{x}: {ours} against {exact}");
            } else {
                assert!(ours <= 2e-38, "e^{x}: {ours}");
            }
        }
        assert!(exp_nonpositive(f32::NEG_INFINITY) <= 2e-38 && exp_nonpositive(f32::NAN) <= 2e-38);
    }

    #[test]
    fn log_sum_exp_matches_the_exact_sum() {
        // A vocabulary-sized row with a remainder after the lanes: a few logits near the top,
        // the rest spread below, one masked out.
        let mut row: Vec<f32> = (0..150_003)
            .map(|i| if i % 1000 == 0 { 20.0 - (i / 1000) as f32 * 0.1 } else { -11.5 + (i % 17) as f32 })
            .collect();
        row[7] = f32::NEG_INFINITY;
        let exact = 20.0 + row.iter().map(|&x| (f64::from(x) - 20.0).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&row) - exact).abs() < 1e-5);
        assert!((log_sum_exp(&[1.0, 2.0, 3.0]) - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln()).abs() < 1e-5);
        // Whichever compilation runs, the sums are the same to the bit.
        assert_eq!(log_sum_exp(&row).to_bits(), log_sum_exp_lanes(&row).to_bits());
    }
}
