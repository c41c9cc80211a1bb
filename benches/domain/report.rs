//! The measured series, their medians, and the side-by-side table (Markdown on stdout, JSON on disk).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use serde_json::{json, Value};

/// What a series counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Seconds.
    Time,
    /// Bytes.
    Bytes,
    /// A plain number (rounds, pages).
    Count,
}

/// One measured quantity over the repetitions.
#[derive(Debug, Clone)]
pub struct Series {
    unit: Unit,
    samples: Vec<f64>,
}

impl Series {
    fn sorted(&self) -> Vec<f64> {
        let mut sorted = self.samples.clone();
        sorted.sort_by(f64::total_cmp);
        sorted
    }

    /// The median (the mean of the middle two for an even count).
    pub fn median(&self) -> f64 {
        let sorted = self.sorted();
        let mid = sorted.len() / 2;
        if sorted.len() % 2 == 0 {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        } else {
            sorted[mid]
        }
    }

    fn min(&self) -> f64 {
        self.sorted()[0]
    }

    fn max(&self) -> f64 {
        *self.sorted().last().expect("a series has samples")
    }

    fn to_json(&self) -> Value {
        json!({
            "unit": match self.unit {
                Unit::Time => "seconds",
                Unit::Bytes => "bytes",
                Unit::Count => "count",
            },
            "samples": self.samples,
            "median": self.median(),
            "min": self.min(),
            "max": self.max(),
        })
    }
}

/// Every series of a run, by key (`side.scenario.quantity`).
#[derive(Debug, Default)]
pub struct Results {
    series: BTreeMap<String, Series>,
}

impl Results {
    fn push(&mut self, key: &str, unit: Unit, value: f64) {
        let series = self.series.entry(key.to_owned()).or_insert(Series {
            unit,
            samples: Vec::new(),
        });
        assert_eq!(series.unit, unit, "series {key} mixes units");
        series.samples.push(value);
    }

    /// Records a duration.
    pub fn time(&mut self, key: &str, value: Duration) {
        self.push(key, Unit::Time, value.as_secs_f64());
    }

    /// Records a size.
    pub fn bytes(&mut self, key: &str, value: u64) {
        self.push(key, Unit::Bytes, value as f64);
    }

    /// Records a count.
    pub fn count(&mut self, key: &str, value: u64) {
        self.push(key, Unit::Count, value as f64);
    }

    /// A recorded series; panics on a key nothing recorded (a bug in the row table).
    pub fn get(&self, key: &str) -> &Series {
        self.series
            .get(key)
            .unwrap_or_else(|| panic!("no series {key} was measured"))
    }

    /// One line per series: median [min, max] (n), for the log.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (key, series) in &self.series {
            let _ = writeln!(
                out,
                "  {key:<44} {} [{}, {}] (n={})",
                format_value(series.unit, series.median()),
                format_value(series.unit, series.min()),
                format_value(series.unit, series.max()),
                series.samples.len()
            );
        }
        out
    }

    /// Every series as JSON.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.series
                .iter()
                .map(|(key, series)| (key.clone(), series.to_json()))
                .collect(),
        )
    }
}

/// Which statistic of a series a row shows.
#[derive(Debug, Clone, Copy)]
pub enum Pick {
    /// Times: the median of the repetitions.
    Median,
    /// Sizes that must "never" exceed a bound: the largest seen.
    Max,
}

/// What a row promises; the ratio is always baseline ÷ domsnap (above 1: domsnap is faster/smaller).
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// No target: shown for comparison.
    None,
    /// ratio ≥ this.
    RatioAtLeast(f64),
    /// ratio > this (strictly below the baseline).
    RatioAbove(f64),
    /// The domsnap value (seconds) at most this.
    AtMost(f64),
    /// The domsnap value at most this many times the baseline's.
    WithinFactor(f64),
}

/// One line of the table.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// What is compared.
    pub scenario: &'static str,
    /// The domsnap series.
    pub domsnap: &'static str,
    /// The baseline's name and series, if the row has one.
    pub baseline: Option<(&'static str, &'static str)>,
    /// Statistic shown for both.
    pub pick: Pick,
    /// The target.
    pub target: Target,
}

fn pick(series: &Series, pick: Pick) -> f64 {
    match pick {
        Pick::Median => series.median(),
        Pick::Max => series.max(),
    }
}

fn format_value(unit: Unit, value: f64) -> String {
    match unit {
        Unit::Time if value < 1.0 => format!("{:.1} ms", value * 1e3),
        Unit::Time => format!("{value:.2} s"),
        Unit::Bytes if value < f64::from(1 << 20) => format!("{:.1} KiB", value / 1024.0),
        Unit::Bytes => format!("{:.1} MiB", value / f64::from(1 << 20)),
        Unit::Count => format!("{value:.0}"),
    }
}

/// A row with its numbers worked out.
struct Evaluated {
    row: Row,
    domsnap: f64,
    unit: Unit,
    baseline: Option<f64>,
    ratio: Option<f64>,
    met: Option<bool>,
}

fn evaluate(results: &Results, row: Row) -> Evaluated {
    let domsnap_series = results.get(row.domsnap);
    let domsnap = pick(domsnap_series, row.pick);
    let baseline = row.baseline.map(|(_, key)| pick(results.get(key), row.pick));
    let ratio = baseline.map(|b| b / domsnap);
    let met = match row.target {
        Target::None => None,
        Target::RatioAtLeast(x) => ratio.map(|r| r >= x),
        Target::RatioAbove(x) => ratio.map(|r| r > x),
        Target::AtMost(limit) => Some(domsnap <= limit),
        Target::WithinFactor(x) => baseline.map(|b| domsnap <= x * b),
    };
    Evaluated {
        row,
        domsnap,
        unit: domsnap_series.unit,
        baseline,
        ratio,
        met,
    }
}

fn target_text(target: Target) -> String {
    match target {
        Target::None => "—".into(),
        Target::RatioAtLeast(x) => format!("≥ {x}×"),
        Target::RatioAbove(x) => format!("> {x}× (below it)"),
        Target::AtMost(limit) => format!("≤ {}", format_value(Unit::Time, limit)),
        Target::WithinFactor(x) => format!("≤ {x}× the baseline"),
    }
}

/// The table in Markdown.
pub fn table(results: &Results, rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | domsnap | QEMU baseline | baseline | ratio | target | met? |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for e in rows.iter().map(|row| evaluate(results, *row)) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            e.row.scenario,
            format_value(e.unit, e.domsnap),
            e.row.baseline.map_or("—", |(name, _)| name),
            e.baseline.map_or("—".into(), |b| format_value(e.unit, b)),
            e.ratio.map_or("—".into(), |r| format!("{r:.2}×")),
            target_text(e.row.target),
            match e.met {
                None => "",
                Some(true) => "yes",
                Some(false) => "**no**",
            }
        );
    }
    out
}

/// One line of a [`grid`]: a quantity and its series, one per method.
#[derive(Debug, Clone, Copy)]
pub struct GridRow {
    /// What is shown.
    pub quantity: &'static str,
    /// Statistic shown.
    pub pick: Pick,
    /// The series of each method, in the order of the grid's methods.
    pub series: &'static [&'static str],
}

/// Several methods side by side (one column each), one quantity a row, in Markdown.
pub fn grid(results: &Results, methods: &[&str], rows: &[GridRow]) -> String {
    let mut out = format!(
        "| | {} |\n|{}\n",
        methods.join(" | "),
        " --- |".repeat(methods.len() + 1)
    );
    for row in rows {
        let cells: Vec<String> = row
            .series
            .iter()
            .map(|key| {
                let series = results.get(key);
                format_value(series.unit, pick(series, row.pick))
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", row.quantity, cells.join(" | "));
    }
    out
}

/// The table as JSON rows.
pub fn rows_json(results: &Results, rows: &[Row]) -> Value {
    rows.iter()
        .map(|row| {
            let e = evaluate(results, *row);
            json!({
                "scenario": e.row.scenario,
                "domsnap_series": e.row.domsnap,
                "domsnap": e.domsnap,
                "baseline_name": e.row.baseline.map(|(name, _)| name),
                "baseline_series": e.row.baseline.map(|(_, key)| key),
                "baseline": e.baseline,
                "statistic": match e.row.pick { Pick::Median => "median", Pick::Max => "max" },
                "ratio_baseline_over_domsnap": e.ratio,
                "target": target_text(e.row.target),
                "met": e.met,
            })
        })
        .collect()
}
