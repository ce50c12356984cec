//! Wire types shared by the kernel programs and the agent.
//!
//! Every record in the `EVENTS` ring buffer starts with an [`EventHeader`]. The header carries
//! [`EVENT_VERSION`] and a [`EventKind`] value; the agent checks both and the record length before
//! reading the body, so a kernel object and an agent from different builds fail loudly instead of
//! misreading bytes. All types are `#[repr(C)]` with fixed-width fields and explicit padding: no
//! `usize`, no pointers, no Rust enums cross the boundary.
#![no_std]

mod config;
mod event;
mod kmem;
mod python;
mod sampling;
mod stack;
mod tables;

pub use config::*;
pub use event::*;
pub use kmem::*;
pub use python::*;
pub use sampling::*;
pub use stack::*;
pub use tables::*;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), made of integers, with explicit padding.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::AllocEvent {}
    unsafe impl aya::Pod for super::FreeEvent {}
    unsafe impl aya::Pod for super::PyFreeEvent {}
    unsafe impl aya::Pod for super::UnmapEvent {}
    unsafe impl aya::Pod for super::RemapEvent {}
    unsafe impl aya::Pod for super::StackTrace {}
    unsafe impl aya::Pod for super::PhaseEvent {}
    unsafe impl aya::Pod for super::ForkEvent {}
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::UnwindEvent {}
    unsafe impl aya::Pod for super::PyWalk {}
    unsafe impl aya::Pod for super::PyStack {}
    unsafe impl aya::Pod for super::TextRanges {}
    unsafe impl aya::Pod for super::RowBlock {}
    unsafe impl aya::Pod for super::IdxBlock {}
    unsafe impl aya::Pod for super::ModuleInfo {}
    unsafe impl aya::Pod for super::ProcMaps {}
    unsafe impl aya::Pod for super::KmemFields {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_are_stable() {
        assert_eq!(size_of::<EventHeader>(), 24);
        assert_eq!(size_of::<AllocEvent>(), 56);
        assert_eq!(size_of::<FreeEvent>(), 32);
        assert_eq!(size_of::<PyFreeEvent>(), 40);
        assert_eq!(size_of::<UnmapEvent>(), 40);
        assert_eq!(size_of::<RemapEvent>(), 56);
        assert_eq!(size_of::<PhaseEvent>(), 32);
        assert_eq!(size_of::<ForkEvent>(), 32);
        assert_eq!(size_of::<ExecEvent>(), 304);
        assert_eq!(size_of::<UnwindEvent>(), 80);
        assert_eq!(size_of::<PyWalk>(), 72);
        assert_eq!(size_of::<StackTrace>(), 1024);
        assert_eq!(size_of::<UnwindRow>(), 8);
        assert_eq!(size_of::<RowBlock>(), 512);
        assert_eq!(size_of::<IdxBlock>(), 512);
        assert_eq!(size_of::<ModuleInfo>(), 32);
        assert_eq!(size_of::<KmemFields>(), 64);
        assert_eq!(size_of::<ExecMap>(), 32);
        assert_eq!(size_of::<ProcMaps>(), 16 + 32 * MAX_EXEC_MAPS);
    }

    #[test]
    fn enums_round_trip() {
        for f in AllocFn::ALL {
            assert_eq!(AllocFn::from_u32(f as u32), Some(f));
        }
        assert_eq!(AllocFn::from_u32(0), None);
        assert_eq!(AllocFn::from_u32(17), Some(AllocFn::Percpu));
        assert_eq!(AllocFn::from_u32(18), None);
        for k in 1..=16 {
            assert_eq!(EventKind::from_u16(k).map(|k| k as u16), Some(k));
        }
        assert_eq!(EventKind::from_u16(17), None);
        assert_eq!(EventKind::from_u16(14), Some(EventKind::ReallocSettled));
    }

    #[test]
    fn exp_interval_samples_with_the_right_probability() {
        let mean = 1u64 << 16;
        // The mean, over a stratified sample of the whole input range.
        let n = 1u64 << 20;
        let sum: f64 = (0..n)
            .map(|i| exp_interval((i << 12 | 0x800) as u32, mean) as f64)
            .sum();
        let avg = sum / n as f64 / mean as f64;
        assert!((avg - 1.0).abs() < 2e-5, "mean {avg}");
        // P(draw < s) = 1 - exp(-s/mean): only inputs near the top can draw less than s, so
        // those are enumerated (every 61st input from just below the threshold).
        for s in [mean / 1024, mean / 64, mean / 8, mean / 5, mean, 4 * mean] {
            let want = 1.0 - libm_exp(-(s as f64) / mean as f64);
            let lo = (libm_exp(-(s as f64) / mean as f64 * 1.05) * 4294967296.0) as u64;
            let step = 61;
            let hits = (lo..1 << 32)
                .step_by(step)
                .filter(|&r| exp_interval(r as u32, mean) < s)
                .count();
            let got = hits as f64 * step as f64 / 4294967296.0;
            assert!(
                (got / want - 1.0).abs() < 2e-4,
                "s = {s}: P {got}, want {want}"
            );
        }
        assert_eq!(exp_interval(u32::MAX, mean), 0, "x = 1: -ln x = 0");
        let top = exp_interval(0, mean) as f64 / mean as f64;
        assert!((top - 32.0 * core::f64::consts::LN_2).abs() < 1e-3, "{top}");
        // The largest mean does not overflow.
        let big = exp_interval(0, MAX_SAMPLE_MEAN) as f64 / MAX_SAMPLE_MEAN as f64;
        assert!((big - 32.0 * core::f64::consts::LN_2).abs() < 1e-3, "{big}");
    }

    #[test]
    fn python_frame_span_covers_the_furthest_field() {
        let mut walk = PyWalk {
            runtime: 0,
            runtime_interpreters_head: 0,
            interp_threads_head: 0,
            tstate_next: 0,
            tstate_native_thread_id: 0,
            tstate_frame: 0,
            cframe_current_frame: PY_NONE,
            // PyFrameObject of CPython 3.8: f_back, f_code, int f_lasti.
            frame_previous: 24,
            frame_code: 32,
            frame_instr: 104,
            instr_is_pointer: 0,
            frame_owner: PY_NONE,
            frame_span: 0,
            frames_in_data_stack: 0,
            frame_is_entry: PY_NONE,
            code_firstlineno: 40,
        };
        assert_eq!(walk.span_of_frame_fields(), Some(108));
        // _PyInterpreterFrame of 3.12: f_code 0, previous 8, prev_instr 56, char owner 70.
        walk.frame_code = 0;
        walk.frame_previous = 8;
        walk.frame_instr = 56;
        walk.instr_is_pointer = 1;
        walk.frame_owner = 70;
        assert_eq!(walk.span_of_frame_fields(), Some(71));
        walk.frame_owner = PY_NONE;
        assert_eq!(walk.span_of_frame_fields(), Some(64));
        // 3.11: bool is_entry at 68, then owner at 69.
        walk.frame_is_entry = 68;
        assert_eq!(walk.span_of_frame_fields(), Some(69));
        walk.frame_is_entry = PY_NONE;
        walk.frame_previous = PY_FRAME_COPY - 4;
        assert_eq!(walk.span_of_frame_fields(), None);
        // A field the reader could not place.
        walk.frame_previous = PY_NONE;
        assert_eq!(walk.span_of_frame_fields(), None);
    }

    /// exp for the no_std test (Taylor series after range reduction; ~1e-15 here).
    fn libm_exp(x: f64) -> f64 {
        let n = (x / core::f64::consts::LN_2) as i32;
        let r = x - n as f64 * core::f64::consts::LN_2;
        let (mut term, mut sum) = (1.0, 1.0);
        for k in 1..30 {
            term *= r / k as f64;
            sum += term;
        }
        let scale = if n < 0 { 0.5 } else { 2.0 };
        (0..n.unsigned_abs()).fold(sum, |acc, _| acc * scale)
    }
}
