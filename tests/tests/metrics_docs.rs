//! The metrics rule of issue 24: every series a role exports is documented
//! in docs/operations.md, so an operator reading a dashboard can look any
//! name up. A series is a string literal `"pushgrid_..."` in the roles'
//! source (`crates/*/src`, test modules included: a name that only tests
//! use is still worth a line, and a false alarm costs one row); the test
//! fails naming each series the document does not mention.

use std::collections::BTreeSet;
use std::path::Path;

use pushgrid_e2e::{rust_files, workspace_root};

/// Every `"pushgrid_<lowercase, digits, _>"` literal of `text`.
fn series_in(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("\"pushgrid_") {
        let after = &rest[start + 1..];
        let end = after
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(after.len());
        if after[end..].starts_with('"') {
            found.insert(after[..end].to_string());
        }
        rest = &after[end..];
    }
    found
}

/// The metric series named in the roles' source.
fn exported_series(root: &Path) -> BTreeSet<String> {
    let mut files = Vec::new();
    let crates =
        std::fs::read_dir(root.join("crates")).expect("the workspace has a crates directory");
    for entry in crates {
        let src = entry
            .expect("a readable directory entry")
            .path()
            .join("src");
        if src.is_dir() {
            rust_files(&src, &mut files);
        }
    }
    files
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(file)
                .unwrap_or_else(|error| panic!("{}: {error}", file.display()));
            series_in(&text)
        })
        .collect()
}

/// Whether `text` names `name` whole: `pushgrid_saver_owed` is not
/// mentioned by `pushgrid_saver_owed_dropped_total`.
fn mentions(text: &str, name: &str) -> bool {
    let part_of_name = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    text.match_indices(name).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + name.len()..].chars().next();
        !before.is_some_and(part_of_name) && !after.is_some_and(part_of_name)
    })
}

#[test]
fn every_exported_series_is_in_the_operations_guide() {
    let root = workspace_root();
    let series = exported_series(&root);
    // The scan finds the series every deployment relies on; an empty or
    // tiny set means it is looking in the wrong place.
    for known in [
        "pushgrid_room_connections",
        "pushgrid_center_pushed_total",
        "pushgrid_saver_owed",
    ] {
        assert!(series.contains(known), "the scan misses {known}");
    }
    let guide = std::fs::read_to_string(root.join("docs/operations.md"))
        .expect("docs/operations.md is readable");
    let missing: Vec<&String> = series
        .iter()
        .filter(|name| !mentions(&guide, name))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} series are not in docs/operations.md: {missing:?}",
        missing.len(),
        series.len()
    );
}

#[test]
fn the_scan_reads_literals_not_prefixes() {
    let text = r#"counter!("pushgrid_room_x_total", "reason" => "a").increment(1);
        let table = "_pushgrid_keeper_migrations"; gauge!("pushgrid_y");
        format!("pushgrid_{role}_z")"#;
    let found: Vec<String> = series_in(text).into_iter().collect();
    assert_eq!(found, vec!["pushgrid_room_x_total", "pushgrid_y"]);
}

#[test]
fn a_longer_name_does_not_mention_a_shorter_one() {
    let guide = "| `pushgrid_saver_owed_dropped_total` | ... |";
    assert!(!mentions(guide, "pushgrid_saver_owed"));
    assert!(mentions(guide, "pushgrid_saver_owed_dropped_total"));
    assert!(mentions(
        "`pushgrid_saver_owed{kind}`",
        "pushgrid_saver_owed"
    ));
}
