//! Markdown helpers for the docs and manifest tests: the anchors GitHub gives a page's headings.

use std::collections::BTreeSet;

/// GitHub's anchor of a Markdown heading: lowercase, punctuation dropped, spaces as hyphens.
pub fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks).
pub fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut anchors = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            anchors.insert(github_anchor(line.trim_start_matches('#')));
        }
    }
    anchors
}
