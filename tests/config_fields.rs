//! The shipped `gateway.toml` claims to show every field: this keeps it so.
//! The config's serde structure is walked (serde-reflection traces what the
//! parser accepts, so a field added to the config is found here without
//! anyone listing it), and every field must appear in the shipped file
//! under its section, set or commented out.
//!
//! Regression (issue 16, defect 13): `[[route]] cost` and
//! `[limits] max_tracked_keys` were missing from the file.

use std::collections::BTreeSet;
use std::path::Path;

use serde_reflection::{ContainerFormat, Format, Registry, Tracer, TracerConfig};

/// Every field the config file accepts, as `section.field` (tables of
/// tables as `upstream.*.field`).
fn accepted_fields() -> BTreeSet<String> {
    let mut tracer = Tracer::new(TracerConfig::default());
    tracer.trace_simple_type::<keygate::config::RawConfig>().expect("the config structure traces");
    // Enum values are leaves here, but the trace wants all their variants.
    tracer.trace_simple_type::<keygate::config::LimitMode>().expect("limits.mode traces");
    tracer.trace_simple_type::<keygate::config::LogFormat>().expect("log.format traces");
    let registry = tracer.registry().expect("every config type is traced");
    let mut fields = BTreeSet::new();
    walk(&registry, "RawConfig", "", &mut fields);
    fields
}

fn walk(registry: &Registry, type_name: &str, at: &str, fields: &mut BTreeSet<String>) {
    let Some(ContainerFormat::Struct(members)) = registry.get(type_name) else {
        panic!("{type_name} is not a struct in the trace");
    };
    for member in members {
        let path = if at.is_empty() { member.name.clone() } else { format!("{at}.{}", member.name) };
        match table_of(registry, &member.value) {
            Some((table, "")) => walk(registry, &table, &path, fields),
            Some((table, suffix)) => walk(registry, &table, &format!("{path}{suffix}"), fields),
            None => {
                fields.insert(path);
            }
        }
    }
}

/// The struct a field holds, if it is a table: itself (`[server]`), in an
/// array (`[[route]]`), or as the values of a map (`[upstream.NAME]`,
/// suffix `.*`). Enums and plain values are leaves.
fn table_of(registry: &Registry, format: &Format) -> Option<(String, &'static str)> {
    match format {
        Format::Option(inner) => table_of(registry, inner),
        Format::TypeName(name) if matches!(registry.get(name), Some(ContainerFormat::Struct(_))) => {
            Some((name.clone(), ""))
        }
        Format::Seq(inner) => match inner.as_ref() {
            Format::TypeName(name) if matches!(registry.get(name), Some(ContainerFormat::Struct(_))) => {
                Some((name.clone(), ""))
            }
            _ => None,
        },
        Format::Map { value, .. } => match value.as_ref() {
            Format::TypeName(name) if matches!(registry.get(name), Some(ContainerFormat::Struct(_))) => {
                Some((name.clone(), ".*"))
            }
            _ => None,
        },
        _ => None,
    }
}

/// The `section.field` pairs a TOML file shows, whether set or commented
/// out (`# field = ...` under `# [section]` counts): a section header opens
/// a section until the next one; `[upstream.api]` is `upstream.*`.
fn documented_fields(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim_start().trim_start_matches('#').trim();
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_start_matches('[').split(']').next().unwrap_or("");
            if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.') {
                // `[[server.listener]]` is an array in a table, named in
                // full; `[upstream.api]` is one entry of a map.
                section = match name.split_once('.') {
                    Some(_) if header.starts_with('[') => name.to_owned(),
                    Some((table, _)) => format!("{table}.*"),
                    None => name.to_owned(),
                };
                continue;
            }
        }
        let Some((key, _)) = line.split_once('=') else { continue };
        let key = key.trim();
        if !key.is_empty()
            // Dotted keys (`tls.cert = ...`) name a field of an inner table.
            && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
            && !section.is_empty()
        {
            found.insert(format!("{section}.{key}"));
        }
    }
    found
}

#[test]
fn every_config_field_appears_in_the_shipped_gateway_toml() {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml")).unwrap();
    let accepted = accepted_fields();
    // The walk itself must see the whole structure, or the test proves nothing.
    for sample in [
        "server.listen",
        "route.cost",
        "upstream.*.targets",
        "limits.max_tracked_keys",
        "admin.token_env",
        "server.listener.tls.certs.key",
        "route.tls_only",
    ] {
        assert!(accepted.contains(sample), "the walk missed {sample}: {accepted:?}");
    }
    let documented = documented_fields(&shipped);
    let missing: Vec<&String> = accepted.iter().filter(|field| !documented.contains(*field)).collect();
    assert!(
        missing.is_empty(),
        "gateway.toml says every field is there; add these (commented, with their default): {missing:?}"
    );
}

#[test]
fn the_file_scan_reads_set_and_commented_fields_under_their_section() {
    let text = "[server]\nlisten = \"x\"\n# idle_timeout = \"60s\"   # note\n# [admin]\n# token_env = \"T\"\n\
                [[route]]\npath = \"/\"\n# [upstream.api]\n# targets = []\n# prose, with no = sign\n";
    let found = documented_fields(text);
    let expected: BTreeSet<String> =
        ["server.listen", "server.idle_timeout", "admin.token_env", "route.path", "upstream.*.targets"]
            .map(str::to_owned)
            .into();
    assert_eq!(found, expected);
    assert!(!found.contains("route.cost"), "a field absent from the file is not found");
}
