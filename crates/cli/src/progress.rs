//! Progress on a terminal while a snapshot operation runs, and the crash tests' kill hook.

use std::time::Duration;

use memory::RoundStats;
use snapshot_core::{Observer, Operation, Step};

/// Progress on a terminal, and the crash-test hook: with `DOMSNAP_TEST_KILL_AT=STEP` (a step's
/// kebab-case name, e.g. `snapshot-disks`) the process kills itself with SIGKILL as that step
/// starts, so tests can check `recover` after a crash at every step; `STEP+MS` kills it MS
/// milliseconds later (e.g. while QEMU streams).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    kill_at: Option<String>,
}

impl Progress {
    pub fn new(terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress {
            bar,
            kill_at: std::env::var("DOMSNAP_TEST_KILL_AT").ok(),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Progress {
    fn step(&self, operation: Operation, step: Step) {
        tracing::debug!(%operation, %step, "step");
        if let Some(kill_at) = &self.kill_at {
            let (wanted, delay_ms) = match kill_at.split_once('+') {
                Some((wanted, ms)) => (wanted, ms.parse().unwrap_or(0)),
                None => (kill_at.as_str(), 0),
            };
            let name = serde_json::to_value(step).ok();
            if name.as_ref().and_then(|n| n.as_str()) == Some(wanted) {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(delay_ms));
                    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                });
                if delay_ms == 0 {
                    // Not a step further.
                    std::thread::park();
                }
            }
        }
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{operation}: {step}"));
        }
    }

    fn memory_round(&self, stats: &RoundStats) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "memory round {}: {} dirty pages, {:.1} MiB written in {:.0} ms",
                stats.round,
                stats.pages_dirty,
                stats.bytes_written as f64 / f64::from(1 << 20),
                stats.duration.as_secs_f64() * 1e3
            ));
        }
    }
}
