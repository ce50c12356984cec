//! Where to put an entry probe. The kernel emulates a few x86 instructions at a uprobe (`push
//! reg`, relative jumps and calls) and single-steps every other one out of line, which costs
//! about ten times more. glibc's `free` starts with `test %rdi,%rdi; je ...` (a NULL check, not
//! emulated) followed by `push %rbp` (emulated). For a function whose call with a NULL first
//! argument does nothing memprof records, the probe can go on the first emulated instruction
//! after such a NULL check: every call with a non-NULL argument passes there with the argument
//! register untouched. The instructions are decoded, never assumed; anything unexpected keeps
//! the probe at the function's first byte.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};

/// How far into a function the NULL-check prologue may reach.
const MAX_PROLOGUE: usize = 6;

/// Offset from the function start at which to probe `code` (the function's bytes, loaded at
/// virtual address `vaddr`), given that a call with a NULL first argument can be skipped.
pub fn skip_null_check(code: &[u8], vaddr: u64) -> u64 {
    let mut decoder = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
    let mut prologue: Vec<Instruction> = Vec::new();
    while decoder.can_decode() && prologue.len() < MAX_PROLOGUE {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return 0;
        }
        prologue.push(insn);
    }
    let Some(first) = prologue.first() else {
        return 0;
    };
    if emulated(first) {
        return 0;
    }
    // Accept: [endbr64] test rdi,rdi ; je/jz <anywhere> ; <emulated instruction>.
    let mut i = 0;
    if prologue[i].code() == Code::Endbr64 {
        i += 1;
    }
    let Some(test) = prologue.get(i) else {
        return 0;
    };
    let tests_rdi = test.code() == Code::Test_rm64_r64
        && test.op0_kind() == OpKind::Register
        && test.op0_register() == Register::RDI
        && test.op1_register() == Register::RDI;
    let Some(jump) = prologue.get(i + 1) else {
        return 0;
    };
    let jumps_if_null = matches!(jump.code(), Code::Je_rel8_64 | Code::Je_rel32_64);
    let Some(target) = prologue.get(i + 2) else {
        return 0;
    };
    if !tests_rdi || !jumps_if_null || !emulated(target) {
        return 0;
    }
    let offset = target.ip() - vaddr;
    // Nothing else in the function may jump into the skipped prologue.
    if jumps_into(code, vaddr, vaddr + 1..=target.ip()) {
        return 0;
    }
    offset
}

/// Whether the kernel emulates `insn` at a uprobe instead of single-stepping it: `push reg`,
/// and relative `jmp`, `jcc` and `call` (arch/x86/kernel/uprobes.c; `loop`/`jrcxz` are not).
fn emulated(insn: &Instruction) -> bool {
    insn.code() == Code::Push_r64
        || insn.is_jmp_short_or_near()
        || insn.is_jcc_short_or_near()
        || insn.is_call_near()
}

/// Whether any near branch decoded from `code` targets an address in `range`.
fn jumps_into(code: &[u8], vaddr: u64, range: std::ops::RangeInclusive<u64>) -> bool {
    let mut decoder = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if matches!(
            insn.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) && range.contains(&insn.near_branch_target())
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc 2.36's `free` prologue: test %rdi,%rdi; je +0xbf; push %rbp; lea -0x10(%rdi),%rsi;
    /// push %rbx; ret (padding stands for the rest).
    const FREE: &[u8] = &[
        0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55, 0x48, 0x8d, 0x77, 0xf0, 0x53,
        0xc3,
    ];

    #[test]
    fn skips_null_check_to_push() {
        assert_eq!(skip_null_check(FREE, 0x98ef0), 9);
    }

    #[test]
    fn keeps_entry_when_first_instruction_is_emulated() {
        // push %r12; push %rbp (glibc malloc)
        assert_eq!(skip_null_check(&[0x41, 0x54, 0x55, 0xc3], 0x1000), 0);
    }

    #[test]
    fn keeps_entry_for_other_prologues() {
        // test %rsi,%rsi; je; push %rbp: not the first argument.
        let other_reg = [0x48, 0x85, 0xf6, 0x74, 0x05, 0x55, 0xc3];
        assert_eq!(skip_null_check(&other_reg, 0x1000), 0);
        // test %rdi,%rdi; jne; push %rbp: jumps when NOT null.
        let jne = [0x48, 0x85, 0xff, 0x75, 0x05, 0x55, 0xc3];
        assert_eq!(skip_null_check(&jne, 0x1000), 0);
        // test %rdi,%rdi; je; mov %rdi,%rax (not emulated).
        let mov = [0x48, 0x85, 0xff, 0x74, 0x05, 0x48, 0x89, 0xf8, 0xc3];
        assert_eq!(skip_null_check(&mov, 0x1000), 0);
        assert_eq!(skip_null_check(&[], 0x1000), 0);
    }

    #[test]
    fn endbr64_before_the_check_is_skipped_too() {
        let mut code = vec![0xf3, 0x0f, 0x1e, 0xfa];
        code.extend_from_slice(FREE);
        assert_eq!(skip_null_check(&code, 0x2000), 13);
    }

    #[test]
    fn a_branch_into_the_prologue_keeps_the_entry() {
        // test; je +2; push %rbp; jmp back to the push... then to the je (inside the skipped
        // part): jmp rel8 -9 lands on 0x1003.
        let code = [0x48, 0x85, 0xff, 0x74, 0x02, 0x55, 0x90, 0xeb, 0xfa, 0xc3];
        assert_eq!(skip_null_check(&code, 0x1000), 0);
    }
}
