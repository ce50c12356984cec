//! Stacks that mix native and Python frames: their keys, and where a thread's Python frames go
//! among its native ones.

use std::ops::Range;

use memprof_common::PY_ENTRY;

use super::RawFrame;

/// The key of a stack with Python frames: native key and Python key combined, with bit 62 set.
pub fn python_key(native: u64, py: u64) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (native, py).hash(&mut h);
    (h.finish() | (1 << 62)) & !(1 << 63)
}

/// Where a thread's Python frames go among its native frames `natives` (innermost first, their
/// modules indexing `modules`): above the first frame in the interpreter's object `interpreter`
/// (the eval loop), or outermost when no frame lies in it.
pub fn python_position(natives: &[RawFrame], modules: &[String], interpreter: &str) -> usize {
    natives
        .iter()
        .position(|f| {
            f.module
                .and_then(|m| modules.get(m as usize))
                .is_some_and(|path| path.ends_with(interpreter))
        })
        .unwrap_or(natives.len())
}

/// The Python frames of a stack as the kernel recorded them ((code, instruction) pairs,
/// innermost first) split into one group per call of the eval loop, innermost first: a group
/// ends at a shim frame (code 0, 3.12+), after a frame marked `PY_ENTRY` (3.11), or, with
/// `frame_per_call` (before 3.11, where each frame is a call of its own), after every frame.
/// Shims are left out and the marks cleared; a group may be empty (a call whose frames have
/// not started).
pub fn python_groups(pairs: &[(u64, u64)], frame_per_call: bool) -> Vec<Vec<(u64, u64)>> {
    let mut groups = Vec::new();
    let mut current = Vec::new();
    for &(code, instr) in pairs {
        if code == 0 {
            groups.push(std::mem::take(&mut current));
            continue;
        }
        current.push((code, instr & !PY_ENTRY));
        if frame_per_call || instr & PY_ENTRY != 0 {
            groups.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

/// Where each group of Python frames goes among the native frames `natives` (innermost first):
/// the native index each is inserted before, in the groups' order. Group `j` goes just outside
/// the `j`-th native frame in the eval loop (`eval_loop`, runtime ranges), counted from the
/// innermost: the C call that runs that Python code. Groups beyond the eval frames found go
/// outermost (the native walk ended first). With no eval frame found, every group goes at
/// `fallback`.
pub fn python_places(
    natives: &[RawFrame],
    eval_loop: &[Range<u64>],
    groups: usize,
    fallback: usize,
) -> Vec<usize> {
    // Return addresses: the call lies just before.
    let evals: Vec<usize> = natives
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            f.python.is_none()
                && eval_loop
                    .iter()
                    .any(|r| r.contains(&f.addr.wrapping_sub(1)))
        })
        .map(|(i, _)| i)
        .collect();
    if evals.is_empty() {
        return vec![fallback.min(natives.len()); groups];
    }
    (0..groups)
        .map(|j| evals.get(j).map_or(natives.len(), |&i| i + 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(module: Option<u32>) -> RawFrame {
        RawFrame {
            addr: 0x1000,
            module,
            file_offset: 0x10,
            python: None,
        }
    }

    #[test]
    fn python_frames_go_above_the_interpreter() {
        let modules = vec!["/opt/ext.so".to_string(), "/usr/bin/python3.11".to_string()];
        let natives = [
            native(Some(0)),
            native(None),
            native(Some(1)),
            native(Some(1)),
        ];
        assert_eq!(python_position(&natives, &modules, "python3.11"), 2);
        assert_eq!(python_position(&natives[..2], &modules, "python3.11"), 2);
        assert_eq!(python_position(&[], &modules, "python3.11"), 0);
    }

    #[test]
    fn python_keys_are_tagged() {
        let k = python_key(1, 2);
        assert_eq!(k >> 62, 1);
        assert_ne!(k, python_key(2, 1));
    }

    fn at(addr: u64) -> RawFrame {
        RawFrame {
            addr,
            module: Some(0),
            file_offset: addr,
            python: None,
        }
    }

    #[test]
    fn groups_end_at_shims_entries_or_every_frame() {
        // 3.12+: f0 f1 | shim | f2 | shim.
        let pairs = [(10, 1), (11, 2), (0, 0), (12, 3), (0, 0)];
        assert_eq!(
            python_groups(&pairs, false),
            vec![vec![(10, 1), (11, 2)], vec![(12, 3)]]
        );
        // Two shims in a row: a call with no frame of its own yet.
        assert_eq!(
            python_groups(&[(0, 0), (12, 3), (0, 0)], false),
            vec![vec![], vec![(12, 3)]]
        );
        // 3.11: the outermost frame of each call carries the mark, cleared in the groups.
        let pairs = [(10, 1), (11, 2 | PY_ENTRY), (12, 3 | PY_ENTRY)];
        assert_eq!(
            python_groups(&pairs, false),
            vec![vec![(10, 1), (11, 2)], vec![(12, 3)]]
        );
        // A walk cut short leaves an unterminated outermost group.
        assert_eq!(
            python_groups(&[(10, 1), (0, 0), (11, 2)], false),
            vec![vec![(10, 1)], vec![(11, 2)]]
        );
        // Before 3.11 each frame is a call.
        assert_eq!(
            python_groups(&[(10, 1), (11, 2)], true),
            vec![vec![(10, 1)], vec![(11, 2)]]
        );
    }

    #[test]
    fn groups_go_outside_their_eval_calls() {
        let eval = [0x5000..0x6000, 0x9000..0x9100];
        // zlib <- C function <- eval [G0] <- helper <- eval.cold [G1] <- main
        let natives = [
            at(0x100),
            at(0x200),
            at(0x5010),
            at(0x300),
            at(0x9001),
            at(0x400),
        ];
        assert_eq!(python_places(&natives, &eval, 2, 0), vec![3, 5]);
        // A return address just past the end belongs to the function (the call was its last
        // instruction); one at its start does not.
        let edge = [at(0x6000), at(0x5000)];
        assert_eq!(python_places(&edge, &eval, 1, 0), vec![1]);
        // More groups than eval frames: the rest go outermost.
        assert_eq!(python_places(&natives, &eval, 3, 0), vec![3, 5, 6]);
        // No eval frame found: all at the fallback.
        assert_eq!(python_places(&natives[..2], &eval, 2, 1), vec![1, 1]);
    }
}
