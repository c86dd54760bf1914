//! The layering rules of issue 16 (item 14), kept: lower layers never import
//! the front ends or the server above them. A `use` that breaks a rule fails
//! here with the file and line, before it grows into a cycle.

use std::path::Path;

/// (folder or file under `src/`, module paths it must not name)
const RULES: &[(&str, &[&str])] = &[
    // The admin API and the CLI are siblings: what both print lives in `ops`.
    ("admin", &["crate::cli"]),
    ("ops", &["crate::cli", "crate::admin"]),
    ("ops.rs", &["crate::cli", "crate::admin"]),
    ("usage", &["crate::cli", "crate::admin"]),
    // Forwarding knows identities, not store records, and not the server.
    ("proxy", &["crate::store", "crate::server", "crate::handler", "crate::auth"]),
    ("meter.rs", &["crate::handler"]),
    ("config.rs", &["crate::route"]),
];

fn rust_files(path: &Path, found: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for entry in entries {
            rust_files(&entry, found);
        }
    } else if path.extension().is_some_and(|ext| ext == "rs") {
        found.push(path.to_owned());
    }
}

#[test]
fn lower_layers_do_not_import_the_layers_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for (place, forbidden) in RULES {
        let root = src.join(place);
        assert!(root.exists(), "rule names {place}, which is not under src/");
        let mut files = Vec::new();
        rust_files(&root, &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (number, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for module in *forbidden {
                    if line.contains(&format!("{module}::")) || line.contains(&format!("{module};")) {
                        broken.push(format!("{}:{}: {}", file.display(), number + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}
