//! Log lines no peer can forge or hide: every Unicode control character and bidi control in what is logged is
//! escaped, whatever field it is in (a path, a header such as `x-request-id`, an IdP's error text).
//!
//! A caller, an upstream or an IdP chooses some of the text tokenproxy logs. Raw, a C1 control (U+009B is a CSI that
//! terminals obey), a line or paragraph separator (U+2028, U+2029: a new line to many viewers) or a bidi override
//! (U+202E) lets it forge lines, recolour a terminal or make a path read backwards. The escaping is done once, on each
//! line as it is written ([`EscapingWriter`]), so that no field can be forgotten: in the JSON format as JSON escapes
//! (`\u009b`), in the text format as Rust's (`\u{9b}`). C0 controls and ESC are escaped by the formatters already
//! (JSON's `\u001b`, the text format's own); DEL is escaped here too.

use std::borrow::Cow;
use std::io;

/// Whether a character is escaped in logs: DEL, the C1 controls (U+0080–U+009F), the line and paragraph separators
/// (U+2028, U+2029) and the bidi controls (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069). C0 controls are
/// escaped too, should a formatter leave one.
pub fn is_escaped(c: char) -> bool {
    matches!(
        c,
        '\u{0}'..='\u{8}'
            | '\u{b}'..='\u{1f}'
            | '\u{7f}'..='\u{9f}'
            | '\u{61c}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
    )
}

/// How escaped characters are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// `\u009b`: the line is JSON, and the character is inside a string.
    Json,
    /// `\u{9b}`: the line is text.
    Text,
}

/// `text` with every character [`is_escaped`] says written as an escape; borrowed when there is none (nearly every
/// line). Tabs and the line's own final newline stay.
pub fn escape_peer_text(text: &str, escape: Escape) -> Cow<'_, str> {
    let body = text.strip_suffix('\n');
    let line = body.unwrap_or(text);
    // Every escaped character is a C0 control or encoded with a lead byte of 0x7f or more.
    if !line.bytes().any(|b| b >= 0x7f || (b < 0x20 && b != b'\t')) {
        return Cow::Borrowed(text);
    }
    if !line.chars().any(|c| is_escaped(c) || c == '\n') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in body.unwrap_or(text).chars() {
        if is_escaped(c) || c == '\n' {
            match escape {
                Escape::Json => out.push_str(&format!("\\u{:04x}", c as u32)),
                Escape::Text => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            }
        } else {
            out.push(c);
        }
    }
    if body.is_some() {
        out.push('\n');
    }
    Cow::Owned(out)
}

/// A log writer that escapes each line it is given (see the module docs).
pub struct EscapingWriter<W> {
    inner: W,
    escape: Escape,
}

impl<W> EscapingWriter<W> {
    /// Writes to `inner`, escaping as `escape` says.
    pub fn new(inner: W, escape: Escape) -> EscapingWriter<W> {
        EscapingWriter { inner, escape }
    }
}

impl<W: io::Write> io::Write for EscapingWriter<W> {
    /// Takes a whole formatted line (the formatters write each event at once) and writes it escaped.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => self.inner.write_all(escape_peer_text(text, self.escape).as_bytes())?,
            // Formatters write UTF-8; anything else is shown as its bytes' escapes.
            Err(_) => self.inner.write_all(buf.escape_ascii().to_string().as_bytes())?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The trace and span ids of the request whose work is running, for the JSON log lines it writes: written as
/// lowercase hex only when a line is.
#[derive(Debug, Clone, Copy)]
pub struct TraceIds {
    /// The trace's id (32 hex digits).
    pub trace_id: opentelemetry::trace::TraceId,
    /// The request's server span's id (16 hex digits).
    pub span_id: opentelemetry::trace::SpanId,
}

tokio::task_local! {
    static TRACE_IDS: TraceIds;
}

/// Runs `work` (a traced request's) with `ids` on every JSON line it logs ([`WithTraceIds`]).
pub async fn with_trace_ids<F: std::future::Future>(ids: TraceIds, work: F) -> F::Output {
    TRACE_IDS.scope(ids, work).await
}

/// The JSON format with `trace_id` and `span_id` first on every line logged by a traced request's work (see
/// [`with_trace_ids`]); a line that names its own `trace_id` (the access line) is left as it is.
pub struct WithTraceIds<F>(pub F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithTraceIds<F>
where
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = TRACE_IDS.try_with(|ids| *ids).ok();
        let Some(ids) = ids.filter(|_| event.metadata().fields().field("trace_id").is_none()) else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, tracing_subscriber::fmt::format::Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}", ids.trace_id, ids.span_id),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_characters_are_escaped_in_both_forms() {
        let peer = "/a\u{9b}31mred\u{85}x\u{2028}y\u{202e}txt.exe\u{7f}\u{61c}\u{2066}";
        assert_eq!(
            escape_peer_text(peer, Escape::Text),
            "/a\\u{9b}31mred\\u{85}x\\u{2028}y\\u{202e}txt.exe\\u{7f}\\u{61c}\\u{2066}"
        );
        assert_eq!(
            escape_peer_text(peer, Escape::Json),
            "/a\\u009b31mred\\u0085x\\u2028y\\u202etxt.exe\\u007f\\u061c\\u2066"
        );
        let line = "{\"path\":\"/ok/é/日本\"}\n";
        assert!(matches!(escape_peer_text(line, Escape::Json), Cow::Borrowed(_)), "nothing to escape, no copy");
        assert_eq!(escape_peer_text("a\u{2029}b\n", Escape::Json), "a\\u2029b\n", "the final newline stays");
        assert_eq!(escape_peer_text("a\nb\n", Escape::Text), "a\\u{a}b\n", "a newline inside a line does not");
    }

    #[test]
    fn the_writer_escapes_every_line() {
        use std::io::Write as _;
        let mut out = Vec::new();
        let mut writer = EscapingWriter::new(&mut out, Escape::Json);
        writer.write_all("{\"id\":\"\u{9b}x\"}\n".as_bytes()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "{\"id\":\"\\u009bx\"}\n");
    }
}
