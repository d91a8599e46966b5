//! The statistics the bench reports: the L4 connect client's quantiles, and
//! for the HTTP section nearest-rank percentiles of request latencies,
//! medians and quartiles over rounds, and added latency paired round by round
//! (a mode minus direct in the same round), so a slow stretch of the machine
//! that moves every mode stays out of the difference.

/// The `q` quantile of sorted values (nearest rank).
pub(super) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub(super) fn median(values: impl Iterator<Item = f64>) -> f64 {
    quartiles(values.collect()).1
}

/// The lower quartile, median and upper quartile (each the mean of the two
/// middle values where the count splits evenly).
pub(super) fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let mid = |v: &[f64]| match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    let half = v.len() / 2;
    (mid(&v[..half]), mid(&v), mid(&v[v.len() - half..]))
}

/// The `p` quantile of sorted values as the L4 connect client reports it:
/// the value at index floor(n * p), the last one at most (not `percentile`'s
/// nearest rank, which is one lower where n * p is whole).
pub(super) fn quantile_at_index(sorted: &[u32], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)] as f64
}

/// A mode's per-round percentiles minus direct's in the same round.
pub(super) fn added(mode: &[f64], direct: &[f64]) -> Vec<f64> {
    mode.iter().zip(direct).map(|(m, d)| m - d).collect()
}

#[cfg(test)]
mod tests {
    use super::{added, percentile, quantile_at_index, quartiles};

    #[test]
    fn quartiles_split_even_and_odd_counts() {
        let q = quartiles(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(q, (1.5, 2.5, 3.5));
        let q = quartiles(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(q, (1.5, 3.0, 4.5));
        assert_eq!(quartiles(vec![7.0]).1, 7.0);
    }

    #[test]
    fn added_latency_pairs_rounds() {
        // A slow round moves both; paired, it stays out of the difference.
        let direct = [70.0, 70.0, 140.0];
        let mode = [100.0, 110.0, 180.0];
        assert_eq!(added(&mode, &direct), vec![30.0, 40.0, 40.0]);
        assert_eq!(quartiles(added(&mode, &direct)).1, 40.0);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 100.0);
        assert_eq!(percentile(&v, 0.99), 198.0);
        assert_eq!(percentile(&v[..1], 0.99), 1.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn connect_quantiles_index_the_sorted_values() {
        let v: Vec<u32> = (1..=200).collect();
        assert_eq!(quantile_at_index(&v, 0.50), 101.0);
        assert_eq!(quantile_at_index(&v, 0.99), 199.0);
        assert_eq!(quantile_at_index(&v[..1], 0.99), 1.0);
    }
}
