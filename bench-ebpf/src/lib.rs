#![no_std]

// This file exists to enable the library target (nat-bench build-depends on it).
