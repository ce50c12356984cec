//! Collecting failed checks so one run reports every mismatch at once.

/// Collects failed checks so one run reports every mismatch at once.
pub(crate) struct Checks {
    pub(crate) what: String,
    pub(crate) failures: Vec<String>,
}

impl Checks {
    pub(crate) fn new(what: impl Into<String>) -> Checks {
        Checks {
            what: what.into(),
            failures: Vec::new(),
        }
    }

    pub(crate) fn check(&mut self, ok: bool, msg: impl Into<String>) {
        if !ok {
            self.failures.push(msg.into());
        }
    }

    pub(crate) fn eq<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: &str,
        actual: T,
        expected: T,
    ) {
        if actual != expected {
            self.failures
                .push(format!("{what}: got {actual:?}, expected {expected:?}"));
        }
    }

    pub(crate) fn finish(self, context: impl FnOnce() -> String) {
        if !self.failures.is_empty() {
            panic!(
                "{}: {} check(s) failed:\n  - {}\n\n{}",
                self.what,
                self.failures.len(),
                self.failures.join("\n  - "),
                context()
            );
        }
    }
}
