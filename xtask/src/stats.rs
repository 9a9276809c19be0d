//! Summary statistics over a sample of measurements.

use serde::Serialize;

/// Median, p90, min and max of a sample.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    pub runs: usize,
    pub median: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// Summarizes `samples` (not empty).
    pub fn of(samples: &[f64]) -> Summary {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        // Nearest-rank percentile.
        let p90 = sorted[((0.9 * n as f64).ceil() as usize).clamp(1, n) - 1];
        Summary {
            runs: n,
            median,
            p90,
            min: sorted[0],
            max: sorted[n - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_a_sample() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0, 10.0, 6.0, 7.0, 8.0, 9.0]);
        assert_eq!(s.median, 5.5);
        assert_eq!(s.p90, 9.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 10.0);
        assert_eq!(Summary::of(&[3.0]).p90, 3.0);
    }
}
