use super::*;

#[test]
fn versions_from_names_and_hex() {
    let v = |major, minor, micro| PyVersion {
        major,
        minor,
        micro,
    };
    let unknown = PyVersion::MICRO_UNKNOWN;
    assert_eq!(
        PyVersion::from_file_name("libpython3.11.so.1.0"),
        Some(v(3, 11, unknown))
    );
    assert_eq!(
        PyVersion::from_file_name("python3.8"),
        Some(v(3, 8, unknown))
    );
    assert_eq!(
        PyVersion::from_file_name("libpython3.7m.so.1.0"),
        Some(v(3, 7, unknown))
    );
    assert_eq!(v(3, 7, unknown).to_string(), "3.7");
    assert_eq!(v(3, 14, 8).to_string(), "3.14.8");
    assert_eq!(PyVersion::from_file_name("python3"), None);
    assert_eq!(PyVersion::from_hex(0x030b07f0), v(3, 11, 7));
    assert_eq!(PyVersion::from_hex(0x030d00f0), v(3, 13, 0));
}

#[test]
fn layouts_cover_3_8_to_3_13() {
    for minor in 8..=13 {
        let o = PyOffsets::for_version(3, minor).expect("supported");
        assert_eq!(o.version_hex, 0x0300_0000 | (u32::from(minor) << 16));
        assert_eq!(o.frame_model == FRAME_MODEL_INTERPRETER_FRAME, minor >= 11);
        assert_eq!(o.code_qualname != NONE, minor >= 11);
        assert_eq!(o.runtime_tstate_current != NONE, minor <= 11);
        // The rules `from_debug_offsets` derives what 3.14+ do not publish with.
        if minor >= 11 {
            assert_eq!(
                o.code_firsttraceable,
                o.code_code_adaptive - 16,
                "3.{minor}"
            );
        }
        if minor >= 12 {
            assert_eq!(
                o.unicode_compact_data,
                o.unicode_ascii_data + 16,
                "3.{minor}"
            );
        }
    }
    assert_eq!(PyOffsets::for_version(3, 7), None);
    assert_eq!(PyOffsets::for_version(3, 14), None);
    assert_eq!(
        std::mem::size_of::<PyOffsets>(),
        32 * 4,
        "u32 fields, no padding"
    );
}

/// The start of `_PyRuntime` as a build initializes it: the cookie, `version`,
/// `free_threaded`, then the offsets (`words`).
fn runtime_head(version: u64, free_threaded: u64, words: &[u64]) -> Vec<u8> {
    let mut bytes = vec![0u8; DEBUG_OFFSETS_SIZE];
    bytes[..8].copy_from_slice(b"xdebugpy");
    for (i, w) in [version, free_threaded].iter().chain(words).enumerate() {
        bytes[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_le_bytes());
    }
    bytes
}

/// `_Py_DebugOffsets` of pyenv's CPython 3.13.0 (libpython3.13.so.1.0's `.data`).
const PY_3_13_0: &[u64] = &[
    283320, 608, 632, 194968, 7272, 7264, 7344, 7400, 7656, 7640, 7648, 16, 7752, 0, 7768, 7760,
    304, 0, 8, 16, 72, 152, 160, 232, 32, 80, 8, 0, 56, 72, 70, 208, 112, 120, 128, 136, 68, 52,
    96, 104, 200, 16, 8, 416, 24, 88, 168, 32, 24, 16, 40, 24, 16, 48, 32, 40, 24, 16, 32, 16, 24,
    40, 16, 32, 64, 32, 16, 40, 240, 200,
];
/// Of Debian's CPython 3.14.8 (forky's /usr/bin/python3.14, libpython linked in).
const PY_3_14_8: &[u64] = &[
    316616, 784, 808, 225864, 7280, 7272, 7344, 7360, 7408, 7688, 7672, 7680, 16, 7784, 0, 7800,
    7792, 7992, 0, 832, 0, 8, 16, 72, 152, 160, 232, 32, 88, 8, 0, 56, 80, 74, 64, 0, 216, 112,
    120, 128, 136, 68, 52, 96, 104, 208, 0, 16, 8, 416, 24, 88, 168, 40, 32, 16, 40, 24, 16, 200,
    24, 40, 32, 48, 32, 40, 24, 16, 32, 16, 24, 40, 16, 32, 64, 32, 16, 40, 264, 192, 160, 24, 72,
    67, 0, 8, 24, 304, 8076, 0, 4, 512,
];
/// Of Debian's CPython 3.15.0 (forky's /usr/bin/python3.15).
const PY_3_15_0: &[u64] = &[
    346568, 912, 936, 226240, 7272, 7264, 7336, 7352, 7400, 7592, 7576, 7584, 16, 7736, 0, 7752,
    7744, 7944, 0, 888, 0, 8, 16, 72, 80, 88, 96, 176, 184, 256, 32, 36, 40, 136, 288, 0, 88, 8, 0,
    56, 80, 74, 64, 0, 216, 112, 120, 128, 136, 68, 52, 96, 104, 208, 0, 16, 8, 424, 24, 88, 168,
    32, 288, 944, 888, 40, 32, 16, 40, 24, 16, 200, 24, 40, 32, 48, 32, 40, 24, 16, 32, 16, 24, 40,
    16, 32, 64, 32, 16, 40, 56, 176, 112, 120, 1112, 104, 160, 24, 72, 67, 0, 8, 24, 344, 8028, 0,
    4, 512,
];

#[test]
fn debug_offsets_of_3_13_are_the_measured_table() {
    let d = DebugOffsets::parse(&runtime_head(0x030d00f0, 0, PY_3_13_0)).expect("3.13.0");
    assert_eq!(d.layout, 0x030d_0000);
    let table = PyOffsets::for_version(3, 13);
    assert_eq!(PyOffsets::from_debug_offsets(&d, table), table.unwrap());
    // Without the table, only `autoTSSkey` (which the kernel does not use) is missing.
    let derived = PyOffsets::from_debug_offsets(&d, None);
    assert_eq!(
        derived,
        PyOffsets {
            runtime_tss_key: NONE,
            ..table.unwrap()
        }
    );
}

#[test]
fn debug_offsets_of_3_14_and_3_15() {
    let want_3_14 = PyOffsets {
        version_hex: 0x030e_0000,
        frame_model: FRAME_MODEL_INTERPRETER_FRAME,
        instr_kind: INSTR_POINTER,
        runtime_interpreters_head: 808,
        runtime_tstate_current: NONE,
        runtime_tss_key: NONE,
        interp_next: 7272,
        interp_threads_head: 7344,
        tstate_next: 8,
        tstate_frame: 72,
        cframe_current_frame: NONE,
        tstate_thread_id: 152,
        tstate_native_thread_id: 160,
        frame_previous: 8,
        frame_code: 0,
        frame_instr: 56,
        frame_owner: 74,
        frame_is_entry: NONE,
        object_type: 8,
        code_name: 120,
        code_filename: 112,
        code_qualname: 128,
        code_firstlineno: 68,
        code_linetable: 136,
        code_code_adaptive: 208,
        code_firsttraceable: 192,
        unicode_state: 32,
        unicode_length: 16,
        unicode_ascii_data: 40,
        unicode_compact_data: 56,
        bytes_size: 16,
        bytes_data: 32,
    };
    let d = DebugOffsets::parse(&runtime_head(0x030e08f0, 0, PY_3_14_8)).expect("3.14.8");
    assert_eq!((d.layout, d.unicode_compact_size), (0x030e_0000, None));
    assert_eq!(PyOffsets::from_debug_offsets(&d, None), want_3_14);
    let d = DebugOffsets::parse(&runtime_head(0x030f00f0, 0, PY_3_15_0)).expect("3.15.0");
    assert_eq!((d.layout, d.unicode_compact_size), (0x030f_0000, Some(56)));
    assert_eq!(
        PyOffsets::from_debug_offsets(&d, None),
        PyOffsets {
            version_hex: 0x030f_0000,
            runtime_interpreters_head: 936,
            interp_next: 7264,
            interp_threads_head: 7336,
            tstate_thread_id: 176,
            tstate_native_thread_id: 184,
            ..want_3_14
        }
    );
    // A later version is read with 3.15's layout: the same struct works as is...
    let d = DebugOffsets::parse(&runtime_head(0x031000f0, 0, PY_3_15_0)).expect("3.16.0");
    assert_eq!((d.version, d.layout), (0x031000f0, 0x030f_0000));
    // ...and one laid out otherwise is refused, not misread: 3.14's struct read as 3.15's
    // puts the code object's offsets past its size.
    let err = DebugOffsets::parse(&runtime_head(0x031000f0, 0, PY_3_14_8)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "its _Py_DebugOffsets do not read as the layout of 3.15 (the newest memprof knows): \
         code_object.filename is 208, past the struct's 104 bytes"
    );
    let d = DebugOffsets::parse(&runtime_head(0x030e08f0, 1, PY_3_14_8)).expect("3.14t");
    assert_eq!(d.free_threaded, 1);
}

#[test]
fn debug_offsets_need_the_cookie_and_3_13() {
    let mut bytes = runtime_head(0x030d00f0, 0, PY_3_13_0);
    assert!(DebugOffsets::parse(&bytes).is_ok());
    assert_eq!(
        DebugOffsets::parse(&bytes[..16]),
        Err(DebugOffsetsError::NoCookie),
        "too short"
    );
    bytes[8..16].copy_from_slice(&0x030c00f0u64.to_le_bytes());
    assert!(matches!(
        DebugOffsets::parse(&bytes),
        Err(DebugOffsetsError::TooOld(_))
    ));
    bytes[0] = b'X';
    assert_eq!(
        DebugOffsets::parse(&bytes),
        Err(DebugOffsetsError::NoCookie)
    );
    // Sizes of no real struct.
    let mut words = PY_3_13_0.to_vec();
    words[0] = 0;
    assert!(matches!(
        DebugOffsets::parse(&runtime_head(0x030d00f0, 0, &words)),
        Err(DebugOffsetsError::Layout { layout: 13, .. })
    ));
}
