//! Every program in the XDP object (`nat_userspace::EBPF_OBJECT`) passes the running kernel's
//! verifier, with the maps sized as natd sizes them by default. `cargo xtask test-kernel` runs
//! this suite under older kernels (Debian 12's 6.1), whose verifier is weaker than a new
//! host's: a program this kernel accepts may still be refused there.
//!
//! Needs root (BPF); without it the test fails saying so. Nothing is attached.

use anyhow::{Context as _, bail};
use aya::{EbpfLoader, programs::Program};
use nat_common::maps::MAPS;
use nat_tests::reliability::Figures;
use nat_userspace::{EBPF_OBJECT, ebpf::Sizes};

/// Lines of a refused program's verifier log shown in the failure (its end says why).
const LOG_TAIL: usize = 60;

/// `ProgramError`'s text, with a verifier log cut to its last [`LOG_TAIL`] lines.
fn load_error(name: &str, e: aya::programs::ProgramError) -> anyhow::Error {
    if let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &e
    {
        let log = verifier_log.to_string();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n");
        return anyhow::anyhow!(
            "the verifier refused program `{name}` ({io_error}); the last {} of {} lines of \
             its log:\n{tail}",
            lines.len().min(LOG_TAIL),
            lines.len()
        );
    }
    anyhow::Error::new(e).context(format!("cannot load program `{name}`"))
}

#[test]
fn every_program_in_the_object_passes_the_verifier() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root to load BPF programs");
    }
    let sizes = Sizes::default();
    let mut loader = EbpfLoader::new();
    for m in MAPS {
        if let Some(n) = sizes.of(m.name) {
            loader.map_max_entries(m.name, n);
        }
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .context("cannot create the object's maps")?;
    let mut loaded = Vec::new();
    let mut failed = Vec::new();
    // For RELIABILITY.md: how far each program is from the verifier's limit on this kernel.
    let mut fig = Figures::new("verifier");
    let release = kernel_release();
    for (name, prog) in ebpf.programs_mut() {
        let result = match prog {
            Program::Xdp(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            other => bail!(
                "program `{name}` is of a type this test does not load: {:?}",
                other.prog_type()
            ),
        };
        match result.map_err(|e| load_error(name, e)) {
            Ok(()) => {
                let info = prog.info().context("cannot read the program's info")?;
                let count = info.verified_instruction_count();
                if let Some(n) = count {
                    fig.set(
                        &format!(
                            "instructions verified of `{name}` on kernel {release} (limit 1000000)"
                        ),
                        u64::from(n),
                    );
                }
                let verified = count.map_or("?".to_string(), |n| n.to_string());
                println!(
                    "program `{name}`: loaded; {verified} instructions verified, {} bytes \
                     translated",
                    info.size_translated().unwrap_or(0)
                );
                loaded.push(name.to_string());
            }
            Err(e) => {
                eprintln!("{e:#}");
                failed.push(name.to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "the verifier of kernel {} refused {} of {} programs: {}",
            kernel_release(),
            failed.len(),
            failed.len() + loaded.len(),
            failed.join(", ")
        );
    }
    if loaded.is_empty() {
        bail!("the object holds no program");
    }
    fig.done();
    println!(
        "kernel {}: all {} programs loaded: {}",
        kernel_release(),
        loaded.len(),
        loaded.join(", ")
    );
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_string())
}
