//! The README's quick start builds `-p pushgrid -p pushgrid-client` in release;
//! a later `cargo build --release --workspace` (or `cargo run --release -p
//! pushgrid`) must reuse that build rather than recompile tokio and everything
//! above it. Cargo compiles a crate again whenever its enabled features differ
//! between two invocations, so this test asks cargo's own resolver (`cargo
//! tree`) for the features of every crate in each package set and fails on any
//! crate both sets build with different features.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Crate ("name vX.Y.Z") -> the feature sets it is compiled with, for what
/// `cargo build` with these package arguments compiles (normal and build
/// dependencies, host target). A crate used both at run time and by a build
/// script or proc macro can be compiled twice, with two sets.
fn features(packages: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "tree",
            "--locked",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "-f",
            "{p}|{f}",
        ])
        .args(packages)
        .output()
        .expect("run cargo tree");
    assert!(
        output.status.success(),
        "cargo tree {packages:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut crates = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let line = line.trim_end_matches(" (*)");
        let Some((package, enabled)) = line.split_once('|') else {
            continue;
        };
        // "name vX.Y.Z (/path)" for workspace members: keep name and version.
        let key: String = package.split(" (").next().unwrap_or(package).to_string();
        crates
            .entry(key)
            .or_insert_with(BTreeSet::new)
            .insert(enabled.to_string());
    }
    crates
}

fn differing(
    a: &BTreeMap<String, BTreeSet<String>>,
    b: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    a.iter()
        .filter_map(|(name, features)| match b.get(name) {
            Some(other) if other != features => {
                Some(format!("{name}: {features:?} versus {other:?}"))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn the_quick_start_build_and_the_workspace_build_compile_the_same_dependencies() {
    let workspace = features(&["--workspace"]);
    let quick_start = features(&["-p", "pushgrid", "-p", "pushgrid-client"]);
    let launcher = features(&["-p", "pushgrid"]);
    // The sets must overlap in what matters, or the comparison proves nothing.
    for name in ["tokio", "hyper", "tonic", "sqlx-core"] {
        assert!(
            launcher.keys().any(|k| k.starts_with(&format!("{name} v"))),
            "{name} missing from the launcher's build"
        );
    }
    let mut problems = differing(&quick_start, &workspace);
    problems.extend(differing(&launcher, &workspace));
    assert!(
        problems.is_empty(),
        "crates built with other features than in `cargo build --workspace` (each would \
         be compiled twice; turn the feature on in [workspace.dependencies] or name the \
         crate in crates/pushgrid/Cargo.toml):\n{}",
        problems.join("\n")
    );
}
