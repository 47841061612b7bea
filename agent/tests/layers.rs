//! The crate's modules depend on each other in one direction only: no two modules (top-level, or the
//! `dataplane` submodules among themselves) name each other. Read from the sources: every `crate::` path
//! and `use crate::{...}` group outside test modules, and `super::` among `dataplane`'s files.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// The module a source file belongs to: its top-level module, or `dataplane/<file>` inside `dataplane`.
fn module_of(relative: &Path) -> Option<String> {
    let parts: Vec<String> = relative.with_extension("").iter().map(|p| p.to_string_lossy().into_owned()).collect();
    match parts.as_slice() {
        [file] if file == "lib" || file == "main" => None,
        [dataplane, file] if dataplane == "dataplane" && file != "mod" => Some(format!("dataplane/{file}")),
        [first, ..] => Some(first.clone()),
        [] => None,
    }
}

/// The module a path names: `dataplane::x` is `dataplane/x`, anything else its first segment.
fn target(path: &str) -> Option<String> {
    let mut segments = path.split("::").map(str::trim).filter(|s| !s.is_empty());
    let first = segments.next()?;
    if !first.chars().next()?.is_ascii_lowercase() || first == "self" {
        return None;
    }
    match (first, segments.next()) {
        ("dataplane", Some(sub)) if sub.chars().next().is_some_and(|c| c.is_ascii_lowercase()) => {
            Some(format!("dataplane/{sub}"))
        }
        _ => Some(first.to_string()),
    }
}

/// The items of a `use` group (`a, b::{c, d}, e`), split at its top level.
fn group_items(group: &str) -> Vec<String> {
    let (mut items, mut current, mut depth) = (Vec::new(), String::new(), 0usize);
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    items.push(current);
    items.into_iter().map(|i| i.split_whitespace().collect()).filter(|i: &String| !i.is_empty()).collect()
}

/// What one file's code (its test module left out) names.
fn named(code: &str, module: &str) -> BTreeSet<String> {
    let code = code.split("#[cfg(test)]").next().unwrap_or_default();
    let mut names = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find("};").unwrap_or(group.len());
            for item in group_items(&group[..end]) {
                match item.split_once("::{") {
                    Some(("dataplane", subs)) => names.extend(
                        group_items(subs.trim_end_matches('}'))
                            .iter()
                            .filter_map(|s| target(&format!("dataplane::{s}"))),
                    ),
                    Some((head, _)) => names.extend(target(head)),
                    None => names.extend(target(&item)),
                }
            }
        } else {
            let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            names.extend(target(&path));
        }
    }
    if let Some(sub) = module.strip_prefix("dataplane/") {
        let mut rest = code;
        while let Some(at) = rest.find("super::") {
            rest = &rest[at + "super::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if name != sub && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                names.insert(format!("dataplane/{name}"));
            }
        }
    }
    names.remove(module);
    names
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_two_modules_depend_on_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&root).expect("under src");
        let Some(module) = module_of(relative) else { continue };
        let code = std::fs::read_to_string(&file).expect("read source");
        graph.entry(module.clone()).or_default().extend(named(&code, &module));
    }
    assert!(graph.len() > 10 && graph["daemon"].contains("allocator"), "the sources were not read: {graph:?}");
    let cycles: Vec<(&String, &String)> = graph
        .iter()
        .flat_map(|(a, names)| names.iter().map(move |b| (a, b)))
        .filter(|(a, b)| a < b && graph.get(*b).is_some_and(|back| back.contains(*a)))
        .collect();
    assert!(cycles.is_empty(), "modules that name each other: {cycles:?}");
}

#[test]
fn the_reader_sees_the_paths_it_must() {
    let code = "use crate::{\n    allocator::Allocator,\n    dataplane::{\n        enforcement::X,\n        routes::{A, B},\n    },\n    store::{self, keys},\n};\nfn f() { crate::cluster::routable(); }\n#[cfg(test)]\nmod tests { use crate::commands; }";
    let names = named(code, "daemon");
    let want: BTreeSet<String> =
        ["allocator", "dataplane/enforcement", "dataplane/routes", "store", "cluster"].map(String::from).into();
    assert_eq!(names, want);
    assert_eq!(named("use super::routes::Routes;", "dataplane/overlay"), BTreeSet::from(["dataplane/routes".into()]));
}
