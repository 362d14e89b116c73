//! Pure helpers: HDR histograms and their summaries, rate pacing, and `/proc` readings.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency a histogram holds, in microseconds (longer values saturate): 10 minutes.
const MAX_US: u64 = 600_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub(crate) fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// The recorded buckets of a histogram as `(value, count)` pairs, to ship between processes.
pub(crate) fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Add `(value, count)` pairs into a histogram.
pub(crate) fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        h.saturating_record_n(value.max(1), count);
    }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub(crate) count: u64,
    pub(crate) p50: u64,
    pub(crate) p99: u64,
    pub(crate) p999: u64,
    pub(crate) max: u64,
}

impl Summary {
    /// Summarise a histogram (all zeros when it is empty).
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self {
                count: 0,
                p50: 0,
                p99: 0,
                p999: 0,
                max: 0,
            };
        }
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }

    /// `p50 1.23 ms · p99 4.56 ms · p99.9 7.89 ms · max 12.3 ms (n=1000)`.
    pub(crate) fn line(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {} · p99 {} · p99.9 {} · max {} (n={})",
            fmt_us(self.p50),
            fmt_us(self.p99),
            fmt_us(self.p999),
            fmt_us(self.max),
            self.count
        )
    }
}

/// A duration in microseconds, human-readable with three significant digits.
pub(crate) fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{} ms", sig3(us as f64 / 1e3))
    } else {
        format!("{} s", sig3(us as f64 / 1e6))
    }
}

/// A number with three significant digits (integers of 1,000 and more keep all their digits).
pub(crate) fn sig3(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// How many sends are due now: a pacer at `rate` per second that started `elapsed` ago and has already
/// sent `sent`. The schedule is absolute (`floor(rate × elapsed)`), so a late tick catches up instead of
/// losing sends and the achieved rate converges to the target.
pub(crate) fn due(rate_per_s: f64, elapsed: Duration, sent: u64) -> u64 {
    if rate_per_s.is_nan() || rate_per_s <= 0.0 {
        return 0;
    }
    let target = (rate_per_s * elapsed.as_secs_f64()).floor() as u64;
    target.saturating_sub(sent)
}

/// The share of a total rate that `part` of `total` senders carry.
pub(crate) fn rate_share(total_rate: f64, part: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        total_rate * part as f64 / total as f64
    }
}

/// `VmRSS` in KiB from `/proc/<pid>/status` text.
pub(crate) fn parse_vmrss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU seconds from `/proc/<pid>/stat` text (clock ticks of 1/100 s, Linux's USER_HZ).
pub(crate) fn parse_cpu_s(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// A process's resident set in KiB.
pub(crate) fn rss_kb(pid: u32) -> Option<u64> {
    parse_vmrss_kb(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// A process's CPU time in seconds.
pub(crate) fn cpu_s(pid: u32) -> Option<f64> {
    parse_cpu_s(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_and_formats_histograms() {
        let mut h = latency_histogram();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let s = Summary::of(&h);
        assert_eq!(s.count, 1000);
        assert!((4_990..=5_010).contains(&s.p50), "{s:?}");
        assert!((9_890..=9_910).contains(&s.p99), "{s:?}");
        assert!((9_980..=10_000).contains(&s.p999), "{s:?}");
        assert!((9_990..=10_010).contains(&s.max), "{s:?}");
        let line = s.line();
        assert!(line.starts_with("p50 5.00 ms · p99 9.90 ms"), "{line}");
        assert!(line.ends_with("(n=1000)"), "{line}");
        assert_eq!(Summary::of(&latency_histogram()).line(), "no samples");
    }

    #[test]
    fn formats_durations() {
        assert_eq!(fmt_us(0), "0 µs");
        assert_eq!(fmt_us(999), "999 µs");
        assert_eq!(fmt_us(1_234), "1.23 ms");
        assert_eq!(fmt_us(45_600), "45.6 ms");
        assert_eq!(fmt_us(456_700), "457 ms");
        assert_eq!(fmt_us(2_500_000), "2.50 s");
        assert_eq!(sig3(0.0), "0");
        assert_eq!(sig3(0.01234), "0.012");
        assert_eq!(sig3(123456.7), "123457");
    }

    #[test]
    fn histograms_survive_the_trip_between_processes() {
        let mut a = latency_histogram();
        for v in [1, 5, 5, 100, 2_000, 3_000_000] {
            a.record(v).unwrap();
        }
        let mut b = latency_histogram();
        add_pairs(&mut b, &to_pairs(&a));
        add_pairs(&mut b, &to_pairs(&a));
        assert_eq!(b.len(), 12);
        assert_eq!(b.max(), a.max());
        assert_eq!(b.value_at_quantile(0.5), a.value_at_quantile(0.5));
        // Values out of range saturate instead of failing.
        add_pairs(&mut b, &[(0, 1), (u64::MAX / 2, 1)]);
        assert_eq!(b.len(), 14);
    }

    #[test]
    fn pacing_follows_an_absolute_schedule() {
        let ms = Duration::from_millis;
        assert_eq!(due(1000.0, ms(0), 0), 0);
        assert_eq!(due(1000.0, ms(1), 0), 1);
        assert_eq!(due(1000.0, ms(10), 3), 7);
        // A late tick catches up, an early one sends nothing.
        assert_eq!(due(2000.0, ms(50), 20), 80);
        assert_eq!(due(2000.0, ms(5), 20), 0);
        // Fractional rates accumulate: 0.5/s sends its first message at 2 s.
        assert_eq!(due(0.5, ms(1_999), 0), 0);
        assert_eq!(due(0.5, ms(2_000), 0), 1);
        assert_eq!(due(0.0, ms(1_000), 0), 0);
        assert_eq!(due(f64::NAN, ms(1_000), 0), 0);
        // Over a whole run the schedule sends exactly rate × duration.
        let mut sent = 0;
        for t in 0..=10_000u64 {
            sent += due(333.0, ms(t), sent);
        }
        assert_eq!(sent, 3_330);
        assert_eq!(rate_share(10_000.0, 1, 4), 2_500.0);
        assert_eq!(rate_share(10_000.0, 1, 0), 0.0);
    }

    #[test]
    fn parses_proc_files() {
        let status =
            "Name:\tswitchboard\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nRssAnon:\t 100 kB\n";
        assert_eq!(parse_vmrss_kb(status), Some(12_345));
        assert_eq!(parse_vmrss_kb("Name: x\n"), None);
        let stat =
            "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_cpu_s(stat), Some(3.0));
        assert_eq!(parse_cpu_s("garbage"), None);
    }
}
