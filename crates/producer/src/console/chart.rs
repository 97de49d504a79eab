//! The last day of one integration as a small server-rendered SVG: stacked bars of
//! synced / skipped / failed events per hour, and the hour's p99 event age as a line on
//! a logarithmic scale. Pure: hours in, markup out.

use maud::{Markup, html};
use thena_store::ledger::hourly::HourBar;

use super::views::millis;

// About the size it is drawn in a list card, so its text reads at ~10 px.
const WIDTH: f64 = 320.0;
const HEIGHT: f64 = 110.0;
const LEFT: f64 = 26.0;
const RIGHT: f64 = 32.0;
const TOP: f64 = 8.0;
const BOTTOM: f64 = 16.0;
/// The age axis: 100 ms at the bottom, 1 h at the top.
const AGE_MIN_MS: f64 = 100.0;
const AGE_MAX_MS: f64 = 3_600_000.0;

/// The chart of `hours` (oldest first).
pub(crate) fn hourly(hours: &[HourBar]) -> Markup {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / hours.len().max(1) as f64;
    let peak = hours
        .iter()
        .map(|h| h.synced + h.skipped + h.failed)
        .max()
        .unwrap_or(0)
        .max(1);
    let scale = |n: i64| n as f64 / peak as f64 * plot_h;
    let ages: Vec<(f64, f64)> = hours
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            let ms = match (h.p99_age_ms, h.p99_over_last_bound) {
                (Some(ms), _) => ms as f64,
                (None, true) => AGE_MAX_MS,
                (None, false) => return None,
            };
            Some((
                LEFT + slot * (i as f64 + 0.5),
                TOP + plot_h - age_y(ms) * plot_h,
            ))
        })
        .collect();
    let label = format!(
        "Events per hour over the last {} hours (synced, skipped, failed) and p99 event age",
        hours.len()
    );
    html! {
        svg.chart viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(label) {
            line.axis x1=(LEFT) y1=(TOP + plot_h) x2=(WIDTH - RIGHT) y2=(TOP + plot_h) {}
            text x="0" y=(TOP + 8.0) { (peak) "/h" }
            text x="0" y=(TOP + plot_h) { "0" }
            text x=(WIDTH - RIGHT + 3.0) y=(TOP + 8.0) { "1 h" }
            text x=(WIDTH - RIGHT + 3.0) y=(TOP + plot_h - age_y(1_000.0) * plot_h + 3.0) { "1 s" }
            text x=(WIDTH - RIGHT + 3.0) y=(TOP + plot_h - age_y(60_000.0) * plot_h + 3.0) { "1 min" }
            text x=(LEFT) y=(HEIGHT - 3.0) { (hours.len()) " h ago" }
            text x=(WIDTH - RIGHT) y=(HEIGHT - 3.0) text-anchor="end" { "now" }
            @for (i, h) in hours.iter().enumerate() {
                @let x = LEFT + slot * i as f64 + slot * 0.1;
                @let w = slot * 0.8;
                @let base = TOP + plot_h;
                g {
                    title { (bar_title(h)) }
                    @for (class, below, n) in [("synced", 0, h.synced), ("skipped", h.synced, h.skipped), ("failed", h.synced + h.skipped, h.failed)] {
                        @if n > 0 {
                            rect class=(class) x=(fmt(x)) y=(fmt(base - scale(below + n))) width=(fmt(w)) height=(fmt(scale(n))) {}
                        }
                    }
                }
            }
            @if ages.len() > 1 {
                polyline.age points=(points(&ages)) {}
            }
            @for (x, y) in &ages {
                circle.age cx=(fmt(*x)) cy=(fmt(*y)) r="1.8" {}
            }
        }
        p.legend {
            span { i.synced {} "synced" }
            span { i.skipped {} "skipped" }
            span { i.failed {} "failed (retried or parked)" }
            span { i.age {} "p99 event age" }
        }
    }
}

/// Where an age sits on the log axis, 0 (100 ms) to 1 (1 h).
fn age_y(ms: f64) -> f64 {
    let clamped = ms.clamp(AGE_MIN_MS, AGE_MAX_MS);
    (clamped.log10() - AGE_MIN_MS.log10()) / (AGE_MAX_MS.log10() - AGE_MIN_MS.log10())
}

fn bar_title(h: &HourBar) -> String {
    let age = match (h.p99_age_ms, h.p99_over_last_bound) {
        (Some(ms), _) => format!(", p99 age ≤ {}", millis(ms)),
        (None, true) => ", p99 age over 1 h".to_owned(),
        (None, false) => String::new(),
    };
    format!(
        "{} UTC: {} synced, {} skipped, {} failed, {} waiting{age}",
        h.hour.format("%H:%M"),
        h.synced,
        h.skipped,
        h.failed,
        h.waiting
    )
}

fn fmt(v: f64) -> String {
    format!("{v:.1}")
}

fn points(points: &[(f64, f64)]) -> String {
    points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeDelta, Utc};

    use super::*;

    fn hours(n: usize) -> Vec<HourBar> {
        let start: DateTime<Utc> = "2026-12-02T00:00:00Z".parse().unwrap();
        (0..n)
            .map(|i| HourBar {
                hour: start + TimeDelta::hours(i as i64),
                ..HourBar::default()
            })
            .collect()
    }

    #[test]
    fn bars_stack_to_the_busiest_hour_and_the_age_is_a_line() {
        let mut bars = hours(24);
        bars[3].synced = 10;
        bars[3].skipped = 5;
        bars[3].failed = 5;
        bars[3].p99_age_ms = Some(1_000);
        bars[4].synced = 2;
        bars[4].p99_age_ms = Some(60_000);
        let svg = hourly(&bars).into_string();
        assert!(svg.contains("20/h"), "{svg}");
        assert_eq!(svg.matches("<rect").count(), 4, "{svg}");
        assert!(svg.contains("<polyline"), "{svg}");
        assert!(
            svg.contains("03:00 UTC: 10 synced, 5 skipped, 5 failed, 0 waiting, p99 age ≤ 1.0 s"),
            "{svg}"
        );
        // The busiest hour fills the plot: its top is the plot's top.
        assert!(svg.contains(&format!("y=\"{TOP:.1}\"")), "{svg}");
    }

    #[test]
    fn an_idle_day_draws_no_bar_and_no_line() {
        let svg = hourly(&hours(24)).into_string();
        assert_eq!(svg.matches("<rect").count(), 0);
        assert!(!svg.contains("<polyline"));
        assert!(svg.contains("1/h"));
    }

    #[test]
    fn ages_map_onto_a_log_axis() {
        assert_eq!(age_y(50.0), 0.0);
        assert_eq!(age_y(AGE_MAX_MS * 2.0), 1.0);
        let one_s = age_y(1_000.0);
        let one_min = age_y(60_000.0);
        assert!(0.0 < one_s && one_s < one_min && one_min < 1.0);
    }
}
