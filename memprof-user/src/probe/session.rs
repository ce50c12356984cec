//! Uprobe session programs (kernel 6.10+), loaded and attached by hand: aya 0.16 knows neither
//! the attach type nor the session kfuncs.
//!
//! The session program (`alloc_session`, in a section aya's parser accepts but never loaded by
//! aya) is taken from the same object aya loaded: aya-obj parses it again, relocates its map
//! references to aya's maps (so the globals aya wrote apply) and its calls, and the calls of the
//! placeholder helper ids (`memprof_common::session`) become calls of the session kfuncs, found
//! by name in the kernel's BTF. It is loaded with `BPF_PROG_LOAD` (attach type
//! `BPF_TRACE_UPROBE_SESSION`) and attached with `BPF_LINK_CREATE` and the uprobe-multi
//! attributes, one link per file and process; closing the link's descriptor detaches it.

use std::{
    collections::HashSet,
    ffi::CString,
    io, mem,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{Ebpf, maps::Map};
use aya_obj::{
    Object,
    btf::{Btf, BtfKind},
    generated::{
        BPF_PSEUDO_KFUNC_CALL, bpf_attach_type::BPF_TRACE_UPROBE_SESSION, bpf_attr, bpf_cmd,
        bpf_insn, bpf_prog_info, bpf_prog_type::BPF_PROG_TYPE_KPROBE,
    },
};
use memprof_common::session::KFUNCS;

use super::counters::ProbeStat;

/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;

/// The session program, loaded.
pub struct SessionProgram {
    fd: OwnedFd,
    pub name: &'static str,
}

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<RawFd> {
    // SAFETY: `attr` is a whole, zero-initialized `bpf_attr` of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            mem::size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as RawFd)
    }
}

/// The descriptor of an aya map.
fn map_fd(map: &Map) -> RawFd {
    use Map::*;
    let data = match map {
        Array(d)
        | ArrayOfMaps(d)
        | BloomFilter(d)
        | CgroupArray(d)
        | CgroupStorage(d)
        | CgrpStorage(d)
        | CpuMap(d)
        | DevMap(d)
        | DevMapHash(d)
        | HashMap(d)
        | HashOfMaps(d)
        | InodeStorage(d)
        | LpmTrie(d)
        | LruHashMap(d)
        | PerCpuArray(d)
        | PerCpuCgroupStorage(d)
        | PerCpuHashMap(d)
        | PerCpuLruHashMap(d)
        | PerfEventArray(d)
        | ProgramArray(d)
        | Queue(d)
        | ReusePortSockArray(d)
        | RingBuf(d)
        | SockHash(d)
        | SockMap(d)
        | SkStorage(d)
        | Stack(d)
        | StackTraceMap(d)
        | Unsupported(d)
        | XskMap(d) => d,
    };
    data.fd().as_fd().as_raw_fd()
}

impl SessionProgram {
    /// Loads program `name` of `object` (the bytes aya loaded as `ebpf`, whose maps it uses).
    /// Fails when the kernel has no uprobe sessions or no session kfuncs.
    pub fn load(ebpf: &Ebpf, object: &[u8], name: &'static str) -> Result<Self> {
        let mut obj = Object::parse(object).context("failed to parse the eBPF object")?;
        // The program's BTF: with its function information the verifier checks each global
        // function once.
        let btf = match obj
            .fixup_and_sanitize_btf(|| {
                Some(|f| aya::sys::is_btf_feature_supported(f).unwrap_or(false))
            })
            .context("failed to prepare the object's BTF")?
        {
            Some(btf) => {
                let raw = btf.to_bytes();
                // SAFETY: zeroed is a valid bpf_attr; the union member is the BTF_LOAD one.
                let mut attr: bpf_attr = unsafe { mem::zeroed() };
                let load = unsafe { &mut attr.__bindgen_anon_7 };
                load.btf = raw.as_ptr() as u64;
                load.btf_size = raw.len() as u32;
                let fd = sys_bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr).context("BTF_LOAD failed")?;
                // SAFETY: a descriptor the kernel just gave us.
                Some(unsafe { OwnedFd::from_raw_fd(fd) })
            }
            None => None,
        };
        let maps: Vec<(String, RawFd, aya_obj::Map)> = obj
            .maps
            .iter()
            .filter_map(|(n, m)| Some((n.clone(), map_fd(ebpf.map(n)?), m.clone())))
            .collect();
        let text: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_maps(maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)), &text)
            .context("failed to relocate the session program's maps")?;
        obj.relocate_calls(&text)
            .context("failed to relocate the session program's calls")?;
        let key = obj
            .programs
            .get(name)
            .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
            .function_key();
        let func = &obj.functions[&key];
        let mut insns: Vec<bpf_insn> = func.instructions.clone();
        patch_kfuncs(&mut insns)?;

        let license = c"GPL";
        let mut log = vec![0u8; 256 << 10];
        let load = |log_level: u32, log: &mut Vec<u8>| {
            // SAFETY: zeroed is a valid bpf_attr; the union member is the PROG_LOAD one.
            let mut attr: bpf_attr = unsafe { mem::zeroed() };
            let p = unsafe { &mut attr.__bindgen_anon_3 };
            p.prog_type = BPF_PROG_TYPE_KPROBE as u32;
            p.expected_attach_type = BPF_TRACE_UPROBE_SESSION as u32;
            p.insn_cnt = insns.len() as u32;
            p.insns = insns.as_ptr() as u64;
            p.license = license.as_ptr() as u64;
            if log_level > 0 {
                p.log_level = log_level;
                p.log_buf = log.as_mut_ptr() as u64;
                p.log_size = log.len() as u32;
            }
            if let Some(btf) = &btf {
                p.prog_btf_fd = btf.as_raw_fd() as u32;
                p.func_info_rec_size = func.func_info_rec_size as u32;
                p.func_info = func.func_info.func_info.as_ptr() as u64;
                p.func_info_cnt = func.func_info.func_info.len() as u32;
                p.line_info_rec_size = func.line_info_rec_size as u32;
                p.line_info = func.line_info.line_info.as_ptr() as u64;
                p.line_info_cnt = func.line_info.line_info.len() as u32;
            }
            for (d, s) in p.prog_name.iter_mut().zip(name.bytes().take(15)) {
                *d = s as _;
            }
            sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
        };
        let fd = match load(0, &mut log) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Again with the verifier's log, for the message.
                let _ = load(1, &mut log);
                let end = log.iter().position(|b| *b == 0).unwrap_or(0);
                let last = String::from_utf8_lossy(&log[..end])
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or_default()
                    .to_string();
                bail!("the kernel rejected program {name}: {e} ({last})");
            }
            Err(e) => bail!("the kernel rejected program {name}: {e}"),
        };
        // SAFETY: a descriptor the kernel just gave us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, name })
    }

    /// Attaches the program at `points` (file offset, cookie) of `path` for process `pid` (0:
    /// every process); closing the returned descriptor detaches every point.
    pub fn attach(&self, path: &Path, points: &[(u64, u64)], pid: u32) -> Result<OwnedFd> {
        let path = CString::new(path.as_os_str().as_bytes())?;
        let offsets: Vec<u64> = points.iter().map(|p| p.0).collect();
        let cookies: Vec<u64> = points.iter().map(|p| p.1).collect();
        // SAFETY: zeroed is a valid bpf_attr; the union members are the LINK_CREATE ones.
        let mut attr: bpf_attr = unsafe { mem::zeroed() };
        let link = unsafe { &mut attr.link_create };
        link.__bindgen_anon_1.prog_fd = self.fd.as_raw_fd() as u32;
        link.attach_type = BPF_TRACE_UPROBE_SESSION as u32;
        let multi = unsafe { &mut link.__bindgen_anon_3.uprobe_multi };
        multi.path = path.as_ptr() as u64;
        multi.offsets = offsets.as_ptr() as u64;
        multi.cookies = cookies.as_ptr() as u64;
        multi.cnt = offsets.len() as u32;
        multi.pid = pid;
        let fd = sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)
            .with_context(|| format!("failed to attach {}", self.name))?;
        // SAFETY: a descriptor the kernel just gave us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The program's runs and total run time (while the kernel's statistics are on), its size
    /// and the verifier's work.
    pub fn stats(&self) -> Option<ProbeStat> {
        let mut info: bpf_prog_info = unsafe { mem::zeroed() };
        // SAFETY: zeroed is a valid bpf_attr; the union member is the OBJ_GET_INFO one.
        let mut attr: bpf_attr = unsafe { mem::zeroed() };
        let get = unsafe { &mut attr.info };
        get.bpf_fd = self.fd.as_raw_fd() as u32;
        get.info_len = mem::size_of::<bpf_prog_info>() as u32;
        get.info = &raw mut info as u64;
        sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).ok()?;
        Some(ProbeStat::new(
            self.name,
            info.run_cnt,
            info.run_time_ns,
            u64::from(info.xlated_prog_len),
            u64::from(info.verified_insns),
        ))
    }
}

/// Rewrites the calls of placeholder helper ids into calls of the session kfuncs, whose ids
/// come from the kernel's BTF.
fn patch_kfuncs(insns: &mut [bpf_insn]) -> Result<()> {
    if !insns
        .iter()
        .any(|i| i.code == CALL && i.src_reg() == 0 && placeholder(i.imm).is_some())
    {
        return Ok(());
    }
    let vmlinux = Btf::from_sys_fs().context("failed to read the kernel's BTF")?;
    for insn in insns {
        if insn.code != CALL || insn.src_reg() != 0 {
            continue;
        }
        if let Some(name) = placeholder(insn.imm) {
            let id = vmlinux
                .id_by_type_name_kind(name, BtfKind::Func)
                .with_context(|| format!("the kernel has no {name} (uprobe sessions need 6.10)"))?;
            insn.set_src_reg(BPF_PSEUDO_KFUNC_CALL as u8);
            insn.imm = id as i32;
            // 0: the kfunc is in the kernel's own BTF.
            insn.off = 0;
        }
    }
    Ok(())
}

/// The kfunc a placeholder helper id stands for.
fn placeholder(imm: i32) -> Option<&'static str> {
    KFUNCS
        .iter()
        .find(|(id, _)| *id as i32 == imm)
        .map(|(_, name)| *name)
}
