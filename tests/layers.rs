//! The modules at the bottom of the crate import nothing above them, so the module graph has no circle through them:
//! `config` may use `keys`, `secret` and `private_file`; `keys` only `secret`; `secret` and `private_file` nothing of
//! tokenproxy. The test reads the source, as a reviewer would: every `crate::` path (in code, doc links and tests
//! alike) must name an allowed module.

use std::path::{Path, PathBuf};

/// Each low module (a file or a folder under `src/`) and the top-level modules it may name through `crate::`.
const LAYERS: &[(&str, &[&str])] = &[
    ("config", &["config", "keys", "secret", "private_file"]),
    ("keys", &["keys", "secret"]),
    ("secret", &["secret"]),
    ("private_file", &["private_file"]),
    ("ca", &["ca", "private_file"]),
];

fn sources(module: &str) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let file = src.join(format!("{module}.rs"));
    if file.is_file() {
        return vec![file];
    }
    let mut files = Vec::new();
    let mut dirs = vec![src.join(module)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    assert!(!files.is_empty(), "no source for module `{module}`");
    files
}

/// The top-level modules a source names through `crate::` (`crate::a::b`, `crate::{a, b::c}`).
fn crate_paths(text: &str) -> Vec<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut names = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            None => names.push(ident(rest)),
            Some(group) => {
                // The first segment of each item of the group, at its top level.
                let mut depth = 0;
                let mut item_start = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && !c.is_whitespace() => {
                            names.push(ident(&group[i..]));
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    names
}

#[test]
fn the_low_modules_import_nothing_above_them() {
    let mut wrong = Vec::new();
    for (module, allowed) in LAYERS {
        for file in sources(module) {
            let text = std::fs::read_to_string(&file).unwrap();
            for name in crate_paths(&text) {
                if !allowed.contains(&name.as_str()) {
                    wrong.push(format!("{} names crate::{name}", file.display()));
                }
            }
            // In a module's root file, `super::` (outside its tests) is the crate root: the same as `crate::`.
            let is_root = file.ends_with(format!("{module}.rs")) || file.ends_with(format!("{module}/mod.rs"));
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            if is_root && code.contains("super::") {
                wrong.push(format!("{} names the crate root through super::", file.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "imports that run up the layers (a circle in the making):\n{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_what_it_looks_for() {
    assert_eq!(crate_paths("use crate::token::dpop;"), ["token"]);
    assert_eq!(
        crate_paths("use crate::{keys, proxy::Proxy, secret::{Secret, SecretSource}};"),
        ["keys", "proxy", "secret"]
    );
    assert_eq!(crate_paths("let x = crate::server::serve(a, crate::admin::Admin::new());"), ["server", "admin"]);
}
