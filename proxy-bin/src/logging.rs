//! The process logger: env_logger's filter and writer (stderr), wrapped to keep every record
//! bounded and payload-free.
//!
//! - **Format** (`--log-format`, `PASEO_LOG_FORMAT`, `log_format`): `text` is env_logger's
//!   default look, `[2026-12-03T18:25:36Z INFO  target] msg key=value ...`; `json` is one
//!   object per line, for Loki or journald:
//!   `{"ts":"2026-12-03T18:25:36.123Z","level":"INFO","target":"...","msg":"...",...}` with
//!   `ts` in RFC 3339 UTC with milliseconds and the record's `log` key-values as further keys
//!   (numbers stay JSON numbers, anything else becomes a string; a key named like one of the
//!   four is written `kv_<key>`, a repeated key once).
//! - **Bound**: no record is written longer than [`MAX_LINE_BYTES`] (the newline included;
//!   terminal colour codes not counted). The message is cut on a char boundary and the cut is
//!   marked `…[cut 63210 bytes]` (the bytes of the message left out); a key-value longer than
//!   [`MAX_VALUE_BYTES`] is cut the same way, and key-values beyond the line's room are left out
//!   (`…[cut 2 fields]`). A cut JSON line is still valid JSON.
//! - **No payloads**: tungstenite and tokio-tungstenite print frame and message payloads at
//!   trace, so their trace records are dropped unless the filter names that crate itself
//!   (`RUST_LOG=trace,tungstenite=trace`); `trace` alone or `--log-level trace` leaves them at
//!   debug. Pingora's proxy prints proxied body chunks at debug, so `pingora_proxy` stays at
//!   info unless named likewise ([`PayloadCap`]).
//! - **Filter**: `RUST_LOG`, when set, as env_logger reads it; otherwise the resolved log level.

use env_logger::fmt::{ConfigurableFormat, Formatter};
use log::kv::{self, Key, Source, Value, VisitSource, VisitValue};
use log::{Level, Log, Metadata, Record};
use std::fmt::{self, Write as _};
use std::io::{self, Write as _};

/// Longest record written, in bytes, its newline included.
pub const MAX_LINE_BYTES: usize = 1024;
/// Longest key-value value written, in bytes (JSON-escaped in `json`); 256-byte ids fit.
pub const MAX_VALUE_BYTES: usize = 300;
/// Longest target written, in bytes.
const MAX_TARGET_BYTES: usize = 128;
/// Longest key-value key written, in bytes.
const MAX_KEY_BYTES: usize = 64;
/// Room always left for the message (and its cut marker) when key-values fill the line.
const MIN_MESSAGE_BYTES: usize = 160;
/// Bytes of env_logger's text header besides the target: `[`, a 20-byte timestamp, ` `, the
/// level padded to 5, ` `, then `] `.
const TEXT_HEADER_BYTES: usize = 30;
/// Crates whose output holds payload bytes, with the most verbose level that carries none:
/// tungstenite and tokio-tungstenite print frames at trace; Pingora's proxy prints proxied
/// request and response body chunks (`HttpTask`) at debug.
const PAYLOAD_CRATES: [(&str, Level); 3] = [
    ("tungstenite", Level::Debug),
    ("tokio_tungstenite", Level::Debug),
    ("pingora_proxy", Level::Info),
];

/// How records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// env_logger's default line.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The format named `name` (`text` or `json`, any case).
    pub fn parse(name: &str) -> Option<LogFormat> {
        match name.to_ascii_lowercase().as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// Which payload crates keep their trace records: those the filter names itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadCap {
    /// Per [`PAYLOAD_CRATES`] entry: capped at its level.
    capped: [bool; 3],
}

impl PayloadCap {
    /// The cap for an env_logger filter `spec` (`RUST_LOG` syntax): a crate is left alone
    /// when a directive names it or one of its modules (`tungstenite::protocol=trace`).
    pub fn from_spec(spec: &str) -> PayloadCap {
        let mods = spec.split('/').next().unwrap_or_default();
        let names: Vec<&str> = mods
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .filter_map(|d| match d.split_once('=') {
                Some((name, _)) => Some(name.trim()),
                // A bare level (`trace`) is the global default, not a name.
                None => d.parse::<log::LevelFilter>().is_err().then_some(d),
            })
            .collect();
        let named = |krate: &str| {
            names.iter().any(|n| {
                n.strip_prefix(krate)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
        };
        PayloadCap {
            capped: PAYLOAD_CRATES.map(|(krate, _)| !named(krate)),
        }
    }

    /// Whether a record of `level` from `target` may be written.
    pub fn allows(&self, target: &str, level: Level) -> bool {
        let krate = target.split("::").next().unwrap_or_default();
        match PAYLOAD_CRATES.iter().position(|(c, _)| *c == krate) {
            Some(i) => level <= PAYLOAD_CRATES[i].1 || !self.capped[i],
            None => true,
        }
    }
}

/// env_logger's `Logger` (filter, writer, our format) behind the payload cap.
struct BoundedLogger {
    inner: env_logger::Logger,
    cap: PayloadCap,
}

impl Log for BoundedLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.cap.allows(metadata.target(), metadata.level()) && self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if self.cap.allows(record.target(), record.level()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Wraps `builder`'s logger: writes `format`, filters as the builder does and caps the
/// payload crates as `spec` (the filter the builder was given) asks.
fn bounded(builder: &mut env_logger::Builder, format: LogFormat, spec: &str) -> BoundedLogger {
    let text = ConfigurableFormat::default();
    builder.format(move |buf, record| match format {
        LogFormat::Text => write_text(&text, buf, record),
        LogFormat::Json => {
            let line = json_line(&buf.timestamp_millis().to_string(), record)?;
            buf.write_all(&line)
        }
    });
    BoundedLogger {
        inner: builder.build(),
        cap: PayloadCap::from_spec(spec),
    }
}

/// Installs the process logger. `level` is the resolved log level; `RUST_LOG`, when set,
/// replaces it (env_logger's per-module syntax).
pub fn init(format: LogFormat, level: &str) {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    let logger = bounded(&mut builder, format, &spec);
    let max = logger.inner.filter();
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(max);
    }
}

/// A `fmt::Write` that keeps the first `limit` bytes (whole chars) and counts all of them, so
/// a 64 KiB message costs a count, not a copy.
struct Capped {
    kept: String,
    total: usize,
    limit: usize,
}

impl Capped {
    fn of(value: &dyn fmt::Display, limit: usize) -> Capped {
        let mut capped = Capped {
            kept: String::new(),
            total: 0,
            limit,
        };
        let _ = write!(capped, "{value}");
        capped
    }
}

impl fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.total += s.len();
        let room = self.limit.saturating_sub(self.kept.len());
        self.kept.push_str(&s[..floor_char_boundary(s, room)]);
        Ok(())
    }
}

/// The largest char boundary of `s` at or below `at`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// What a char costs once written as a JSON string's content (serde_json's escapes).
fn json_cost(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
        '\0'..='\u{1f}' => 6,
        _ => c.len_utf8(),
    }
}

/// What a char costs in the text format (env_logger indents continuation lines by 4).
fn text_cost(c: char) -> usize {
    match c {
        '\n' => 5,
        _ => c.len_utf8(),
    }
}

fn cost_of(s: &str, cost: fn(char) -> usize) -> usize {
    s.chars().map(cost).sum()
}

/// The cut marker: nothing, `…[cut N bytes]`, `…[cut M fields]` or both.
fn marker(bytes: usize, fields: usize) -> String {
    match (bytes, fields) {
        (0, 0) => String::new(),
        (b, 0) => format!("…[cut {b} bytes]"),
        (0, f) => format!("…[cut {f} fields]"),
        (b, f) => format!("…[cut {b} bytes, {f} fields]"),
    }
}

/// Cuts `text`, the first bytes of a value of `total` bytes, so that it and its marker cost at
/// most `budget`. Returns the kept text with the marker appended.
fn fit(text: &str, total: usize, budget: usize, cost: fn(char) -> usize, fields: usize) -> String {
    if text.len() == total {
        let mark = marker(0, fields);
        if cost_of(text, cost) + cost_of(&mark, cost) <= budget {
            return format!("{text}{mark}");
        }
    }
    // The marker for cutting everything is the widest one.
    let room = budget.saturating_sub(cost_of(&marker(total, fields), cost));
    let mut used = 0;
    let mut end = 0;
    for (i, c) in text.char_indices() {
        used += cost(c);
        if used > room {
            break;
        }
        end = i + c.len_utf8();
    }
    format!("{}{}", &text[..end], marker(total - end, fields))
}

/// A key-value's value as written: a JSON number or a string.
enum Scalar {
    Number(String),
    Text(String),
}

/// Reads a [`Value`] into a [`Scalar`].
struct ToScalar(Option<Scalar>);

impl<'v> VisitValue<'v> for ToScalar {
    fn visit_any(&mut self, value: Value) -> Result<(), kv::Error> {
        self.0 = Some(Scalar::Text(Capped::of(&value, MAX_VALUE_BYTES + 1).kept));
        Ok(())
    }

    fn visit_u64(&mut self, value: u64) -> Result<(), kv::Error> {
        self.0 = Some(Scalar::Number(value.to_string()));
        Ok(())
    }

    fn visit_i64(&mut self, value: i64) -> Result<(), kv::Error> {
        self.0 = Some(Scalar::Number(value.to_string()));
        Ok(())
    }

    fn visit_u128(&mut self, value: u128) -> Result<(), kv::Error> {
        self.0 = Some(Scalar::Number(value.to_string()));
        Ok(())
    }

    fn visit_i128(&mut self, value: i128) -> Result<(), kv::Error> {
        self.0 = Some(Scalar::Number(value.to_string()));
        Ok(())
    }

    fn visit_f64(&mut self, value: f64) -> Result<(), kv::Error> {
        self.0 = Some(match serde_json::to_string(&value) {
            Ok(n) if value.is_finite() => Scalar::Number(n),
            _ => Scalar::Text(value.to_string()),
        });
        Ok(())
    }

    fn visit_str(&mut self, value: &str) -> Result<(), kv::Error> {
        self.0 = Some(Scalar::Text(
            value[..floor_char_boundary(value, MAX_VALUE_BYTES + 1)].to_string(),
        ));
        Ok(())
    }
}

/// The record's key-values, rendered for `format` within `budget` bytes.
struct Fields {
    format: LogFormat,
    budget: usize,
    /// `,"key":value` (json) or ` key=value` (text) pieces.
    written: String,
    seen: Vec<String>,
    /// Pairs left out for want of room.
    dropped: usize,
}

impl Fields {
    fn collect(source: &dyn Source, format: LogFormat, budget: usize) -> Fields {
        let mut fields = Fields {
            format,
            budget,
            written: String::new(),
            seen: Vec::new(),
            dropped: 0,
        };
        let _ = source.visit(&mut fields);
        fields
    }

    fn cost(&self) -> usize {
        match self.format {
            LogFormat::Json => self.written.len(),
            LogFormat::Text => cost_of(&self.written, text_cost),
        }
    }

    /// `,"key":value` or ` key=value`.
    fn piece(&self, key: &str, value: &Value<'_>) -> Result<String, kv::Error> {
        let mut scalar = ToScalar(None);
        let _ = value.visit(&mut scalar);
        let cost = match self.format {
            LogFormat::Json => json_cost,
            LogFormat::Text => text_cost,
        };
        let value = match scalar.0 {
            Some(Scalar::Number(n)) => Scalar::Number(n),
            Some(Scalar::Text(t)) => {
                // `t` holds at most MAX_VALUE_BYTES + 1 bytes: one more says it was longer.
                let total = Capped::of(value, 0).total;
                Scalar::Text(fit(&t, total, MAX_VALUE_BYTES, cost, 0))
            }
            None => Scalar::Text(String::new()),
        };
        let json = |s: &str| serde_json::to_string(s).map_err(|_| kv::Error::msg("unserialisable"));
        Ok(match (self.format, value) {
            (LogFormat::Json, Scalar::Number(n)) => format!(",{}:{n}", json(key)?),
            (LogFormat::Json, Scalar::Text(t)) => format!(",{}:{}", json(key)?, json(&t)?),
            (LogFormat::Text, Scalar::Number(v) | Scalar::Text(v)) => format!(" {key}={v}"),
        })
    }
}

impl<'kvs> VisitSource<'kvs> for Fields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let key = key.as_str();
        let key = &key[..floor_char_boundary(key, MAX_KEY_BYTES)];
        let key = match (self.format, key) {
            (LogFormat::Json, "ts" | "level" | "target" | "msg") => format!("kv_{key}"),
            _ => key.to_string(),
        };
        if self.seen.contains(&key) {
            return Ok(());
        }
        let piece = self.piece(&key, &value)?;
        let cost = match self.format {
            LogFormat::Json => piece.len(),
            LogFormat::Text => cost_of(&piece, text_cost),
        };
        if self.dropped > 0 || self.cost() + cost > self.budget {
            self.dropped += 1;
        } else {
            self.written.push_str(&piece);
            self.seen.push(key);
        }
        Ok(())
    }
}

/// The record's target, cut to [`MAX_TARGET_BYTES`].
fn target<'a>(record: &Record<'a>) -> &'a str {
    let target = record.target();
    &target[..floor_char_boundary(target, MAX_TARGET_BYTES)]
}

/// One JSON line (newline included, at most [`MAX_LINE_BYTES`]) for `record` logged at `ts`.
///
/// # Errors
/// None in practice: serialising strings into a `Vec`.
pub fn json_line(ts: &str, record: &Record<'_>) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(256);
    line.extend_from_slice(b"{\"ts\":");
    serde_json::to_writer(&mut line, ts)?;
    line.extend_from_slice(b",\"level\":");
    serde_json::to_writer(&mut line, record.level().as_str())?;
    line.extend_from_slice(b",\"target\":");
    serde_json::to_writer(&mut line, target(record))?;
    line.extend_from_slice(b",\"msg\":");
    // Left after the message's quotes and the closing `}\n`.
    let room = MAX_LINE_BYTES.saturating_sub(line.len() + 4);
    let fields = Fields::collect(
        record.key_values(),
        LogFormat::Json,
        room.saturating_sub(MIN_MESSAGE_BYTES),
    );
    let msg = Capped::of(record.args(), MAX_LINE_BYTES);
    let budget = room.saturating_sub(fields.written.len());
    let msg = fit(&msg.kept, msg.total, budget, json_cost, fields.dropped);
    serde_json::to_writer(&mut line, &msg)?;
    line.extend_from_slice(fields.written.as_bytes());
    line.extend_from_slice(b"}\n");
    Ok(line)
}

/// The text line's target and what follows the header: the message, cut to fit, and the
/// key-values in env_logger's ` key=value` form.
fn text_body<'a>(record: &Record<'a>) -> (&'a str, String) {
    let target = target(record);
    let room = MAX_LINE_BYTES.saturating_sub(TEXT_HEADER_BYTES + target.len() + 1);
    let fields = Fields::collect(
        record.key_values(),
        LogFormat::Text,
        room.saturating_sub(MIN_MESSAGE_BYTES),
    );
    let msg = Capped::of(record.args(), MAX_LINE_BYTES);
    let budget = room.saturating_sub(fields.cost());
    let mut body = fit(&msg.kept, msg.total, budget, text_cost, fields.dropped);
    body.push_str(&fields.written);
    (target, body)
}

/// Writes `record` in env_logger's default format, bounded.
fn write_text(
    format: &ConfigurableFormat,
    buf: &mut Formatter,
    record: &Record<'_>,
) -> io::Result<()> {
    let (target, body) = text_body(record);
    format.format(
        buf,
        &Record::builder()
            .args(format_args!("{body}"))
            .level(record.level())
            .target(target)
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as Json;
    use std::sync::{Arc, Mutex};

    const TS: &str = "2026-12-03T18:25:36.123Z";

    fn keys(line: &[u8]) -> Vec<String> {
        let json: Json = serde_json::from_slice(line).expect("the line parses as JSON");
        let mut keys: Vec<String> = json.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    fn parse(line: &[u8]) -> Json {
        assert!(line.len() <= MAX_LINE_BYTES, "{} bytes", line.len());
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        serde_json::from_slice(line).expect("the line parses as JSON")
    }

    fn record_line(msg: &str, kvs: &[(&str, Value<'_>)]) -> Vec<u8> {
        json_line(
            TS,
            &Record::builder()
                .args(format_args!("{msg}"))
                .level(Level::Info)
                .target("relay_module::socket")
                .key_values(&kvs)
                .build(),
        )
        .unwrap()
    }

    #[test]
    fn json_line_without_key_values_holds_the_four_keys() {
        let line = record_line("socket \"closed\"\tnow", &[]);
        assert_eq!(keys(&line), ["level", "msg", "target", "ts"]);
        let json = parse(&line);
        assert_eq!(json["ts"], TS);
        assert_eq!(json["level"], "INFO");
        assert_eq!(json["target"], "relay_module::socket");
        assert_eq!(json["msg"], "socket \"closed\"\tnow");
    }

    #[test]
    fn json_line_key_values_become_keys_numbers_stay_numbers() {
        let line = record_line(
            "socket closed",
            &[
                ("kind", Value::from("client")),
                ("server_id", Value::from("S")),
                ("code_sent", Value::from(1001u16)),
                ("bytes_in", Value::from(-3i64)),
                ("ratio", Value::from(0.5f64)),
                ("clean", Value::from(true)),
                ("msg", Value::from("mine")),
                ("kind", Value::from("again")),
            ],
        );
        assert_eq!(
            keys(&line),
            [
                "bytes_in",
                "clean",
                "code_sent",
                "kind",
                "kv_msg",
                "level",
                "msg",
                "ratio",
                "server_id",
                "target",
                "ts"
            ]
        );
        let json = parse(&line);
        assert_eq!(json["kind"], "client");
        assert_eq!(json["server_id"], "S");
        assert_eq!(json["code_sent"], 1001);
        assert_eq!(json["bytes_in"], -3);
        assert_eq!(json["ratio"], 0.5);
        assert_eq!(json["clean"], "true");
        assert_eq!(json["kv_msg"], "mine");
        assert_eq!(json["msg"], "socket closed");
    }

    #[test]
    fn a_64_kib_message_is_cut_and_marked_and_still_parses() {
        let big = "x".repeat(64 * 1024);
        let line = record_line(&big, &[("kind", Value::from("client"))]);
        let json = parse(&line);
        let msg = json["msg"].as_str().unwrap();
        let kept = msg.trim_end_matches(|c| c != '…').trim_end_matches('…');
        assert!(kept.len() > 500, "{msg}");
        assert_eq!(
            msg,
            format!("{kept}…[cut {} bytes]", big.len() - kept.len())
        );
        assert_eq!(json["kind"], "client");
        // Escapes grow the line: a message of control characters is bounded as well.
        let line = record_line(&"\u{1}\"".repeat(32 * 1024), &[]);
        assert!(parse(&line)["msg"].as_str().unwrap().ends_with(" bytes]"));
    }

    #[test]
    fn cuts_fall_on_char_boundaries() {
        let text = "é€😀".repeat(10_000);
        let line = record_line(&text, &[]);
        let msg = parse(&line)["msg"].as_str().unwrap().to_string();
        let (kept, mark) = msg.split_once('…').unwrap();
        assert!(text.starts_with(kept));
        assert_eq!(mark, format!("[cut {} bytes]", text.len() - kept.len()));
        for limit in 0..12 {
            let cut = fit(&text[..9], 9, limit, json_cost, 0);
            assert!(cut.len() <= limit.max(marker(9, 0).len()), "{cut}");
            assert!(text.starts_with(cut.split('…').next().unwrap()));
        }
    }

    #[test]
    fn long_values_and_too_many_fields_are_cut_and_marked() {
        let long = "v".repeat(5000);
        let keys: Vec<String> = (0..40).map(|i| format!("key_{i:02}")).collect();
        let many: Vec<(&str, Value<'_>)> = keys
            .iter()
            .map(|k| (k.as_str(), Value::from(&*long)))
            .collect();
        let line = record_line("m", &many);
        let json = parse(&line);
        assert_eq!(
            json["key_00"].as_str().unwrap(),
            format!("{}…[cut 4719 bytes]", "v".repeat(281))
        );
        assert_eq!(json["key_02"], Json::Null);
        assert_eq!(json["msg"], "m…[cut 38 fields]");
    }

    #[test]
    fn tungstenite_is_capped_at_debug_unless_named() {
        let trace = PayloadCap::from_spec("trace");
        assert!(!trace.allows("tungstenite::protocol", Level::Trace));
        assert!(!trace.allows("tokio_tungstenite", Level::Trace));
        assert!(trace.allows("tungstenite::protocol", Level::Debug));
        assert!(trace.allows("pingora_core::protocols", Level::Trace));
        assert!(trace.allows("tungstenite_like", Level::Trace));

        let named = PayloadCap::from_spec("trace,tungstenite=trace");
        assert!(named.allows("tungstenite::protocol::frame", Level::Trace));
        assert!(!named.allows("tokio_tungstenite::compat", Level::Trace));
        let module = PayloadCap::from_spec("tokio_tungstenite::compat=trace/x");
        assert!(module.allows("tokio_tungstenite", Level::Trace));
        assert!(!module.allows("tungstenite", Level::Trace));

        // Pingora's proxy prints proxied body chunks at debug.
        assert!(!trace.allows("pingora_proxy::proxy_h1", Level::Debug));
        assert!(trace.allows("pingora_proxy::proxy_h1", Level::Info));
        assert!(PayloadCap::from_spec("debug,pingora_proxy=debug")
            .allows("pingora_proxy::proxy_h1", Level::Debug));

        let info = PayloadCap::from_spec("info");
        assert_eq!(info, trace);
        assert!(info.allows("tungstenite", Level::Info));
        assert!(!info.allows("tungstenite", Level::Trace));
    }

    /// A pipe for env_logger that tests can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat, spec: &str, records: &[Record<'_>]) -> String {
        let sink = Sink::default();
        let mut builder = env_logger::Builder::new();
        builder
            .parse_filters(spec)
            .write_style(env_logger::WriteStyle::Never)
            .target(env_logger::Target::Pipe(Box::new(sink.clone())));
        let logger = bounded(&mut builder, format, spec);
        for record in records {
            if logger.enabled(record.metadata()) {
                logger.log(record);
            }
        }
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn text_keeps_env_loggers_look_with_key_values_and_is_bounded() {
        let kvs = [
            ("kind", Value::from("client")),
            ("code_sent", Value::from(1000)),
        ];
        let big = "y\n".repeat(40_000);
        let out = logged(
            LogFormat::Text,
            "trace",
            &[
                Record::builder()
                    .args(format_args!("socket closed"))
                    .level(Level::Info)
                    .target("relay_module::socket")
                    .key_values(&kvs)
                    .build(),
                Record::builder()
                    .args(format_args!("{big}"))
                    .level(Level::Debug)
                    .target("pingora_core")
                    .build(),
                Record::builder()
                    .args(format_args!("payload"))
                    .level(Level::Trace)
                    .target("tungstenite::protocol")
                    .build(),
            ],
        );
        let (first, rest) = out.split_once('\n').unwrap();
        assert!(first.starts_with('['), "{first}");
        assert_eq!(first.find(' '), Some(21), "{first}");
        assert!(
            first
                .ends_with(" INFO  relay_module::socket] socket closed kind=client code_sent=1000"),
            "{first}"
        );
        assert!(rest.len() <= MAX_LINE_BYTES, "{}", rest.len());
        assert!(rest.ends_with(" bytes]\n"), "{rest}");
        assert!(!out.contains("payload"), "{out}");
    }

    #[test]
    fn json_through_env_logger_has_a_millisecond_utc_timestamp() {
        let out = logged(
            LogFormat::Json,
            "info",
            &[Record::builder()
                .args(format_args!("hello"))
                .level(Level::Info)
                .target("paseo_relay")
                .build()],
        );
        let json = parse(out.as_bytes());
        let ts = json["ts"].as_str().unwrap();
        assert_eq!(ts.len(), TS.len(), "{ts}");
        assert_eq!(
            (&ts[10..11], &ts[19..20], &ts[23..]),
            ("T", ".", "Z"),
            "{ts}"
        );
    }
}
