//! The kernel clocks the program uses: CLOCK_MONOTONIC (its flows' last-seen times, at tick
//! resolution) and jiffies (when a flow refreshes its last-seen time).
/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_coarse_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel's tick rate (`CONFIG_HZ`): the resolution of `CLOCK_MONOTONIC_COARSE` is one
/// tick. 0 if it cannot be read (the program then assumes 1000).
pub fn jiffies_per_sec() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out-pointer.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 || ts.tv_sec != 0 || ts.tv_nsec <= 0 {
        return 0;
    }
    (1_000_000_000 / ts.tv_nsec as u64).min(u32::MAX as u64) as u32
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
