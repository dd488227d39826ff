//! A tiny BPF assembler: encodes the instructions the bench's raw programs use (no toolchain
//! needed) and resolves jumps to named labels. Pure, so the host tests it.
//!
//! Encoding per the kernel's `Documentation/bpf/standardization/instruction-set.rst`: one
//! 8-byte slot `{opcode, dst:4 | src:4 << 4, off: i16, imm: i32}`, little-endian; `ld_imm64`
//! takes two slots.
use std::collections::BTreeMap;

/// One encoded instruction slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    pub fn bytes(&self) -> [u8; 8] {
        let [o0, o1] = self.off.to_le_bytes();
        let [i0, i1, i2, i3] = self.imm.to_le_bytes();
        [self.code, self.regs, o0, o1, i0, i1, i2, i3]
    }
}

// Classes, sizes, modes, sources and operations (instruction-set.rst §§ 3-5).
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const ALU64: u8 = 0x07;
const IMM: u8 = 0x00;
const MEM: u8 = 0x60;
const ATOMIC: u8 = 0xc0;
const K: u8 = 0x00;
const X: u8 = 0x08;
const END: u8 = 0xd0;
const TO_BE: u8 = 0x08;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
/// `src` of an `ld_imm64` whose immediate is a map file descriptor.
const PSEUDO_MAP_FD: u8 = 1;

/// Access sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    B = 0x10,
    H = 0x08,
    W = 0x00,
    DW = 0x18,
}

/// ALU operations (the ISA's set; the bench's programs use some).
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alu {
    Add = 0x00,
    Sub = 0x10,
    Mul = 0x20,
    Div = 0x30,
    Or = 0x40,
    And = 0x50,
    Lsh = 0x60,
    Rsh = 0x70,
    Mod = 0x90,
    Xor = 0xa0,
    Mov = 0xb0,
}

/// Conditional jumps (unsigned comparisons).
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    Eq = 0x10,
    Gt = 0x20,
    Ge = 0x30,
    Ne = 0x50,
    Lt = 0xa0,
    Le = 0xb0,
}

/// Registers r0-r10.
pub type Reg = u8;
pub const R0: Reg = 0;
pub const R1: Reg = 1;
pub const R2: Reg = 2;
pub const R3: Reg = 3;
pub const R4: Reg = 4;
pub const R5: Reg = 5;
pub const R6: Reg = 6;
pub const R7: Reg = 7;
pub const R8: Reg = 8;
pub const R9: Reg = 9;
/// Frame pointer (read-only).
pub const R10: Reg = 10;

/// Kernel helper ids (`enum bpf_func_id`).
pub const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
pub const HELPER_GET_PRANDOM_U32: i32 = 7;

/// XDP actions.
pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;

fn regs(dst: Reg, src: Reg) -> u8 {
    debug_assert!(dst <= 10 && src <= 10);
    dst | (src << 4)
}

/// A program under construction: instructions plus jumps waiting for their label.
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: BTreeMap<&'static str, usize>,
    /// (index of the jump, label it targets)
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> &mut Self {
        self.insns.push(Insn {
            code,
            regs: regs(dst, src),
            off,
            imm,
        });
        self
    }

    /// `dst op= imm` on 64 bits.
    pub fn alu_imm(&mut self, op: Alu, dst: Reg, imm: i32) -> &mut Self {
        self.push(ALU64 | K | op as u8, dst, 0, 0, imm)
    }

    /// `dst op= src` on 64 bits.
    pub fn alu_reg(&mut self, op: Alu, dst: Reg, src: Reg) -> &mut Self {
        self.push(ALU64 | X | op as u8, dst, src, 0, 0)
    }

    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.alu_imm(Alu::Mov, dst, imm)
    }

    pub fn mov_reg(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.alu_reg(Alu::Mov, dst, src)
    }

    /// `dst = htobe(dst)` keeping the low `bits` (16, 32 or 64).
    pub fn bswap_be(&mut self, dst: Reg, bits: i32) -> &mut Self {
        self.push(ALU | END | TO_BE, dst, 0, 0, bits)
    }

    /// `dst = *(size *)(src + off)`.
    pub fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(LDX | MEM | size as u8, dst, src, off, 0)
    }

    /// `*(size *)(dst + off) = src`.
    pub fn store_reg(&mut self, size: Size, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(STX | MEM | size as u8, dst, src, off, 0)
    }

    /// `*(size *)(dst + off) = imm`.
    pub fn store_imm(&mut self, size: Size, dst: Reg, off: i16, imm: i32) -> &mut Self {
        self.push(ST | MEM | size as u8, dst, 0, off, imm)
    }

    /// `lock *(u64 *)(dst + off) += src`.
    pub fn atomic_add64(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(STX | ATOMIC | Size::DW as u8, dst, src, off, 0)
    }

    /// `dst = map` (the map's file descriptor, resolved by the verifier).
    pub fn load_map_fd(&mut self, dst: Reg, fd: i32) -> &mut Self {
        self.push(LD | IMM | Size::DW as u8, dst, PSEUDO_MAP_FD, 0, fd);
        self.push(0, 0, 0, 0, 0)
    }

    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.push(JMP | CALL, 0, 0, 0, helper)
    }

    pub fn exit(&mut self) -> &mut Self {
        self.push(JMP | EXIT, 0, 0, 0, 0)
    }

    /// `r0 = action; exit`.
    pub fn ret(&mut self, action: i32) -> &mut Self {
        self.mov_imm(R0, action).exit()
    }

    /// `if dst cond imm goto label`.
    pub fn jmp_imm(&mut self, cond: Cond, dst: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(JMP | K | cond as u8, dst, 0, 0, imm)
    }

    /// `if dst cond src goto label`.
    pub fn jmp_reg(&mut self, cond: Cond, dst: Reg, src: Reg, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(JMP | X | cond as u8, dst, src, 0, 0)
    }

    /// `goto label`.
    #[allow(dead_code)]
    pub fn ja(&mut self, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(JMP, 0, 0, 0, 0)
    }

    /// Places `name` at the next instruction.
    pub fn label(&mut self, name: &'static str) -> &mut Self {
        let prev = self.labels.insert(name, self.insns.len());
        assert!(prev.is_none(), "label {name} placed twice");
        self
    }

    /// The program with every jump resolved (offsets count from the next instruction).
    pub fn finish(&self) -> Result<Vec<Insn>, String> {
        let mut out = self.insns.clone();
        for &(at, label) in &self.fixups {
            let target = *self
                .labels
                .get(label)
                .ok_or_else(|| format!("jump to undefined label {label}"))?;
            let off = target as i64 - at as i64 - 1;
            out[at].off = i16::try_from(off).map_err(|_| format!("jump to {label} too far"))?;
        }
        Ok(out)
    }
}

/// The program's bytes as the kernel reads them.
pub fn to_bytes(insns: &[Insn]) -> Vec<u8> {
    insns.iter().flat_map(Insn::bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_instructions() {
        // Reference encodings as `llvm-objdump -d` prints them for the same source.
        let mut a = Asm::new();
        a.mov_imm(R0, 2) // b7 00 00 00 02 00 00 00
            .load(Size::W, R2, R1, 4) // 61 12 04 00 00 00 00 00
            .store_imm(Size::W, R10, -4, 0) // 62 0a fc ff 00 00 00 00
            .bswap_be(R8, 16) // dc 08 00 00 10 00 00 00
            .atomic_add64(R0, 8, R1) // db 10 08 00 00 00 00 00
            .exit(); // 95 00 00 00 00 00 00 00
        let bytes = to_bytes(&a.finish().unwrap());
        assert_eq!(
            bytes,
            [
                0xb7, 0x00, 0, 0, 2, 0, 0, 0, //
                0x61, 0x12, 4, 0, 0, 0, 0, 0, //
                0x62, 0x0a, 0xfc, 0xff, 0, 0, 0, 0, //
                0xdc, 0x08, 0, 0, 16, 0, 0, 0, //
                0xdb, 0x10, 8, 0, 0, 0, 0, 0, //
                0x95, 0, 0, 0, 0, 0, 0, 0,
            ]
        );
    }

    #[test]
    fn resolves_forward_and_backward_jumps_and_map_loads() {
        let mut a = Asm::new();
        a.label("top")
            .load_map_fd(R1, 7)
            .jmp_imm(Cond::Eq, R0, 0, "out")
            .ja("top")
            .label("out")
            .ret(XDP_PASS);
        let p = a.finish().unwrap();
        assert_eq!(p[0].code, 0x18);
        assert_eq!(p[0].regs, 0x11);
        assert_eq!(p[0].imm, 7);
        assert_eq!(
            p[1],
            Insn {
                code: 0,
                regs: 0,
                off: 0,
                imm: 0
            }
        );
        assert_eq!(p[2].off, 1, "skips the ja");
        assert_eq!(p[3].off, -4, "back to the ld_imm64");
        assert!(Asm::new().ja("nowhere").finish().is_err());
    }
}
