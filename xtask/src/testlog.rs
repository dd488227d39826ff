//! Reading `cargo test`'s output (its stdout and stderr merged, in order): which suite (test
//! binary) ran how many tests and for how long, which tests failed, and which were ignored
//! and why. A suite is named by its binary (`nat_common`, `e2e_hardening`, `doc-tests
//! nat_common`), and a test by its suite and path (`e2e_hardening::hostile::NAME`), the names
//! `nat_tests::reliability` gives the figures a test reports.

/// One test binary's run.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Suite {
    pub name: String,
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub filtered_out: u64,
    /// libtest's own "finished in" time.
    pub seconds: f64,
    /// A `test result:` line was printed (a suite whose binary crashed has none).
    pub finished: bool,
}

impl Suite {
    /// Tests the suite actually ran (passed or failed).
    pub fn ran(&self) -> u64 {
        self.passed + self.failed
    }
}

/// Everything read so far.
#[derive(Debug, Default)]
pub struct TestLog {
    pub suites: Vec<Suite>,
    /// Qualified names (`SUITE::PATH`) of the tests that failed.
    pub failed_tests: Vec<String>,
    /// Qualified names of the ignored tests, with the reason their `#[ignore = "..."]` gives
    /// (empty when it gives none).
    pub ignored_tests: Vec<(String, String)>,
}

/// The suite name of a test binary path: its file name without cargo's `-HASH` suffix
/// (`target/debug/deps/e2e-0123456789abcdef` -> `e2e`).
pub fn binary_stem(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    match file.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            stem.to_string()
        }
        _ => file.to_string(),
    }
}

impl TestLog {
    /// The suite the next test lines belong to.
    fn current(&mut self) -> &mut Suite {
        if self.suites.last().is_none_or(|s| s.finished) {
            self.suites.push(Suite {
                name: "(unnamed suite)".into(),
                ..Suite::default()
            });
        }
        let last = self.suites.len() - 1;
        &mut self.suites[last]
    }

    fn qualified(&mut self, test: &str) -> String {
        format!("{}::{test}", self.current().name)
    }

    /// Takes one line of output.
    pub fn line(&mut self, line: &str) {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Running ") {
            // `Running unittests src/lib.rs (target/debug/deps/nat_common-HASH)` or
            // `Running tests/e2e.rs (target/debug/deps/e2e-HASH)`.
            let path = rest
                .rsplit_once('(')
                .map_or(rest, |(_, p)| p.trim_end_matches(')'));
            self.start(binary_stem(path));
            return;
        }
        if let Some(krate) = line.strip_prefix("Doc-tests ") {
            self.start(format!("doc-tests {}", krate.trim()));
            return;
        }
        if let Some((name, outcome)) = line
            .strip_prefix("test ")
            .and_then(|l| l.split_once(" ... "))
        {
            if outcome == "FAILED" {
                let q = self.qualified(name);
                self.failed_tests.push(q);
            } else if let Some(why) = outcome.strip_prefix("ignored") {
                let why = why.trim_start_matches(',').trim().to_string();
                let q = self.qualified(name);
                self.ignored_tests.push((q, why));
            }
            return;
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            self.result(rest);
        }
    }

    fn start(&mut self, name: String) {
        self.suites.push(Suite {
            name,
            ..Suite::default()
        });
    }

    /// `ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`
    fn result(&mut self, rest: &str) {
        let fields = rest.split_once(". ").map_or(rest, |(_, f)| f);
        let suite = self.current();
        for field in fields.split(';') {
            let field = field.trim();
            if let Some(secs) = field.strip_prefix("finished in ") {
                suite.seconds = secs.trim_end_matches('s').parse().unwrap_or(0.0);
                continue;
            }
            let Some((n, what)) = field.split_once(' ') else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => suite.passed += n,
                "failed" => suite.failed += n,
                "ignored" => suite.ignored += n,
                "filtered out" => suite.filtered_out += n,
                _ => {}
            }
        }
        suite.finished = true;
    }

    /// (passed, failed, ignored) over every suite.
    pub fn totals(&self) -> (u64, u64, u64) {
        self.suites.iter().fold((0, 0, 0), |(p, f, i), s| {
            (p + s.passed, f + s.failed, i + s.ignored)
        })
    }

    /// Suites that ran no test, or never finished. With `filtered` (the caller passed a test
    /// name filter), a suite whose tests were all filtered out does not count.
    pub fn empty_suites(&self, filtered: bool) -> Vec<&Suite> {
        self.suites
            .iter()
            .filter(|s| !s.finished || (s.ran() == 0 && !(filtered && s.filtered_out > 0)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(lines: &str) -> TestLog {
        let mut l = TestLog::default();
        for line in lines.lines() {
            l.line(line);
        }
        l
    }

    #[test]
    fn suites_tests_and_counts() {
        let l = log("   Compiling xtask v0.1.0\n\
             \x20    Running unittests src/lib.rs (target/debug/deps/nat_common-0123456789abcdef)\n\
             running 3 tests\n\
             test a::b ... FAILED\n\
             test a::c ... ok\n\
             test a::d ... ignored, product bug: x\n\
             test a::e ... ignored\n\
             test result: FAILED. 1 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1.50s\n\
             \x20    Running tests/e2e.rs (target/debug/deps/e2e-fedcba9876543210)\n\
             running 0 tests\n\
             test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s\n\
             \x20  Doc-tests nat_common\n\
             running 1 test\n\
             test src/lib.rs - f (line 3) ... ok\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 4 filtered out; finished in 0.20s\n");
        let names: Vec<_> = l.suites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["nat_common", "e2e", "doc-tests nat_common"]);
        assert_eq!(l.totals(), (2, 1, 2));
        assert_eq!(l.suites[0].seconds, 1.5);
        assert_eq!(l.suites[2].filtered_out, 4);
        assert_eq!(l.failed_tests, ["nat_common::a::b"]);
        assert_eq!(
            l.ignored_tests,
            [
                ("nat_common::a::d".to_string(), "product bug: x".to_string()),
                ("nat_common::a::e".to_string(), String::new())
            ]
        );
        let empty: Vec<_> = l.empty_suites(false).iter().map(|s| &s.name).collect();
        assert_eq!(empty, ["e2e"]);
    }

    #[test]
    fn a_suite_of_ignored_or_filtered_tests_or_that_crashed_is_empty() {
        let l = log(
            "Running tests/a.rs (target/debug/deps/a-0123456789abcdef)\n\
             test x ... ignored, why\n\
             test result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s\n\
             Running tests/b.rs (target/debug/deps/b-0123456789abcdef)\n\
             test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; finished in 0.00s\n\
             Running tests/c.rs (target/debug/deps/c-0123456789abcdef)\n\
             running 2 tests\n",
        );
        let names = |filtered| -> Vec<String> {
            l.empty_suites(filtered)
                .iter()
                .map(|s| s.name.clone())
                .collect()
        };
        assert_eq!(names(false), ["a", "b", "c"]);
        // With a name filter, a suite whose tests were all filtered out is not empty.
        assert_eq!(names(true), ["a", "c"]);
    }

    #[test]
    fn binary_stems() {
        assert_eq!(
            binary_stem("target/debug/deps/e2e_ops-0123456789abcdef"),
            "e2e_ops"
        );
        assert_eq!(
            binary_stem("/x/deps/nat-bench-0123456789abcdef"),
            "nat-bench"
        );
        assert_eq!(binary_stem("natd"), "natd");
        assert_eq!(binary_stem("e2e-hardening"), "e2e-hardening");
    }
}
