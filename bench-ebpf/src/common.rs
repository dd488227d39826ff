//! What every bench program needs: the panic handler and the license. Parameters are
//! `aya_ebpf::Global`s the loader sets (`EbpfLoader::override_global`); the verifier sees
//! their values as constants (aya freezes `.rodata`), so branches on them cost nothing.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
