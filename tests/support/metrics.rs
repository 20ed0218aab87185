//! The metrics registry as the tests read it: every family `tokenproxy::metrics::Metrics::new()` registers, with its
//! type and its label names, taken from the text exposition (what Prometheus scrapes).

use std::collections::{BTreeMap, BTreeSet};

use tokenproxy::metrics::{Metrics, METRIC_NAMES};

/// A metric as the registry has it: its type and its labels.
#[derive(Debug, PartialEq)]
pub struct Registered {
    /// `counter`, `gauge`, `histogram` (`# TYPE`).
    pub kind: String,
    /// The label names of its series (`le` left out).
    pub labels: BTreeSet<String>,
}

/// Every metric the registry registers, read from its text exposition with a series of each.
pub fn registered_metrics() -> BTreeMap<String, Registered> {
    let metrics = Metrics::new();
    // Families with labels have no series until a label value is used: use one of each.
    let _provider = metrics.provider("p");
    let route = metrics.route("r");
    route.count_status(http::StatusCode::OK);
    route.duration.observe(0.001);
    let _tls = metrics.upstream_tls_reloads("r");
    let _exchange = metrics.exchange("x");
    metrics.vended("v");
    metrics.misdirected("proxy").inc();
    let _listener = metrics.listener("proxy");
    metrics.store().operation("get", "ok").inc();
    metrics.store().degraded("p").set(0);
    metrics.config_reloaded("success");

    let text = metrics.encode();
    let mut found: BTreeMap<String, Registered> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            found.insert(name.to_owned(), Registered { kind: kind.to_owned(), labels: BTreeSet::new() });
        } else if !line.starts_with('#') && !line.is_empty() {
            let series = line.split(' ').next().expect("a series");
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .find(|base| found.get(*base).is_some_and(|m| m.kind == "histogram"))
                .unwrap_or(name);
            let metric = found.get_mut(family).unwrap_or_else(|| panic!("a series before its # TYPE: {line}"));
            for pair in labels.trim_end_matches('}').split(',').filter(|p| !p.is_empty()) {
                let label = pair.split('=').next().expect("label=value");
                if label != "le" {
                    metric.labels.insert(label.to_owned());
                }
            }
        }
    }
    let listed: BTreeSet<&str> = METRIC_NAMES.iter().copied().collect();
    let exposed: BTreeSet<&str> = found.keys().map(String::as_str).collect();
    assert_eq!(exposed, listed, "touch each new metric family in registered_metrics() so that it has a series");
    found
}

/// The family a series belongs to, and the registry's entry for it: `x_bucket`, `x_sum` and `x_count` belong to `x`
/// when `x` is a histogram; any other name is its own family. `None` when the registry has no such family.
pub fn family<'a>(registered: &'a BTreeMap<String, Registered>, series: &str) -> Option<(&'a str, &'a Registered)> {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| series.strip_suffix(suffix))
        .find(|base| registered.get(*base).is_some_and(|m| m.kind == "histogram"))
        .unwrap_or(series);
    registered.get_key_value(base).map(|(name, metric)| (name.as_str(), metric))
}
