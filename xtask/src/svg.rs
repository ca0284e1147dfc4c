//! Hand-written SVG line charts (standard library only, so `cargo xtask bench`
//! needs no system libraries): one line per series, markers at the points,
//! log axes when every value is positive, a legend on the right.

use std::fmt::Write as _;

/// One named line of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// What to draw.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 440.0;
/// Plot area: left, top, right, bottom edges.
const LEFT: f64 = 80.0;
const TOP: f64 = 40.0;
const RIGHT: f64 = WIDTH - 200.0;
const BOTTOM: f64 = HEIGHT - 55.0;
/// Colour-blind-friendly palette (Okabe-Ito, its pale yellow darkened), cycled.
const COLORS: &[&str] = &["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C6D1F"];

/// A value axis mapped onto [0, 1].
#[derive(Clone, Copy, Debug, PartialEq)]
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
}

impl Axis {
    /// Log if every value is positive, else linear; rounded out to ticks.
    fn fit(values: impl Iterator<Item = f64> + Clone) -> Self {
        let (min, max) = values.clone().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        if !min.is_finite() {
            return Self { log: false, lo: 0.0, hi: 1.0 };
        }
        if min > 0.0 {
            let lo = 10f64.powf(min.log10().floor());
            let mut hi = 10f64.powf(max.log10().ceil());
            if hi <= lo {
                hi = lo * 10.0;
            }
            return Self { log: true, lo, hi };
        }
        let step = nice_step((max - min.min(0.0)) / 5.0);
        let lo = (min.min(0.0) / step).floor() * step;
        let hi = ((max / step).ceil() * step).max(lo + step);
        Self { log: false, lo, hi }
    }

    /// Where `v` lies, 0 at `lo` and 1 at `hi`.
    fn pos(&self, v: f64) -> f64 {
        if self.log {
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    /// Tick values: each decade (plus 2x and 5x when it spans few) or
    /// evenly spaced nice steps.
    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (first, last) = (self.lo.log10().round() as i32, self.hi.log10().round() as i32);
            let few = last - first <= 2;
            let mut out = Vec::new();
            for e in first..=last {
                let base = 10f64.powi(e);
                out.push(base);
                if few && e < last {
                    out.extend([2.0 * base, 5.0 * base]);
                }
            }
            out
        } else {
            let step = nice_step((self.hi - self.lo) / 5.0);
            let n = ((self.hi - self.lo) / step).round() as usize;
            (0..=n).map(|i| self.lo + i as f64 * step).collect()
        }
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let base = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * base).find(|s| *s >= raw * 0.999).unwrap_or(10.0 * base)
}

/// A tick label: `1k`, `10M`, `0.5`, `12`.
pub fn fmt_num(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    for (div, suffix) in [(1e9, "G"), (1e6, "M"), (1e3, "k")] {
        if v.abs() >= div {
            return trim(format!("{:.2}", v / div)) + suffix;
        }
    }
    if v != 0.0 && v.abs() < 1e-3 {
        let sci = format!("{v:.2e}");
        let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
        return format!("{}e{exp}", trim(mantissa.to_string()));
    }
    trim(format!("{v:.3}"))
}

/// How series `i` is drawn: a colour, and past the palette a dash pattern
/// and marker shape, so up to 24 series stay distinct.
struct Style {
    color: &'static str,
    dash: &'static str,
    shape: usize,
}

impl Style {
    fn nth(i: usize) -> Self {
        let round = i / COLORS.len() % 3;
        Self { color: COLORS[i % COLORS.len()], dash: ["", "6 3", "2 2"][round], shape: round }
    }

    fn stroke(&self) -> String {
        let dash = if self.dash.is_empty() { String::new() } else { format!(r#" stroke-dasharray="{}""#, self.dash) };
        format!(r#"stroke="{}" stroke-width="2"{dash}"#, self.color)
    }

    /// A circle, square or triangle at (x, y) with a hover title (escaped).
    fn marker(&self, x: f64, y: f64, title: &str) -> String {
        let c = self.color;
        let (body, end) = match self.shape {
            0 => (format!(r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{c}">"#), "</circle>"),
            1 => {
                (format!(r#"<rect x="{:.1}" y="{:.1}" width="7" height="7" fill="{c}">"#, x - 3.5, y - 3.5), "</rect>")
            }
            _ => (
                format!(
                    r#"<polygon points="{x:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{c}">"#,
                    y - 4.5,
                    x - 4.0,
                    y + 3.5,
                    x + 4.0,
                    y + 3.5
                ),
                "</polygon>",
            ),
        };
        format!("{body}<title>{title}</title>{end}")
    }
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Points sorted by x, duplicates of one x averaged, non-finite dropped.
fn clean(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64, usize)> = Vec::new();
    for (x, y) in p {
        match out.last_mut() {
            Some(last) if last.0 == x => {
                last.1 += y;
                last.2 += 1;
            }
            _ => out.push((x, y, 1)),
        }
    }
    out.into_iter().map(|(x, y, n)| (x, y / n as f64)).collect()
}

/// The whole SVG document.
pub fn line_chart(chart: &Chart<'_>) -> String {
    let series: Vec<(&str, Vec<(f64, f64)>)> =
        chart.series.iter().map(|s| (s.name.as_str(), clean(&s.points))).filter(|(_, p)| !p.is_empty()).collect();
    let all = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let (xa, ya) = (Axis::fit(all().map(|p| p.0)), Axis::fit(all().map(|p| p.1)));
    let px = |v: f64| LEFT + xa.pos(v) * (RIGHT - LEFT);
    let py = |v: f64| BOTTOM - ya.pos(v) * (BOTTOM - TOP);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        (LEFT + RIGHT) / 2.0,
        esc(chart.title)
    );
    axes(&mut s, chart, xa, ya);
    if series.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#666">no data</text>"##,
            (LEFT + RIGHT) / 2.0,
            (TOP + BOTTOM) / 2.0
        );
    }
    let spacing = ((HEIGHT - TOP - 10.0) / series.len().max(1) as f64).min(20.0);
    for (i, (name, points)) in series.iter().enumerate() {
        let style = Style::nth(i);
        let path: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = writeln!(s, r#"<polyline fill="none" {} points="{}"/>"#, style.stroke(), path.join(" "));
        for &(x, y) in points {
            let title = format!("{}: x={} y={}", esc(name), fmt_num(x), fmt_num(y));
            let _ = writeln!(s, "{}", style.marker(px(x), py(y), &title));
        }
        let ly = TOP + 10.0 + i as f64 * spacing;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" {}/>"#,
            RIGHT + 15.0,
            RIGHT + 40.0,
            style.stroke()
        );
        let _ = writeln!(s, "{}", style.marker(RIGHT + 27.5, ly, &esc(name)));
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, RIGHT + 47.0, ly + 4.0, esc(name));
    }
    s.push_str("</svg>\n");
    s
}

/// Frame, grid lines, tick labels and axis titles.
fn axes(s: &mut String, chart: &Chart<'_>, xa: Axis, ya: Axis) {
    let grid = r##"stroke="#ddd" stroke-width="1""##;
    for t in xa.ticks() {
        let x = LEFT + xa.pos(t) * (RIGHT - LEFT);
        let _ = writeln!(s, r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{BOTTOM}" {grid}/>"#);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#, BOTTOM + 16.0, fmt_num(t));
    }
    for t in ya.ticks() {
        let y = BOTTOM - ya.pos(t) * (BOTTOM - TOP);
        let _ = writeln!(s, r#"<line x1="{LEFT}" y1="{y:.1}" x2="{RIGHT}" y2="{y:.1}" {grid}/>"#);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 6.0, y + 4.0, fmt_num(t));
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        RIGHT - LEFT,
        BOTTOM - TOP
    );
    let scale = |a: Axis| if a.log { " (log)" } else { "" };
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}{}</text>"#,
        (LEFT + RIGHT) / 2.0,
        HEIGHT - 15.0,
        esc(chart.x_label),
        scale(xa)
    );
    let (cx, cy) = (20.0, (TOP + BOTTOM) / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{cx}" y="{cy}" text-anchor="middle" transform="rotate(-90 {cx} {cy})">{}{}</text>"#,
        esc(chart.y_label),
        scale(ya)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_axis_spans_decades() {
        let a = Axis::fit([512.0, 262_144.0].into_iter());
        assert_eq!(a, Axis { log: true, lo: 100.0, hi: 1e6 });
        assert_eq!(a.ticks(), vec![100.0, 1e3, 1e4, 1e5, 1e6]);
        assert!((a.pos(1e4) - 0.5).abs() < 1e-12);
        let narrow = Axis::fit([2.0, 3.0].into_iter());
        assert_eq!(narrow.ticks(), vec![1.0, 2.0, 5.0, 10.0]);
    }

    #[test]
    fn linear_axis_when_not_positive() {
        let a = Axis::fit([0.0, 7.0].into_iter());
        assert!(!a.log);
        assert_eq!((a.lo, a.hi), (0.0, 8.0));
        assert_eq!(a.ticks(), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
    }

    #[test]
    fn labels() {
        assert_eq!(fmt_num(1000.0), "1k");
        assert_eq!(fmt_num(16384.0), "16.38k");
        assert_eq!(fmt_num(1e6), "1M");
        assert_eq!(fmt_num(0.5), "0.5");
        assert_eq!(fmt_num(12.0), "12");
        assert_eq!(fmt_num(0.0001), "1e-4");
        assert_eq!(fmt_num(0.00025), "2.5e-4");
    }

    #[test]
    fn chart_has_every_series_and_averages_duplicates() {
        let series = [
            Series { name: "range_fault".into(), points: vec![(512.0, 2.0), (16384.0, 1.0), (512.0, 4.0)] },
            Series { name: "a<b".into(), points: vec![(512.0, 10.0)] },
        ];
        let svg = line_chart(&Chart { title: "t", x_label: "x", y_label: "y", series: &series });
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("range_fault: x=512 y=3</title>"));
        assert!(svg.contains("a&lt;b"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        let many: Vec<Series> =
            (0..10).map(|i| Series { name: format!("s{i}"), points: vec![(1.0, 1.0 + i as f64)] }).collect();
        let svg = line_chart(&Chart { title: "t", x_label: "x", y_label: "y", series: &many });
        assert_eq!((svg.matches("<rect x=").count(), svg.matches("stroke-dasharray").count()), (2 * 2 + 1, 2 * 2));
        let empty = line_chart(&Chart { title: "t", x_label: "x", y_label: "y", series: &[] });
        assert!(empty.contains("no data"));
    }
}
