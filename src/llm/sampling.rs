//! Choosing each next token: the candidates (the largest logits), the seeded sampler chain.

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;

use super::Sampling;

/// How many of the largest logits can be sampled at all: 1 for greedy, `top-k` otherwise
/// (0 means all).
pub(super) fn sampleable(sampling: &Sampling) -> usize {
    match sampling.temperature <= 0.0 {
        true => 1,
        false => usize::try_from(sampling.top_k).unwrap_or(0),
    }
}

/// The `k` largest logits as llama.cpp candidates (all of them when `k` is 0); among equal
/// logits the lower token id wins, as in llama.cpp's greedy sampler.
pub(super) fn top_candidates(logits: &[f32], k: usize) -> Vec<LlamaTokenData> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked above.
        return unsafe { top_candidates_avx2(logits, k) };
    }
    top_candidates_in(logits, k)
}

/// The scan compiled for AVX2: one register per eight logits instead of four (same result).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn top_candidates_avx2(logits: &[f32], k: usize) -> Vec<LlamaTokenData> {
    top_candidates_in(logits, k)
}

#[inline(always)]
fn top_candidates_in(logits: &[f32], k: usize) -> Vec<LlamaTokenData> {
    let data = |(id, &logit): (usize, &f32)| LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0);
    if k == 0 || k >= logits.len() {
        return logits.iter().enumerate().map(data).collect();
    }
    // Candidates for the k largest: the first k logits, then every later one above `floor`, the
    // k-th largest when the candidates were last cut down to k (they are cut once they fill
    // the spare room). Almost no logit is, once the scan is under way: most blocks are passed
    // over after one vectorised comparison. Ordered largest first, the lower id first among
    // equal logits (a later logit equal to the floor loses to it, so it can be passed over).
    let key = |logit: f32| if logit.is_nan() { f32::NEG_INFINITY } else { logit + 0.0 }; // -0 is 0
    let order = |a: &(f32, usize), b: &(f32, usize)| key(b.0).total_cmp(&key(a.0)).then(a.1.cmp(&b.1));
    let cut = |kept: &mut Vec<(f32, usize)>| {
        kept.select_nth_unstable_by(k - 1, order);
        kept.truncate(k);
        key(kept[k - 1].0)
    };
    const BLOCK: usize = 64;
    // Room for k more, at least: each cut is a selection over all that is kept.
    let spare = k.max(512);
    let mut kept: Vec<(f32, usize)> = Vec::with_capacity(k + spare);
    kept.extend(logits[..k].iter().enumerate().map(|(id, &logit)| (logit, id)));
    let mut floor = cut(&mut kept);
    for (b, block) in logits[k..].chunks(BLOCK).enumerate() {
        if !any_above(block, floor) {
            continue;
        }
        for (c, chunk) in block.chunks(8).enumerate().filter(|(_, chunk)| any_above(chunk, floor)) {
            for (j, &logit) in chunk.iter().enumerate() {
                if logit > floor {
                    kept.push((logit, k + b * BLOCK + c * 8 + j));
                }
            }
        }
        if kept.len() > k + spare - BLOCK {
            floor = cut(&mut kept);
        }
    }
    kept.sort_unstable_by(order);
    kept.truncate(k);
    kept.iter().map(|&(logit, id)| data((id, &logit))).collect()
}

/// Whether any of `block` is larger than `floor`: comparisons or-ed together, which the
/// compiler vectorises (a running maximum, being a floating-point reduction, it keeps scalar
/// without fast-math: three times slower).
#[inline(always)]
fn any_above(block: &[f32], floor: f32) -> bool {
    block.iter().fold(false, |above, &logit| above | (logit > floor))
}

/// A 32-bit sampler seed from a sample's 64-bit seed. Never `LLAMA_DEFAULT_SEED` (all ones),
/// which llama.cpp's sampler takes as "seed me at random".
pub(super) fn seed32(seed: u64) -> u32 {
    match (seed ^ (seed >> 32)) as u32 {
        u32::MAX => u32::MAX - 1,
        folded => folded,
    }
}

pub(super) fn sampler(sampling: &Sampling, seed: u64) -> LlamaSampler {
    if sampling.temperature <= 0.0 {
        return LlamaSampler::greedy();
    }
    LlamaSampler::chain_simple([
        LlamaSampler::top_k(sampling.top_k),
        LlamaSampler::top_p(sampling.top_p, 1),
        LlamaSampler::temp(sampling.temperature),
        LlamaSampler::dist(seed32(seed)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_candidates_are_the_largest_logits_lower_ids_first_on_ties() {
        let logits = [0.5, 3.0, -1.0, 3.0, 2.0, f32::NEG_INFINITY, 2.5];
        let ids = |k| top_candidates(&logits, k).iter().map(|c| c.id().0).collect::<Vec<_>>();
        assert_eq!(ids(1), [1]);
        assert_eq!(ids(3), [1, 3, 6]);
        assert_eq!(ids(4), [1, 3, 6, 4]);
        assert_eq!(ids(0).len(), logits.len());
        assert_eq!(ids(99).len(), logits.len());
        // NaN ranks as -∞, -0 as 0; a NaN among the first k gives way to a later logit.
        let odd = [f32::NAN, -0.0, 0.0, f32::NEG_INFINITY, 1.0, f32::NAN];
        let ids = |k| top_candidates(&odd, k).iter().map(|c| c.id().0).collect::<Vec<_>>();
        assert_eq!(ids(4), [4, 1, 2, 0]);
        assert_eq!(top_candidates(&[f32::NAN, 5.0, 3.0], 2).iter().map(|c| c.id().0).collect::<Vec<_>>(), [1, 2]);
        let greedy =
            Sampling { temperature: 0.0, top_p: 1.0, top_k: 40, max_tokens: 1, stop: vec![], stop_after_code: false };
        assert_eq!(sampleable(&greedy), 1);
        assert_eq!(sampleable(&Sampling { temperature: 0.8, ..greedy.clone() }), 40);
    }

    #[test]
    fn no_sample_seed_asks_llama_cpp_for_a_random_one() {
        assert_eq!(seed32(0xFFFF_FFFF), u32::MAX - 1);
        assert_eq!(seed32(0x1234_5678_0000_0001), 0x1234_5679);
    }

    #[test]
    fn top_candidates_of_a_vocabulary_are_its_sorted_head() {
        // Many ties, and a row that does not end on a whole block; then one rising all along,
        // where every logit is a candidate and the candidates are cut down again and again.
        let scattered: Vec<f32> =
            (0..151_937u32).map(|i| (i.wrapping_mul(2_654_435_761) % 1000) as f32 * 0.01).collect();
        let rising: Vec<f32> = (0..20_000).map(|i| i as f32 * 0.5).collect();
        for (logits, k) in [(&scattered, 1), (&scattered, 40), (&scattered, 1000), (&rising, 40)] {
            let mut order: Vec<i32> = (0..logits.len() as i32).collect();
            order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
            let ids: Vec<i32> = top_candidates(logits, k).iter().map(|c| c.id().0).collect();
            assert_eq!(ids, order[..k]);
            // The baseline compilation too, where the AVX2 one ran above.
            let portable: Vec<i32> = top_candidates_in(logits, k).iter().map(|c| c.id().0).collect();
            assert_eq!(portable, ids);
        }
    }
}
