//! Where to put an entry probe. The kernel emulates a few x86 instructions at a uprobe (`push
//! reg`, relative `jmp`, `jcc` and `call`, and `nop`) and single-steps every other one out of
//! line, which costs about ten times more. Many allocators start with something else: jemalloc's
//! `malloc` with `cmp $0x1000,%rdi`, its `free` with `mov %rdi,%rax`, glibc's `free` with
//! `test %rdi,%rdi`, mimalloc's `malloc` with a load.
//!
//! So the probe goes on the first emulated instruction of the function's straight-line start,
//! when every instruction before it
//! - is no branch, return or system call (every call passes there, exactly once),
//! - leaves the stack pointer alone (a probe there still sees the return address at the top
//!   of the stack), and
//! - leaves each argument the entry program reads either in its register or copied, by a
//!   plain register move, to another register that keeps it (the attach cookie then tells the
//!   program where to read it);
//!
//! and nothing else in the function jumps into the instructions skipped. Otherwise the probe
//! stays at the function's first byte. Nothing is assumed of a build: the instructions are
//! decoded each time.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess,
    OpKind, Register,
};
use memprof_common::{ARG_REGS, AllocFn};

/// How many instructions the straight-line start may be.
const MAX_SKIPPED: usize = 16;

/// Where an entry probe goes and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// Offset from the function's start.
    pub offset: u64,
    /// Where the program reads each ABI argument: 0 for its own register, else an index into
    /// [`ARG_REGS`] plus one (encoded in the attach cookie, see `memprof_common::cookie`).
    pub arg_regs: [u8; 6],
    /// The instruction probed and what was skipped, for the start record.
    pub why: String,
}

impl Placement {
    fn entry(why: impl Into<String>) -> Self {
        Self {
            offset: 0,
            arg_regs: [0; 6],
            why: why.into(),
        }
    }
}

/// The System V argument registers, as iced-x86 names them, in `ARG_REGS` order.
const ABI: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// The ABI arguments (by index) the entry program reads for a call of kind `func`.
pub fn args_read(func: AllocFn) -> &'static [usize] {
    match func {
        AllocFn::Malloc | AllocFn::Valloc | AllocFn::Pvalloc | AllocFn::Free => &[0],
        AllocFn::Calloc | AllocFn::Realloc | AllocFn::Munmap => &[0, 1],
        AllocFn::Memalign | AllocFn::AlignedAlloc => &[1],
        AllocFn::PosixMemalign => &[0, 2],
        AllocFn::Reallocarray | AllocFn::Mremap => &[0, 1, 2],
        AllocFn::Mmap => &[1, 3],
        // Tracepoints, not probed functions.
        AllocFn::Kmalloc | AllocFn::KmemCache | AllocFn::Page | AllocFn::Percpu => &[],
    }
}

/// Where to probe the function `code` (its bytes, loaded at virtual address `vaddr`), whose
/// calls the entry program reads as `func`.
pub fn place(code: &[u8], vaddr: u64, func: AllocFn) -> Placement {
    let mut decoder = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    // The registers holding each argument (by ABI index) at this point.
    let mut holds: [Vec<Register>; 6] = ABI.map(|r| vec![r]);
    let mut skipped = 0;
    while decoder.can_decode() && skipped <= MAX_SKIPPED {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return Placement::entry("undecodable start");
        }
        if emulated(&insn) {
            return placed_at(code, vaddr, &insn, skipped, &holds, func);
        }
        if insn.flow_control() != FlowControl::Next {
            return Placement::entry(format!(
                "{} before any emulated instruction",
                mnemonic(&insn)
            ));
        }
        let mut written: Vec<Register> = Vec::new();
        for r in info.info(&insn).used_registers() {
            if matches!(
                r.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) {
                written.push(r.register().full_register());
            }
        }
        if written.contains(&Register::RSP) {
            return Placement::entry(format!("{} moves the stack pointer", mnemonic(&insn)));
        }
        // A plain copy `mov dst, src` of a register holding an argument keeps it in `dst` too.
        let copy = matches!(insn.code(), Code::Mov_rm64_r64 | Code::Mov_r64_rm64)
            && insn.op0_kind() == OpKind::Register
            && insn.op1_kind() == OpKind::Register;
        let copied: Vec<bool> = holds
            .iter()
            .map(|h| copy && h.contains(&insn.op1_register()))
            .collect();
        for (h, copied) in holds.iter_mut().zip(copied) {
            h.retain(|r| !written.contains(r));
            if copied {
                h.push(insn.op0_register());
            }
        }
        skipped += 1;
    }
    Placement::entry("no emulated instruction near the start")
}

/// The placement at `insn`, the first emulated instruction, after `skipped` others.
fn placed_at(
    code: &[u8],
    vaddr: u64,
    insn: &Instruction,
    skipped: usize,
    holds: &[Vec<Register>; 6],
    func: AllocFn,
) -> Placement {
    let offset = insn.ip() - vaddr;
    if skipped == 0 {
        return Placement::entry(format!("{} at +0 is emulated", mnemonic(insn)));
    }
    let mut arg_regs = [0u8; 6];
    let mut moved = Vec::new();
    for &arg in args_read(func) {
        if holds[arg].contains(&ABI[arg]) {
            continue;
        }
        let Some((index, name)) = holds[arg].iter().find_map(|r| {
            let name = reg_name(*r);
            ARG_REGS.iter().position(|n| *n == name).map(|i| (i, name))
        }) else {
            return Placement::entry(format!(
                "argument {} is overwritten before {} at +{offset}",
                arg + 1,
                mnemonic(insn)
            ));
        };
        arg_regs[arg] = index as u8 + 1;
        moved.push(format!("argument {} from {name}", arg + 1));
    }
    if jumps_into(code, vaddr, vaddr + 1..=insn.ip()) {
        return Placement::entry("a branch leads into the start");
    }
    Placement {
        offset,
        arg_regs,
        why: format!(
            "{} at +{offset} is emulated; {skipped} instruction{} before it not single-stepped{}",
            mnemonic(insn),
            if skipped == 1 { "" } else { "s" },
            if moved.is_empty() {
                String::new()
            } else {
                format!(" ({})", moved.join(", "))
            }
        ),
    }
}

/// The lower-case name `ARG_REGS` uses for a 64-bit register.
fn reg_name(r: Register) -> &'static str {
    match r {
        Register::RDI => "rdi",
        Register::RSI => "rsi",
        Register::RDX => "rdx",
        Register::RCX => "rcx",
        Register::R8 => "r8",
        Register::R9 => "r9",
        Register::RAX => "rax",
        Register::R10 => "r10",
        Register::R11 => "r11",
        _ => "",
    }
}

fn mnemonic(insn: &Instruction) -> String {
    format!("{:?}", insn.mnemonic()).to_lowercase()
}

/// Whether the kernel emulates `insn` at a uprobe instead of single-stepping it: `push reg`,
/// relative `jmp`, `jcc` and `call`, and `nop` (arch/x86/kernel/uprobes.c; `loop`/`jrcxz` are
/// not).
fn emulated(insn: &Instruction) -> bool {
    insn.code() == Code::Push_r64
        || insn.is_jmp_short_or_near()
        || insn.is_jcc_short_or_near()
        || insn.is_call_near()
        || matches!(
            insn.code(),
            Code::Nopd | Code::Nopq | Code::Nop_rm16 | Code::Nop_rm32 | Code::Nop_rm64
        )
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

    /// glibc 2.36's `free`: test %rdi,%rdi; je +0xbf; push %rbp; lea -0x10(%rdi),%rsi; push %rbx.
    const GLIBC_FREE: &[u8] = &[
        0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55, 0x48, 0x8d, 0x77, 0xf0, 0x53,
        0xc3,
    ];

    /// Debian's jemalloc 5.3 `free`: nine loads, shifts and masks that only read %rdi, then
    /// `jne` at +48.
    const JEMALLOC_FREE: &[u8] = &[
        0x48, 0x89, 0xf8, 0x48, 0x8b, 0x15, 0x0e, 0x53, 0x0a, 0x00, 0x48, 0x89, 0xf9, 0x48, 0xc1,
        0xe8, 0x1a, 0x48, 0x81, 0xe1, 0x00, 0x00, 0x00, 0xc0, 0x25, 0xf0, 0x00, 0x00, 0x00, 0x64,
        0x48, 0x03, 0x04, 0x25, 0x00, 0x00, 0x00, 0x00, 0x48, 0x01, 0xd0, 0x48, 0x3b, 0x88, 0xb0,
        0x01, 0x00, 0x00, 0x0f, 0x85, 0x8a, 0x00, 0x00, 0x00, 0xc3,
    ];

    /// Debian's jemalloc `malloc`: cmp $0x1000,%rdi; ja +0x93.
    const JEMALLOC_MALLOC: &[u8] = &[
        0x48, 0x81, 0xff, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x87, 0x93, 0x00, 0x00, 0x00, 0xc3,
    ];

    /// Debian's mimalloc 2.0 `mi_malloc`: mov 0xb449(%rip),%rax; mov %rdi,%rsi;
    /// mov %fs:(%rax),%rdi (the size is now only in %rsi); cmp $0x400,%rsi; ja +0x29.
    const MIMALLOC_MALLOC: &[u8] = &[
        0x48, 0x8b, 0x05, 0x49, 0xb4, 0x00, 0x00, 0x48, 0x89, 0xfe, 0x64, 0x48, 0x8b, 0x38, 0x48,
        0x81, 0xfe, 0x00, 0x04, 0x00, 0x00, 0x77, 0x29, 0xc3,
    ];

    /// Debian's gperftools 2.10 `tc_malloc`: mov 0x132f9(%rip),%rax; mov %rdi,%r8;
    /// test %rax,%rax; jne +0x8e.
    const TCMALLOC_MALLOC: &[u8] = &[
        0x48, 0x8b, 0x05, 0xf9, 0x32, 0x01, 0x00, 0x49, 0x89, 0xf8, 0x48, 0x85, 0xc0, 0x0f, 0x85,
        0x8e, 0x00, 0x00, 0x00, 0xc3,
    ];

    #[test]
    fn glibc_free_is_probed_on_its_null_check_jump() {
        let p = place(GLIBC_FREE, 0x98ef0, AllocFn::Free);
        assert_eq!((p.offset, p.arg_regs), (3, [0; 6]), "{}", p.why);
        assert_eq!(
            p.why,
            "je at +3 is emulated; 1 instruction before it not single-stepped"
        );
    }

    #[test]
    fn an_emulated_first_instruction_keeps_the_entry() {
        // glibc's malloc: push %r12; push %rbp; push %rbx; mov %rdi,%rbx.
        let p = place(
            &[0x41, 0x54, 0x55, 0x53, 0x48, 0x89, 0xfb],
            0x1000,
            AllocFn::Malloc,
        );
        assert_eq!((p.offset, p.why.as_str()), (0, "push at +0 is emulated"));
    }

    #[test]
    fn jemalloc_free_and_malloc_skip_their_reads() {
        let p = place(JEMALLOC_FREE, 0x27c60, AllocFn::Free);
        assert_eq!((p.offset, p.arg_regs), (48, [0; 6]), "{}", p.why);
        let p = place(JEMALLOC_MALLOC, 0x23910, AllocFn::Malloc);
        assert_eq!((p.offset, p.arg_regs), (7, [0; 6]), "{}", p.why);
    }

    #[test]
    fn an_argument_copied_away_is_read_from_its_copy() {
        let p = place(MIMALLOC_MALLOC, 0x10b70, AllocFn::Malloc);
        // %rsi is ARG_REGS[1]: encoded as 2.
        assert_eq!(
            (p.offset, p.arg_regs),
            (21, [2, 0, 0, 0, 0, 0]),
            "{}",
            p.why
        );
        assert!(p.why.ends_with("(argument 1 from rsi)"), "{}", p.why);
        // The same start for a call that also reads its second argument (now overwritten by
        // the copy) stays at the entry.
        let p = place(MIMALLOC_MALLOC, 0x10b70, AllocFn::Calloc);
        assert_eq!(p.offset, 0, "{}", p.why);
        assert!(p.why.starts_with("argument 2 is overwritten"), "{}", p.why);
        let p = place(TCMALLOC_MALLOC, 0x39b40, AllocFn::Malloc);
        assert_eq!((p.offset, p.arg_regs), (13, [0; 6]), "{}", p.why);
    }

    #[test]
    fn stack_moves_branches_into_the_start_and_returns_keep_the_entry() {
        // sub $0x18,%rsp; test %rdi,%rdi; je.
        let sub = [0x48, 0x83, 0xec, 0x18, 0x48, 0x85, 0xff, 0x74, 0x02, 0xc3];
        let p = place(&sub, 0x1000, AllocFn::Malloc);
        assert_eq!(
            (p.offset, p.why.as_str()),
            (0, "sub moves the stack pointer")
        );
        // test; je +2; nop; jmp back onto the je: the je runs twice for one call.
        let back = [0x48, 0x85, 0xff, 0x74, 0x02, 0x90, 0x90, 0xeb, 0xfa, 0xc3];
        let p = place(&back, 0x1000, AllocFn::Free);
        assert_eq!(
            (p.offset, p.why.as_str()),
            (0, "a branch leads into the start")
        );
        // xor %eax,%eax; ret.
        let p = place(&[0x31, 0xc0, 0xc3], 0x1000, AllocFn::Malloc);
        assert_eq!(
            (p.offset, p.why.as_str()),
            (0, "ret before any emulated instruction")
        );
        let p = place(&[], 0x1000, AllocFn::Malloc);
        assert_eq!(p.offset, 0);
    }

    #[test]
    fn cookies_carry_the_argument_places() {
        let p = place(MIMALLOC_MALLOC, 0x10b70, AllocFn::Malloc);
        let c = memprof_common::cookie::encode(AllocFn::Malloc, p.arg_regs);
        assert_eq!(memprof_common::cookie::func(c), AllocFn::Malloc as u32);
        assert_eq!(memprof_common::cookie::arg_reg(c, 0), 2);
        assert_eq!(memprof_common::cookie::arg_reg(c, 1), 0);
        assert_eq!(
            ARG_REGS[memprof_common::cookie::arg_reg(c, 0) as usize - 1],
            "rsi"
        );
    }
}
