//! The configuration reference cannot drift from the code: `docs/configuration.md` documents every key of
//! `config.example.toml` (active and commented out) and only keys that the config code accepts, and each default it
//! gives in backticks is the default the config code applies. (Links, error codes, grants, pages and metric names of
//! the README and the guide: tests/docs_consistency.rs.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tokenproxy::config::{Config, ConfigError};

/// Secrets come in three forms (`X`, `X_file`, `X_env`); the docs and the example may show any of them.
const SECRETS: &[&str] = &["client_secret", "refresh_token", "password", "telemetry.headers"];

/// Tables whose keys are chosen by the user, not by tokenproxy: documented as one key.
const FREE_FORM_TABLES: &[&str] = &["extra_params"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `providers.NAME.client_secret_file` → `providers.NAME.client_secret`.
fn normalize(key: &str) -> String {
    for secret in SECRETS {
        for suffix in ["_file", "_env"] {
            if let Some(stem) = key.strip_suffix(suffix).filter(|stem| stem.ends_with(secret)) {
                return stem.to_owned();
            }
        }
    }
    key.to_owned()
}

/// The documented path of a TOML table header: `[providers.orders]` → `providers.NAME`, `[[routes]]` → `routes[]`.
fn section_path(header: &str) -> String {
    let name = header.trim().trim_start_matches('[').trim_end_matches(']').trim();
    match name.split_once('.') {
        Some(("providers", _)) => "providers.NAME".to_owned(),
        _ if header.trim().starts_with("[[") => format!("{name}[]"),
        _ => name.to_owned(),
    }
}

/// The keys of a table, recursively (sub-tables as `a.b`), except inside free-form tables.
fn leaf_keys(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
    for (key, value) in table {
        let path = format!("{prefix}.{key}");
        match value {
            toml::Value::Table(inner) if !FREE_FORM_TABLES.contains(&key.as_str()) => leaf_keys(&path, inner, out),
            _ => {
                out.insert(path);
            }
        }
    }
}

/// Every key of config.example.toml: the ones set, and the ones shown commented out (`# key = value`).
fn example_keys() -> BTreeSet<String> {
    let text = read(&repo().join("config.example.toml"));
    let mut keys = BTreeSet::new();

    let parsed: toml::Table = text.parse().expect("config.example.toml is valid TOML");
    for (section, value) in &parsed {
        match (section.as_str(), value) {
            ("providers", toml::Value::Table(providers)) => {
                for provider in providers.values() {
                    leaf_keys("providers.NAME", provider.as_table().expect("a provider table"), &mut keys);
                }
            }
            (_, toml::Value::Array(items)) => {
                for item in items {
                    leaf_keys(&format!("{section}[]"), item.as_table().expect("an array of tables"), &mut keys);
                }
            }
            (_, toml::Value::Table(table)) => leaf_keys(section, table, &mut keys),
            _ => panic!("config.example.toml: top-level key `{section}` outside a section"),
        }
    }

    // Commented-out keys: `# key = value`, several on a line separated by `; `, after the first section header.
    let mut section = None;
    for line in text.lines() {
        // A section header, or a commented-out one (`# [vending]`: a section off by default).
        let trimmed = line.trim();
        let trimmed = trimmed.strip_prefix("# [").map_or(trimmed, |rest| &line[line.len() - rest.len() - 1..]);
        if trimmed.starts_with('[') {
            section = Some(section_path(trimmed.split('#').next().unwrap_or(trimmed)));
            continue;
        }
        let (Some(section), Some(comment)) = (&section, line.strip_prefix("# ")) else { continue };
        if !comment.starts_with(|c: char| c.is_ascii_lowercase()) {
            continue;
        }
        let pieces: Vec<toml::Table> = match comment.parse::<toml::Table>() {
            Ok(table) => vec![table],
            Err(_) => comment.split("; ").filter_map(|piece| piece.parse::<toml::Table>().ok()).collect(),
        };
        for table in pieces {
            leaf_keys(section, &table, &mut keys);
        }
    }
    keys.into_iter().map(|key| normalize(&key)).collect()
}

/// The rows of the key tables in docs/configuration.md: key → the default cell.
fn documented_keys() -> BTreeMap<String, String> {
    let text = read(&repo().join("docs/configuration.md"));
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        let [key, _type, default, _meaning] = cells.as_slice() else { continue };
        let Some(key) = key.strip_prefix('`').and_then(|k| k.strip_suffix('`')) else { continue };
        let is_key = ["server.", "admin.", "log.", "state.", "vending.", "telemetry.", "providers.NAME.", "routes[]."]
            .iter()
            .any(|prefix| key.starts_with(prefix));
        if is_key {
            assert!(rows.insert(key.to_owned(), (*default).to_owned()).is_none(), "{key} is documented twice");
        }
    }
    rows
}

#[test]
fn every_example_key_is_documented() {
    let example = example_keys();
    let documented: BTreeSet<String> = documented_keys().keys().map(|key| normalize(key)).collect();
    assert!(example.len() > 40, "found only {} keys in config.example.toml: {example:?}", example.len());
    let undocumented: Vec<&String> = example.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "keys of config.example.toml missing from docs/configuration.md: {undocumented:?}"
    );
}

/// The minimal config of the tests, as a TOML table.
const MINIMAL: &str = r#"
[providers.p]
token_url = "https://idp.example/oauth2/token"
client_id = "c"
client_secret = "s"

[[routes]]
upstream = "https://api.example"
provider = "p"
"#;

/// Whether the config code knows `key` (a documented path such as `providers.NAME.scope` or `routes[].host`): it
/// is set in the minimal config, and the problems the config code reports must not call it unknown. Its value may
/// be wrong (a placeholder); only "unknown key" counts.
fn accepted_by_the_config_code(key: &str) -> bool {
    let path = key.replacen("providers.NAME.", "providers.p.", 1).replacen("routes[].", "routes[0].", 1);
    let (parents, last) = path.rsplit_once('.').expect("a key inside a section");
    let mut root: toml::Table = MINIMAL.parse().expect("minimal config");
    let mut table = &mut root;
    for segment in parents.split('.') {
        table = match segment.strip_suffix("[0]") {
            Some(name) => table
                .get_mut(name)
                .and_then(|v| v.as_array_mut())
                .and_then(|items| items.first_mut())
                .and_then(|v| v.as_table_mut())
                .expect("the minimal config has one of these"),
            None => table
                .entry(segment)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("a table"),
        };
    }
    let value = if FREE_FORM_TABLES.contains(&last) {
        toml::Value::Table(toml::Table::new())
    } else {
        toml::Value::String("placeholder".to_owned())
    };
    table.insert(last.to_owned(), value);
    let text = toml::to_string(&root).expect("TOML");
    match Config::from_toml_str(&text, "probe") {
        Ok(_) => true,
        Err(ConfigError::Invalid(problems)) => {
            !problems.iter().any(|p| p.key == path && p.message.starts_with("unknown key"))
        }
        Err(other) => panic!("{key}: {other}"),
    }
}

#[test]
fn every_documented_key_is_a_key_of_the_config_code() {
    assert!(!accepted_by_the_config_code("server.no_such_key"), "the probe must see unknown keys");
    assert!(!accepted_by_the_config_code("routes[].no_such_key"), "the probe must see unknown route keys");
    assert!(!accepted_by_the_config_code("providers.NAME.no_such_key"), "the probe must see unknown provider keys");
    let unknown: Vec<String> = documented_keys().into_keys().filter(|key| !accepted_by_the_config_code(key)).collect();
    assert!(unknown.is_empty(), "docs/configuration.md documents keys the config code does not know: {unknown:?}");
}

/// The configuration a minimal file resolves to, printed as `tokenproxy check` prints it, as a TOML table.
fn resolved(route_extra: &str) -> toml::Table {
    let text = format!("{MINIMAL}{route_extra}\n");
    let config = Config::from_toml_str(&text, "minimal").unwrap_or_else(|e| panic!("minimal config: {e}"));
    config.to_redacted_toml().parse().expect("the redacted config is TOML")
}

fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut segments = key.split('.');
    let first = segments.next()?;
    let mut value = match first {
        "routes[]" => table.get("routes")?.as_array()?.first()?,
        _ => table.get(first)?,
    };
    for segment in segments {
        let segment = if segment == "NAME" { "p" } else { segment };
        value = match segment.strip_suffix("[]") {
            Some(name) => value.get(name)?.as_array()?.first()?,
            None => value.get(segment)?,
        };
    }
    Some(value)
}

#[test]
fn documented_defaults_are_the_defaults_the_code_applies() {
    // Keys that only appear for some routes are looked up in the variant where they apply.
    let variants = [resolved(""), resolved("inject = \"query\"")];
    let mut checked = 0;
    for (key, default) in documented_keys() {
        // Only a default written as one literal in backticks is a claim about a value; "none", "required",
        // "one per CPU core" and the like are prose.
        let Some(literal) = default.strip_prefix('`').and_then(|d| d.strip_suffix('`')).filter(|d| !d.contains('`'))
        else {
            continue;
        };
        let documented: toml::Table = format!("v = {literal}")
            .parse()
            .unwrap_or_else(|e| panic!("{key}: the default `{literal}` is not a TOML value: {e}"));
        let documented = &documented["v"];
        let actual = variants
            .iter()
            .find_map(|table| lookup(table, &key))
            .unwrap_or_else(|| panic!("{key}: documented default {literal}, but the resolved config has no such key"));
        let same = match (documented, actual) {
            // Header names are case-insensitive; the config prints them lowercased.
            (toml::Value::String(d), toml::Value::String(a)) if key.ends_with("header_name") => {
                d.eq_ignore_ascii_case(a)
            }
            // Durations are equal by value ("60s" is printed "1m").
            (toml::Value::String(d), toml::Value::String(a))
                if humantime::parse_duration(d).is_ok() && humantime::parse_duration(a).is_ok() =>
            {
                humantime::parse_duration(d).ok() == humantime::parse_duration(a).ok()
            }
            _ => documented == actual,
        };
        assert!(same, "{key}: docs/configuration.md says the default is {literal}, the code applies {actual}");
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} defaults were checked");
}
