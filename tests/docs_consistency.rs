//! README.md and the user guide (docs/) cannot drift from the code or from each other:
//! - the error codes of the README's Errors section and of the gRPC table in docs/configuration.md are exactly the
//!   codes the proxy answers, with the HTTP and gRPC statuses it answers them with, and each has its section in
//!   docs/troubleshooting.md;
//! - the README names every `grant` and `client_auth` value the config code accepts, and no page names another;
//! - docs/README.md and the README's user guide link every page of docs/;
//! - every relative link of these pages leads to a file, and to a heading that exists; no link leaves the repository;
//! - every repository path they name in backticks exists, and every test they name by its function exists;
//! - every metric name they use is one the metrics registry registers, and docs/metrics-and-alerts.md gives each
//!   registered metric its type and labels.
//!
//! (docs/configuration.md's keys and defaults are checked by tests/docs_config.rs.)

mod support {
    pub mod markdown;
    pub mod metrics;
}

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use support::markdown;
use support::metrics::{family, registered_metrics, Registered};
use tokenproxy::config::{Config, ConfigError};
use tokenproxy::proxy::ProxyError;
use tokenproxy::token::SubjectRefusal;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The pages of the guide, `docs/*.md`, sorted.
fn guide_pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    assert!(pages.len() > 10, "found only {} pages in docs/", pages.len());
    pages
}

/// README.md and every page of docs/.
fn all_pages() -> Vec<PathBuf> {
    let mut pages = vec![repo().join("README.md")];
    pages.extend(guide_pages());
    pages
}

/// A page's path as the messages show it: `docs/fleet.md`.
fn shown(path: &Path) -> String {
    path.strip_prefix(repo()).unwrap_or(path).display().to_string()
}

/// The lines of a Markdown text outside fenced code blocks.
fn prose_lines(text: &str) -> Vec<&str> {
    let mut in_code = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code {
            lines.push(line);
        }
    }
    lines
}

/// The lines under the heading `heading` (the whole heading line, e.g. `### Errors`), up to the next heading of the
/// same or a higher level outside code blocks.
fn section(text: &str, heading: &str) -> String {
    let level = heading.chars().take_while(|&c| c == '#').count();
    let mut lines = text.lines().skip_while(|line| line.trim_end() != heading);
    assert!(lines.next().is_some(), "no heading `{heading}`");
    let mut in_code = false;
    let mut out = String::new();
    for line in lines {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !in_code && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The code spans (`like this`) of a Markdown text, outside fenced code blocks.
fn code_spans(text: &str) -> Vec<String> {
    prose_lines(text).iter().flat_map(|line| line.split('`').skip(1).step_by(2).map(str::to_owned)).collect()
}

/// The targets of the inline links `[text](target)` of a Markdown text, outside code blocks and code spans.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in prose_lines(text) {
        // Drop code spans: `[x](y)` inside backticks is not a link.
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = prose.as_str();
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            targets.push(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    targets
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

// ------------------------------------------------------------------------------------------------ error codes

/// One of each error the proxy answers. Adding a variant to `ProxyError` (or `SubjectRefusal`) fails to compile
/// below until it is listed here too.
fn every_error() -> Vec<ProxyError> {
    let errors = vec![
        ProxyError::TokenUnavailable { detail: String::new(), retry_after: None },
        ProxyError::Subject { refusal: SubjectRefusal::Missing, detail: String::new() },
        ProxyError::Subject { refusal: SubjectRefusal::Invalid, detail: String::new() },
        ProxyError::Subject { refusal: SubjectRefusal::Refused, detail: String::new() },
        ProxyError::Subject { refusal: SubjectRefusal::Throttled, detail: String::new() },
        ProxyError::TokenBudgetExhausted { detail: String::new(), retry_after: None },
        ProxyError::UpstreamUnreachable(String::new()),
        ProxyError::UpstreamBusy(1),
        ProxyError::UpstreamTimeout(std::time::Duration::from_secs(1)),
        ProxyError::RequestTimeout(std::time::Duration::from_secs(1)),
        ProxyError::NoRoute,
        ProxyError::HostNotAllowed(String::new()),
        ProxyError::Misdirected(String::new()),
        ProxyError::BadRequest(String::new()),
        ProxyError::Malformed(String::new()),
        ProxyError::MethodNotAllowed(String::new()),
    ];
    // Every variant, numbered: the match is exhaustive, so a new variant needs an arm here, and the assertion then
    // needs it in the list above.
    let variant = |error: &ProxyError| match error {
        ProxyError::TokenUnavailable { .. } => 0,
        ProxyError::Subject { refusal, .. } => match refusal {
            SubjectRefusal::Missing => 1,
            SubjectRefusal::Invalid => 2,
            SubjectRefusal::Refused => 3,
            SubjectRefusal::Throttled => 4,
        },
        ProxyError::TokenBudgetExhausted { .. } => 5,
        ProxyError::UpstreamUnreachable(_) => 6,
        ProxyError::UpstreamBusy(_) => 7,
        ProxyError::UpstreamTimeout(_) => 8,
        ProxyError::RequestTimeout(_) => 9,
        ProxyError::NoRoute => 10,
        ProxyError::HostNotAllowed(_) => 11,
        ProxyError::Misdirected(_) => 12,
        ProxyError::BadRequest(_) => 13,
        ProxyError::Malformed(_) => 14,
        ProxyError::MethodNotAllowed(_) => 15,
    };
    let listed: BTreeSet<usize> = errors.iter().map(variant).collect();
    assert_eq!(listed, (0..16).collect(), "every_error() must list one error of each variant");
    errors
}

/// What the proxy answers for each error code: the HTTP status, and the gRPC status number and name.
struct Answered {
    status: u16,
    grpc: u8,
    grpc_name: String,
}

/// Every error code the proxy answers, with its statuses (one code may stand for several variants, with the same
/// statuses).
fn error_codes() -> BTreeMap<&'static str, Answered> {
    let mut codes: BTreeMap<&'static str, Answered> = BTreeMap::new();
    for error in every_error() {
        let grpc_code = error.grpc_code();
        // `DeadlineExceeded` → `DEADLINE_EXCEEDED`, the name the gRPC spec gives the status.
        let mut grpc_name = String::new();
        for (i, c) in format!("{grpc_code:?}").chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                grpc_name.push('_');
            }
            grpc_name.push(c.to_ascii_uppercase());
        }
        let answered = Answered { status: error.status().as_u16(), grpc: grpc_code as u8, grpc_name };
        let code = error.code();
        if let Some(known) = codes.get(code) {
            assert!(
                known.status == answered.status && known.grpc == answered.grpc,
                "`{code}` is answered with two statuses: the docs can give only one"
            );
        }
        codes.insert(code, answered);
    }
    assert!(codes.len() >= 15, "only {} error codes: {:?}", codes.len(), codes.keys());
    codes
}

/// `` `code` (NNN `` in a text: each error code given with its HTTP status.
fn codes_with_status(text: &str) -> Vec<(String, u16)> {
    let pieces: Vec<&str> = text.split('`').collect();
    let mut found = Vec::new();
    // Odd pieces are code spans, each followed by the prose after it.
    for pair in pieces[1..].chunks(2) {
        let [word, after] = pair else { continue };
        let is_word = !word.is_empty() && word.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        let status = after.strip_prefix(" (").and_then(|s| s.get(..3)).and_then(|s| s.parse::<u16>().ok());
        if let (true, Some(status)) = (is_word, status) {
            found.push(((*word).to_owned(), status));
        }
    }
    found
}

#[test]
fn the_readme_lists_every_error_code_with_its_status() {
    let codes = error_codes();
    let readme = read(&repo().join("README.md"));
    let errors = section(&readme, "### Errors");
    let listed = codes_with_status(&errors);
    let mut named = BTreeSet::new();
    for (code, status) in &listed {
        let answered = codes
            .get(code.as_str())
            .unwrap_or_else(|| panic!("README.md, Errors: `{code}` ({status}) is not an error code the proxy answers"));
        assert_eq!(
            *status, answered.status,
            "README.md, Errors: `{code}` is given status {status}, the proxy answers {}",
            answered.status
        );
        named.insert(code.as_str());
    }
    let missing: Vec<&&str> = codes.keys().filter(|code| !named.contains(**code)).collect();
    assert!(missing.is_empty(), "README.md, Errors: no `code` (status) for {missing:?}");
}

#[test]
fn the_grpc_table_lists_every_error_code_with_its_statuses() {
    let codes = error_codes();
    let text = read(&repo().join("docs/configuration.md"));
    let mut in_table = false;
    let mut named = BTreeSet::new();
    for line in prose_lines(&text) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        if cells.first() == Some(&"error code") && cells.get(2) == Some(&"`grpc-status`") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        if !line.starts_with('|') {
            break;
        }
        if cells.iter().all(|c| c.chars().all(|c| c == '-')) {
            continue;
        }
        let [row_codes, statuses, grpc_cell] = cells.as_slice() else { panic!("gRPC table: a row of 3 cells: {line}") };
        let row_codes: Vec<&str> = row_codes.split(',').map(|c| c.trim().trim_matches('`')).collect();
        let statuses: Vec<&str> = statuses.split(',').map(str::trim).collect();
        assert_eq!(row_codes.len(), statuses.len(), "gRPC table: a status for each code: {line}");
        let (number, name) = grpc_cell.split_once(' ').unwrap_or_else(|| panic!("gRPC table: `N NAME`: {line}"));
        let name = name.trim().trim_matches('`');
        for (code, status) in row_codes.iter().zip(&statuses) {
            let answered = codes
                .get(code)
                .unwrap_or_else(|| panic!("gRPC table: `{code}` is not an error code the proxy answers"));
            assert_eq!(
                status.parse::<u16>().ok(),
                Some(answered.status),
                "gRPC table: `{code}` is given HTTP status {status}, the proxy answers {}",
                answered.status
            );
            assert_eq!(
                (number.parse::<u8>().ok(), name),
                (Some(answered.grpc), answered.grpc_name.as_str()),
                "gRPC table: `{code}` is given grpc-status {number} {name}, the proxy answers {} {}",
                answered.grpc,
                answered.grpc_name
            );
            assert!(named.insert(*code), "gRPC table: `{code}` is listed twice");
        }
    }
    assert!(in_table, "docs/configuration.md has no table `| error code | HTTP status | `grpc-status` |`");
    let missing: Vec<&&str> = codes.keys().filter(|code| !named.contains(**code)).collect();
    assert!(missing.is_empty(), "the gRPC table of docs/configuration.md lacks {missing:?}");
}

#[test]
fn troubleshooting_has_a_section_for_every_error_code() {
    let text = read(&repo().join("docs/troubleshooting.md"));
    let headings: Vec<&str> = prose_lines(&text).into_iter().filter(|line| line.starts_with('#')).collect();
    for code in error_codes().keys() {
        let found = headings
            .iter()
            .any(|heading| heading.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|word| word == *code));
        assert!(found, "docs/troubleshooting.md has no heading naming `{code}`");
    }
}

// ------------------------------------------------------------------------------------------------ grants, client_auth

/// The values the config code accepts for `providers.NAME.<key>`, as it lists them when it refuses another.
fn accepted_values(key: &str) -> BTreeSet<String> {
    let text = format!(
        r#"
[providers.p]
token_url = "https://idp.example/oauth2/token"
client_id = "c"
client_secret = "s"
{key} = "no_such_value"

[[routes]]
upstream = "https://api.example"
provider = "p"
"#
    );
    let Err(ConfigError::Invalid(problems)) = Config::from_toml_str(&text, "probe") else {
        panic!("`{key} = \"no_such_value\"` was not refused");
    };
    let path = format!("providers.p.{key}");
    let problem = problems
        .iter()
        .find(|p| p.key == path)
        .unwrap_or_else(|| panic!("no problem reported for {path}: {problems:?}"));
    let list = problem
        .message
        .split_once("expected one of: ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(list, _)| list)
        .unwrap_or_else(|| panic!("{path}: the message lists no values: {}", problem.message));
    let values: BTreeSet<String> = list.split(", ").map(str::to_owned).collect();
    assert!(values.len() >= 3, "{path}: only {values:?}");
    values
}

/// Every value given to `key` in the pages, in prose and in code blocks: `key = "value"`.
fn values_given(key: &str) -> Vec<(String, String)> {
    let needle = format!("{key} = \"");
    let mut given = Vec::new();
    for page in all_pages() {
        let text = read(&page);
        for (i, _) in text.match_indices(&needle) {
            // Only the key itself, not a longer key ending in it.
            let before = text[..i].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &text[i + needle.len()..];
            let value = &rest[..rest.find('"').expect("a closing quote")];
            given.push((shown(&page), value.to_owned()));
        }
    }
    given
}

#[test]
fn the_readme_names_every_grant_and_client_authentication_method() {
    let readme = read(&repo().join("README.md"));
    let grants_section = section(&readme, "### Grants and sessions");
    let configuration = read(&repo().join("docs/configuration.md"));
    for (key, in_readme) in [("grant", "grant = \"{}\""), ("client_auth", "\"{}\"")] {
        let accepted = accepted_values(key);
        let row = configuration
            .lines()
            .find(|line| line.starts_with(&format!("| `providers.NAME.{key}` |")))
            .unwrap_or_else(|| panic!("docs/configuration.md has no row for providers.NAME.{key}"));
        for value in &accepted {
            let wanted = in_readme.replace("{}", value);
            assert!(
                grants_section.contains(&wanted),
                "README.md, Grants and sessions: `{key}` value `{value}` is not named (as {wanted})"
            );
            assert!(
                row.contains(&format!("`{value}`")),
                "docs/configuration.md, providers.NAME.{key}: `{value}` is not named"
            );
        }
        let given = values_given(key);
        assert!(!given.is_empty(), "no page gives a value to {key}");
        for (page, value) in given {
            assert!(accepted.contains(&value), "{page}: {key} = \"{value}\", which the config code refuses");
        }
    }
}

// ------------------------------------------------------------------------------------------------ pages and links

#[test]
fn both_indexes_link_every_page_of_the_guide() {
    let index = read(&repo().join("docs/README.md"));
    let readme = read(&repo().join("README.md"));
    let user_guide = section(&readme, "## User guide");
    let index_links: BTreeSet<String> = link_targets(&index).into_iter().collect();
    let readme_links: BTreeSet<String> = link_targets(&user_guide).into_iter().collect();
    assert!(readme_links.contains("docs/README.md"), "README.md, User guide: no link to docs/README.md");
    for page in guide_pages() {
        let name = page.file_name().and_then(|n| n.to_str()).expect("a file name");
        if name == "README.md" {
            continue;
        }
        assert!(index_links.contains(name), "docs/README.md does not link to {name}");
        assert!(readme_links.contains(&format!("docs/{name}")), "README.md, User guide: no link to docs/{name}");
    }
}

#[test]
fn links_lead_to_files_and_headings_in_the_repository() {
    let root = repo();
    let mut checked = 0;
    for page in all_pages() {
        let text = read(&page);
        let dir = page.parent().expect("a directory");
        for target in link_targets(&text) {
            assert!(
                !target.contains("://") && !target.starts_with("mailto:"),
                "{}: a link to {target}: the docs cite nothing outside this repository",
                shown(&page)
            );
            let (file, anchor) = target.split_once('#').unwrap_or((target.as_str(), ""));
            let file = if file.is_empty() { page.clone() } else { normalize(&dir.join(file)) };
            assert!(file.starts_with(&root), "{}: a link to {target}, outside the repository", shown(&page));
            assert!(file.exists(), "{}: a link to {target}, but {} does not exist", shown(&page), shown(&file));
            if !anchor.is_empty() {
                assert!(
                    file.extension().is_some_and(|e| e == "md") && markdown::anchors(&read(&file)).contains(anchor),
                    "{}: a link to {target}, but {} has no heading #{anchor}",
                    shown(&page),
                    shown(&file)
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} links checked");
}

/// A path segment that is a placeholder for the reader to fill in (`ROW.json`, `NAME`).
fn is_placeholder(segment: &str) -> bool {
    let stem = segment.split('.').next().unwrap_or(segment);
    stem.len() > 1 && stem.chars().all(|c| c.is_ascii_uppercase() || c == '_')
}

/// Whether `path` (relative to `root`) exists; a `*` in its last segment (`tests/oidc_*.rs`) must match a file.
fn exists(root: &Path, path: &str) -> bool {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    let Some((head, tail)) = name.split_once('*') else { return root.join(path).exists() };
    std::fs::read_dir(root.join(dir)).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|entry| {
            let file = entry.file_name().to_string_lossy().into_owned();
            file.len() >= head.len() + tail.len() && file.starts_with(head) && file.ends_with(tail)
        })
    })
}

#[test]
fn paths_and_tests_named_in_the_pages_exist() {
    let root = repo();
    let top_level: BTreeSet<String> = std::fs::read_dir(&root)
        .expect("the repository")
        .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name != "target" && name != ".git")
        .collect();
    // The functions of the test and source files, for test names cited in the docs.
    let mut sources = String::new();
    for dir in ["tests", "src"] {
        let mut stack = vec![root.join(dir)];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("a source directory") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    sources.push_str(&read(&path));
                }
            }
        }
    }
    let (mut paths, mut tests) = (0, 0);
    for page in all_pages() {
        for span in code_spans(&read(&page)) {
            let first = span.split('/').next().unwrap_or_default();
            if span.contains('/') && top_level.contains(first) && !span.contains(' ') {
                if !span.split('/').any(is_placeholder) {
                    assert!(exists(&root, &span), "{}: `{span}` does not exist", shown(&page));
                    paths += 1;
                }
            } else if span.matches('_').count() >= 6
                && span.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                assert!(sources.contains(&format!("fn {span}(")), "{}: no test `{span}`", shown(&page));
                tests += 1;
            }
        }
    }
    assert!(paths > 20 && tests > 3, "only {paths} paths and {tests} test names checked");
}

// ------------------------------------------------------------------------------------------------ metrics

/// The label names of a label list `{a, b}`, `{a="x",b="y"}`, `{a="x"|"y"}` or `{a!="x"}`.
fn label_names(list: &str) -> Vec<String> {
    list.split(',')
        .map(|part| part.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>())
        .filter(|name| !name.is_empty())
        .collect()
}

#[test]
fn metric_names_in_the_pages_are_the_registered_ones() {
    let registered = registered_metrics();
    let mut checked = 0;
    for page in all_pages() {
        let text = read(&page);
        let bytes = text.as_bytes();
        let mut at = 0;
        while let Some(found) = text[at..].find("tokenproxy_") {
            let start = at + found;
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .map_or(text.len(), |e| start + e);
            at = end;
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            let name = &text[start..end];
            // `grep tokenproxy_token` filters by a prefix.
            if text[..start].ends_with("grep ") {
                assert!(
                    registered.keys().any(|m| m.starts_with(name)),
                    "{}: `grep {name}` matches no metric",
                    shown(&page)
                );
                continue;
            }
            let (_, metric) = family(&registered, name)
                .unwrap_or_else(|| panic!("{}: `{name}` is not a metric tokenproxy registers", shown(&page)));
            if let Some(list) = text[end..].strip_prefix('{').and_then(|rest| rest.split_once('}')).map(|(l, _)| l) {
                for label in label_names(list) {
                    assert!(
                        metric.labels.contains(&label) || (label == "le" && name.ends_with("_bucket")),
                        "{}: `{name}` has no label `{label}` (it has {:?})",
                        shown(&page),
                        metric.labels
                    );
                }
            }
            checked += 1;
        }
        // Short names in code spans: `replays_total{outcome="rate_limited"}`.
        for span in code_spans(&text) {
            let word: String =
                span.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
            if word.starts_with("tokenproxy_") || !(word.ends_with("_total") || word.ends_with("_seconds")) {
                continue;
            }
            assert!(
                registered.contains_key(&format!("tokenproxy_{word}")),
                "{}: `{word}` is not the short name of a metric",
                shown(&page)
            );
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} metric names checked");
}

#[test]
fn the_metrics_page_gives_every_metric_its_type_and_labels() {
    let registered = registered_metrics();
    let text = read(&repo().join("docs/metrics-and-alerts.md"));
    let mut documented = BTreeMap::new();
    for line in prose_lines(&text) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        let [name, kind, labels, _meaning] = cells.as_slice() else { continue };
        let Some(name) = name.strip_prefix("`tokenproxy_").and_then(|n| n.strip_suffix('`')) else { continue };
        // `provider, outcome (`success`, `error`)`: the names, without the values in parentheses.
        let mut names = String::new();
        let mut depth = 0;
        for c in labels.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => names.push(c),
                _ => {}
            }
        }
        let labels: BTreeSet<String> = names
            .split(',')
            .map(|label| label.trim().to_owned())
            .filter(|label| !label.is_empty() && label != "—")
            .collect();
        let metric = Registered { kind: (*kind).to_owned(), labels };
        assert!(documented.insert(format!("tokenproxy_{name}"), metric).is_none(), "tokenproxy_{name} twice");
    }
    for (name, metric) in &registered {
        let doc = documented.get(name).unwrap_or_else(|| panic!("docs/metrics-and-alerts.md has no row for `{name}`"));
        assert_eq!(doc, metric, "docs/metrics-and-alerts.md, `{name}`: type and labels differ from the registry's");
    }
    let unknown: Vec<&String> = documented.keys().filter(|name| !registered.contains_key(*name)).collect();
    assert!(unknown.is_empty(), "docs/metrics-and-alerts.md documents metrics nobody registers: {unknown:?}");
}
