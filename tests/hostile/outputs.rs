//! What memprof writes: names the traced program chose, neutralised; output paths that are
//! planted links, not followed.

use std::{
    fs,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{MetadataExt as _, PermissionsExt as _},
    },
};

use crate::{
    Dir, NOBODY, cc,
    common::{memprof_trace, require_root},
};

/// CSV cells and the text report hold names the traced program chose: a module named
/// `=HYPERLINK(...)` is neutralised in the CSV, an escape sequence is escaped in the text.
#[test]
fn names_from_targets_are_neutralised() {
    require_root();
    let dir = Dir::new("names");
    let name = "=HYPERLINK(\"x\")\x1b]0;owned\x07";
    let exe = dir.path(name);
    cc(
        &dir,
        &exe,
        "#include <stdlib.h>\nvoid *keep[8];\nint main(void) { for (int i = 0; i < 8; i++) keep[i] = malloc(100); return 0; }\n",
        &["-s"],
    );
    let csv = dir.path("sites.csv");
    let out = memprof_trace(&["--csv", csv.to_str().unwrap(), "--"])
        .arg(&exe)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains('\x1b') && !stdout.contains('\x07'),
        "{stdout}"
    );
    assert!(stdout.contains("\\x1b]0;owned\\x07"), "{stdout}");
    let table = fs::read_to_string(&csv).unwrap();
    let stack_of_leak = table
        .lines()
        .find(|l| l.contains("owned"))
        .unwrap_or_else(|| panic!("no row with the program's frames:\n{table}"));
    // The stack column starts with the program's own (unnamed) frame: neutralised.
    assert!(stack_of_leak.contains(",\"'=HYPERLINK("), "{stack_of_leak}");
    assert!(!table.contains(",=") && !table.contains(",\"="), "{table}");
    assert_eq!(fs::metadata(&csv).unwrap().mode() & 0o777, 0o600);
}

/// An output path that is another user's symbolic link is not written through (root would
/// overwrite the link's target); the report still comes, and the error names the file.
#[test]
fn outputs_do_not_follow_planted_links() {
    require_root();
    let dir = Dir::new("links");
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o1777)).unwrap();
    let victim = dir.path("victim");
    fs::write(&victim, "precious").unwrap();
    let link = dir.path("out.html");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let c = std::ffi::CString::new(link.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::lchown(c.as_ptr(), NOBODY, NOBODY) }, 0);
    let saved = dir.path("report.json");
    let out = memprof_trace(&[
        "--html",
        link.to_str().unwrap(),
        "--output",
        saved.to_str().unwrap(),
        "--",
        "true",
    ])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "failed to write {}: it is a symbolic link owned by uid 65534",
            link.display()
        )),
        "{stderr}"
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    assert!(String::from_utf8_lossy(&out.stdout).contains("memprof report"));
    assert_eq!(fs::metadata(&saved).unwrap().mode() & 0o777, 0o600);
}
