//! The layout rule of issue 24: no source file in `crates/` or `loadtest/`
//! over [`FILE_LIMIT`] lines and no function over [`FUNCTION_LIMIT`] lines,
//! except the entries of [`FILES_OVER`] and [`FUNCTIONS_OVER`]. The lists only
//! shrink: an entry that is no longer over its limit fails the test until it
//! is removed, and anything new over a limit fails it until it is split.
//!
//! What is measured:
//! * Every `.rs` file under `crates/` and `loadtest/`, except `tests/`
//!   directories, `target/` and generated code (`crates/proto`, which only
//!   includes what the build script generates, and files marked `@generated`).
//! * A file's lines stop at its test module: a `#[cfg(test)]` line at column 0
//!   followed (after other attributes) by a `mod name {` line; from there to
//!   the end of the file nothing is counted, functions included.
//!
//! How functions are found, deliberately simple (a line scanner, not a
//! parser):
//! * A function starts at a line that, after its indentation, reads
//!   `[pub[(..)]] [const] [async] [unsafe] [extern "C"] fn name`. A line ending
//!   in `;` there (a trait method without a body) is no function.
//! * It ends at the first later line that is exactly its indentation and `}`
//!   (rustfmt's layout), or on its own line when that line already ends in
//!   `}`. Its length counts both ends; doc comments and attributes above the
//!   `fn` line are not counted.
//! * A closure, a macro body or a function written on one line with its
//!   closing brace elsewhere than at its indentation is not seen; a nested
//!   `fn` counts inside its outer function and once more on its own.
//! * Two functions of the same name in one file are told apart by the
//!   numbered suffix `#2`, `#3`, ... in the order they appear.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pushgrid_e2e::workspace_root;

/// The most lines a source file may have, its test module not counted.
const FILE_LIMIT: usize = 600;
/// The most lines a function may have, from its `fn` line to its `}`.
const FUNCTION_LIMIT: usize = 80;

/// Files still over [`FILE_LIMIT`]: the path from the workspace root and its
/// line count when it was listed. Owned by other work in progress; remove an
/// entry when its file is split.
const FILES_OVER: &[(&str, usize)] = &[
    // Split by the work on saver.
];

/// Functions still over [`FUNCTION_LIMIT`]: the file, the function's name and
/// its line count when it was listed. Remove an entry when it is split.
const FUNCTIONS_OVER: &[(&str, &str, usize)] = &[];

/// What one source file measures.
struct Measured {
    /// Lines before the test module.
    lines: usize,
    /// Each function's name (with `#n` for a repeated name) and line count.
    functions: Vec<(String, usize)>,
}

/// Every source file the rule covers, as paths relative to `root`.
fn source_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for top in ["crates", "loadtest"] {
        collect_rust_files(root, &root.join(top), &mut found);
    }
    found.sort();
    found
}

fn collect_rust_files(root: &Path, dir: &Path, found: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()));
    for entry in entries {
        let path = entry.expect("a readable directory entry").path();
        let relative = path
            .strip_prefix(root)
            .expect("under the root")
            .to_path_buf();
        if path.is_dir() {
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("");
            let generated = relative == Path::new("crates/proto");
            if name == "tests" || name == "target" || generated {
                continue;
            }
            collect_rust_files(root, &path, found);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(relative);
        }
    }
}

/// The lines before the file's test module (see the module doc).
fn lines_before_tests(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    for (index, line) in lines.iter().enumerate() {
        if !line.starts_with("#[cfg(test)]") {
            continue;
        }
        let after_attributes = lines[index + 1..]
            .iter()
            .find(|next| !next.starts_with("#["));
        if after_attributes.is_some_and(|next| is_module_with_body(next)) {
            return lines[..index].to_vec();
        }
    }
    lines
}

fn is_module_with_body(line: &str) -> bool {
    let line = line.strip_prefix("pub ").unwrap_or(line);
    line.starts_with("mod ") && line.trim_end().ends_with('{')
}

/// The name of the function a line starts, and the line's indentation.
fn function_start(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim_start();
    let indentation = &line[..line.len() - rest.len()];
    let mut rest = rest;
    if let Some(after) = rest.strip_prefix("pub") {
        rest = match after.strip_prefix('(') {
            Some(inside) => inside.split_once(')')?.1.trim_start(),
            None => after.strip_prefix(' ')?.trim_start(),
        };
    }
    for qualifier in ["const ", "async ", "unsafe ", "extern \"C\" "] {
        if let Some(after) = rest.strip_prefix(qualifier) {
            rest = after.trim_start();
        }
    }
    let after_fn = rest.strip_prefix("fn ")?;
    let name_length = after_fn
        .find(|character: char| !(character.is_alphanumeric() || character == '_'))
        .unwrap_or(after_fn.len());
    let name = &after_fn[..name_length];
    if name.is_empty() {
        return None;
    }
    Some((name, indentation))
}

/// The number of lines of the function starting at `lines[start]`, or `None`
/// when that line declares no body.
fn function_length(lines: &[&str], start: usize, indentation: &str) -> Option<usize> {
    let first = lines[start].trim_end();
    if first.ends_with(';') {
        return None;
    }
    if first.ends_with('}') {
        return Some(1);
    }
    let closing = format!("{indentation}}}");
    lines[start + 1..]
        .iter()
        .position(|line| line.trim_end() == closing)
        .map(|offset| offset + 2)
}

fn measure(text: &str) -> Measured {
    let lines = lines_before_tests(text);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut functions = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let Some((name, indentation)) = function_start(line) else {
            continue;
        };
        let Some(length) = function_length(&lines, index, indentation) else {
            continue;
        };
        let count = seen.entry(name.to_string()).or_insert(0);
        *count += 1;
        let name = match *count {
            1 => name.to_string(),
            n => format!("{name}#{n}"),
        };
        functions.push((name, length));
    }
    Measured {
        lines: lines.len(),
        functions,
    }
}

#[test]
fn files_and_functions_stay_small_and_the_allowlist_only_shrinks() {
    let root = workspace_root();
    let mut problems = Vec::new();
    let mut files_over = BTreeMap::new();
    let mut functions_over = BTreeMap::new();
    for relative in source_files(&root) {
        let text = std::fs::read_to_string(root.join(&relative))
            .unwrap_or_else(|error| panic!("{}: {error}", relative.display()));
        if text.contains("@generated") {
            continue;
        }
        let path = relative.to_string_lossy().replace('\\', "/");
        let measured = measure(&text);
        if measured.lines > FILE_LIMIT {
            files_over.insert(path.clone(), measured.lines);
        }
        for (name, length) in measured.functions {
            if length > FUNCTION_LIMIT {
                functions_over.insert((path.clone(), name), length);
            }
        }
    }

    for (path, lines) in &files_over {
        if !FILES_OVER.iter().any(|(listed, _)| listed == path) {
            problems.push(format!(
                "{path}: {lines} lines (limit {FILE_LIMIT}): split it by job"
            ));
        }
    }
    for (path, listed_lines) in FILES_OVER {
        if !files_over.contains_key(*path) {
            problems.push(format!(
                "{path} (listed with {listed_lines} lines) is within {FILE_LIMIT} lines \
                 now or gone: remove it from FILES_OVER"
            ));
        }
    }
    for ((path, name), length) in &functions_over {
        let listed = FUNCTIONS_OVER
            .iter()
            .any(|(listed_path, listed_name, _)| listed_path == path && listed_name == name);
        if !listed {
            problems.push(format!(
                "{path}: fn {name} has {length} lines (limit {FUNCTION_LIMIT}): split it into named steps"
            ));
        }
    }
    for (path, name, listed_length) in FUNCTIONS_OVER {
        if !functions_over.contains_key(&(path.to_string(), name.to_string())) {
            problems.push(format!(
                "{path}: fn {name} (listed with {listed_length} lines) is within \
                 {FUNCTION_LIMIT} lines now or gone: remove it from FUNCTIONS_OVER"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "layout rule broken:\n{}\n\nwhat is over the limits now:\n{}",
        problems.join("\n"),
        allowlist_now(&files_over, &functions_over)
    );
}

/// What is over the limits now, written as the two constants.
fn allowlist_now(
    files_over: &BTreeMap<String, usize>,
    functions_over: &BTreeMap<(String, String), usize>,
) -> String {
    let mut text = String::from("const FILES_OVER: &[(&str, usize)] = &[\n");
    for (path, lines) in files_over {
        text.push_str(&format!("    (\"{path}\", {lines}),\n"));
    }
    text.push_str("];\nconst FUNCTIONS_OVER: &[(&str, &str, usize)] = &[\n");
    for ((path, name), length) in functions_over {
        text.push_str(&format!("    (\"{path}\", \"{name}\", {length}),\n"));
    }
    text.push_str("];");
    text
}

#[test]
fn the_scanner_finds_functions_and_skips_the_test_module() {
    let text = "\
//! doc
pub(crate) async fn outer(a: u32) -> u32 {
    fn inner() {}
    a
}

trait Shape {
    fn area(&self) -> f64;
}

impl Thing {
    pub fn method(&self)
    where
        Self: Sized,
    {
        todo!()
    }
}

#[cfg(test)]
mod tests {
    fn hidden() {
    }
}
";
    let measured = measure(text);
    assert_eq!(measured.lines, 19);
    assert_eq!(
        measured.functions,
        vec![
            ("outer".to_string(), 4),
            ("inner".to_string(), 1),
            ("method".to_string(), 6),
        ]
    );
}

/// The error rule of issue 24: role libraries (and `common`, `client`,
/// `wire`) return their own error enums (`StartError` for starting a role,
/// `ApiError`, `StoreError`, `DispatchError`, ...), so a caller can tell a
/// refused call from a lost store; `anyhow` is left to binaries (`main.rs`,
/// the launcher crate `crates/pushgrid`, examples and benches), `loadtest`
/// and tests.
#[test]
fn anyhow_appears_only_in_binaries() {
    let root = workspace_root();
    let mut offenders = Vec::new();
    for relative in source_files(&root) {
        let in_binary = relative.file_name().is_some_and(|name| name == "main.rs")
            || relative.starts_with("crates/pushgrid")
            || relative.starts_with("loadtest")
            || relative.components().any(|part| {
                ["examples", "benches", "bin"].contains(&part.as_os_str().to_str().unwrap_or(""))
            });
        if in_binary {
            continue;
        }
        let text = std::fs::read_to_string(root.join(&relative))
            .unwrap_or_else(|error| panic!("{}: {error}", relative.display()));
        let used = lines_before_tests(&text)
            .iter()
            .any(|line| !line.trim_start().starts_with("//") && line.contains("anyhow"));
        if used {
            offenders.push(relative.display().to_string());
        }
    }
    assert!(
        offenders.is_empty(),
        "library code uses anyhow (give it an error enum instead): {offenders:?}"
    );
}
