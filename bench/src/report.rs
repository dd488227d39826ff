//! RESULTS.md and the SVG charts: each section of the bench hands back a [`Section`] (prose,
//! tables, optional bar chart) and this module lays them out. Pure formatting, tested on the
//! host.
use std::fmt::Write as _;

use crate::util::{Machine, Summary};

/// A table of already formatted cells.
#[derive(Debug, Default, Clone)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[&str]) -> Self {
        Self {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "| {} |", self.columns.join(" | "));
        let _ = writeln!(
            s,
            "|{}|",
            self.columns
                .iter()
                .map(|_| " --- ")
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }
}

/// A horizontal bar chart: one bar per label at the median, a whisker from min to max.
#[derive(Debug, Clone)]
pub struct Chart {
    /// File name under bench/, e.g. `testrun.svg`.
    pub file: String,
    pub title: String,
    pub unit: String,
    pub bars: Vec<(String, Summary)>,
}

/// One part of RESULTS.md.
#[derive(Debug, Default, Clone)]
pub struct Section {
    pub title: String,
    /// Markdown paragraphs before the tables (method).
    pub intro: String,
    pub tables: Vec<(String, Table)>,
    /// Markdown paragraphs after the tables (findings, targets, caveats), made from the
    /// measured numbers (see `verdict`).
    pub notes: String,
    /// Bullet lines for the summary at the top of RESULTS.md, made from the measured numbers
    /// (target verdicts, comparisons): never typed-in prose about a result.
    pub summary: Vec<String>,
    pub charts: Vec<Chart>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart as a standalone SVG document.
pub fn svg(c: &Chart) -> String {
    let (left, right, top, bar_h, gap) = (300.0, 110.0, 50.0, 18.0, 8.0);
    let width = 900.0;
    let plot = width - left - right;
    let height = top + (bar_h + gap) * c.bars.len() as f64 + 40.0;
    let max = c
        .bars
        .iter()
        .map(|(_, s)| s.max)
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let x = |v: f64| left + plot * (v / max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">{}</text>"#,
        esc(&c.title)
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="38" fill="#555">bar: median; line: min to max; {}</text>"##,
        esc(&c.unit)
    );
    for (i, (label, sum)) in c.bars.iter().enumerate() {
        let y = top + (bar_h + gap) * i as f64;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y + bar_h * 0.75,
            esc(label)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{y}" width="{:.1}" height="{bar_h}" fill="#4a7fb5"/>"##,
            (x(sum.median) - left).max(0.5)
        );
        let mid = y + bar_h / 2.0;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{mid}" x2="{:.1}" y2="{mid}" stroke="black" stroke-width="1.5"/>"#,
            x(sum.min),
            x(sum.max)
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}">{}</text>"#,
            x(sum.max) + 6.0,
            y + bar_h * 0.75,
            esc(&format_value(sum.median))
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// Three significant digits, thousands as `k`/`M`.
pub fn format_value(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.3}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The whole RESULTS.md.
pub fn markdown(machine: &Machine, quick: bool, preamble: &str, sections: &[Section]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmark results\n");
    if !machine.changes.is_empty() {
        let _ = writeln!(
            s,
            "> **WARNING: not a committed state.** These figures were measured on commit `{}` \
             **with uncommitted changes** (`--allow-dirty`), so no commit holds the code that \
             produced them. Changed files: {}.\n",
            machine.commit,
            machine
                .changes
                .iter()
                .map(|c| format!("`{}`", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench{}`; do not edit by hand.\n",
        if quick { " -- --quick" } else { "" }
    );
    let _ = writeln!(s, "| | |\n| --- | --- |");
    let _ = writeln!(s, "| CPU | {} |", machine.cpu);
    let _ = writeln!(s, "| cores | {} |", machine.cores);
    let _ = writeln!(s, "| kernel | {} |", machine.kernel);
    let _ = writeln!(
        s,
        "| commit | `{}`{} |",
        machine.commit,
        if machine.changes.is_empty() {
            " (clean tree)"
        } else {
            " **with uncommitted changes**"
        }
    );
    let _ = writeln!(s, "| date | {} |", machine.date);
    let _ = writeln!(
        s,
        "| run | {} |\n",
        if quick {
            "quick (`--quick`: fewer repeats, smaller tables)"
        } else {
            "full"
        }
    );
    s.push_str(preamble);
    s.push('\n');
    let _ = writeln!(
        s,
        "## Summary\n\nMade from the measurements below: each target is met only if every \
         run met it, and a comparison says more or less only if every paired run says so.\n"
    );
    for sec in sections.iter().filter(|sec| !sec.summary.is_empty()) {
        let _ = writeln!(s, "{}:\n", sec.title);
        for line in &sec.summary {
            let _ = writeln!(s, "{line}");
        }
        s.push('\n');
    }
    for sec in sections {
        let _ = writeln!(s, "## {}\n", sec.title);
        if !sec.intro.is_empty() {
            let _ = writeln!(s, "{}\n", sec.intro.trim_end());
        }
        for (caption, t) in &sec.tables {
            if !caption.is_empty() {
                let _ = writeln!(s, "{caption}\n");
            }
            let _ = writeln!(s, "{}", t.markdown());
        }
        for c in &sec.charts {
            let _ = writeln!(s, "![{}]({})\n", c.title, c.file);
        }
        if !sec.notes.is_empty() {
            let _ = writeln!(s, "{}\n", sec.notes.trim_end());
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_svg_render() {
        let mut t = Table::new(&["a", "b"]);
        t.row(vec!["1".into(), "2".into()]);
        assert_eq!(t.markdown(), "| a | b |\n| --- | --- |\n| 1 | 2 |\n");
        let c = Chart {
            file: "x.svg".into(),
            title: "T <1>".into(),
            unit: "ns".into(),
            bars: vec![
                ("one".into(), Summary::of(&[1.0, 2.0, 3.0]).unwrap()),
                ("two".into(), Summary::of(&[10.0]).unwrap()),
            ],
        };
        let doc = svg(&c);
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert!(doc.contains("T &lt;1&gt;"));
        assert_eq!(doc.matches("<rect x=").count(), 2);
        assert_eq!(format_value(1_234_567.0), "1.235M");
        assert_eq!(format_value(54.321), "54.3");
    }

    fn machine(changes: &[&str]) -> Machine {
        Machine {
            cpu: "C".into(),
            cores: 2,
            kernel: "K".into(),
            commit: "abc".into(),
            changes: changes.iter().map(|c| c.to_string()).collect(),
            date: "D".into(),
        }
    }

    #[test]
    fn a_dirty_tree_is_flagged_and_the_summary_is_the_sections_lines() {
        let sec = Section {
            title: "1. X".into(),
            summary: vec!["- Target 't': runs 1 s: met (1 of 1 runs met it).".into()],
            ..Section::default()
        };
        let md = markdown(
            &machine(&[" M bench/src/main.rs"]),
            false,
            "pre\n",
            std::slice::from_ref(&sec),
        );
        assert!(md.starts_with("# Benchmark results\n\n> **WARNING: not a committed state.**"));
        assert!(md.contains("`M bench/src/main.rs`"));
        assert!(md.contains("| commit | `abc` **with uncommitted changes** |"));
        assert!(md.contains("## Summary\n"));
        assert!(md.contains("1. X:\n\n- Target 't': runs 1 s: met (1 of 1 runs met it).\n"));
        let clean = markdown(&machine(&[]), false, "pre\n", &[sec]);
        assert!(!clean.contains("WARNING"));
        assert!(clean.contains("| commit | `abc` (clean tree) |"));
    }
}
