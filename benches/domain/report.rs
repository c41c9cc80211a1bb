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
    /// MiB per second (the guest's dirty rate).
    MibPerSecond,
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
                Unit::MibPerSecond => "MiB/s",
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

    /// Records a rate in MiB/s.
    pub fn rate(&mut self, key: &str, mib_per_second: f64) {
        self.push(key, Unit::MibPerSecond, mib_per_second);
    }

    /// A recorded series, if it was measured in this run (a scenario may be skipped, e.g. at one
    /// size or when the product cannot run it).
    pub fn get(&self, key: &str) -> Option<&Series> {
        self.series.get(key)
    }

    /// One line per series: median [min, max] (n), for the log.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (key, series) in &self.series {
            let _ = writeln!(
                out,
                "  {key:<52} {} [{}, {}] (n={})",
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
    /// The domsnap value (seconds) at most this.
    AtMost(f64),
    /// The domsnap value at most the baseline's plus this many seconds.
    AtMostPlus(f64),
    /// The domsnap value at most this many times the baseline's.
    AtMostTimes(f64),
}

/// One line of the table, the same at every guest size: its series keys are relative to the size's
/// prefix ([`size_key`]).
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

/// The series `key` of the guest with `ram_mib` MiB of RAM.
pub fn size_key(ram_mib: u64, key: &str) -> String {
    format!("{ram_mib}m.{key}")
}

/// A guest size as the tables show it.
pub fn size_name(ram_mib: u64) -> String {
    if ram_mib % 1024 == 0 {
        format!("{} GiB", ram_mib / 1024)
    } else {
        format!("{ram_mib} MiB")
    }
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
        Unit::MibPerSecond => format!("{value:.1} MiB/s"),
    }
}

/// A row with its numbers worked out, at one size.
struct Evaluated {
    row: Row,
    ram_mib: u64,
    /// `None`: the domsnap series was not measured in this run.
    domsnap: Option<(f64, Unit)>,
    baseline: Option<f64>,
    ratio: Option<f64>,
    met: Option<bool>,
    /// The unit of the row's values (the baseline's when domsnap's was not measured).
    unit: Unit,
}

fn evaluate(results: &Results, row: Row, ram_mib: u64) -> Evaluated {
    let series = |key: &str| results.get(&size_key(ram_mib, key));
    let domsnap = series(row.domsnap).map(|s| (pick(s, row.pick), s.unit));
    let baseline_series = row.baseline.and_then(|(_, key)| series(key));
    let baseline = baseline_series.map(|s| pick(s, row.pick));
    let ratio = domsnap.zip(baseline).map(|((d, _), b)| b / d);
    let met = domsnap.and_then(|(d, _)| match row.target {
        Target::None => None,
        Target::RatioAtLeast(x) => ratio.map(|r| r >= x),
        Target::AtMost(limit) => Some(d <= limit),
        Target::AtMostPlus(slack) => baseline.map(|b| d <= b + slack),
        Target::AtMostTimes(x) => baseline.map(|b| d <= x * b),
    });
    Evaluated {
        row,
        ram_mib,
        domsnap,
        baseline,
        ratio,
        met,
        unit: domsnap
            .map(|(_, unit)| unit)
            .or(baseline_series.map(|s| s.unit))
            .unwrap_or(Unit::Time),
    }
}

fn target_text(target: Target) -> String {
    match target {
        Target::None => "—".into(),
        Target::RatioAtLeast(x) => format!("ratio ≥ {x}×"),
        Target::AtMost(limit) => format!("≤ {}", format_value(Unit::Time, limit)),
        Target::AtMostPlus(slack) => format!("≤ baseline + {}", format_value(Unit::Time, slack)),
        Target::AtMostTimes(x) => format!("≤ baseline × {x}"),
    }
}

fn verdict(e: &Evaluated) -> &'static str {
    match (e.domsnap, e.met) {
        (None, _) => "not measured",
        (Some(_), None) if matches!(e.row.target, Target::None) => "",
        (Some(_), None) => "no baseline",
        (Some(_), Some(true)) => "PASS",
        (Some(_), Some(false)) => "**FAIL**",
    }
}

/// The table in Markdown: every row at every size, size by size.
pub fn table(results: &Results, rows: &[Row], sizes: &[u64]) -> String {
    let mut out = String::from(
        "| guest | scenario | domsnap | QEMU baseline | baseline | ratio | target | result |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for &ram_mib in sizes {
        for e in rows.iter().map(|row| evaluate(results, *row, ram_mib)) {
            let unit = e.unit;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                size_name(e.ram_mib),
                e.row.scenario,
                e.domsnap.map_or("—".into(), |(d, unit)| format_value(unit, d)),
                e.row.baseline.map_or("—", |(name, _)| name),
                e.baseline.map_or("—".into(), |b| format_value(unit, b)),
                e.ratio.map_or("—".into(), |r| format!("{r:.2}×")),
                target_text(e.row.target),
                verdict(&e)
            );
        }
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

/// Several methods side by side (one column each), one quantity a row per size, in Markdown.
pub fn grid(results: &Results, methods: &[&str], rows: &[GridRow], sizes: &[u64]) -> String {
    let mut out = format!(
        "| guest | | {} |\n|{}\n",
        methods.join(" | "),
        " --- |".repeat(methods.len() + 2)
    );
    for &ram_mib in sizes {
        for row in rows {
            let cells: Vec<String> = row
                .series
                .iter()
                .map(|key| {
                    results.get(&size_key(ram_mib, key)).map_or("—".into(), |series| {
                        format_value(series.unit, pick(series, row.pick))
                    })
                })
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                size_name(ram_mib),
                row.quantity,
                cells.join(" | ")
            );
        }
    }
    out
}

/// The table as JSON rows.
pub fn rows_json(results: &Results, rows: &[Row], sizes: &[u64]) -> Value {
    sizes
        .iter()
        .flat_map(|&ram_mib| rows.iter().map(move |row| evaluate(results, *row, ram_mib)))
        .map(|e| {
            json!({
                "ram_mib": e.ram_mib,
                "scenario": e.row.scenario,
                "domsnap_series": size_key(e.ram_mib, e.row.domsnap),
                "domsnap": e.domsnap.map(|(d, _)| d),
                "baseline_name": e.row.baseline.map(|(name, _)| name),
                "baseline_series": e.row.baseline.map(|(_, key)| size_key(e.ram_mib, key)),
                "baseline": e.baseline,
                "statistic": match e.row.pick { Pick::Median => "median", Pick::Max => "max" },
                "ratio_baseline_over_domsnap": e.ratio,
                "target": target_text(e.row.target),
                "met": e.met,
                "result": verdict(&e).trim_matches('*'),
            })
        })
        .collect()
}
