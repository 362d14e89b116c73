//! Reports: the metrics of one run, the summary table, the side-by-side table with the baseline and the
//! ratio, and the targets.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::stats::{fmt_us, sig3};

/// One figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Metric {
    /// Stable key for machines (`deliver_p99_us`).
    pub(crate) key: String,
    /// What a human reads.
    pub(crate) label: String,
    pub(crate) value: f64,
    /// `us` values print as durations; others print as numbers followed by the unit.
    pub(crate) unit: String,
}

/// A target from the issue and whether this run met it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Target {
    pub(crate) what: String,
    pub(crate) goal: String,
    pub(crate) measured: String,
    pub(crate) met: bool,
}

/// Everything one scenario run against one server produced.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    pub(crate) target: String,
    pub(crate) server: String,
    pub(crate) params: BTreeMap<String, String>,
    pub(crate) metrics: Vec<Metric>,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) closes: BTreeMap<String, u64>,
    pub(crate) targets: Vec<Target>,
    /// One line per latency histogram (`p50 … · p99 … · p99.9 … · max … (n=…)`).
    pub(crate) latencies: BTreeMap<String, String>,
}

impl Report {
    /// Add a figure.
    pub(crate) fn push(&mut self, key: &str, label: &str, value: f64, unit: &str) {
        self.metrics.push(Metric {
            key: key.into(),
            label: label.into(),
            value,
            unit: unit.into(),
        });
    }

    /// A figure by key.
    pub(crate) fn get(&self, key: &str) -> Option<f64> {
        self.metrics.iter().find(|m| m.key == key).map(|m| m.value)
    }
}

/// A value with its unit, for a table cell.
pub(crate) fn fmt_value(value: f64, unit: &str) -> String {
    if !value.is_finite() {
        return "–".into();
    }
    match unit {
        "us" => fmt_us(value.max(0.0).round() as u64),
        "" if value.fract() == 0.0 && value.abs() < 1e15 => format!("{value:.0}"),
        "" => sig3(value),
        u => format!("{} {u}", sig3(value)),
    }
}

/// `a / b`, printed with three significant digits and an `×`, or `–` when undefined.
pub(crate) fn fmt_ratio(a: f64, b: f64) -> String {
    if b == 0.0 || !a.is_finite() || !b.is_finite() {
        "–".into()
    } else {
        format!("{}×", sig3(a / b))
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let pad = widths[c] - cell.chars().count();
            if c == 0 {
                let _ = write!(line, "{cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(line, "  {}{cell}", " ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * cols.saturating_sub(1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

fn header(r: &Report) -> String {
    let params: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "scenario {} · target {} at {} · {}\n",
        r.scenario,
        r.target,
        r.server,
        params.join(" ")
    )
}

fn counts(title: &str, map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return String::new();
    }
    let mut out = format!("{title}:\n");
    for (k, v) in map {
        let _ = writeln!(out, "  {v:>8}  {k}");
    }
    out
}

fn latencies(r: &Report) -> String {
    let mut out = String::new();
    for (k, v) in &r.latencies {
        let _ = writeln!(out, "{} {k}: {v}", r.target);
    }
    out
}

fn targets(r: &Report) -> String {
    let mut out = String::new();
    for t in &r.targets {
        let _ = writeln!(
            out,
            "target: {} {} — measured {} — {}",
            t.what,
            t.goal,
            t.measured,
            if t.met { "MET" } else { "NOT MET" }
        );
    }
    out
}

/// The summary table of one run.
pub(crate) fn summary(r: &Report) -> String {
    let mut rows = vec![vec!["metric".to_string(), r.target.clone()]];
    for m in &r.metrics {
        rows.push(vec![m.label.clone(), fmt_value(m.value, &m.unit)]);
    }
    let mut out = header(r);
    out.push_str(&table(&rows));
    out.push_str(&latencies(r));
    out.push_str(&counts("errors", &r.errors));
    out.push_str(&counts("closes", &r.closes));
    out.push_str(&targets(r));
    out
}

/// Two runs side by side (normally Switchboard and the baseline) with the ratio `a / b`.
pub(crate) fn comparison(a: &Report, b: &Report) -> String {
    let mut rows = vec![vec![
        "metric".to_string(),
        a.target.clone(),
        b.target.clone(),
        "ratio".to_string(),
    ]];
    for m in &a.metrics {
        let other = b.get(&m.key);
        rows.push(vec![
            m.label.clone(),
            fmt_value(m.value, &m.unit),
            other.map_or("–".into(), |v| fmt_value(v, &m.unit)),
            other.map_or("–".into(), |v| fmt_ratio(m.value, v)),
        ]);
    }
    let mut out = header(a);
    out.push_str(&header(b));
    out.push_str(&table(&rows));
    out.push_str(&latencies(a));
    out.push_str(&latencies(b));
    out.push_str(&counts(&format!("errors ({})", a.target), &a.errors));
    out.push_str(&counts(&format!("errors ({})", b.target), &b.errors));
    out.push_str(&counts(&format!("closes ({})", a.target), &a.closes));
    out.push_str(&counts(&format!("closes ({})", b.target), &b.closes));
    out.push_str(&targets(a));
    out
}

/// The ratios `a / b` by key, for `--json`.
pub(crate) fn ratios(a: &Report, b: &Report) -> BTreeMap<String, f64> {
    a.metrics
        .iter()
        .filter_map(|m| {
            let v = b.get(&m.key)?;
            (v != 0.0 && v.is_finite() && m.value.is_finite()).then(|| (m.key.clone(), m.value / v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(target: &str, p99: f64, rate: f64) -> Report {
        let mut r = Report {
            scenario: "dm".into(),
            target: target.into(),
            server: "127.0.0.1:1".into(),
            ..Report::default()
        };
        r.params.insert("pairs".into(), "10".into());
        r.push("deliver_p99_us", "send→deliver p99", p99, "us");
        r.push("rate", "send rate", rate, "msg/s");
        r.push("sent", "sent", 1000.0, "");
        r
    }

    #[test]
    fn formats_values_and_ratios() {
        assert_eq!(fmt_value(1234.0, "us"), "1.23 ms");
        assert_eq!(fmt_value(2000.0, "msg/s"), "2000 msg/s");
        assert_eq!(fmt_value(1.25, ""), "1.25");
        assert_eq!(fmt_value(50.0, ""), "50");
        assert_eq!(fmt_value(f64::NAN, ""), "–");
        assert_eq!(fmt_ratio(3.0, 2.0), "1.50×");
        assert_eq!(fmt_ratio(3.0, 0.0), "–");
    }

    #[test]
    fn prints_a_summary_and_a_comparison() {
        let a = report("switchboard", 2_000.0, 1_000.0);
        let b = report("baseline", 500.0, 1_000.0);
        let s = summary(&a);
        assert!(s.contains("scenario dm · target switchboard"), "{s}");
        let line = s
            .lines()
            .find(|l| l.starts_with("send→deliver p99"))
            .unwrap();
        assert!(line.ends_with(" 2.00 ms"), "{s}");
        let c = comparison(&a, &b);
        let line = c
            .lines()
            .find(|l| l.starts_with("send→deliver p99"))
            .unwrap();
        assert!(line.ends_with("2.00 ms      500 µs  4.00×"), "{line}");
        let r = ratios(&a, &b);
        assert_eq!(r["deliver_p99_us"], 4.0);
        assert_eq!(r["rate"], 1.0);
        // JSON round trip.
        let back: Report = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.metrics, a.metrics);
    }
}
