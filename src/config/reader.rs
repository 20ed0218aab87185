//! A small reader over the merged figment tree: it takes each known key of a table, converts the leaf leniently
//! (environment values arrive as strings), records a [`Problem`] with the dotted key and its source for anything
//! wrong, and at the end of each table reports the keys nobody asked for, with a "did you mean" suggestion.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::value::{Dict, Num, Tag, Value};
use figment::Figment;

use super::layers;
use super::Problem;

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone)]
enum Segment {
    Key(String),
    Index(usize),
}

/// A key path, displayed as `providers.orders.token_url` or `routes[2].provider`.
#[derive(Debug, Clone, Default)]
pub(super) struct KeyPath(Vec<Segment>);

impl KeyPath {
    /// The path of `key` inside this table.
    pub(super) fn key(&self, key: &str) -> KeyPath {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(key.to_owned()));
        KeyPath(segments)
    }

    /// The path of element `index` of this array.
    pub(super) fn index(&self, index: usize) -> KeyPath {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        KeyPath(segments)
    }

    /// The segments as figment keys (indexes as numbers), for naming environment variables.
    fn segments(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|segment| match segment {
                Segment::Key(key) => key.clone(),
                Segment::Index(index) => index.to_string(),
            })
            .collect()
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A table being read: which keys it has and which ones have been asked for.
pub(super) struct Table<'v> {
    /// Where the table is.
    pub(super) path: KeyPath,
    /// Tag of the table (or of its parent when the table is absent), for naming the source of missing keys.
    pub(super) tag: Tag,
    entries: Option<&'v Dict>,
    known: Vec<String>,
}

impl<'v> Table<'v> {
    /// A table read from `dict` at `path`.
    pub(super) fn new(path: KeyPath, tag: Tag, dict: &'v Dict) -> Self {
        Table { path, tag, entries: Some(dict), known: Vec::new() }
    }

    /// A table that is not there: every key reads as absent.
    fn absent(path: KeyPath, tag: Tag) -> Self {
        Table { path, tag, entries: None, known: Vec::new() }
    }

    /// Whether the table exists at all.
    pub(super) fn is_present(&self) -> bool {
        self.entries.is_some()
    }

    /// Whether `key` is set.
    pub(super) fn has(&self, key: &str) -> bool {
        self.entries.is_some_and(|entries| entries.contains_key(key))
    }

    /// The entries, for tables whose keys are names (`[providers]`, `extra_params`).
    pub(super) fn entries(&self) -> impl Iterator<Item = (&'v String, &'v Value)> {
        self.entries.into_iter().flatten()
    }

    /// Takes `key`: it becomes known, and its value is returned if set.
    pub(super) fn field(&mut self, key: &str) -> Option<Field<'v>> {
        if !self.known.iter().any(|known| known == key) {
            self.known.push(key.to_owned());
        }
        let value = self.entries?.get(key)?;
        Some(Field { path: self.path.key(key), value })
    }
}

/// A value read from the tree, with its key path.
pub(super) struct Field<'v> {
    /// Where the value is.
    pub(super) path: KeyPath,
    /// The value, with its source tag.
    pub(super) value: &'v Value,
}

/// A converted value with the key path and tag it came from, for checks that involve several keys.
pub(super) struct Leaf<T> {
    /// The converted value.
    pub(super) value: T,
    /// Where it is.
    pub(super) path: KeyPath,
    /// Its source tag.
    pub(super) tag: Tag,
}

/// Walks the merged tree and collects problems.
pub(super) struct Reader<'f> {
    figment: &'f Figment,
    /// Names the TOML text, the source of keys missing at the top level.
    root_source: &'f str,
    problems: Vec<Problem>,
    unknown: Vec<Problem>,
    /// Offline (`check --offline`): a secret or file that is not there is only reported in `unavailable`.
    offline: bool,
    unavailable: Vec<Problem>,
}

impl<'f> Reader<'f> {
    /// A reader over `figment`'s values; `root_source` names the TOML text.
    pub(super) fn new(figment: &'f Figment, root_source: &'f str) -> Self {
        Reader {
            figment,
            root_source,
            problems: Vec::new(),
            unknown: Vec::new(),
            offline: false,
            unavailable: Vec::new(),
        }
    }

    /// A reader for `check --offline`: secrets and files that are absent here are warnings, not problems.
    pub(super) fn offline(mut self) -> Self {
        self.offline = true;
        self
    }

    /// What could not be had here but may be where the proxy runs (offline only), one line each.
    pub(super) fn take_unavailable(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unavailable)
            .into_iter()
            .map(|problem| format!("{problem}; not checked offline, `run` needs it"))
            .collect()
    }

    /// Records that a secret or file named at `field` cannot be had here: a problem, or, offline, a warning. Tells
    /// whether the value may still be used (offline).
    pub(super) fn report_unavailable(&mut self, field: &Field<'_>, message: impl Into<String>) -> bool {
        if self.offline {
            let source = self.source(field.value.tag(), &field.path);
            self.unavailable.push(Problem { key: field.path.to_string(), message: message.into(), source });
        } else {
            self.report_field(field, message);
        }
        self.offline
    }

    /// `key` of `table`: the path of a file that must exist and be readable when the proxy runs.
    pub(super) fn file(&mut self, table: &mut Table<'_>, key: &str) -> Option<Leaf<PathBuf>> {
        let field = table.field(key)?;
        let path = match path(field.value) {
            Ok(path) => path,
            Err(message) => {
                self.report_field(&field, message);
                return None;
            }
        };
        let usable = match std::fs::File::open(&path).and_then(|file| file.metadata()) {
            Ok(metadata) if metadata.is_file() => true,
            Ok(_) => {
                self.report_field(&field, format!("{} is not a file", path.display()));
                false
            }
            Err(e) => self.report_unavailable(&field, format!("cannot read {}: {e}", path.display())),
        };
        usable.then(|| Leaf { value: path, path: field.path.clone(), tag: field.value.tag() })
    }

    /// Like [`Reader::file`], but an absent key is a problem too.
    pub(super) fn require_file(&mut self, table: &mut Table<'_>, key: &str, missing: &str) -> Option<Leaf<PathBuf>> {
        if !table.has(key) {
            table.field(key);
            self.report_missing(table, key, missing);
            return None;
        }
        self.file(table, key)
    }

    /// All problems: those found while reading, then unknown keys.
    pub(super) fn into_problems(self) -> Vec<Problem> {
        let mut problems = self.problems;
        problems.extend(self.unknown);
        problems
    }

    /// How many problems have been found so far.
    pub(super) fn problem_count(&self) -> usize {
        self.problems.len()
    }

    /// Whether the value tagged `tag` came from the environment.
    pub(super) fn is_environment(&self, tag: Tag) -> bool {
        layers::is_environment(self.figment, tag)
    }

    /// Records a problem at `path` with a value tagged `tag`.
    pub(super) fn report(&mut self, path: &KeyPath, tag: Tag, message: impl Into<String>) {
        let problem = Problem { key: path.to_string(), message: message.into(), source: self.source(tag, path) };
        self.problems.push(problem);
    }

    /// Where the value tagged `tag` at `path` came from; the root table has no tag of its own.
    fn source(&self, tag: Tag, path: &KeyPath) -> String {
        if tag.is_default() {
            self.root_source.to_owned()
        } else {
            layers::source_name(self.figment, tag, &path.segments())
        }
    }

    /// Records a problem with a field.
    pub(super) fn report_field(&mut self, field: &Field<'_>, message: impl Into<String>) {
        self.report(&field.path, field.value.tag(), message);
    }

    /// Records a problem with a converted value.
    pub(super) fn report_leaf<T>(&mut self, leaf: &Leaf<T>, message: impl Into<String>) {
        self.report(&leaf.path, leaf.tag, message);
    }

    /// Records that `key` of `table` is missing. The source is the file when the table has any key from it (a
    /// table figment merged with environment values carries the environment's tag), else the table's own.
    pub(super) fn report_missing(&mut self, table: &Table<'_>, key: &str, message: impl Into<String>) {
        let tag = table.entries().map(|(_, value)| value.tag()).find(|tag| !self.is_environment(*tag));
        let source = self.source(tag.unwrap_or(table.tag), &table.path);
        self.problems.push(Problem { key: table.path.key(key).to_string(), message: message.into(), source });
    }

    /// The sub-table `key` of `parent`; an absent table reads as empty, a non-table is a problem.
    pub(super) fn table<'v>(&mut self, parent: &mut Table<'v>, key: &str) -> Table<'v> {
        let path = parent.path.key(key);
        match parent.field(key) {
            None => Table::absent(path, parent.tag),
            Some(Field { value: Value::Dict(tag, dict), .. }) => Table::new(path, *tag, dict),
            Some(field) => {
                self.report_field(&field, format!("expected a table, found {}", kind(field.value)));
                Table::absent(path, parent.tag)
            }
        }
    }

    /// Converts `key` of `table` with `convert`; a conversion error is recorded and gives `None`, as does absence.
    pub(super) fn get<T>(
        &mut self,
        table: &mut Table<'_>,
        key: &str,
        convert: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<Leaf<T>> {
        let field = table.field(key)?;
        match convert(field.value) {
            Ok(value) => Some(Leaf { value, path: field.path, tag: field.value.tag() }),
            Err(message) => {
                self.report_field(&field, message);
                None
            }
        }
    }

    /// Like [`Reader::get`], but an absent key is a problem too.
    pub(super) fn require<T>(
        &mut self,
        table: &mut Table<'_>,
        key: &str,
        missing: &str,
        convert: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<Leaf<T>> {
        if !table.has(key) {
            table.field(key);
            self.report_missing(table, key, missing);
            return None;
        }
        self.get(table, key, convert)
    }

    /// Ends reading `table`: every key nobody asked for is reported as unknown.
    pub(super) fn finish(&mut self, table: Table<'_>) {
        for (key, value) in table.entries() {
            if table.known.iter().any(|known| known == key) {
                continue;
            }
            let path = table.path.key(key);
            let message = match suggest(key, table.known.iter().map(String::as_str)) {
                Some(known) => format!("unknown key; did you mean `{known}`?"),
                None if table.known.is_empty() => "unknown key".to_owned(),
                None => format!("unknown key (known here: {})", table.known.join(", ")),
            };
            self.unknown.push(Problem { key: path.to_string(), message, source: self.source(value.tag(), &path) });
        }
    }
}

/// "a string", "a number", … for messages that must not echo the value.
pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::String(..) => "a string",
        Value::Char(..) => "a character",
        Value::Bool(..) => "a boolean",
        Value::Num(..) => "a number",
        Value::Empty(..) => "an empty value",
        Value::Dict(..) => "a table",
        Value::Array(..) => "an array",
    }
}

/// A string (never echoed in errors, so it also serves for secrets).
pub(super) fn string(value: &Value) -> Result<String, String> {
    match value {
        Value::String(_, s) => Ok(s.clone()),
        Value::Char(_, c) => Ok(c.to_string()),
        Value::Num(..) | Value::Bool(..) => Err(format!("expected a string, found {}; quote it", kind(value))),
        other => Err(format!("expected a string, found {}", kind(other))),
    }
}

/// A string that is not empty.
pub(super) fn non_empty_string(value: &Value) -> Result<String, String> {
    let s = string(value)?;
    if s.trim().is_empty() {
        return Err("must not be empty; remove the key instead".to_owned());
    }
    Ok(s)
}

/// A file-system path (not checked).
pub(super) fn path(value: &Value) -> Result<PathBuf, String> {
    let s = string(value)?;
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(PathBuf::from(s))
}

/// `true` or `false` (also as a string, as environment variables give it).
pub(super) fn boolean(value: &Value) -> Result<bool, String> {
    match value {
        Value::Bool(_, b) => Ok(*b),
        Value::String(_, s) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
        Value::String(_, s) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
        other => Err(format!("expected true or false, found {}", kind(other))),
    }
}

/// A whole number ≥ 0 (also as a string).
pub(super) fn count(value: &Value) -> Result<usize, String> {
    let n = match value {
        Value::Num(_, n) => n.to_u128_lossy().and_then(|n| usize::try_from(n).ok()),
        Value::String(_, s) => s.trim().parse::<usize>().ok(),
        _ => None,
    };
    n.ok_or_else(|| format!("expected a whole number ≥ 0, found {}", describe(value)))
}

/// A whole number ≥ 1.
pub(super) fn positive_count(value: &Value) -> Result<usize, String> {
    match count(value)? {
        0 => Err("must be at least 1".to_owned()),
        n => Ok(n),
    }
}

/// A number, integer or not (also as a string).
pub(super) fn number(value: &Value) -> Result<f64, String> {
    let n = match value {
        Value::Num(_, n) => num_to_f64(*n),
        Value::String(_, s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    n.filter(|n| n.is_finite()).ok_or_else(|| format!("expected a number, found {}", describe(value)))
}

/// Any figment number as `f64`.
fn num_to_f64(n: Num) -> Option<f64> {
    n.to_f64().or_else(|| n.to_u128_lossy().map(|n| n as f64)).or_else(|| n.to_i128().map(|n| n as f64))
}

/// A duration string: `"250ms"`, `"30s"`, `"5m"`, `"1h 30m"`.
pub(super) fn duration(value: &Value) -> Result<Duration, String> {
    const HINT: &str = "durations are strings such as \"250ms\", \"30s\" or \"5m\"";
    match value {
        Value::String(_, s) => {
            humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration `{}` ({e}); {HINT}", s.trim()))
        }
        Value::Num(..) => Err(format!("a bare number has no unit; {HINT}")),
        other => Err(format!("expected a duration, found {}; {HINT}", kind(other))),
    }
}

/// A duration greater than zero.
pub(super) fn positive_duration(value: &Value) -> Result<Duration, String> {
    match duration(value)? {
        d if d.is_zero() => Err("must be greater than zero".to_owned()),
        d => Ok(d),
    }
}

/// A size in bytes: a whole number, or a string such as `"64KiB"` or `"1MiB"` (`KB` and `MB` are powers of 1000).
pub(super) fn size(value: &Value) -> Result<usize, String> {
    const HINT: &str = "sizes are byte counts or strings such as \"64KiB\" or \"1MiB\"";
    let bytes = match value {
        Value::Num(_, n) => n.to_u128_lossy().and_then(|n| u64::try_from(n).ok()),
        Value::String(_, s) => s.trim().parse::<bytesize::ByteSize>().ok().map(|b| b.as_u64()),
        _ => None,
    };
    let bytes = bytes.ok_or_else(|| format!("expected a size, found {}; {HINT}", describe(value)))?;
    usize::try_from(bytes).map_err(|_| format!("{bytes} bytes is more than this machine can address"))
}

/// An IP address and port: `127.0.0.1:8080`, `[::]:8080`.
pub(super) fn socket_addr(value: &Value) -> Result<SocketAddr, String> {
    let s = string(value)?;
    s.trim().parse::<SocketAddr>().map_err(|_| {
        format!("invalid address `{s}`; expected an IP address and port such as \"127.0.0.1:8080\" or \"[::]:8080\" (host names are not resolved here)")
    })
}

/// One of `options` (the config spelling and its value), with a suggestion for a near miss.
pub(super) fn choice<'a, T: Copy>(options: &'a [(&'a str, T)]) -> impl FnOnce(&Value) -> Result<T, String> + 'a {
    move |value| {
        let s = string(value)?;
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == s) {
            return Ok(*t);
        }
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        let hint = match suggest(&s, names.iter().copied()) {
            Some(near) => format!("; did you mean `{near}`?"),
            None => String::new(),
        };
        Err(format!("unknown value `{s}` (expected one of: {}){hint}", names.join(", ")))
    }
}

/// A value for a message: numbers and short strings are shown, anything else is named by its kind.
fn describe(value: &Value) -> String {
    match value {
        Value::Num(_, n) => match (n.to_i128(), n.to_u128_lossy(), n.to_f64()) {
            (Some(i), ..) => i.to_string(),
            (None, Some(u), _) => u.to_string(),
            (None, None, Some(f)) => f.to_string(),
            _ => "a number".to_owned(),
        },
        Value::String(_, s) if s.chars().count() <= 40 => format!("`{s}`"),
        other => kind(other).to_owned(),
    }
}

/// The candidate closest to `word` (case-insensitive edit distance), if it is close enough to be a typo.
pub(super) fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|candidate| (edit_distance(&word, &candidate.to_ascii_lowercase()), candidate))
        .filter(|(distance, candidate)| *distance <= (candidate.chars().count() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and adjacent swaps each cost 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // rows[i][j] = distance between a[..i] and b[..j]
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitution = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1).min(rows[i][j - 1] + 1).min(rows[i - 1][j - 1] + substitution);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}
