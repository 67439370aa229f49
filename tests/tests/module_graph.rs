//! The module rule of issue 24: inside `room`, `center` and `loadtest`, the
//! modules' dependencies point one way (shared types below, what uses them above), so
//! no module reaches, through other modules, back to itself. The edges that
//! still close a cycle are listed in [`UPWARD_EDGES`]; the list only shrinks:
//! an entry that no longer closes a cycle (or is gone) fails the test until it
//! is removed, and a new cycle fails it until it is broken.
//!
//! What is measured, deliberately simple (a line scanner, not a parser):
//! * A crate's modules are its `src/<name>.rs` files and `src/<name>/`
//!   directories (a module's submodules belong to it); `lib.rs` and
//!   `main.rs`, which declare the modules and the state they share, are not
//!   modules here.
//! * A file's text stops at its test module (a `#[cfg(test)]` line at column
//!   0 followed by a `mod name {` line, as in `layout.rs`); a single item
//!   under `#[cfg(test)]` (a test-only `use`) is skipped as well, and so are
//!   comment lines.
//! * Module `a` depends on module `b` when one of `a`'s files names
//!   `crate::b`, either directly (`crate::b::Thing`, `crate::b::f()`) or in a
//!   group (`use crate::{b, c::Thing}`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use pushgrid_e2e::{rust_files, workspace_root};

/// The crates whose modules are checked, as source directories from the
/// workspace root.
const CRATES: &[&str] = &["crates/room/src", "crates/center/src", "loadtest/src"];

/// Dependencies that still point up (from a lower module to one that uses
/// it) and close a cycle: the crate's source directory, then `from` and `to`.
/// Remove an entry when the dependency is gone or no longer closes a cycle.
const UPWARD_EDGES: &[(&str, &str, &str)] = &[];

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Each module of the crate in `src` and its files.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut modules = BTreeMap::new();
    let entries =
        std::fs::read_dir(src).unwrap_or_else(|error| panic!("{}: {error}", src.display()));
    for entry in entries {
        let path = entry.expect("a readable directory entry").path();
        let name = path
            .file_stem()
            .and_then(|name| name.to_str())
            .unwrap_or("")
            .to_string();
        let files: &mut Vec<PathBuf> = modules.entry(name.clone()).or_default();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
    modules.retain(|name, files| name != "lib" && name != "main" && !files.is_empty());
    modules
}

/// The file's code lines: before its test module, without comment lines and
/// without single items under `#[cfg(test)]`.
fn code_lines(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let mut kept = Vec::new();
    let mut skip_next = false;
    for (index, line) in lines.iter().enumerate() {
        if skip_next {
            skip_next = false;
            continue;
        }
        if line.starts_with("#[cfg(test)]") {
            let next = lines[index + 1..]
                .iter()
                .find(|next| !next.starts_with("#["));
            if next.is_some_and(|next| is_module_with_body(next)) {
                break;
            }
            skip_next = true;
            continue;
        }
        if line.trim_start().starts_with("//") {
            continue;
        }
        kept.push(*line);
    }
    kept
}

fn is_module_with_body(line: &str) -> bool {
    let line = line.strip_prefix("pub ").unwrap_or(line);
    line.starts_with("mod ") && line.trim_end().ends_with('{')
}

fn identifier(text: &str) -> &str {
    let end = text
        .find(|character: char| !(character.is_alphanumeric() || character == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The first names after each `crate::` in `code`: `crate::a::b` gives `a`,
/// `crate::{a, b::c, d::{e, f}}` gives `a`, `b` and `d`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = code;
    while let Some(found) = rest.find("crate::") {
        let preceded_by_identifier = rest[..found]
            .chars()
            .next_back()
            .is_some_and(|character| character.is_alphanumeric() || character == '_');
        rest = &rest[found + "crate::".len()..];
        if preceded_by_identifier {
            continue;
        }
        let Some(group) = rest.strip_prefix('{') else {
            names.insert(identifier(rest).to_string());
            continue;
        };
        // Top-level items of the group: split at commas outside inner braces.
        let mut depth = 0usize;
        let mut item_start = true;
        for (offset, character) in group.char_indices() {
            match character {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                character if item_start && !character.is_whitespace() => {
                    item_start = false;
                    names.insert(identifier(&group[offset..]).to_string());
                }
                _ => {}
            }
        }
    }
    names
}

/// The crate's module graph: each module and the other modules it names.
fn graph(src: &Path) -> Graph {
    let modules = modules(src);
    let mut graph = Graph::new();
    for (name, files) in &modules {
        let mut uses = BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(file)
                .unwrap_or_else(|error| panic!("{}: {error}", file.display()));
            let code = code_lines(&text).join("\n");
            uses.extend(
                crate_paths(&code)
                    .into_iter()
                    .filter(|used| used != name && modules.contains_key(used)),
            );
        }
        graph.insert(name.clone(), uses);
    }
    graph
}

/// A cycle of `graph` as the modules along it (first repeated at the end),
/// or `None` when its dependencies all point one way.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    // 0: not visited, 1: on the current path, 2: done.
    fn visit<'a>(
        graph: &'a Graph,
        node: &'a str,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(node, 1);
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|on| on == next).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        path[start..].iter().map(|on| on.to_string()).collect();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(cycle) = visit(graph, next, state, path) {
                        return Some(cycle);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(node, 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            let mut path = Vec::new();
            if let Some(cycle) = visit(graph, node, &mut state, &mut path) {
                return Some(cycle);
            }
        }
    }
    None
}

/// `graph` without the listed edges.
fn without(graph: &Graph, edges: &[(&str, &str)]) -> Graph {
    let mut graph = graph.clone();
    for (from, to) in edges {
        if let Some(uses) = graph.get_mut(*from) {
            uses.remove(*to);
        }
    }
    graph
}

fn describe(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(name, uses)| {
            let uses: Vec<&str> = uses.iter().map(String::as_str).collect();
            format!("    {name} -> {}", uses.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn module_dependencies_point_one_way_and_the_allowlist_only_shrinks() {
    let root = workspace_root();
    let mut problems = Vec::new();
    let mut graphs = Vec::new();
    for src in CRATES {
        let graph = graph(&root.join(src));
        let allowed: Vec<(&str, &str)> = UPWARD_EDGES
            .iter()
            .filter(|(listed_src, _, _)| listed_src == src)
            .map(|(_, from, to)| (*from, *to))
            .collect();
        if let Some(cycle) = find_cycle(&without(&graph, &allowed)) {
            problems.push(format!(
                "{src}: the modules call each other in a circle: {}; move what they \
                 share into a lower module",
                cycle.join(" -> ")
            ));
        }
        for (index, (from, to)) in allowed.iter().enumerate() {
            if !graph.get(*from).is_some_and(|uses| uses.contains(*to)) {
                problems.push(format!(
                    "{src}: {from} -> {to} is gone: remove it from UPWARD_EDGES"
                ));
                continue;
            }
            let mut others = allowed.clone();
            others.remove(index);
            if find_cycle(&without(&graph, &others)).is_none() {
                problems.push(format!(
                    "{src}: {from} -> {to} closes no cycle any more: remove it from UPWARD_EDGES"
                ));
            }
        }
        graphs.push(format!("{src}:\n{}", describe(&graph)));
    }
    assert!(
        problems.is_empty(),
        "module rule broken:\n{}\n\nthe module graphs now:\n{}",
        problems.join("\n"),
        graphs.join("\n")
    );
}

#[test]
fn the_scanner_reads_paths_groups_and_skips_tests_and_comments() {
    let text = "\
//! uses crate::doc_only
use crate::a::Thing;
use crate::{b, c::{D, E}, d::f};
#[cfg(test)]
use crate::test_only::Helper;
fn g() {
    // crate::commented
    crate::e::call();
    pushgrid_crate::not_ours();
}

#[cfg(test)]
mod tests {
    use crate::hidden;
}
";
    let code = code_lines(text).join("\n");
    let found: Vec<String> = crate_paths(&code).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "d", "e"]);

    let graph: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(name, uses)| {
        (
            name.to_string(),
            uses.into_iter().map(str::to_string).collect(),
        )
    })
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(find_cycle(&without(&graph, &[("c", "a")])), None);
}
