//! Percentiles and sample summaries (pure functions).

use serde::Serialize;

/// The nearest-rank percentile `p` (0–100) of `sorted` (ascending): the
/// smallest sample with at least `p` % of the samples at or below it. Always
/// one of the samples (p50 of 30 samples is the 15th, p99 is the largest).
/// `None` for no samples or a `p` outside 0–100.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Count, percentiles, extremes and mean of a set of samples (in the unit
/// the field name of the report says).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// `None` when there are no samples. NaNs are ignored.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        sorted.sort_by(f64::total_cmp);
        let pct = |p| percentile(&sorted, p).map(round3);
        Some(Self {
            n: sorted.len(),
            p50: pct(50.0)?,
            p90: pct(90.0)?,
            p99: pct(99.0)?,
            min: round3(sorted[0]),
            max: round3(*sorted.last()?),
            mean: round3(sorted.iter().sum::<f64>() / sorted.len() as f64),
        })
    }
}

/// Rounds to 3 decimals (µs precision for milliseconds) for the report.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let one_to_hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&one_to_hundred, 50.0), Some(50.0));
        assert_eq!(percentile(&one_to_hundred, 90.0), Some(90.0));
        assert_eq!(percentile(&one_to_hundred, 99.0), Some(99.0));
        assert_eq!(percentile(&one_to_hundred, 100.0), Some(100.0));
        assert_eq!(percentile(&one_to_hundred, 0.0), Some(1.0));
        // n = 30: p50 is the 15th sample, p90 the 27th, p99 the largest.
        let thirty: Vec<f64> = (1..=30).map(f64::from).collect();
        assert_eq!(percentile(&thirty, 50.0), Some(15.0));
        assert_eq!(percentile(&thirty, 90.0), Some(27.0));
        assert_eq!(percentile(&thirty, 99.0), Some(30.0));
        // n = 5 (cold boots): p50 is the 3rd, p90 the 5th.
        let five = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&five, 50.0), Some(3.0));
        assert_eq!(percentile(&five, 90.0), Some(5.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    }

    #[test]
    fn percentile_edge_cases() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0], -1.0), None);
        assert_eq!(percentile(&[1.0], 100.5), None);
    }

    #[test]
    fn summaries_sort_and_round() {
        let s = Summary::of(&[3.0, 1.0, 2.0, 4.0, f64::NAN]).unwrap();
        assert_eq!(s.n, 4);
        assert_eq!((s.p50, s.p90, s.p99), (2.0, 4.0, 4.0));
        assert_eq!((s.min, s.max, s.mean), (1.0, 4.0, 2.5));
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.23456]).unwrap().p50, 1.235);
    }
}
