//! Raw BPF for the bench: an assembler, the `bpf(2)` commands, and the small programs built
//! with them (baseline, traffic generator, counting sink, map micro-benchmarks). They need no
//! BPF toolchain, so the bench can compare the project's program against them.
pub mod asm;
pub mod progs;
pub mod sys;
