//! Stacks that mix native and Python frames: their keys, and where a thread's Python frames go
//! among its native ones.

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
}
