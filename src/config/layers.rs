//! The figment layers (the TOML text, then `TOKENPROXY_` environment variables) and the naming of where a value
//! came from: the config file as the user gave it, the exact environment variable, or `default`.
//!
//! Built-in defaults are not a layer: the reader applies them for absent keys, so a default never needs a source.

use std::path::Path;
use std::sync::Arc;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Tag, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};

use super::{ConfigError, Problem, CONFIG_FILE_VARIABLE};

/// Prefix of the environment variables that override the file.
const ENV_PREFIX: &str = "TOKENPROXY_";

/// Separator between key levels in an environment variable name.
const ENV_SEPARATOR: &str = "__";

/// Metadata name of the environment layer.
const ENV_LAYER: &str = "environment";

/// Where the TOML text came from.
pub(super) enum Origin<'a> {
    /// A file, named in errors as the user gave its path.
    File(&'a Path),
    /// Text from elsewhere (embedded demo config, tests), named in errors by this name.
    Named(&'a str),
}

/// The layered figment: the TOML text, then (when `with_env`) the environment.
///
/// The TOML text is parsed here first so that a syntax error is reported with a line and column, without the
/// excerpt of the offending line that the TOML parser would print (it could hold a secret).
pub(super) fn figment(text: &str, origin: Origin<'_>, with_env: bool) -> Result<Figment, ConfigError> {
    let source_name = match &origin {
        Origin::File(path) => path.display().to_string(),
        Origin::Named(name) => (*name).to_owned(),
    };
    if let Err(e) = text.parse::<toml::Table>() {
        let position = e
            .span()
            .map(|span| {
                let (line, column) = line_and_column(text, span.start);
                format!(" at line {line}, column {column}")
            })
            .unwrap_or_default();
        return Err(ConfigError::Invalid(vec![Problem {
            key: String::new(),
            message: format!("invalid TOML{position}: {}", e.message().trim().replace('\n', "; ")),
            source: source_name,
        }]));
    }
    let metadata = match origin {
        Origin::File(path) => Metadata::from("TOML file", Source::File(path.to_owned())),
        Origin::Named(name) => Metadata::from("TOML", Source::Custom(name.to_owned())),
    };
    let mut figment = Figment::new().merge(TomlLayer { text, metadata });
    if with_env {
        figment = figment.merge(EnvLayer::from_process());
    }
    Ok(figment)
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Where the value tagged `tag` at `path` came from, for error messages.
pub(super) fn source_name(figment: &Figment, tag: Tag, path: &[String]) -> String {
    let Some(metadata) = figment.get_metadata(tag) else {
        return "default".to_owned();
    };
    match &metadata.source {
        Some(Source::File(file)) => file.display().to_string(),
        Some(Source::Custom(name)) => name.clone(),
        _ => metadata.interpolate(&Profile::Default, path),
    }
}

/// Whether the value tagged `tag` came from the environment (which wins over the file).
pub(super) fn is_environment(figment: &Figment, tag: Tag) -> bool {
    figment.get_metadata(tag).is_some_and(|metadata| metadata.name == ENV_LAYER)
}

/// The TOML text as a figment provider whose metadata names the file (or text) as the user gave it.
struct TomlLayer<'a> {
    text: &'a str,
    metadata: Metadata,
}

impl Provider for TomlLayer<'_> {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(self.text).data()
    }
}

/// `TOKENPROXY_` environment variables, `__` between levels, as a figment provider.
///
/// Unlike figment's own `Env` provider it keeps scalar values as the strings they are: `Env` would turn
/// `client_id=007` into the number 7. The reader converts strings to numbers, booleans and durations where a key
/// needs one. Only where a key takes a table or an array (`server__tls`, `extra_params`, `routes`, a whole
/// section or provider) is a value starting with `{` or `[` parsed as figment's inline syntax.
struct EnvLayer {
    /// Key path (lowercased, split at `__`) and raw value of each variable.
    vars: Vec<(Vec<String>, String)>,
}

impl EnvLayer {
    /// Collects the variables now, ignoring [`CONFIG_FILE_VARIABLE`] (it names the file, it is not a key).
    fn from_process() -> Self {
        let ignored =
            CONFIG_FILE_VARIABLE.strip_prefix(ENV_PREFIX).unwrap_or(CONFIG_FILE_VARIABLE).to_ascii_lowercase();
        let mut vars: Vec<(Vec<String>, String)> = Env::prefixed(ENV_PREFIX)
            .split(ENV_SEPARATOR)
            .ignore(&[ignored.as_str()])
            .iter()
            .map(|(key, value)| (key.as_str().split('.').map(str::to_owned).collect(), value))
            .collect();
        // Shallow keys first, so `X__TLS__CERT_FILE` lands inside a table given whole by `X__TLS`.
        vars.sort();
        vars.sort_by_key(|(path, _)| path.len());
        EnvLayer { vars }
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        let keys: Arc<Vec<Vec<String>>> = Arc::new(self.vars.iter().map(|(path, _)| path.clone()).collect());
        Metadata::named(ENV_LAYER).interpolater(move |_: &Profile, path: &[&str]| variable_name(&keys, path))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (path, raw) in &self.vars {
            insert(&mut root, path, env_value(path, raw));
        }
        Ok(Profile::Default.collect(root))
    }
}

/// The variable that set `path`: the one whose key is the longest prefix of `path` (a variable holding a whole
/// table sets every key in it), else for a table the first variable that set a key inside it.
fn variable_name(keys: &[Vec<String>], path: &[&str]) -> String {
    let starts_with =
        |long: &[String], short: &[String]| long.len() >= short.len() && long.iter().zip(short).all(|(l, s)| l == s);
    let path: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
    let segments = keys
        .iter()
        .filter(|key| starts_with(&path, key))
        .max_by_key(|key| key.len())
        .or_else(|| keys.iter().find(|key| starts_with(key, &path)))
        .unwrap_or(&path);
    format!("{ENV_PREFIX}{}", segments.join(ENV_SEPARATOR).to_ascii_uppercase())
}

/// The value of one variable: a string, or a table/array where the key takes one and the text looks like one.
fn env_value(path: &[String], raw: &str) -> Value {
    let takes_table = match path {
        [_section] => true,
        [first, _name] if first == "providers" => true,
        [.., last] => matches!(last.as_str(), "tls" | "extra_params" | "routes"),
        [] => false,
    };
    if takes_table && raw.trim_start().starts_with(['{', '[']) {
        if let Ok(value @ (Value::Dict(..) | Value::Array(..))) = raw.parse::<Value>() {
            return value;
        }
    }
    Value::from(raw.to_owned())
}

/// Inserts `value` at `path`, creating tables on the way (a deeper variable replaces a scalar in its way).
fn insert(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict.entry(first.clone()).or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}
