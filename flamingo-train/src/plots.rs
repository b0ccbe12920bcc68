//! PNG plots of a run: loss, learning rate and the tanh of every gate.
//!
//! Each file is drawn under a temporary name and renamed, so a viewer never
//! sees half a plot. Text needs a system font, which plotters' `ttf` feature
//! finds through fontconfig. Where none exists, plotting fails and the
//! caller logs a warning instead of stopping the run.

use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::metrics::MetricsRecord;

/// The files [`write_plots`] writes into a folder.
pub const PLOT_FILES: [&str; 3] = ["loss.png", "lr.png", "gates.png"];

const SIZE: (u32, u32) = (960, 540);

/// Draws every plot from `history` into `folder`; returns the files written.
pub fn write_plots(folder: &Path, history: &[MetricsRecord]) -> Result<Vec<PathBuf>, String> {
    let mut steps = Vec::new();
    let mut validation = Vec::new();
    let mut gates: Vec<(u64, Vec<crate::metrics::GateRecord>)> = Vec::new();
    for record in history {
        match record {
            MetricsRecord::Step(step) => {
                steps.push((step.step, step.loss, step.lr));
                if let Some(values) = &step.gates {
                    gates.push((step.step, values.clone()));
                }
            }
            MetricsRecord::Eval(eval) => {
                if let Some(loss) = eval.validation_loss {
                    validation.push((eval.step, loss));
                }
            }
        }
    }
    if steps.is_empty() {
        return Ok(Vec::new());
    }

    let mut written = Vec::new();
    let train_loss = steps.iter().map(|&(step, loss, _)| (step as f64, loss as f64)).collect();
    let validation_loss = validation.iter().map(|&(step, loss)| (step as f64, loss as f64)).collect();
    let path = folder.join(PLOT_FILES[0]);
    draw(&path, "loss", "cross-entropy", &[Series::line("train", train_loss), Series::dots("validation", validation_loss)])?;
    written.push(path);

    let lr = steps.iter().map(|&(step, _, lr)| (step as f64, lr as f64)).collect();
    let path = folder.join(PLOT_FILES[1]);
    draw(&path, "learning rate", "learning rate", &[Series::line("base lr", lr)])?;
    written.push(path);

    if let Some((_, first)) = gates.first() {
        let mut series = Vec::new();
        for (index, block) in first.iter().enumerate() {
            let attention = gates.iter().filter_map(|(step, g)| g.get(index).map(|g| (*step as f64, g.attention as f64))).collect();
            let feed_forward = gates.iter().filter_map(|(step, g)| g.get(index).map(|g| (*step as f64, g.feed_forward as f64))).collect();
            series.push(Series::line(format!("layer {} attn", block.layer), attention));
            series.push(Series::line(format!("layer {} ff", block.layer), feed_forward));
        }
        let path = folder.join(PLOT_FILES[2]);
        draw(&path, "tanh of the gates", "tanh(gate)", &series)?;
        written.push(path);
    }
    Ok(written)
}

/// One named set of points, drawn as a line or as dots.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    dots: bool,
}

impl Series {
    fn line(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { label: label.into(), points, dots: false }
    }

    fn dots(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { label: label.into(), points, dots: true }
    }
}

/// Draws the series with a legend.
fn draw(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<(), String> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // The bitmap backend picks the format from the extension, so the
    // temporary name keeps `.png`.
    let temporary = path.with_file_name(format!(".{name}.partial.png"));
    let (x_range, y_range) = ranges(series);
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    {
        let root = BitMapBackend::new(&temporary, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range, y_range)
            .map_err(|e| fail(&e))?;
        chart.configure_mesh().x_desc("step").y_desc(y_label).draw().map_err(|e| fail(&e))?;

        for (index, series) in series.iter().enumerate() {
            if series.points.is_empty() {
                continue;
            }
            let color = Palette99::pick(index).to_rgba();
            let style = ShapeStyle::from(color).stroke_width(2);
            let drawn = if series.dots {
                chart.draw_series(series.points.iter().map(|&point| Circle::new(point, 4, style.filled())))
            } else {
                chart.draw_series(LineSeries::new(series.points.iter().copied(), style))
            };
            drawn
                .map_err(|e| fail(&e))?
                .label(series.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))?;
    }
    std::fs::rename(&temporary, path).map_err(|e| fail(&e))
}

/// Axis ranges that hold every point, with a margin on the y axis.
fn ranges(series: &[Series]) -> (Range<f64>, Range<f64>) {
    let points = series.iter().flat_map(|series| series.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return (0.0..1.0, 0.0..1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let margin = ((y1 - y0) * 0.05).max(1e-6 * y1.abs().max(1e-3));
    (x0..x1, (y0 - margin)..(y1 + margin))
}
