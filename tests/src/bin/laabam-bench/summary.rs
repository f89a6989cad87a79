//! The medians of several runs, and the comparisons the targets make between scenarios.

use serde_json::{Value, json};

/// The median of the finite values (the upper one of an even count), NaN if there is none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A run report's deliveries per second.
pub(crate) fn rate(report: &Value) -> f64 {
    report["deliveries_per_s"].as_f64().unwrap_or(f64::NAN)
}

/// A run report's deliveries per CPU-second of the whole machine.
fn per_cpu_second(report: &Value) -> f64 {
    report["deliveries_per_cpu_second"].as_f64().unwrap_or(f64::NAN)
}

/// The median of several runs' rate and latency percentiles, as one line and as JSON.
pub(crate) fn summary(name: &str, runs: &[Value]) -> Value {
    let median = |f: &dyn Fn(&Value) -> f64| median(runs.iter().map(f));
    let rate = median(&rate);
    let p50 = median(&|r| r["latency_ms"]["p50"].as_f64().unwrap_or(f64::NAN));
    let p99 = median(&|r| r["latency_ms"]["p99"].as_f64().unwrap_or(f64::NAN));
    let per_cpu = median(&per_cpu_second);
    println!(
        "\nSUMMARY {name}: median of {} runs: {rate:.0} deliveries/s, latency p50 {p50:.0} ms, p99 {p99:.0} ms, {per_cpu:.0} deliveries per CPU-second",
        runs.len()
    );
    json!({ "scenario": name, "runs": runs.len(), "median_deliveries_per_s": rate,
        "median_latency_ms": { "p50": p50, "p99": p99 }, "median_deliveries_per_cpu_second": per_cpu })
}

/// Two scenarios a target compares, by deliveries per second: `of` as a share of `against`.
/// They run interleaved, and this machine's speed drifts between rounds by more than the
/// margins the targets set, so both readings are printed: each round's pair (runs made at the
/// same time), and the ratio of the medians (which may pair a fast run with a slow one).
/// Each pair's CPU per delivery for the whole machine is printed too, as `of`'s multiple of
/// `against`'s: the rates compare what each scenario's limit lets through, and `baseline`'s
/// limit is its one queue, which leaves part of the cores idle by a share that moves with the
/// host; the CPU a delivery costs does not depend on that.
pub(crate) struct Comparison {
    pub(crate) label: &'static str,
    pub(crate) of: usize,
    pub(crate) against: usize,
}

impl Comparison {
    pub(crate) fn report(&self, reports: &[Vec<Value>]) -> Value {
        let (of, against) = (&reports[self.of], &reports[self.against]);
        let pairs: Vec<f64> = of.iter().zip(against).map(|(o, a)| rate(o) / rate(a)).collect();
        let median_pair = median(pairs.iter().copied());
        let of_medians = median(of.iter().map(rate)) / median(against.iter().map(rate));
        let cpu: Vec<f64> = of
            .iter()
            .zip(against)
            .map(|(o, a)| per_cpu_second(a) / per_cpu_second(o))
            .collect();
        let percent = |r: f64| format!("{:.1}%", r * 100.0);
        println!(
            "\nSUMMARY {}: pairs {}; median pair {}, ratio of the medians {}; CPU per delivery ×{} (median ×{:.2})",
            self.label,
            pairs.iter().map(|&r| percent(r)).collect::<Vec<_>>().join(", "),
            percent(median_pair),
            percent(of_medians),
            cpu.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ×"),
            median(cpu.iter().copied())
        );
        json!({ "comparison": self.label, "pairs": pairs, "median_pair": median_pair,
            "ratio_of_medians": of_medians, "cpu_per_delivery_pairs": cpu })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs of these rates, each using the whole machine's CPU at `per_cpu` deliveries per
    /// CPU-second.
    fn runs(rates: &[f64], per_cpu: f64) -> Vec<Value> {
        rates
            .iter()
            .map(|r| json!({ "deliveries_per_s": r, "deliveries_per_cpu_second": per_cpu }))
            .collect()
    }

    /// The rounds' pairs and the medians' ratio differ when the machine's speed moves between
    /// rounds; each is read from runs of its own round.
    #[test]
    fn a_comparison_pairs_each_round_and_divides_the_medians_apart() {
        let reports = [runs(&[100.0, 200.0, 100.0], 500.0), runs(&[90.0, 150.0, 100.0], 400.0)];
        let c = Comparison {
            label: "second / first",
            of: 1,
            against: 0,
        };
        let out = c.report(&reports);
        assert_eq!(out["pairs"], json!([0.9, 0.75, 1.0]));
        assert_eq!(out["median_pair"], json!(0.9));
        assert_eq!(out["ratio_of_medians"], json!(1.0));
        assert_eq!(
            out["cpu_per_delivery_pairs"],
            json!([1.25, 1.25, 1.25]),
            "a fifth fewer per CPU-second"
        );
    }

    #[test]
    fn a_median_skips_what_is_not_a_number_and_takes_the_upper_of_two() {
        assert_eq!(median([3.0, f64::NAN, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0].into_iter()), 4.0);
        assert!(median(std::iter::empty()).is_nan());
    }
}
