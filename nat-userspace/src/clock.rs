//! The kernel clocks the program uses: CLOCK_MONOTONIC (its flows' last-seen times, at tick
//! resolution) and jiffies (when a flow refreshes its last-seen time).
use nix::time::{ClockId, clock_getres, clock_gettime};

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_coarse_ns`.
pub fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The kernel's tick rate (`CONFIG_HZ`): the resolution of `CLOCK_MONOTONIC_COARSE` is one
/// tick. 0 if it cannot be read (the program then assumes 1000).
pub fn jiffies_per_sec() -> u32 {
    match clock_getres(ClockId::CLOCK_MONOTONIC_COARSE) {
        Ok(t) if t.tv_sec() == 0 && t.tv_nsec() > 0 => {
            (1_000_000_000 / t.tv_nsec() as u64).min(u32::MAX as u64) as u32
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tick_rate_is_one_linux_allows() {
        assert!(
            [100, 250, 300, 1000].contains(&super::jiffies_per_sec()),
            "{}",
            super::jiffies_per_sec()
        );
    }
}
