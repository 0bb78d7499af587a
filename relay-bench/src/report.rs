//! How results are shown: a [`Record`] is one result line (ordered key/value fields, the
//! unit in the key's suffix: `_us`, `_kb`, `_bytes`, `_per_s`, `_s`), printed as a human
//! table or as one JSON object per line. Also the latency summary of an HDR histogram.

use hdrhistogram::Histogram;
use std::fmt::Write as _;

/// One value of a result.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// A count or an integer figure.
    Count(u64),
    /// A difference that may be negative (e.g. RSS kept after a run, kB).
    Signed(i64),
    /// An identifier such as a process id (never grouped by thousands).
    Id(u64),
    /// A measured real number.
    Real(f64),
    /// Text (kind, URL, label).
    Text(String),
    /// A yes/no fact.
    Flag(bool),
    /// Not measured in this run (e.g. no `--pid`): `null` in JSON, `-` in the table.
    Missing,
}

impl From<u64> for Field {
    fn from(v: u64) -> Self {
        Field::Count(v)
    }
}
impl From<usize> for Field {
    fn from(v: usize) -> Self {
        Field::Count(v as u64)
    }
}
impl From<i64> for Field {
    fn from(v: i64) -> Self {
        Field::Signed(v)
    }
}
impl From<f64> for Field {
    fn from(v: f64) -> Self {
        Field::Real(v)
    }
}
impl From<bool> for Field {
    fn from(v: bool) -> Self {
        Field::Flag(v)
    }
}
impl From<&str> for Field {
    fn from(v: &str) -> Self {
        Field::Text(v.to_string())
    }
}
impl From<String> for Field {
    fn from(v: String) -> Self {
        Field::Text(v)
    }
}
impl<T: Into<Field>> From<Option<T>> for Field {
    fn from(v: Option<T>) -> Self {
        v.map_or(Field::Missing, Into::into)
    }
}

impl Field {
    /// The value as JSON (reals rounded to 3 decimals).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Field::Count(v) | Field::Id(v) => (*v).into(),
            Field::Signed(v) => (*v).into(),
            Field::Real(v) => serde_json::Number::from_f64((v * 1000.0).round() / 1000.0)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Field::Text(v) => v.as_str().into(),
            Field::Flag(v) => (*v).into(),
            Field::Missing => serde_json::Value::Null,
        }
    }

    /// The value for a human: counts grouped by thousands, reals to 3 significant digits.
    pub fn to_human(&self) -> String {
        match self {
            Field::Count(v) => group_thousands(*v),
            Field::Signed(v) if *v < 0 => format!("-{}", group_thousands(v.unsigned_abs())),
            Field::Signed(v) => group_thousands(v.unsigned_abs()),
            Field::Id(v) => v.to_string(),
            Field::Real(v) => format_real(*v),
            Field::Text(v) => v.clone(),
            Field::Flag(v) => if *v { "yes" } else { "no" }.to_string(),
            Field::Missing => "-".to_string(),
        }
    }
}

/// One result line: the first field is `kind` (the subcommand).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    fields: Vec<(&'static str, Field)>,
}

impl Record {
    /// A record of `kind`.
    pub fn new(kind: &str) -> Record {
        Record {
            fields: vec![("kind", kind.into())],
        }
    }

    /// Appends (or replaces) `key`.
    pub fn set(&mut self, key: &'static str, value: impl Into<Field>) -> &mut Record {
        let value = value.into();
        match self.fields.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((key, value)),
        }
        self
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Field> {
        self.fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.fields.iter().map(|(k, _)| *k)
    }

    /// The record as one JSON object on one line, keys in record order.
    pub fn to_json_line(&self) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{}:{}", serde_json::Value::from(*k), v.to_json());
        }
        out.push('}');
        out
    }
}

/// A table with one row per key and one column per record (so `large` shows its sizes side
/// by side); keys missing from a record show `-`.
pub fn table(records: &[Record]) -> String {
    let mut keys: Vec<&'static str> = Vec::new();
    for r in records {
        for k in r.keys() {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let mut row = vec![k.to_string()];
            row.extend(
                records
                    .iter()
                    .map(|r| r.get(k).map_or_else(|| "-".to_string(), Field::to_human)),
            );
            row
        })
        .collect();
    let columns = records.len() + 1;
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        for (c, cell) in row.iter().enumerate() {
            let pad = widths[c] - cell.chars().count();
            if c == 0 {
                let _ = write!(out, "{cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(out, "  {}{cell}", " ".repeat(pad));
            }
        }
        out.push('\n');
    }
    out
}

/// `36512` → `36 512`.
pub fn group_thousands(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// A real to 3 significant digits (at least), integers of 1000 and more grouped.
pub fn format_real(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let a = v.abs();
    if a >= 999.5 {
        let s = group_thousands(a.round() as u64);
        return if v < 0.0 { format!("-{s}") } else { s };
    }
    let decimals = if a >= 99.95 {
        0
    } else if a >= 9.995 {
        1
    } else if a >= 0.9995 {
        2
    } else {
        3
    };
    format!("{v:.decimals$}")
}

/// Round-trip latency percentiles of one run, µs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    /// Samples behind the figures.
    pub count: u64,
    /// Mean, µs.
    pub mean_us: f64,
    /// Median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Largest sample, µs.
    pub max_us: f64,
}

impl LatencySummary {
    /// Summarises a histogram of nanoseconds.
    pub fn from_ns(h: &Histogram<u64>) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }

    /// Adds `latency_*_us` fields to `r`.
    pub fn add_to(&self, r: &mut Record) {
        r.set("latency_mean_us", self.mean_us)
            .set("latency_p50_us", self.p50_us)
            .set("latency_p90_us", self.p90_us)
            .set("latency_p99_us", self.p99_us)
            .set("latency_p999_us", self.p999_us)
            .set("latency_max_us", self.max_us);
    }
}

/// A histogram for latencies in nanoseconds, 1 ns to 60 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("the bounds should be valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_formatted_for_humans() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(36_512), "36 512");
        assert_eq!(group_thousands(1_234_567), "1 234 567");
        assert_eq!(format_real(12.345), "12.3");
        assert_eq!(format_real(1.2345), "1.23");
        assert_eq!(format_real(0.01234), "0.012");
        assert_eq!(format_real(123.4), "123");
        assert_eq!(format_real(36_511.6), "36 512");
        assert_eq!(format_real(-2.5), "-2.50");
    }

    #[test]
    fn percentiles_come_from_the_histogram_in_us() {
        let mut h = latency_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap(); // 1..=1000 µs
        }
        let s = LatencySummary::from_ns(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_us - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p90_us - 900.0).abs() < 1.0, "{s:?}");
        assert!((s.p99_us - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.p999_us - 999.0).abs() < 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() < 1.0, "{s:?}");
        let mut r = Record::new("echo");
        s.add_to(&mut r);
        assert_eq!(format_real(900.0), "900");
        assert!(r.get("latency_p999_us").is_some());
    }

    #[test]
    fn records_print_as_ordered_json_and_as_a_table() {
        let mut a = Record::new("large");
        a.set("size_mib", 1usize)
            .set("mb_per_s", 1234.5678)
            .set("pid", Field::Id(12345))
            .set("verified", true)
            .set("kept_kb", -1234i64);
        let mut b = Record::new("large");
        b.set("size_mib", 32usize).set("mb_per_s", 987.0);
        assert_eq!(
            a.to_json_line(),
            r#"{"kind":"large","size_mib":1,"mb_per_s":1234.568,"pid":12345,"verified":true,"kept_kb":-1234}"#
        );
        let t = table(&[a, b]);
        assert_eq!(
            t,
            "kind       large  large\n\
             size_mib       1     32\n\
             mb_per_s   1 235    987\n\
             pid        12345      -\n\
             verified     yes      -\n\
             kept_kb   -1 234      -\n"
        );
    }
}
