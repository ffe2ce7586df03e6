//! Estimates for paired comparisons whose noise has heavy tails.
//!
//! A lab guest's round of work under TCG takes its usual time most of the
//! time and now and then a second longer, whether or not anything watches
//! it. The mean of the per-pair differences carries those bursts at full
//! weight, so its interval stays wide however long the run; the estimates
//! here give each pair a rank instead. Both intervals are distribution-free:
//! they assume only that the pairs are independent and, for the signed-rank
//! one, that the differences are symmetric about their centre (true of log
//! ratios when nothing differs but the noise and the order alternates).

/// The two-sided 95 % normal quantile.
const Z95: f64 = 1.96;

/// A central estimate and its 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

fn median_of_sorted(s: &[f64]) -> f64 {
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// How many order statistics to leave out at each end, from the normal
/// approximation of a statistic with mean `mean` and variance `var`
/// (matching the exact tables from 10 pairs on).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped >= 0
fn cut(mean: f64, var: f64) -> usize {
    (mean - Z95 * var.sqrt()).floor().max(0.0) as usize
}

/// Below this many pairs the normal approximation strays from the exact
/// tables, and no interval is given.
pub const MIN_PAIRS: usize = 10;

/// The Hodges-Lehmann estimate of the differences' centre (the median of
/// all pairwise means, the Walsh averages) with the interval that inverts
/// Wilcoxon's signed-rank test. Quadratic in memory: fine for thousands of
/// pairs. `None` for fewer than [`MIN_PAIRS`].
#[allow(clippy::cast_precision_loss)] // counts far below 2^52
pub fn hodges_lehmann(d: &[f64]) -> Option<Estimate> {
    let n = d.len();
    if n < MIN_PAIRS {
        return None;
    }
    let mut walsh = Vec::with_capacity(n * (n + 1) / 2);
    for i in 0..n {
        for j in i..n {
            walsh.push((d[i] + d[j]) / 2.0);
        }
    }
    walsh.sort_by(f64::total_cmp);
    let nf = n as f64;
    let c = cut(nf * (nf + 1.0) / 4.0, nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0);
    let m = walsh.len();
    Some(Estimate { value: median_of_sorted(&walsh), low: walsh[c], high: walsh[m - c - 1] })
}

/// The median of the differences with the interval that inverts the sign
/// test (order statistics). `None` for fewer than [`MIN_PAIRS`].
#[allow(clippy::cast_precision_loss)]
pub fn median(d: &[f64]) -> Option<Estimate> {
    if d.len() < MIN_PAIRS {
        return None;
    }
    let s = sorted(d);
    let n = s.len();
    let c = cut(n as f64 / 2.0, n as f64 / 4.0);
    Some(Estimate { value: median_of_sorted(&s), low: s[c], high: s[n - c - 1] })
}

/// The mean with its normal-approximation interval (1.96 standard errors),
/// and the sample standard deviation.
#[allow(clippy::cast_precision_loss)]
pub fn mean(d: &[f64]) -> Option<(Estimate, f64)> {
    let n = d.len() as f64;
    if d.len() < 2 {
        return None;
    }
    let m = d.iter().sum::<f64>() / n;
    let sd = (d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let half = Z95 * sd / n.sqrt();
    Some((Estimate { value: m, low: m - half, high: m + half }, sd))
}

/// The slowdown of the whole time, `sum(b) / sum(a) - 1` over pairs
/// `(a, b)`, with the delta method's normal interval: what a workload
/// loses over time, long rounds weighed by their length. Unlike the mean
/// of the per-pair ratios `b / a - 1`, it carries no bias from the noise
/// in `a`: with independent noise of spread s in each time, that mean
/// overstates the slowdown by about s squared (1 / a averages more than
/// 1 over the average a), 0.3 % for pairs that spread 8 %. `None` for
/// fewer than 2 pairs or times that are not positive.
#[allow(clippy::cast_precision_loss)]
pub fn ratio_of_totals(pairs: &[(f64, f64)]) -> Option<Estimate> {
    let n = pairs.len() as f64;
    if pairs.len() < 2 || !pairs.iter().all(|&(a, b)| a > 0.0 && b >= 0.0 && (a + b).is_finite()) {
        return None;
    }
    let (sa, sb) = pairs.iter().fold((0.0, 0.0), |(x, y), (a, b)| (x + a, y + b));
    let r = sb / sa;
    // Var(r) ~ Var(b - r a) / (n mean(a)^2).
    let resid = pairs.iter().map(|(a, b)| (b - r * a).powi(2)).sum::<f64>() / (n - 1.0);
    let half = Z95 * (resid / n).sqrt() / (sa / n);
    Some(Estimate { value: r - 1.0, low: r - 1.0 - half, high: r - 1.0 + half })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of uniform numbers in [0, 1).
    struct Lcg(u64);
    impl Lcg {
        #[allow(clippy::cast_precision_loss)]
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn hodges_lehmann_is_the_median_of_the_walsh_averages() {
        // 55 Walsh averages; the 28th, (11 + 30) / 2, is the median.
        let d = [1.0, 2.0, 6.0, 10.0, 11.0, 30.0, 31.0, 33.0, 40.0, 100.0];
        let e = hodges_lehmann(&d).unwrap();
        let mut w = vec![];
        for i in 0..10 {
            for j in i..10 {
                w.push((d[i] + d[j]) / 2.0);
            }
        }
        w.sort_by(f64::total_cmp);
        assert_eq!(w.len(), 55);
        assert_eq!(e.value, w[27]);
        assert_eq!(e.value, 20.5);
    }

    #[test]
    fn the_intervals_match_the_exact_tables_at_twenty_pairs() {
        // n = 20: the signed-rank test's two-sided 5 % critical value is 52,
        // so the interval runs from the 53rd Walsh average to the 158th of
        // 210; the sign test's from the 6th order statistic to the 15th.
        let d: Vec<f64> = (1..=20).map(|i| f64::from(i * i)).collect();
        let mut w = vec![];
        for i in 0..20 {
            for j in i..20 {
                w.push((d[i] + d[j]) / 2.0);
            }
        }
        w.sort_by(f64::total_cmp);
        let e = hodges_lehmann(&d).unwrap();
        assert_eq!((e.low, e.high), (w[52], w[157]));
        let m = median(&d).unwrap();
        assert_eq!((m.low, m.high), (d[5], d[14]));
        assert_eq!(m.value, (d[9] + d[10]) / 2.0);
        // n = 10: critical value 8, the 9th to the 47th of 55.
        let e = hodges_lehmann(&d[..10]).unwrap();
        let mut w = vec![];
        for i in 0..10 {
            for j in i..10 {
                w.push((d[i] + d[j]) / 2.0);
            }
        }
        w.sort_by(f64::total_cmp);
        assert_eq!((e.low, e.high), (w[8], w[46]));
    }

    #[test]
    fn too_few_pairs_give_no_interval() {
        let d: Vec<f64> = (0..10).map(f64::from).collect();
        assert_eq!(hodges_lehmann(&d[..9]), None);
        assert_eq!(median(&d[..9]), None);
        assert_eq!(hodges_lehmann(&[]), None);
        assert_eq!(mean(&[1.0]), None);
        assert!(hodges_lehmann(&d).is_some() && median(&d).is_some());
    }

    /// `n` pairs of times about 1 with independent spread `s` each (the
    /// sum of twelve uniforms, nearly normal), the second `1 + effect`
    /// times longer.
    fn noisy_pairs(r: &mut Lcg, n: usize, s: f64, effect: f64) -> Vec<(f64, f64)> {
        let mut normal = || (0..12).map(|_| r.next()).sum::<f64>() - 6.0;
        (0..n).map(|_| (1.0 + s * normal(), (1.0 + effect) * (1.0 + s * normal()))).collect()
    }

    #[test]
    fn the_ratio_of_totals_is_exact_without_noise_and_names_no_bad_input() {
        let pairs: Vec<(f64, f64)> =
            (1..=20).map(|i| (f64::from(i), 1.02 * f64::from(i))).collect();
        let e = ratio_of_totals(&pairs).unwrap();
        assert!((e.value - 0.02).abs() < 1e-12 && e.high - e.low < 1e-12, "{e:?}");
        assert_eq!(ratio_of_totals(&pairs[..1]), None);
        assert_eq!(ratio_of_totals(&[(1.0, 1.0), (0.0, 1.0)]), None);
        assert_eq!(ratio_of_totals(&[(1.0, 1.0), (1.0, f64::NAN)]), None);
    }

    #[test]
    fn noise_biases_the_mean_of_ratios_upwards_and_not_the_ratio_of_totals() {
        // Times that spread 12 % each (17 % per pair's ratio), no effect:
        // the mean of the ratios sits near s^2 = 1.4 % above zero, the
        // ratio of totals at zero; both intervals near 95 % wide.
        let mut r = Lcg(3);
        let (mut mean_sum, mut total_sum, mut covered) = (0.0, 0.0, 0);
        for _ in 0..200 {
            let pairs = noisy_pairs(&mut r, 400, 0.12, 0.0);
            let ratios: Vec<f64> = pairs.iter().map(|(a, b)| b / a - 1.0).collect();
            mean_sum += mean(&ratios).unwrap().0.value;
            let t = ratio_of_totals(&pairs).unwrap();
            total_sum += t.value;
            covered += usize::from(t.low <= 0.0 && 0.0 <= t.high);
        }
        let (m, t) = (mean_sum / 200.0, total_sum / 200.0);
        assert!((0.011..0.018).contains(&m), "mean of ratios {m}");
        assert!(t.abs() < 0.002, "ratio of totals {t}");
        assert!((180..=198).contains(&covered), "{covered} of 200 intervals hold 0");
        // And it finds an effect that is there.
        let t = ratio_of_totals(&noisy_pairs(&mut r, 2000, 0.05, 0.01)).unwrap();
        assert!(t.low > 0.005 && t.high < 0.015, "{t:?}");
    }

    #[test]
    fn a_burst_moves_the_mean_but_hardly_the_rank_estimates() {
        let mut r = Lcg(7);
        let mut d: Vec<f64> = (0..200).map(|_| 0.005 + 0.03 * (r.next() - 0.5)).collect();
        let quiet = hodges_lehmann(&d).unwrap().value;
        for x in d.iter_mut().step_by(20) {
            *x += 0.25; // ten rounds a second longer
        }
        let hl = hodges_lehmann(&d).unwrap();
        let (m, _) = mean(&d).unwrap();
        assert!((hl.value - quiet).abs() < 0.002, "{} against {quiet}", hl.value);
        assert!(m.value - quiet > 0.01, "{m:?}");
        assert!(hl.low < 0.005 && 0.005 < hl.high, "{hl:?}");
    }

    #[test]
    fn the_intervals_cover_the_centre_about_ninety_five_times_in_a_hundred() {
        // Symmetric, heavy-tailed differences about 0.004 (a Cauchy-like mix):
        // over 400 samples of 40 pairs each, both intervals hold the centre
        // close to 95 % of the time, and the width shrinks with more pairs.
        let mut r = Lcg(11);
        let draw = |r: &mut Lcg| {
            let u = r.next();
            let spread = if r.next() < 0.1 { 0.2 } else { 0.02 };
            0.004 + spread * (u - 0.5)
        };
        let (mut hl_in, mut med_in) = (0, 0);
        for _ in 0..400 {
            let d: Vec<f64> = (0..40).map(|_| draw(&mut r)).collect();
            let e = hodges_lehmann(&d).unwrap();
            hl_in += usize::from(e.low <= 0.004 && 0.004 <= e.high);
            let m = median(&d).unwrap();
            med_in += usize::from(m.low <= 0.004 && 0.004 <= m.high);
        }
        assert!((364..=392).contains(&hl_in), "signed-rank interval held it {hl_in} of 400 times");
        assert!((364..=396).contains(&med_in), "sign interval held it {med_in} of 400 times");
        let small: Vec<f64> = (0..40).map(|_| draw(&mut r)).collect();
        let large: Vec<f64> = (0..640).map(|_| draw(&mut r)).collect();
        let (a, b) = (hodges_lehmann(&small).unwrap(), hodges_lehmann(&large).unwrap());
        assert!(b.high - b.low < (a.high - a.low) / 2.0, "{a:?} against {b:?}");
    }
}
