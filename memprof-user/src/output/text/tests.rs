use memprof_common::NO_STACK;

use super::*;
use crate::{
    analysis::{
        diff::{
            diff,
            tests::{after, before, frame, leak, report},
        },
        tracking::Tracker,
    },
    probe::ProbeStat,
    report::{
        fixtures::{alloc, inputs},
        snapshot,
    },
    stacks::Sites,
    table::Tables,
};

#[test]
fn text_mentions_losses_and_sites() {
    let mut table = Tables::default();
    table.apply(&alloc(0x10, 64, NO_STACK, 1));
    let sites = Sites::new();
    let tracker = Tracker::new(&[], 0);
    let text = render(&snapshot(&inputs(&table, &sites, &tracker, 0)));
    assert!(
        text.contains("lost events  8 (5 left unread at the end)    lost stacks 4"),
        "{text}"
    );
    assert!(text.contains("64 B in 1 allocations via malloc"), "{text}");
    assert!(!text.contains("programs"), "{text}");
    let mut probed = inputs(&table, &sites, &tracker, 0);
    probed.probe_stats = vec![
        ProbeStat::new("alloc_return", 4, 1802, 8 * 5688, 39672),
        ProbeStat::new("free_entry", 2, 401, 0, 0),
    ];
    let text = render(&snapshot(&probed));
    assert!(
        text.contains(
            "  programs     alloc_return 450 ns x 4, free_entry 200 ns x 2\n  \
             loaded       alloc_return 5688 instructions (39672 verified)\n"
        ),
        "{text}"
    );
}

#[test]
fn text_explains_rss() {
    let mut table = Tables::default();
    table.apply(&alloc(0x10, 64, NO_STACK, 1));
    let sites = Sites::new();
    let tracker = Tracker::new(&[], 0);
    let key = (
        sites.site_of(NO_STACK),
        memprof_common::AllocFn::Malloc,
        false,
    );
    let residency: std::collections::HashMap<u32, crate::analysis::rss::Residency> = [(
        42,
        crate::analysis::rss::Residency {
            explained: crate::report::sample::rss_explained(0),
            groups: [(key, 48)].into_iter().collect(),
            ..Default::default()
        },
    )]
    .into_iter()
    .collect();
    let mut i = inputs(&table, &sites, &tracker, 0);
    i.residency = &residency;
    let text = render(&snapshot(&i));
    assert!(
        text.contains(
            "  RSS explained  live 293.0 KiB, retained by the allocator 195.3 KiB, other \
             488.3 KiB (of 976.6 KiB); allocated, never touched 48.8 KiB\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("unknown: fewer than 5 samples, 48 B resident\n"),
        "{text}"
    );
}

#[test]
fn text_lists_changes_by_size() {
    let d = diff(&before(), &after()).unwrap();
    let text = render_diff(&d, 3);
    let expected = "\
memprof diff: outstanding heap 9.8 KiB -> 12.2 KiB (+2.4 KiB, +25.0%)    mmap +4.0 KiB
  call sites   1 new, 1 gone, 1 grew, 1 shrank, 1 same

Top 3 of 4 changed call sites by bytes:
      change      before       after   allocs  status  allocator        stack (innermost first)
    +2.9 KiB     2.0 KiB     4.9 KiB      +15  grew    malloc (heap)    parse_header <- server+0x5000
    +2.4 KiB         0 B     2.4 KiB       +2  new     malloc (heap)    libz.so.1+0x1000 <- ?
    -2.0 KiB     2.9 KiB      1000 B      -18  shrank  realloc (heap)   log_append
";
    assert_eq!(text, expected, "got:\n{text}");
}

#[test]
fn names_from_targets_cannot_drive_the_terminal() {
    let text = printable("site \x1b]0;owned\x07 <- main\nnext\n".to_string());
    assert_eq!(text, "site \\x1b]0;owned\\x07 <- main\nnext\n");
    let mut table = Tables::default();
    table.apply(&alloc(0x10, 64, NO_STACK, 1));
    let (sites, tracker) = (Sites::new(), Tracker::new(&[], 0));
    let text = render(&snapshot(&inputs(&table, &sites, &tracker, 0)));
    assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
}

#[test]
fn text_without_changes() {
    let r = report("report", 0, 0, vec![]);
    let text = render_diff(&diff(&r, &r).unwrap(), 10);
    assert!(text.contains("0 B -> 0 B (0 B, unchanged)"), "{text}");
    assert!(text.ends_with("No call site changed.\n"), "{text}");
    let long = report(
        "report",
        8,
        0,
        vec![leak(
            8,
            1,
            "malloc",
            "heap",
            (0..6)
                .map(|i| frame(Some(&format!("f{i}")), None, "0x1"))
                .collect(),
        )],
    );
    let text = render_diff(&diff(&r, &long).unwrap(), 10);
    assert!(text.contains("0 B -> 8 B (+8 B, from nothing)"), "{text}");
    assert!(text.contains("f0 <- f1 <- f2 <- f3 <- ...\n"), "{text}");
}
