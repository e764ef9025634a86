//! Two evaluations of the same tasks compared task by task: which tasks each one solved that the
//! other did not (the flips), whether that many flips one way could be chance (the exact McNemar
//! test), and how large the difference in pass@1 plausibly is (a bootstrap confidence interval).
//! Greedy pass@1 on a few hundred tasks cannot see small differences; these say how large one
//! must be before it means something.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{Status, Verdict};

/// Resamples of the tasks for the confidence interval: enough for its bounds to be stable to
/// about ±0.002 at a few hundred tasks.
const RESAMPLES: usize = 10_000;

/// `before` against `after` on the tasks both evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    /// Tasks both evaluated (only these are compared).
    pub tasks: usize,
    /// pass@1 of each over those tasks.
    pub before: f64,
    pub after: f64,
    /// Tasks that `after` does better on than `before` (for greedy runs: solved by `after`
    /// only), and the other way round.
    pub gained: usize,
    pub lost: usize,
    /// Two-sided exact McNemar test of gained against lost (with several samples per task, the
    /// sign test on the tasks whose pass rate changed, which is the same test).
    pub p_value: f64,
    /// 95% bootstrap confidence interval of `after - before`, resampling tasks.
    pub ci_low: f64,
    pub ci_high: f64,
}

/// One line: "pass@1 0.320 -> 0.410 on 50 tasks (+9.0 points, 95% CI +2.0 to +16.0); 7 gained,
/// 2 lost, McNemar p = 0.180".
impl std::fmt::Display for Paired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let points = |v: f64| format!("{:+.1}", v * 100.0);
        write!(
            f,
            "pass@1 {:.3} -> {:.3} on {} tasks ({} points, 95% CI {} to {}); {} gained, {} lost, McNemar p = {:.3}",
            self.before,
            self.after,
            self.tasks,
            points(self.after - self.before),
            points(self.ci_low),
            points(self.ci_high),
            self.gained,
            self.lost,
            self.p_value
        )
    }
}

/// Each task's pass@1: the share of its samples that passed.
pub fn pass_rates(verdicts: &[Verdict]) -> BTreeMap<String, f64> {
    let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for v in verdicts {
        let entry = counts.entry(v.sample.task_id.clone()).or_default();
        entry.0 += 1;
        entry.1 += usize::from(v.status == Status::Passed);
    }
    counts.into_iter().map(|(task, (n, passed))| (task, passed as f64 / n as f64)).collect()
}

/// Compares two evaluations on the tasks they share; `None` when they share none.
pub fn compare(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Option<Paired> {
    let pairs: Vec<(f64, f64)> = before.iter().filter_map(|(task, b)| after.get(task).map(|a| (*b, *a))).collect();
    if pairs.is_empty() {
        return None;
    }
    let n = pairs.len() as f64;
    let gained = pairs.iter().filter(|(b, a)| a > b).count();
    let lost = pairs.iter().filter(|(b, a)| a < b).count();
    let differences: Vec<f64> = pairs.iter().map(|(b, a)| a - b).collect();
    let (ci_low, ci_high) = bootstrap_interval(&differences, RESAMPLES, 0);
    Some(Paired {
        tasks: pairs.len(),
        before: pairs.iter().map(|(b, _)| b).sum::<f64>() / n,
        after: pairs.iter().map(|(_, a)| a).sum::<f64>() / n,
        gained,
        lost,
        p_value: mcnemar_exact(gained, lost),
        ci_low,
        ci_high,
    })
}

/// The two-sided exact McNemar p-value for `b` and `c` discordant pairs: the binomial test of
/// `b` successes in `b + c` trials at probability 1/2, as scipy's `binomtest` computes it.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 || b == c {
        return 1.0;
    }
    // Binomial(n, 1/2) probabilities in logs: 2^-n underflows past n = 1074.
    let mut log_choose = 0.0;
    let mut tail = 0.0;
    for i in 0..=b.min(c) {
        if i > 0 {
            log_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (log_choose - n as f64 * std::f64::consts::LN_2).exp();
    }
    (2.0 * tail).min(1.0)
}

/// The 2.5th and 97.5th percentiles of the mean of `values` over `resamples` resamples with
/// replacement, drawn from `seed` (so a report is the same every time it is made).
pub fn bootstrap_interval(values: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    if values.is_empty() || resamples == 0 {
        return (0.0, 0.0);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| {
            (0..values.len()).map(|_| values[rng.random_range(0..values.len())]).sum::<f64>() / values.len() as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * resamples as f64) as usize).min(resamples - 1)];
    (at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_matches_scipy() {
        // scipy.stats.binomtest(k=b, n=b+c, p=0.5).pvalue (scipy 1.17.1).
        for (b, c, want) in [
            (0, 5, 0.0625),
            (3, 12, 0.03515625),
            (10, 20, 0.09873714670538905),
            (58, 44, 0.1977898630680834),
            (117, 102, 0.34415251140914976),
            (1, 1, 1.0),
            (0, 0, 1.0),
            (700, 800, 0.010559255466711506),
        ] {
            let got = mcnemar_exact(b, c);
            assert!((got - want).abs() < 1e-9 * want.max(1e-3), "b={b} c={c}: {got} vs scipy's {want}");
            assert_eq!(got, mcnemar_exact(c, b));
        }
    }

    #[test]
    fn compares_the_shared_tasks() {
        let before: BTreeMap<String, f64> = [("a", 1.0), ("b", 0.0), ("c", 0.0), ("d", 1.0), ("e", 0.0)]
            .into_iter()
            .map(|(t, p)| (t.to_string(), p))
            .collect();
        let mut after = before.clone();
        after.insert("b".into(), 1.0);
        after.insert("c".into(), 1.0);
        after.insert("d".into(), 0.0);
        after.remove("e");
        after.insert("z".into(), 1.0);
        let paired = compare(&before, &after).unwrap();
        assert_eq!((paired.tasks, paired.gained, paired.lost), (4, 2, 1));
        assert_eq!((paired.before, paired.after), (0.5, 0.75));
        assert_eq!(paired.p_value, 1.0);
        assert!(paired.ci_low < 0.25 && 0.25 < paired.ci_high, "{paired:?}");
        assert!(compare(&before, &BTreeMap::new()).is_none());
    }

    #[test]
    fn the_interval_narrows_with_more_tasks_and_holds_the_mean() {
        // 30 % of tasks gained, 10 % lost: the mean difference is 0.2.
        let pattern = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|i| match i % 10 {
                    0..=2 => 1.0,
                    3 => -1.0,
                    _ => 0.0,
                })
                .collect()
        };
        let (low_small, high_small) = bootstrap_interval(&pattern(50), RESAMPLES, 0);
        let (low, high) = bootstrap_interval(&pattern(1000), RESAMPLES, 0);
        assert!(
            low < 0.2 && 0.2 < high && low_small < low && high < high_small,
            "{low} {high} {low_small} {high_small}"
        );
        // The normal approximation's half-width at n = 1000: 1.96 * sd / sqrt(n) ≈ 0.0372.
        assert!(((high - low) / 2.0 - 0.0372).abs() < 0.003, "{low} {high}");
        assert_eq!(bootstrap_interval(&pattern(50), RESAMPLES, 0), (low_small, high_small));
    }
}
