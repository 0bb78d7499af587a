//! `plot --kind ratios`: the ratios a/b of `compare` JSON lines as horizontal bars, one per
//! workload and figure, with a line at 1 (same as b). A bar is green where a is the better
//! of the two (a lower cost, or a higher rate for `*_per_s` figures) and red where it is
//! worse.

use crate::error::{BenchError, Result};
use crate::params::PlotParams;
use crate::plot::{register_font, write_png};
use crate::report::Record;
use plotters::prelude::*;

/// One bar: `workload: figure` and its ratio a/b.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// `echo 50x1: relay_cpu_us_per_msg`.
    pub label: String,
    /// `a_median / b_median`.
    pub ratio: f64,
    /// Whether a higher value is better (rates: `*_per_s`).
    pub higher_is_better: bool,
    /// Labels of a and b.
    pub sides: (String, String),
}

impl Bar {
    /// Whether a did better than b (or equal).
    pub fn a_better(&self) -> bool {
        if self.higher_is_better {
            self.ratio >= 1.0
        } else {
            self.ratio <= 1.0
        }
    }
}

/// The bars of every `compare` line of `text` with a finite ratio; other lines are skipped.
pub fn read_bars(text: &str) -> Vec<Bar> {
    text.lines().filter_map(bar_of).collect()
}

fn bar_of(line: &str) -> Option<Bar> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("kind")?.as_str()? != "compare" {
        return None;
    }
    let s = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
    let figure = s("figure")?;
    let ratio = v.get("ratio_a_over_b")?.as_f64()?;
    ratio.is_finite().then(|| Bar {
        label: format!("{}: {figure}", s("workload").unwrap_or("?")),
        ratio,
        higher_is_better: figure.ends_with("_per_s"),
        sides: (
            s("a").unwrap_or("a").to_string(),
            s("b").unwrap_or("b").to_string(),
        ),
    })
}

/// Draws the bars of `text` at `p.output` and returns a record of what it drew.
pub fn run(text: &str, p: &PlotParams) -> Result<Record> {
    let bars = read_bars(text);
    if bars.is_empty() {
        return Err(BenchError::Invalid(format!(
            "{}: no compare JSON lines with a ratio",
            p.input.display()
        )));
    }
    let mut rgb = vec![0u8; p.width as usize * p.height as usize * 3];
    draw_rgb(&bars, p, &mut rgb)?;
    write_png(&rgb, p)?;
    let mut r = Record::new("plot");
    r.set("input", p.input.display().to_string())
        .set("output", p.output.display().to_string())
        .set("bars", bars.len());
    Ok(r)
}

fn draw_rgb(bars: &[Bar], p: &PlotParams, rgb: &mut [u8]) -> Result<()> {
    register_font();
    let fail = |e: &dyn std::fmt::Display| BenchError::Io(format!("{}: {e}", p.output.display()));
    let n = bars.len() as i32;
    let max = bars.iter().map(|b| b.ratio).fold(1.0, f64::max) * 1.15;
    let (a, b) = &bars[0].sides;
    let root = BitMapBackend::with_buffer(rgb, (p.width, p.height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{a} / {b}, medians"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size((p.width / 2).min(420))
        .build_cartesian_2d(0.0..max, (0..n).into_segmented())
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(format!(
            "ratio {a} / {b} (green: {a} better; rates higher is better, costs lower)"
        ))
        .label_style(("sans-serif", 13))
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| bars.get(i))
                .map_or_else(String::new, |b| b.label.clone()),
            SegmentValue::Last => String::new(),
        })
        .x_label_formatter(&|x| crate::report::format_real(*x))
        .draw()
        .map_err(|e| fail(&e))?;
    let green = RGBColor(44, 160, 44);
    let red = RGBColor(214, 39, 40);
    chart
        .draw_series(bars.iter().enumerate().map(|(i, bar)| {
            let i = i as i32;
            let color = if bar.a_better() { green } else { red };
            let mut r = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (bar.ratio, SegmentValue::Exact(i + 1)),
                ],
                color.filled(),
            );
            r.set_margin(3, 3, 0, 0);
            r
        }))
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, bar)| {
            Text::new(
                crate::report::format_real(bar.ratio),
                (bar.ratio + max * 0.01, SegmentValue::CenterOf(i as i32)),
                ("sans-serif", 12),
            )
        }))
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(std::iter::once(PathElement::new(
            [(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Last)],
            BLACK.stroke_width(2),
        )))
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::PlotKind;

    const LINES: &str = r#"{"kind":"compare","workload":"echo 1x1","figure":"relay_cpu_us_per_msg","a":"paseo","b":"go","a_median":20.0,"b_median":25.0,"ratio_a_over_b":0.8}
{"kind":"compare","workload":"large 32 MiB","figure":"app_to_daemon_mb_per_s","a":"paseo","b":"go","a_median":300.0,"b_median":400.0,"ratio_a_over_b":0.75}
{"kind":"echo","relayed_msgs_per_s":1.0}
{"kind":"compare","workload":"idle 4000","figure":"rss_per_socket_bytes","ratio_a_over_b":null}
"#;

    #[test]
    fn bars_come_from_compare_lines_with_a_ratio() {
        let bars = read_bars(LINES);
        assert_eq!(bars.len(), 2);
        assert_eq!(bars[0].label, "echo 1x1: relay_cpu_us_per_msg");
        assert_eq!(bars[0].sides, ("paseo".to_string(), "go".to_string()));
        assert!(bars[0].a_better(), "a lower cost is better");
        assert!(!bars[1].a_better(), "a lower rate is worse");
    }

    #[test]
    fn a_ratio_png_is_written() {
        let dir = std::env::temp_dir().join(format!("relay-bench-ratios-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.jsonl");
        std::fs::write(&input, LINES).unwrap();
        let p = PlotParams {
            input,
            output: dir.join("out.png"),
            kind: PlotKind::Ratios,
            width: 800,
            height: 300,
        };
        let r = crate::run_plot(&p).unwrap();
        assert_eq!(r.get("bars"), Some(&crate::report::Field::Count(2)));
        let png = std::fs::read(&p.output).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
