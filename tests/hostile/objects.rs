//! Objects a traced process maps: huge and sparse files, lying section headers, lying
//! compressed debug sections.

use std::{
    fs,
    io::Write as _,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::Path,
    process::Command,
    thread,
    time::Duration,
};

use crate::{
    Dir, NOBODY, cc,
    common::{Proc, final_report, frame_names, leaks, memprof_trace, num, require_root},
    status_field, wait_tracing,
};

/// Mapped files a traced process controls: a 2 GiB and a 64 GiB sparse file mapped
/// executable, a 2 GiB blob named like python, an ELF whose section headers claim a 2 GiB
/// symbol table. memprof reads only headers: its RSS stays under 200 MiB, the trace goes on.
#[test]
fn huge_mapped_files_are_not_read_whole() {
    require_root();
    let dir = Dir::new("mapped");
    let sparse = |name: &str, len: u64| {
        let p = dir.path(name);
        let f = fs::File::create(&p).unwrap();
        f.set_len(len).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    };
    let two = sparse("two-gib.so", 2 << 30);
    let sixty_four = sparse("sixty-four-gib.so", 64 << 30);
    let python = sparse("libpython3.11-fake.so", 2 << 30);
    // An ELF header whose section headers sit at the end of a 2 GiB file and describe a
    // symbol table of all of it.
    let lying = sparse("lying-elf.so", 2 << 30);
    {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[6] = 1;
        h[0x10] = 3;
        h[0x12] = 62;
        let shoff: u64 = (2 << 30) - 2 * 64;
        h[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        h[0x34] = 64;
        h[0x3a] = 64;
        h[0x3c] = 2;
        let mut sh = [0u8; 128];
        sh[64 + 4..64 + 8].copy_from_slice(&2u32.to_le_bytes()); // SHT_SYMTAB
        sh[64 + 0x18..64 + 0x20].copy_from_slice(&64u64.to_le_bytes());
        sh[64 + 0x20..64 + 0x28].copy_from_slice(&((2u64 << 30) - 256).to_le_bytes());
        sh[64 + 0x38..64 + 0x40].copy_from_slice(&24u64.to_le_bytes());
        let f = fs::OpenOptions::new().write(true).open(&lying).unwrap();
        use std::os::unix::fs::FileExt as _;
        f.write_all_at(&h, 0).unwrap();
        f.write_all_at(&sh, shoff).unwrap();
    }
    let exe = dir.path("mapper");
    let source = format!(
        r#"
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
void *volatile sink;
static void map(const char *p, size_t len) {{
    int fd = open(p, O_RDONLY);
    if (fd < 0 || mmap(0, len, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0) == MAP_FAILED) {{
        perror(p);
        exit(1);
    }}
}}
int main(void) {{
    map("{}", 2UL << 30);
    map("{}", 64UL << 30);
    map("{}", 2UL << 30);
    map("{}", 2UL << 30);
    printf("ready\n");
    fflush(stdout);
    for (;;) {{
        /* About 10,000 allocations a second: what memprof keeps up with on a busy machine,
           so any loss would be the mapped files' doing. */
        for (int i = 0; i < 10; i++) {{ sink = malloc(64 + i); free(sink); }}
        usleep(1000);
    }}
}}
"#,
        two.display(),
        sixty_four.display(),
        python.display(),
        lying.display()
    );
    cc(&dir, &exe, &source, &[]);
    let mut cmd = Command::new(&exe);
    cmd.uid(NOBODY).gid(NOBODY);
    let mut target = Proc::spawn("mapper", &mut cmd);
    target.expect_stdout_line("ready");
    let mut mp = Proc::spawn(
        "memprof",
        &mut memprof_trace(&[
            "--json",
            "--pid",
            &target.pid().to_string(),
            "--duration",
            "3s",
        ]),
    );
    wait_tracing(&mut mp);
    let pid = mp.pid();
    let mut peak = 0;
    while mp.alive() {
        peak = peak.max(status_field(pid, "VmHWM").unwrap_or(0));
        thread::sleep(Duration::from_millis(100));
    }
    let f = mp.finish(Duration::from_secs(30));
    let report = final_report(&f);
    eprintln!("mapped hostile files: memprof peak RSS {} MiB", peak >> 20);
    assert!(peak < 200 << 20, "peak RSS {} MiB", peak >> 20);
    assert!(num(&report["totals"], "allocs") > 0, "the trace went on");
    assert_eq!(num(&report["totals"], "lost_events"), 0);
}

/// Appends `payload` to the ELF file at `path` and makes its `.debug_info` a compressed section
/// holding it (`SHF_COMPRESSED`).
fn make_debug_info(path: &Path, payload: &[u8]) {
    let mut data = fs::read(path).unwrap();
    let u16_at = |d: &[u8], at: usize| u16::from_le_bytes(d[at..at + 2].try_into().unwrap());
    let u32_at = |d: &[u8], at: usize| u32::from_le_bytes(d[at..at + 4].try_into().unwrap());
    let u64_at = |d: &[u8], at: usize| u64::from_le_bytes(d[at..at + 8].try_into().unwrap());
    let shoff = u64_at(&data, 0x28) as usize;
    let shnum = u16_at(&data, 0x3c) as usize;
    let shstrndx = u16_at(&data, 0x3e) as usize;
    let header = |i: usize| shoff + i * 64;
    let names = u64_at(&data, header(shstrndx) + 0x18) as usize;
    let debug_info = (0..shnum)
        .find(|&i| {
            let at = names + u32_at(&data, header(i)) as usize;
            data[at..].starts_with(b".debug_info\0")
        })
        .expect("the library has .debug_info (built with -g)");
    while !data.len().is_multiple_of(8) {
        data.push(0);
    }
    let at = data.len() as u64;
    data.extend_from_slice(payload);
    let h = header(debug_info);
    let flags = u64_at(&data, h + 8) | 0x800; // SHF_COMPRESSED
    data[h + 8..h + 16].copy_from_slice(&flags.to_le_bytes());
    data[h + 0x18..h + 0x20].copy_from_slice(&at.to_le_bytes());
    data[h + 0x20..h + 0x28].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    data[h + 0x30..h + 0x38].copy_from_slice(&8u64.to_le_bytes());
    fs::write(path, data).unwrap();
}

/// A compression header (`Elf64_Chdr`, zlib) claiming `claimed` bytes, then `stream`.
fn compressed(claimed: u64, stream: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&1u32.to_le_bytes()); // ELFCOMPRESS_ZLIB
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&claimed.to_le_bytes());
    out.extend_from_slice(&1u64.to_le_bytes());
    out.extend_from_slice(stream);
    out
}

/// `len` zero bytes as a zlib stream.
fn zlib_zeros(len: u64) -> Vec<u8> {
    use flate2::{Compression, write::ZlibEncoder};
    let mut enc = ZlibEncoder::new(Vec::new(), Compression::best());
    let block = vec![0u8; 1 << 20];
    for _ in 0..len / block.len() as u64 {
        enc.write_all(&block).unwrap();
    }
    enc.finish().unwrap()
}

/// Libraries whose compressed `.debug_info` lies: its header claims 64 GiB, or 2^64-1, or it
/// is a zlib bomb (a few MiB inflating to 2 GiB). They once aborted memprof (`memory
/// allocation of 68719476736 bytes failed`), panicked it (`capacity overflow`) or took it to
/// 2.17 GB RSS. A command allocating from each runs to its end under memprof: the report is
/// whole, the functions are named from the symbol tables, memprof's peak RSS stays under
/// 300 MiB.
#[test]
fn lying_debug_sections_cost_no_report() {
    require_root();
    let dir = Dir::new("debugbombs");
    let bomb = zlib_zeros(2 << 30);
    let small = zlib_zeros(1 << 20);
    let libs = [
        ("claims64g", compressed(64 << 30, &small)),
        ("claimsmax", compressed(u64::MAX, &small)),
        ("bomb", compressed(2 << 30, &bomb)),
    ];
    let mut link = Vec::new();
    for (name, _) in &libs {
        let lib = dir.path(format!("lib{name}.so"));
        let source = format!(
            "#include <stdlib.h>\nvoid *volatile {name}_sink;\n\
             __attribute__((noinline)) void *{name}_alloc(size_t n) {{\n\
             void *p = malloc(n); {name}_sink = p; return p; }}\n"
        );
        cc(&dir, &lib, &source, &["-g", "-shared", "-fPIC"]);
        link.push(format!("-l{name}"));
    }
    let exe = dir.path("bomber");
    let source = libs
        .iter()
        .map(|(name, _)| format!("void *{name}_alloc(unsigned long);\n"))
        .collect::<String>()
        + "int main(void) {\n"
        + &libs
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                format!(
                    "    for (int i = 0; i < 10; i++) {name}_alloc({});\n",
                    1000 + i
                )
            })
            .collect::<String>()
        + "    return 0;\n}\n";
    let mut flags = vec![
        format!("-L{}", dir.0.display()),
        format!("-Wl,-rpath,{}", dir.0.display()),
    ];
    flags.extend(link);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    cc(&dir, &exe, &source, &flags);
    // After linking: the linker refuses such libraries, the dynamic loader reads no section.
    for (name, payload) in &libs {
        make_debug_info(&dir.path(format!("lib{name}.so")), payload);
    }
    let exe_arg = exe.display().to_string();
    let mut mp = Proc::spawn("memprof", &mut memprof_trace(&["--json", "--", &exe_arg]));
    let pid = mp.pid();
    let mut peak = 0;
    while mp.alive() {
        peak = peak.max(status_field(pid, "VmHWM").unwrap_or(0));
        thread::sleep(Duration::from_millis(20));
    }
    let f = mp.finish(Duration::from_secs(60));
    let report = final_report(&f);
    eprintln!("lying debug sections: memprof peak RSS {} MiB", peak >> 20);
    assert!(peak < 300 << 20, "peak RSS {} MiB", peak >> 20);
    assert_eq!(num(&report["totals"], "allocs"), 30, "{}", f.context());
    for (name, _) in &libs {
        let function = format!("{name}_alloc");
        let group = leaks(&report)
            .iter()
            .find(|g| frame_names(g).contains(&function.as_str()))
            .unwrap_or_else(|| panic!("no leak names {function}\n{}", f.context()));
        assert_eq!(num(group, "allocs"), 10, "{function}");
    }
}
