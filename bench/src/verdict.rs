//! Sentences made from measured numbers: target verdicts (a target is met only when every
//! run met it), comparisons of paired runs (more, less, or no clear difference), and the
//! per-run values behind each. Nothing here is typed in about a result: change the numbers
//! and the sentences change with them. Pure formatting, tested on the host.
use crate::report::format_value;

/// The values of each run, in run order: `344, 336, 351`.
pub fn per_run(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format_value(*v))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A target a measurement must stay under (`below`) or reach (`!below`).
pub struct Target<'a> {
    /// What the target says, e.g. "established flow under 67 ns/packet".
    pub name: &'a str,
    pub limit: f64,
    /// Met when a value is below the limit (else: at least the limit).
    pub below: bool,
    pub unit: &'a str,
}

impl Target<'_> {
    fn meets(&self, v: f64) -> bool {
        if self.below {
            v < self.limit
        } else {
            v >= self.limit
        }
    }

    /// `- Target 'NAME': runs 1, 2, 3 UNIT: met (3 of 3 runs met it).` Met only if every
    /// run measured it and met it; `failed` runs (that produced no value) count as missing it.
    pub fn line(&self, values: &[f64], failed: usize) -> String {
        self.line_noted(values, failed, "")
    }

    /// [`Target::line`] with `note` added inside its closing parenthesis.
    pub fn line_noted(&self, values: &[f64], failed: usize, note: &str) -> String {
        let runs = values.len() + failed;
        let ok = values.iter().filter(|v| self.meets(**v)).count();
        let verdict = if runs > 0 && ok == runs {
            "met".to_string()
        } else {
            "**missed**".to_string()
        };
        let mut failed_note = if failed > 0 {
            format!(", {failed} failed without a value")
        } else {
            String::new()
        };
        if !note.is_empty() {
            failed_note.push_str("; ");
            failed_note.push_str(note);
        }
        format!(
            "- Target '{}': {} {}: {verdict} ({ok} of {runs} runs met it{failed_note}).",
            self.name,
            if values.is_empty() {
                "no run measured".to_string()
            } else {
                format!("runs {}", per_run(values))
            },
            self.unit,
        )
    }
}

/// How `what` compares with `base` from paired ratios (`what / base` per run): "less than"
/// or "more than" only if every run says so; otherwise no clear difference.
pub fn compare(what: &str, base: &str, quantity: &str, ratios: &[f64]) -> String {
    if ratios.is_empty() {
        return format!("- {what} against {base}: no paired runs.");
    }
    let (lo, hi) = ratios
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), r| {
            (l.min(*r), h.max(*r))
        });
    let word = if hi < 1.0 {
        format!("less {quantity} than")
    } else if lo > 1.0 {
        format!("more {quantity} than")
    } else {
        format!("no clear difference in {quantity} from")
    };
    format!(
        "- {what}: {word} {base} in these runs (ratio per run: {}; from {lo:.2} to {hi:.2}).",
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_met_only_when_every_run_met_it() {
        let t = Target {
            name: "under 1 s",
            limit: 1.0,
            below: true,
            unit: "s",
        };
        assert_eq!(
            t.line(&[0.5, 0.7], 0),
            "- Target 'under 1 s': runs 0.50, 0.70 s: met (2 of 2 runs met it)."
        );
        // The median (0.7) is under the limit, one run is not: missed.
        assert_eq!(
            t.line(&[0.5, 0.7, 1.2], 0),
            "- Target 'under 1 s': runs 0.50, 0.70, 1.20 s: **missed** (2 of 3 runs met it)."
        );
        // Runs that failed count against it.
        assert_eq!(
            t.line(&[0.66], 4),
            "- Target 'under 1 s': runs 0.66 s: **missed** (1 of 5 runs met it, 4 failed \
             without a value)."
        );
        assert!(
            t.line(&[], 0)
                .contains("no run measured s: **missed** (0 of 0")
        );
        let at_least = Target {
            name: "x",
            limit: 2.0,
            below: false,
            unit: "",
        };
        assert!(at_least.line(&[2.0, 3.0], 0).contains(": met"));
        assert!(
            at_least
                .line_noted(&[2.0], 0, "ns: 5")
                .ends_with("(1 of 1 runs met it; ns: 5).")
        );
    }

    #[test]
    fn a_comparison_needs_every_run() {
        assert_eq!(
            compare("XDP", "kernel forwarding", "CPU", &[0.9, 1.04, 1.09]),
            "- XDP: no clear difference in CPU from kernel forwarding in these runs (ratio per \
             run: 0.90, 1.04, 1.09; from 0.90 to 1.09)."
        );
        assert!(compare("a", "b", "CPU", &[0.44, 0.5]).contains("less CPU than b"));
        assert!(compare("a", "b", "CPU", &[1.2, 2.3]).contains("more CPU than b"));
        assert!(compare("a", "b", "CPU", &[]).contains("no paired runs"));
        assert_eq!(per_run(&[344.0, 1234.4]), "344, 1234");
    }
}
