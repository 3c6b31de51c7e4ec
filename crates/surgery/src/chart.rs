//! The layer-score chart: one panel per metric, one bar per layer scaled to that metric's
//! largest score, the layers the metric would drop in a contrasting colour. SVG, or a
//! self-contained HTML page with the chart and the table.

use std::fmt::Write;

use crate::score::ScoreReport;

const PANEL_HEIGHT: f64 = 150.0;
const BAR_AREA: f64 = 100.0;
const LEFT: f64 = 140.0;
const BAR_PITCH: f64 = 56.0;
const KEEP_COLOUR: &str = "#3b6ea5";
const DROP_COLOUR: &str = "#d1495b";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart as a standalone SVG document; `title` heads it.
pub fn score_svg(report: &ScoreReport, title: &str) -> String {
    let width = LEFT + BAR_PITCH * report.layers as f64 + 20.0;
    let height = 50.0 + PANEL_HEIGHT * report.metrics.len() as f64 + 30.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"##
    );
    let _ = write!(
        svg,
        r##"<rect width="100%" height="100%" fill="white"/><text x="10" y="24" font-size="16" font-weight="bold">{}</text>"##,
        escape(title)
    );
    for (row, m) in report.metrics.iter().enumerate() {
        let top = 50.0 + PANEL_HEIGHT * row as f64;
        let base = top + 20.0 + BAR_AREA;
        let max = m
            .per_layer
            .iter()
            .flatten()
            .fold(0.0f64, |a, &b| a.max(b.abs()));
        let dropped = m.dropped(report.layers).unwrap_or_default();
        let label = match m.metric {
            crate::score::Metric::Angular | crate::score::Metric::AngularLast => {
                format!("{} (span {})", m.metric.name(), report.span)
            }
            other => other.name().to_string(),
        };
        let _ = write!(
            svg,
            r##"<text x="10" y="{}" font-weight="bold">{}</text><text x="10" y="{}" fill="#666">max {max:.3e}</text><line x1="{LEFT}" y1="{base}" x2="{}" y2="{base}" stroke="#999"/>"##,
            top + 60.0,
            escape(&label),
            top + 78.0,
            width - 20.0
        );
        for (layer, value) in m.per_layer.iter().enumerate() {
            let x = LEFT + BAR_PITCH * layer as f64 + 8.0;
            let Some(v) = value else {
                let _ = write!(
                    svg,
                    r##"<text x="{}" y="{}" fill="#999">n/a</text>"##,
                    x + 8.0,
                    base - 4.0
                );
                continue;
            };
            let h = if max > 0.0 {
                BAR_AREA * v.abs() / max
            } else {
                0.0
            };
            let colour = if dropped.contains(&layer) {
                DROP_COLOUR
            } else {
                KEEP_COLOUR
            };
            let _ = write!(
                svg,
                r##"<rect x="{x}" y="{}" width="{}" height="{h}" fill="{colour}"><title>layer {layer}: {v:.4e}</title></rect><text x="{}" y="{}" text-anchor="middle" font-size="10">{v:.2e}</text>"##,
                base - h,
                BAR_PITCH - 16.0,
                x + (BAR_PITCH - 16.0) / 2.0,
                base - h - 3.0
            );
        }
    }
    let axis = 50.0 + PANEL_HEIGHT * report.metrics.len() as f64;
    for layer in 0..report.layers {
        let x = LEFT + BAR_PITCH * layer as f64 + BAR_PITCH / 2.0;
        let _ = write!(
            svg,
            r##"<text x="{x}" y="{}" text-anchor="middle">layer {layer}</text>"##,
            axis - 10.0
        );
    }
    let legend = match report.target_layers {
        Some(k) => format!(
            "red: the layers each metric would drop to keep {k} (higher score = more important)"
        ),
        None => "higher score = more important".to_string(),
    };
    let _ = write!(
        svg,
        r##"<text x="10" y="{}" fill="#444">{}</text></svg>"##,
        axis + 16.0,
        escape(&legend)
    );
    svg
}

/// A self-contained HTML page: the chart, then the scores as a table.
pub fn score_html(report: &ScoreReport, title: &str) -> String {
    let mut table = String::from("<table><tr><th>layer</th>");
    for m in &report.metrics {
        let _ = write!(table, "<th>{}</th>", m.metric.name());
    }
    table += "</tr>";
    for layer in 0..report.layers {
        let _ = write!(table, "<tr><td>{layer}</td>");
        for m in &report.metrics {
            let dropped = m
                .dropped(report.layers)
                .unwrap_or_default()
                .contains(&layer);
            let cell = m.per_layer[layer].map_or("n/a".into(), |v| format!("{v:.4e}"));
            let class = if dropped { " class=\"drop\"" } else { "" };
            let _ = write!(table, "<td{class}>{cell}</td>");
        }
        table += "</tr>";
    }
    table += "</table>";
    format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-top:1em}}\
         td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td.drop{{color:{DROP_COLOUR};font-weight:bold}}\
         </style></head><body>{svg}<p>{n} calibration sentences, {p} positive pairs.</p>{table}</body></html>\n",
        t = escape(title),
        svg = score_svg(report, title),
        n = report.sentences,
        p = report.pairs,
    )
}
