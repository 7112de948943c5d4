//! The convergence curve of a training run as a standalone SVG image:
//! training objective and test AUC against wall time, in two stacked panels
//! that share the time axis.
//!
//! Hand-written SVG keeps the crate free of a plotting dependency; the image
//! is small enough that string formatting is the simplest correct tool.
//! Every number printed is finite, every text is escaped, so the output is
//! well-formed XML for any input.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One point of the convergence curve.
///
/// Objective points come once per iteration; test scores come less often
/// (every evaluation), so a point may carry only one of the two: a missing
/// objective is NaN (stored as JSON `null`) and a missing test score is
/// `None`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Seconds since training began.
    #[serde(with = "finite_or_null")]
    pub seconds: f64,
    /// Training log-loss per example at this point; NaN when unknown.
    #[serde(with = "finite_or_null")]
    pub objective: f64,
    /// Test AUC measured at this point, if one was.
    #[serde(default)]
    pub test_auc: Option<f64>,
    /// Test log-loss measured at this point, if one was.
    #[serde(default)]
    pub test_logloss: Option<f64>,
    /// The iteration (clock) reached.
    pub iteration: u64,
}

/// Serde helper for `f64` fields that may be NaN or infinite: JSON has no
/// such numbers and `serde_json` writes them as `null`, which it then refuses
/// to read back as `f64`. Writing `null` and reading it as NaN makes every
/// value round-trip (infinities come back as NaN, still "not a number").
pub mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes finite values as numbers and the rest as `null`.
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    /// Reads numbers as themselves and `null` as NaN.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

// Layout, in SVG user units (pixels at 100 %).
const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 560.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 736.0;
const TOP_PANEL: (f64, f64) = (56.0, 266.0);
const BOTTOM_PANEL: (f64, f64) = (300.0, 480.0);
const OBJECTIVE_COLOR: &str = "#1f77b4";
const AUC_COLOR: &str = "#d62728";

/// Renders `curve` under `title` as a complete SVG document.
///
/// Top panel: the objective (training log-loss per example) of every point
/// whose objective is finite, as a line. Bottom panel: the test AUC of every
/// point that has one, as a line with a marker per point. Both share the
/// time axis, which starts at 0 (training start) unless times are negative.
/// Points with a non-finite time or value are left out of that series;
/// an empty series leaves its panel with a "no data" note.
pub fn svg(curve: &[CurvePoint], title: &str) -> String {
    let objective: Vec<(f64, f64)> = curve
        .iter()
        .filter(|p| p.seconds.is_finite() && p.objective.is_finite())
        .map(|p| (p.seconds, p.objective))
        .collect();
    let auc: Vec<(f64, f64)> = curve
        .iter()
        .filter_map(|p| Some((p.seconds, p.test_auc?)))
        .filter(|(s, a)| s.is_finite() && a.is_finite())
        .collect();

    let times = objective.iter().chain(&auc).map(|p| p.0);
    let x_axis = match bounds(times) {
        Some((lo, hi)) => Axis::nice(lo.min(0.0), hi),
        None => Axis::nice(0.0, 1.0),
    };

    let mut out = String::with_capacity(4096 + 24 * (objective.len() + auc.len()));
    let _ = write!(
        out,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{cx}\" y=\"30\" text-anchor=\"middle\" font-size=\"16\" \
         font-weight=\"bold\">{t}</text>\n",
        w = WIDTH,
        h = HEIGHT,
        cx = num((LEFT + RIGHT) / 2.0),
        t = escape(title),
    );

    panel(
        &mut out,
        &Series {
            points: &objective,
            class: "objective",
            color: OBJECTIVE_COLOR,
            y_title: "objective (log-loss / example)",
            markers: objective.len() == 1,
        },
        &x_axis,
        TOP_PANEL,
        false,
    );
    panel(
        &mut out,
        &Series {
            points: &auc,
            class: "auc",
            color: AUC_COLOR,
            y_title: "test AUC",
            markers: true,
        },
        &x_axis,
        BOTTOM_PANEL,
        true,
    );

    let _ = write!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time (s)</text>\n</svg>\n",
        num((LEFT + RIGHT) / 2.0),
        num(BOTTOM_PANEL.1 + 44.0),
    );
    out
}

/// One panel's data and looks.
struct Series<'a> {
    /// (seconds, value) pairs, all finite.
    points: &'a [(f64, f64)],
    /// The `class` attribute of its line, so tools and tests can find it.
    class: &'a str,
    color: &'a str,
    y_title: &'a str,
    /// Draw a circle at each point (a lone point draws no line).
    markers: bool,
}

/// Draws one panel spanning `top..bottom` vertically: grid, axes, tick
/// labels, the series. Only the bottom panel labels the time ticks, since
/// the axis is shared.
fn panel(out: &mut String, s: &Series, x: &Axis, (top, bottom): (f64, f64), x_labels: bool) {
    let y = match bounds(s.points.iter().map(|p| p.1)) {
        Some((lo, hi)) => Axis::nice(lo, hi),
        None => Axis::nice(0.0, 1.0),
    };
    let px = |v: f64| x.map(v, LEFT, RIGHT);
    let py = |v: f64| y.map(v, bottom, top);

    let _ = writeln!(out, "<g class=\"panel-{}\">", s.class);
    for &t in &x.ticks {
        let gx = num(px(t));
        let _ = writeln!(
            out,
            "<line x1=\"{gx}\" y1=\"{}\" x2=\"{gx}\" y2=\"{}\" stroke=\"#e0e0e0\"/>",
            num(top),
            num(bottom)
        );
        if x_labels {
            let _ = writeln!(
                out,
                "<text x=\"{gx}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                num(bottom + 18.0),
                x.label(t)
            );
        }
    }
    for &t in &y.ticks {
        let gy = num(py(t));
        let _ = writeln!(
            out,
            "<line x1=\"{}\" y1=\"{gy}\" x2=\"{}\" y2=\"{gy}\" stroke=\"#e0e0e0\"/>\n\
             <text x=\"{}\" y=\"{gy}\" text-anchor=\"end\" dominant-baseline=\"middle\">{}</text>",
            num(LEFT),
            num(RIGHT),
            num(LEFT - 6.0),
            y.label(t)
        );
    }
    let _ = writeln!(
        out,
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333333\"/>",
        num(LEFT),
        num(top),
        num(RIGHT - LEFT),
        num(bottom - top)
    );
    let mid = num((top + bottom) / 2.0);
    let _ = writeln!(
        out,
        "<text x=\"18\" y=\"{mid}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {mid})\">{}</text>",
        escape(s.y_title)
    );

    if s.points.is_empty() {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{mid}\" text-anchor=\"middle\" fill=\"#888888\">no data</text>",
            num((LEFT + RIGHT) / 2.0)
        );
    } else {
        let _ = write!(
            out,
            "<polyline class=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"",
            s.class, s.color
        );
        for (i, &(t, v)) in s.points.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            let _ = write!(out, "{sep}{},{}", num(px(t)), num(py(v)));
        }
        out.push_str("\"/>\n");
        if s.markers {
            for &(t, v) in s.points {
                let _ = writeln!(
                    out,
                    "<circle cx=\"{}\" cy=\"{}\" r=\"2.5\" fill=\"{}\"/>",
                    num(px(t)),
                    num(py(v)),
                    s.color
                );
            }
        }
    }
    out.push_str("</g>\n");
}

/// The smallest and largest of `values`, if any.
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// An axis: the value range it shows and where its ticks are.
#[derive(Debug)]
struct Axis {
    lo: f64,
    hi: f64,
    /// Tick spacing; NaN when the ticks are just the two ends (extreme
    /// ranges where round numbers do not exist in `f64`).
    step: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// An axis covering `[min, max]` (finite, `min <= max`) with about five
    /// ticks at round numbers (1, 2 or 5 times a power of ten), widened to
    /// the enclosing ticks. A zero-width range is padded so a constant
    /// series sits in the middle of its panel.
    fn nice(min: f64, max: f64) -> Axis {
        let (min, max) = if max > min {
            (min, max)
        } else {
            let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.05 };
            ((min - pad).max(f64::MIN), (max + pad).min(f64::MAX))
        };
        let ends = Axis {
            lo: min,
            hi: max,
            step: f64::NAN,
            ticks: vec![min, max],
        };
        // Halving before subtracting keeps the span finite for any finite
        // ends; the factor 2 is put back in the step.
        let raw = (max / 2.0 - min / 2.0) / 2.5;
        if !(raw.is_finite() && raw > 0.0) {
            return ends;
        }
        let mag = 10f64.powf(raw.log10().floor());
        let norm = raw / mag;
        let step = mag
            * if norm < 1.5 {
                1.0
            } else if norm < 3.5 {
                2.0
            } else if norm < 7.5 {
                5.0
            } else {
                10.0
            };
        let lo = (min / step).floor() * step;
        let hi = (max / step).ceil() * step;
        let n = ((hi - lo) / step).round();
        if !(lo.is_finite() && hi.is_finite() && step > 0.0 && (1.0..=20.0).contains(&n)) {
            return ends;
        }
        let ticks = (0..=n as u32).map(|i| lo + f64::from(i) * step).collect();
        Axis {
            lo,
            hi,
            step,
            ticks,
        }
    }

    /// Position of `v` on a line from `a` (at `lo`) to `b` (at `hi`).
    fn map(&self, v: f64, a: f64, b: f64) -> f64 {
        let t = (v / 2.0 - self.lo / 2.0) / (self.hi / 2.0 - self.lo / 2.0);
        let t = if t.is_finite() {
            t.clamp(0.0, 1.0)
        } else {
            0.5
        };
        a + t * (b - a)
    }

    /// A tick's label, with as many decimals as the step needs, or in
    /// scientific notation for very large or very small magnitudes.
    fn label(&self, v: f64) -> String {
        // Adding 0.0 turns -0.0 into 0.0, so no "-0" label appears.
        let v = v + 0.0;
        if !v.is_finite() {
            return String::new();
        }
        let scale = if self.step.is_finite() {
            self.step
        } else {
            v.abs()
        };
        if v != 0.0 && (v.abs() >= 1e6 || scale < 1e-4) {
            return format!("{v:.2e}");
        }
        let decimals = if self.step.is_finite() {
            (-self.step.log10().floor()).clamp(0.0, 6.0) as usize
        } else {
            2
        };
        // Rounding can leave a -0.000 for a tick that should be 0.
        let s = format!("{v:.decimals$}");
        if s.trim_start_matches('-')
            .chars()
            .all(|c| c == '0' || c == '.')
        {
            s.trim_start_matches('-').to_string()
        } else {
            s
        }
    }
}

/// A coordinate, to two decimals; never NaN or infinite in the output.
fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "0".to_string()
    }
}

/// `s` as XML character data or attribute text: markup characters escaped
/// and characters XML 1.0 forbids (most control characters) dropped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal XML well-formedness check: one root element, tags balanced
    /// and properly nested, attributes quoted and unique, no raw `<` or bare
    /// `&` in text or attribute values. Returns the element names in order.
    fn check_xml(doc: &str) -> Result<Vec<String>, String> {
        fn check_text(t: &str) -> Result<(), String> {
            if t.contains('<') {
                return Err(format!("raw '<' in {t:?}"));
            }
            let mut rest = t;
            while let Some(i) = rest.find('&') {
                rest = &rest[i + 1..];
                let end = rest.find(';').ok_or_else(|| format!("bare '&' in {t:?}"))?;
                let name = &rest[..end];
                let ok = matches!(name, "amp" | "lt" | "gt" | "quot" | "apos")
                    || (name.starts_with('#') && name.len() > 1);
                if !ok {
                    return Err(format!("unknown entity &{name};"));
                }
            }
            if t.chars()
                .any(|c| (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r'))
            {
                return Err("control character".into());
            }
            Ok(())
        }
        fn is_name(s: &str) -> bool {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.'))
                && !s.starts_with(|c: char| c.is_ascii_digit() || c == '-')
        }

        let mut rest = doc
            .strip_prefix("<?xml")
            .and_then(|r| r.split_once("?>"))
            .map(|(_, r)| r)
            .ok_or("no XML declaration")?;
        let mut stack: Vec<String> = Vec::new();
        let mut names = Vec::new();
        let mut roots = 0;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            if stack.is_empty() && !text.trim().is_empty() {
                return Err(format!("text outside the root: {text:?}"));
            }
            check_text(text)?;
            let close = rest[open..].find('>').ok_or("unclosed tag")? + open;
            let tag = &rest[open + 1..close];
            rest = &rest[close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                match stack.pop() {
                    Some(top) if top == name.trim() => {}
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
                continue;
            }
            let (body, empty) = match tag.strip_suffix('/') {
                Some(b) => (b, true),
                None => (tag, false),
            };
            let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
            let name = &body[..name_end];
            if !is_name(name) {
                return Err(format!("bad element name {name:?}"));
            }
            // Attributes: name="value" pairs, separated by whitespace.
            let mut attrs = body[name_end..].trim_start();
            let mut seen = Vec::new();
            while !attrs.is_empty() {
                let (an, after) = attrs.split_once('=').ok_or("attribute without value")?;
                if !is_name(an) || seen.contains(&an) {
                    return Err(format!("bad or repeated attribute {an:?}"));
                }
                seen.push(an);
                let after = after.strip_prefix('"').ok_or("unquoted attribute")?;
                let (value, tail) = after.split_once('"').ok_or("unterminated attribute")?;
                check_text(value)?;
                if !(tail.is_empty() || tail.starts_with(char::is_whitespace)) {
                    return Err("attributes not separated".into());
                }
                attrs = tail.trim_start();
            }
            if stack.is_empty() {
                roots += 1;
            }
            names.push(name.to_string());
            if !empty {
                stack.push(name.to_string());
            }
        }
        if !rest.trim().is_empty() {
            return Err("text after the root".into());
        }
        if !stack.is_empty() || roots != 1 {
            return Err(format!("unclosed {stack:?} or {roots} roots"));
        }
        Ok(names)
    }

    /// The number of points of the polyline of class `class`, if present.
    fn polyline_points(doc: &str, class: &str) -> Option<usize> {
        let start = doc.find(&format!("<polyline class=\"{class}\""))?;
        let tag = &doc[start..start + doc[start..].find("/>")?];
        let pts = tag.split("points=\"").nth(1)?.split('"').next()?;
        Some(pts.split_whitespace().count())
    }

    fn point(seconds: f64, objective: f64, auc: Option<f64>, iteration: u64) -> CurvePoint {
        CurvePoint {
            seconds,
            objective,
            test_auc: auc,
            test_logloss: None,
            iteration,
        }
    }

    fn assert_clean(doc: &str) {
        check_xml(doc).unwrap_or_else(|e| panic!("not well-formed: {e}\n{doc}"));
        assert!(!doc.contains("NaN") && !doc.contains("inf"), "{doc}");
        assert!(doc.contains("<svg ") && doc.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn checker_rejects_broken_xml() {
        let head = "<?xml version=\"1.0\"?>";
        for bad in [
            "<a><b></a></b>",
            "<a>",
            "<a x=\"1\" x=\"2\"/>",
            "<a x=1/>",
            "<a>&</a>",
            "<a>1 < 2</a>",
            "<a/><b/>",
        ] {
            assert!(check_xml(&format!("{head}{bad}")).is_err(), "{bad}");
        }
        assert!(check_xml(&format!("{head}<a x=\"&amp;\"><b/>t&lt;</a>")).is_ok());
    }

    #[test]
    fn typical_curve() {
        let curve: Vec<CurvePoint> = (0..10)
            .map(|i| {
                let t = f64::from(i) * 0.4;
                let auc = (i % 3 == 0).then(|| 0.7 + 0.01 * f64::from(i));
                point(t, 0.69 / (1.0 + t), auc, u64::from(i as u32))
            })
            .collect();
        let doc = svg(&curve, "dbpg on flights");
        assert_clean(&doc);
        assert_eq!(polyline_points(&doc, "objective"), Some(10));
        assert_eq!(polyline_points(&doc, "auc"), Some(4));
        assert_eq!(doc.matches("<circle").count(), 4);
        assert!(doc.contains("dbpg on flights"));
        assert!(doc.contains("time (s)") && doc.contains("test AUC"));
        // Round tick labels on the time axis.
        assert!(
            doc.contains(">0.0</text>") || doc.contains(">0</text>"),
            "{doc}"
        );
    }

    #[test]
    fn empty_curve() {
        let doc = svg(&[], "");
        assert_clean(&doc);
        assert_eq!(polyline_points(&doc, "objective"), None);
        assert_eq!(polyline_points(&doc, "auc"), None);
        assert_eq!(doc.matches("no data").count(), 2);
    }

    #[test]
    fn single_point() {
        let doc = svg(&[point(1.5, 0.5, Some(0.8), 1)], "one");
        assert_clean(&doc);
        assert_eq!(polyline_points(&doc, "objective"), Some(1));
        assert_eq!(polyline_points(&doc, "auc"), Some(1));
        // A lone point draws no line, so both series get a marker.
        assert_eq!(doc.matches("<circle").count(), 2);
    }

    #[test]
    fn non_finite_points_are_skipped() {
        let curve = [
            point(0.0, 0.7, Some(f64::NAN), 0),
            point(1.0, f64::NAN, Some(0.75), 1),
            point(f64::INFINITY, 0.5, Some(0.8), 2),
            point(2.0, f64::NEG_INFINITY, None, 3),
            point(3.0, 0.4, Some(0.81), 4),
            point(f64::NAN, 0.3, None, 5),
        ];
        let doc = svg(&curve, "gaps");
        assert_clean(&doc);
        assert_eq!(polyline_points(&doc, "objective"), Some(2));
        assert_eq!(polyline_points(&doc, "auc"), Some(2));
    }

    #[test]
    fn constant_series() {
        let curve: Vec<CurvePoint> = (0..5)
            .map(|i| point(f64::from(i), 0.25, Some(0.5), 0))
            .collect();
        let doc = svg(&curve, "flat");
        assert_clean(&doc);
        assert_eq!(polyline_points(&doc, "objective"), Some(5));
        // Padded, so the flat line has ticks above and below it.
        let zeros: Vec<CurvePoint> = (0..3).map(|i| point(0.0, 0.0, None, i)).collect();
        assert_clean(&svg(&zeros, "zero"));
    }

    #[test]
    fn title_is_escaped() {
        let doc = svg(&[], "a<b & \"c\" 'd'>\u{0}\u{7}");
        assert_clean(&doc);
        assert!(doc.contains("a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;"));
    }

    #[test]
    fn extreme_values() {
        let curve = [
            point(0.0, f64::MAX, Some(-f64::MAX), 0),
            point(f64::MAX, -f64::MAX, Some(f64::MIN_POSITIVE), 1),
            point(1e-300, 1e-310, Some(f64::MAX), 2),
        ];
        assert_clean(&svg(&curve, "extremes"));
        let tiny = [point(0.0, 1e-310, None, 0), point(1e-310, 2e-310, None, 1)];
        assert_clean(&svg(&tiny, "tiny"));
    }

    #[test]
    fn nice_ticks_are_round() {
        let a = Axis::nice(0.0, 9.3);
        assert_eq!(a.ticks, vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let a = Axis::nice(0.712, 0.803);
        assert!((a.step - 0.02).abs() < 1e-12);
        assert_eq!(a.label(a.ticks[1]), "0.72");
        assert!(a.lo <= 0.712 && a.hi >= 0.803);
        assert_eq!(Axis::nice(-0.3, 0.3).label(0.0), "0.0");
    }

    #[test]
    fn curve_point_json_round_trips_non_finite() {
        let p = point(1.0, f64::NAN, Some(0.8), 3);
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("\"objective\":null"));
        let back: CurvePoint = serde_json::from_str(&json).unwrap();
        assert!(back.objective.is_nan());
        assert_eq!(back.test_auc, Some(0.8));
        assert_eq!(back.iteration, 3);
    }

    proptest! {
        #[test]
        fn any_curve_gives_well_formed_svg(
            pts in prop::collection::vec(
                (any::<f64>(), any::<f64>(), prop::option::of(any::<f64>()), any::<u64>()),
                0..30,
            ),
            title in ".{0,20}",
        ) {
            let curve: Vec<CurvePoint> =
                pts.into_iter().map(|(s, o, a, i)| point(s, o, a, i)).collect();
            let doc = svg(&curve, &title);
            prop_assert!(check_xml(&doc).is_ok(), "{:?}", check_xml(&doc));
            let finite = curve
                .iter()
                .filter(|p| p.seconds.is_finite() && p.objective.is_finite())
                .count();
            prop_assert_eq!(
                polyline_points(&doc, "objective"),
                (finite > 0).then_some(finite)
            );
            let body = doc.replace(&escape(&title), "");
            prop_assert!(!body.contains("NaN") && !body.contains("inf"));
        }
    }
}
