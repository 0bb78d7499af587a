//! `plot`: round-trip latency percentiles (p50, p90, p99, p99.9; log scale, µs) against
//! load (relayed messages per second), one line per percentile and target, from the JSON
//! lines of `echo` and `baseline` runs. Text is drawn with the font bundled in `assets/`
//! (a DejaVu Sans subset), so no system font or fontconfig is needed.

use crate::error::{BenchError, Result};
use crate::params::{PlotKind, PlotParams};
use crate::report::Record;
use plotters::coord::combinators::IntoLogRange;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use std::sync::Once;

/// The bundled font: DejaVu Sans cut down to ASCII, `µ` and a few punctuation marks
/// (assets/README.md says how it was made; its licence is assets/LICENSE-DejaVu.txt).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

/// The percentiles drawn: label and JSON key.
const PERCENTILES: [(&str, &str); 4] = [
    ("p50", "latency_p50_us"),
    ("p90", "latency_p90_us"),
    ("p99", "latency_p99_us"),
    ("p99.9", "latency_p999_us"),
];

/// Line colour of each target (label), in order of first appearance.
const TARGET_COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// Dash and gap of each percentile's line, px (p50 solid).
const DASHES: [(u32, u32); 4] = [(1000, 0), (12, 4), (6, 4), (2, 3)];

/// One run: its target and load, and its latency at p50, p90, p99 and p99.9, µs.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The run's `label` (its target).
    pub label: String,
    /// Relayed messages per second.
    pub load: f64,
    /// Latency at each percentile, µs.
    pub latency_us: [f64; 4],
}

/// The points of every `echo`/`baseline` line of `text`; other lines are skipped.
pub fn read_points(text: &str) -> Vec<Point> {
    text.lines().filter_map(point_of).collect()
}

fn point_of(line: &str) -> Option<Point> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let kind = v.get("kind")?.as_str()?;
    if kind != "echo" && kind != "baseline" {
        return None;
    }
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    let mut latency_us = [0.0; 4];
    for (slot, (_, key)) in latency_us.iter_mut().zip(PERCENTILES) {
        *slot = num(key)?;
    }
    Some(Point {
        label: v
            .get("label")
            .and_then(|l| l.as_str())
            .unwrap_or(kind)
            .to_string(),
        load: num("relayed_msgs_per_s")?,
        latency_us,
    })
}

/// Registers the bundled font as `sans-serif` (once per process).
pub(crate) fn register_font() {
    static FONT_ONCE: Once = Once::new();
    FONT_ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws `points` as a PNG at `p.output`.
pub fn draw(points: &[Point], p: &PlotParams) -> Result<()> {
    let mut rgb = vec![0u8; p.width as usize * p.height as usize * 3];
    draw_rgb(points, p, &mut rgb)?;
    write_png(&rgb, p)
}

/// Encodes 8-bit RGB pixels as a PNG file (the `png` crate directly: plotters' own encoder
/// would bring the whole `image` crate).
pub(crate) fn write_png(rgb: &[u8], p: &PlotParams) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Io(format!("{}: {e}", p.output.display()));
    let file = std::fs::File::create(&p.output).map_err(|e| fail(&e))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), p.width, p.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| fail(&e))?;
    writer.write_image_data(rgb).map_err(|e| fail(&e))?;
    writer.finish().map_err(|e| fail(&e))
}

/// Draws the chart into an RGB buffer of `p.width` × `p.height` pixels.
fn draw_rgb(points: &[Point], p: &PlotParams, rgb: &mut [u8]) -> Result<()> {
    register_font();
    let fail = |e: &dyn std::fmt::Display| BenchError::Io(format!("{}: {e}", p.output.display()));
    let max_load = points.iter().map(|q| q.load).fold(1.0, f64::max) * 1.05;
    let all = points.iter().flat_map(|q| q.latency_us);
    let lo = all.clone().fold(f64::INFINITY, f64::min).max(0.1) / 1.5;
    let hi = all.fold(1.0, f64::max) * 1.5;

    let root = BitMapBackend::with_buffer(rgb, (p.width, p.height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Round-trip latency against load", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_load, (lo..hi).log_scale())
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("relayed messages per second")
        .y_desc("round-trip latency (µs)")
        .label_style(("sans-serif", 14))
        .max_light_lines(1)
        .y_labels(12)
        .x_label_formatter(&|x| crate::report::group_thousands(x.round() as u64))
        .y_label_formatter(&|y| crate::report::format_real(*y))
        .draw()
        .map_err(|e| fail(&e))?;

    let mut labels: Vec<&str> = Vec::new();
    for q in points {
        if !labels.contains(&q.label.as_str()) {
            labels.push(&q.label);
        }
    }
    for (t, label) in labels.iter().enumerate() {
        let color = TARGET_COLORS[t % TARGET_COLORS.len()];
        let mut series: Vec<&Point> = points.iter().filter(|q| q.label == *label).collect();
        series.sort_by(|a, b| a.load.total_cmp(&b.load));
        for (k, (name, _)) in PERCENTILES.iter().enumerate() {
            let (dash, gap) = DASHES[k];
            let style = color.stroke_width(2);
            let xy: Vec<(f64, f64)> = series.iter().map(|q| (q.load, q.latency_us[k])).collect();
            chart
                .draw_series(DashedLineSeries::new(xy.clone(), dash, gap, style))
                .map_err(|e| fail(&e))?
                .label(format!("{name} {label}"))
                .legend(move |(x, y)| {
                    DashedPathElement::new([(x, y), (x + 24, y)], dash, gap, style)
                });
            chart
                .draw_series(xy.into_iter().map(|c| Circle::new(c, 3, color.filled())))
                .map_err(|e| fail(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// Runs `plot`: reads `p.input`, draws `p.output`, and returns a record of what it drew.
pub fn run_plot(p: &PlotParams) -> Result<Record> {
    p.validate()?;
    let text = std::fs::read_to_string(&p.input)
        .map_err(|e| BenchError::Io(format!("{}: {e}", p.input.display())))?;
    if p.kind == PlotKind::Ratios {
        return crate::ratios::run(&text, p);
    }
    let points = read_points(&text);
    if points.is_empty() {
        return Err(BenchError::Invalid(format!(
            "{}: no echo or baseline JSON lines",
            p.input.display()
        )));
    }
    draw(&points, p)?;
    let mut r = Record::new("plot");
    r.set("input", p.input.display().to_string())
        .set("output", p.output.display().to_string())
        .set("points", points.len());
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"kind":"echo","label":"relay","relayed_msgs_per_s":1000.0,"latency_p50_us":50.0,"latency_p90_us":60.0,"latency_p99_us":90.0,"latency_p999_us":120.5}
not json
{"kind":"idle","rss_per_socket_bytes":9000}
{"kind":"baseline","label":"tcp-forwarder","relayed_msgs_per_s":5000.0,"latency_p50_us":20.0,"latency_p90_us":25.0,"latency_p99_us":30.0,"latency_p999_us":40.0}
{"kind":"echo","relayed_msgs_per_s":1.0}
"#;

    #[test]
    fn points_come_from_echo_and_baseline_lines_only() {
        let points = read_points(LINES);
        assert_eq!(points.len(), 2);
        assert_eq!(
            points[0],
            Point {
                label: "relay".into(),
                load: 1000.0,
                latency_us: [50.0, 60.0, 90.0, 120.5]
            }
        );
        assert_eq!(points[1].label, "tcp-forwarder");
    }

    #[test]
    fn a_png_is_written_with_the_bundled_font() {
        let dir = std::env::temp_dir().join(format!("relay-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.jsonl");
        std::fs::write(&input, LINES).unwrap();
        let p = PlotParams {
            input,
            output: dir.join("out.png"),
            kind: PlotKind::Latency,
            width: 400,
            height: 300,
        };
        let r = run_plot(&p).unwrap();
        assert_eq!(r.get("points"), Some(&crate::report::Field::Count(2)));
        let png = std::fs::read(&p.output).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
