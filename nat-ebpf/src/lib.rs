#![no_std]

// This file exists to enable the library target (nat-userspace build-depends on it).
