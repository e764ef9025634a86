//! The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
//! on Code", eq. 1): for n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k).

use std::collections::BTreeMap;

use super::{Status, Verdict};

/// The k an `execute` step reports pass@k for (those its samples per task reach).
pub const EXECUTE_KS: [usize; 4] = [1, 5, 10, 100];

/// pass@k for one task; `None` when fewer than k samples were drawn.
pub fn estimate(n: usize, c: usize, k: usize) -> Option<f64> {
    if k == 0 || n < k || c > n {
        return None;
    }
    if n - c < k {
        return Some(1.0);
    }
    // 1 - prod_{i = n-c+1}^{n} (1 - k / i), the numerically stable form of the ratio.
    let product: f64 = ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product();
    Some(1.0 - product)
}

/// Mean pass@k over tasks, for each k that every task has enough samples for.
pub fn over_tasks(verdicts: &[Verdict], ks: &[usize]) -> BTreeMap<usize, f64> {
    let mut per_task: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for v in verdicts {
        let entry = per_task.entry(v.sample.task_id.as_str()).or_default();
        entry.0 += 1;
        entry.1 += usize::from(v.status == Status::Passed);
    }
    let mut out = BTreeMap::new();
    if per_task.is_empty() {
        return out;
    }
    for &k in ks {
        let estimates: Option<Vec<f64>> = per_task.values().map(|&(n, c)| estimate(n, c, k)).collect();
        if let Some(estimates) = estimates {
            out.insert(k, estimates.iter().sum::<f64>() / estimates.len() as f64);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closed form, C(n-c,k)/C(n,k) with exact binomials, as an independent check.
    fn closed_form(n: u64, c: u64, k: u64) -> f64 {
        fn choose(n: u64, k: u64) -> f64 {
            if k > n {
                return 0.0;
            }
            (0..k).map(|i| (n - i) as f64 / (i + 1) as f64).product()
        }
        1.0 - choose(n - c, k) / choose(n, k)
    }

    #[test]
    fn matches_the_closed_form() {
        for (n, c, k) in [(10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 20, 1), (200, 13, 100), (5, 1, 5)] {
            let got = estimate(n, c, k).unwrap();
            let want = closed_form(n as u64, c as u64, k as u64);
            assert!((got - want).abs() < 1e-9, "n={n} c={c} k={k}: {got} vs {want}");
        }
        // pass@1 is the fraction passing.
        assert_eq!(estimate(4, 1, 1), Some(0.25));
    }

    #[test]
    fn undefined_when_too_few_samples() {
        assert_eq!(estimate(3, 1, 5), None);
        assert_eq!(estimate(3, 1, 0), None);
    }
}
