//! Progress bars and PNG plots.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use std::path::Path;

pub fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:30} {bar:40} {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

/// Named series of (x, y) points.
pub type Series = Vec<(String, Vec<(f64, f64)>)>;

/// Appends `point` to the series called `name`, creating it if needed.
pub fn push_point(series: &mut Series, name: &str, point: (f64, f64)) {
    match series.iter_mut().find(|(n, _)| n == name) {
        Some((_, points)) => points.push(point),
        None => series.push((name.to_string(), vec![point])),
    }
}

/// The titles of a plot.
pub struct Labels<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

/// A line plot of `series` with a logarithmic y axis (0.2 ms and 2 s fit in one figure).
pub fn line_plot(file: &Path, labels: &Labels<'_>, series: &Series) -> Result<()> {
    let points = || series.iter().flat_map(|(_, p)| p.iter()).filter(|p| p.1.is_finite() && p.1 > 0.0);
    let (x_max, y_max) = points().fold((1.0f64, 1.0f64), |(x, y), &(px, py)| (x.max(px), y.max(py)));
    let y_min = points().map(|p| p.1).fold(f64::INFINITY, f64::min).clamp(0.01, y_max);
    let root = BitMapBackend::new(file, (960, 600)).into_drawing_area();
    root.fill(&WHITE).context("plot")?;
    let mut chart = ChartBuilder::on(&root)
        .caption(labels.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max * 1.05, (y_min * 0.8..y_max * 1.25).log_scale())
        .context("plot")?;
    chart.configure_mesh().x_desc(labels.x).y_desc(labels.y).draw().context("plot")?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).mix(0.9);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .context("plot")?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).context("plot")?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .context("plot")?;
    root.present().context("plot")?;
    Ok(())
}

/// Horizontal bars, one per (name, value), top to bottom, each labelled with its value.
pub fn bar_plot(file: &Path, labels: &Labels<'_>, bars: &[(String, f64)]) -> Result<()> {
    let max = bars.iter().map(|b| b.1).filter(|v| v.is_finite()).fold(1.0, f64::max);
    let root = BitMapBackend::new(file, (960, 120 + 60 * u32::try_from(bars.len()).unwrap_or(u32::MAX / 120)))
        .into_drawing_area();
    root.fill(&WHITE).context("plot")?;
    // Segment i is drawn at the top for i = 0.
    let row = |i: usize| bars.len() - 1 - i;
    let mut chart = ChartBuilder::on(&root)
        .caption(labels.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(250)
        .build_cartesian_2d(0f64..max * 1.15, (0..bars.len().saturating_sub(1)).into_segmented())
        .context("plot")?;
    let name_of = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(r) if *r < bars.len() => bars[row(*r)].0.clone(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_label_formatter(&name_of)
        .x_desc(labels.x)
        .y_desc(labels.y)
        .draw()
        .context("plot")?;
    for (i, (_, value)) in bars.iter().enumerate() {
        let r = row(i);
        let mut bar = Rectangle::new(
            [(0.0, SegmentValue::Exact(r)), (*value, SegmentValue::Exact(r + 1))],
            Palette99::pick(i).filled(),
        );
        bar.set_margin(8, 8, 0, 0);
        chart.draw_series([bar]).context("plot")?;
        let label = Text::new(format!(" {value:.1}"), (*value, SegmentValue::CenterOf(r)), ("sans-serif", 16));
        chart.draw_series([label]).context("plot")?;
    }
    root.present().context("plot")?;
    Ok(())
}

/// The machine's steal time so far, in ms (`/proc/stat`: time the hypervisor ran something
/// else on this VM's CPUs, summed over them); None where the kernel does not say.
pub fn host_steal_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    // "cpu  user nice system idle iowait irq softirq steal ...", in clock ticks.
    let steal: f64 = stat.lines().next()?.split_whitespace().nth(8)?.parse().ok()?;
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten()?;
    Some(steal * 1000.0 / ticks_per_s as f64)
}
