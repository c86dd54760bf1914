//! The access log: one line per request, written when its response has
//! ended (or its WebSocket tunnel closed), to stdout or a file, apart from
//! the diagnostic log on stderr.
//!
//! `[log] access` picks the destination (`"stdout"`, `"off"`, or a file
//! path) and `[log] access_format` the form: `json`, one object per line
//! whose field names are stable (scripts and log shippers rely on them, see
//! [`Entry`]), or `text`, the same fields as `key=value`.
//!
//! A line never carries a secret: no header but `User-Agent` is logged (no
//! `Authorization`, no key header, no cookie), the path is the canonical
//! one, and the query keeps its parameters except the values of those that
//! carry credentials ([`redact_query`]). Formatting goes into a per-thread
//! buffer that is reused ([`write`]), then into the [`sink::Sink`], whose
//! own buffer is too: a line costs no allocation once they have grown.

pub mod sink;

use std::borrow::Cow;
use std::cell::RefCell;
use std::io::Write as _;
use std::net::IpAddr;

use serde::Serialize;

use crate::config::{KeysConfig, LogFormat};
pub use sink::{Destination, Sink};

/// One access line. The JSON field names are a contract: add fields, never
/// rename or remove one. Absent values are `null` in JSON and `-` in text.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// When the line was written (the response's end), RFC 3339 in UTC
    /// with microseconds: `2026-12-03T07:22:58.123456Z`.
    #[serde(serialize_with = "serialize_timestamp")]
    pub timestamp: jiff::Timestamp,
    pub request_id: &'a str,
    pub method: &'a str,
    /// The canonical request path, as routed (before any `strip_prefix`).
    pub path: &'a str,
    /// The query as sent, credential values replaced ([`redact_query`]).
    pub query: Option<&'a str>,
    pub status: u16,
    /// The matched route's configured path.
    pub route: Option<&'a str>,
    /// The upstream's name, or `builtin:echo`; `null` when the request did
    /// not get that far (refused, no route).
    pub upstream: Option<&'a str>,
    /// The upstream target (`host:port`) that answered.
    pub target: Option<&'a str>,
    pub client: Option<&'a str>,
    pub key_id: Option<&'a str>,
    /// `key`, `jwt` or `cert`.
    pub credential: Option<&'a str>,
    /// Request body bytes read from the client (after an upgrade, plus the
    /// tunnel's bytes from the client).
    pub bytes_in: u64,
    /// Response body bytes sent to the client (or the tunnel's bytes to it).
    pub bytes_out: u64,
    /// From the request's arrival to the response's last byte (or the
    /// tunnel's close), microseconds.
    pub duration_us: u64,
    /// From sending to the upstream to its response head, microseconds.
    pub upstream_us: Option<u64>,
    /// The client's address: the peer's, or behind trusted proxies the one
    /// they forwarded for.
    pub peer: IpAddr,
    pub user_agent: Option<&'a str>,
    /// A WebSocket tunnel's line: how it ended (`client_closed`, ...).
    pub tunnel_end: Option<&'a str>,
}

thread_local! {
    /// The line being formatted; keeps its capacity between requests.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The last second formatted (`2026-12-03T07:22:58`), and which it is:
    /// the date and time are printed once a second, not once a line.
    static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
}

/// A timestamp as the access log prints it, through the per-second cache.
struct Rfc3339Micros(jiff::Timestamp);

impl std::fmt::Display for Rfc3339Micros {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (second, micros) = (self.0.as_second(), self.0.subsec_microsecond());
        SECOND.with(|cache| {
            let Ok(mut cache) = cache.try_borrow_mut() else {
                return write!(f, "{}", self.0);
            };
            if cache.0 != second {
                cache.1.clear();
                let whole = jiff::Timestamp::from_second(second).unwrap_or(self.0);
                // `Display` of a whole second ends in `Z`; the micros go first.
                std::fmt::write(&mut cache.1, format_args!("{whole}"))?;
                cache.1.pop();
                cache.0 = second;
            }
            f.write_str(&cache.1)?;
            write!(f, ".{micros:06}Z")
        })
    }
}

fn serialize_timestamp<S: serde::Serializer>(at: &jiff::Timestamp, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&Rfc3339Micros(*at))
}

/// Formats `entry` in `format` and queues it on `sink`.
pub fn write(sink: &Sink, format: LogFormat, entry: &Entry<'_>) {
    LINE.with(|line| {
        // Re-entry is impossible (formatting calls nothing that logs here);
        // were it to happen, the line is formatted in a fresh buffer.
        let mut fresh = Vec::new();
        let mut borrowed = line.try_borrow_mut();
        let buffer = match borrowed.as_deref_mut() {
            Ok(buffer) => buffer,
            Err(_) => &mut fresh,
        };
        buffer.clear();
        format_into(buffer, format, entry);
        sink.write(buffer);
    });
}

/// `entry` as one line (with its `\n`) in `format`.
pub fn format_into(buffer: &mut Vec<u8>, format: LogFormat, entry: &Entry<'_>) {
    match format {
        LogFormat::Json => {
            // Writing to a Vec cannot fail, and every field serializes.
            if serde_json::to_writer(&mut *buffer, entry).is_err() {
                buffer.clear();
                buffer.extend_from_slice(b"{\"error\":\"access line not serializable\"}");
            }
        }
        LogFormat::Text => text_into(buffer, entry),
    }
    buffer.push(b'\n');
}

/// `key=value` pairs, strings quoted and escaped as Rust's `Debug` does
/// (so a value can never end the line or fake a field).
fn text_into(buffer: &mut Vec<u8>, e: &Entry<'_>) {
    fn text(buffer: &mut Vec<u8>, key: &str, value: Option<&str>) {
        let _ = match value {
            Some(value) => write!(buffer, " {key}={value:?}"),
            None => write!(buffer, " {key}=-"),
        };
    }
    let _ = write!(
        buffer,
        "{} access request_id={:?} method={}",
        Rfc3339Micros(e.timestamp),
        e.request_id,
        e.method
    );
    text(buffer, "path", Some(e.path));
    text(buffer, "query", e.query);
    let _ = write!(buffer, " status={}", e.status);
    text(buffer, "route", e.route);
    text(buffer, "upstream", e.upstream);
    text(buffer, "target", e.target);
    text(buffer, "client", e.client);
    text(buffer, "key_id", e.key_id);
    text(buffer, "credential", e.credential);
    let _ =
        write!(buffer, " bytes_in={} bytes_out={} duration_us={}", e.bytes_in, e.bytes_out, e.duration_us);
    let _ = match e.upstream_us {
        Some(us) => write!(buffer, " upstream_us={us}"),
        None => write!(buffer, " upstream_us=-"),
    };
    let _ = write!(buffer, " peer={}", e.peer);
    text(buffer, "user_agent", e.user_agent);
    if let Some(end) = e.tunnel_end {
        text(buffer, "tunnel_end", Some(end));
    }
}

/// Query parameters whose values are credentials whatever route they are
/// sent to: OAuth's bearer and refresh tokens (RFC 6750 §2.3, RFC 6749) and
/// the usual names for keys and passwords. The configured
/// `[keys] query_param` is added to them.
const SECRET_PARAMETERS: [&str; 9] = [
    "access_token",
    "refresh_token",
    "id_token",
    "token",
    "key",
    "api_key",
    "apikey",
    "password",
    "client_secret",
];

/// What replaces a credential's value in a logged query.
pub const REDACTED: &str = "REDACTED";

/// A JWT's shape: a base64url JSON header (`{"` encodes as `eyJ`) and
/// three parts. Narrower than the credential finder's test, so a value
/// such as `1.2.3` stays readable.
fn jwt_shaped(value: &str) -> bool {
    value.starts_with("eyJ") && value.bytes().filter(|&b| b == b'.').count() == 2
}

/// The query for the log: every parameter kept, in order, except that the
/// value of one that carries a credential is [`REDACTED`]: a parameter named
/// `[keys] query_param` or in [`SECRET_PARAMETERS`], or whose value starts
/// with the key prefix or has a JWT's shape. Borrowed when nothing is
/// replaced (the usual case: no allocation).
pub fn redact_query<'q>(query: &'q str, keys: &KeysConfig) -> Cow<'q, str> {
    let secret = |pair: &str| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
        let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
        !value.is_empty()
            && (name.eq_ignore_ascii_case(&keys.query_param)
                || SECRET_PARAMETERS.iter().any(|s| name.eq_ignore_ascii_case(s))
                || value.starts_with(&keys.prefix)
                || jwt_shaped(&value))
    };
    if !query.split('&').any(secret) {
        return Cow::Borrowed(query);
    }
    let mut kept = String::with_capacity(query.len());
    for (n, pair) in query.split('&').enumerate() {
        if n > 0 {
            kept.push('&');
        }
        match secret(pair) {
            true => {
                kept.push_str(pair.split_once('=').map_or(pair, |(name, _)| name));
                kept.push('=');
                kept.push_str(REDACTED);
            }
            false => kept.push_str(pair),
        }
    }
    Cow::Owned(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            timestamp: "2026-12-03T07:22:58.123456Z".parse().unwrap(),
            request_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            method: "POST",
            path: "/v1/orders",
            query: Some("page=2"),
            status: 201,
            route: Some("/v1"),
            upstream: Some("orders"),
            target: Some("127.0.0.1:9001"),
            client: Some("acme"),
            key_id: Some("k_1"),
            credential: Some("key"),
            bytes_in: 17,
            bytes_out: 42,
            duration_us: 1234,
            upstream_us: Some(900),
            peer: IpAddr::from([10, 0, 0, 7]),
            user_agent: Some("curl/8.5 \"quoted\"\nnext"),
            tunnel_end: None,
        }
    }

    #[test]
    fn a_json_line_has_every_field_under_its_stable_name() {
        let mut line = Vec::new();
        format_into(&mut line, LogFormat::Json, &entry());
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        let json: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let expected = serde_json::json!({
            "timestamp": "2026-12-03T07:22:58.123456Z", "request_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "method": "POST", "path": "/v1/orders", "query": "page=2", "status": 201, "route": "/v1",
            "upstream": "orders", "target": "127.0.0.1:9001", "client": "acme", "key_id": "k_1",
            "credential": "key", "bytes_in": 17, "bytes_out": 42, "duration_us": 1234, "upstream_us": 900,
            "peer": "10.0.0.7", "user_agent": "curl/8.5 \"quoted\"\nnext", "tunnel_end": null,
        });
        assert_eq!(json, expected);
    }

    #[test]
    fn timestamps_print_in_utc_with_microseconds_across_seconds() {
        for (at, printed) in [
            ("2026-12-03T07:22:58.123456789Z", "2026-12-03T07:22:58.123456Z"),
            ("2026-12-03T07:22:58.5Z", "2026-12-03T07:22:58.500000Z"),
            ("2026-12-03T07:22:59Z", "2026-12-03T07:22:59.000000Z"),
            ("2026-12-31T23:59:59.999999Z", "2026-12-31T23:59:59.999999Z"),
            ("2027-01-01T00:00:00.000001Z", "2027-01-01T00:00:00.000001Z"),
        ] {
            let at: jiff::Timestamp = at.parse().unwrap();
            assert_eq!(Rfc3339Micros(at).to_string(), printed);
        }
    }

    #[test]
    fn a_text_line_quotes_strings_so_no_value_can_break_it() {
        let mut line = Vec::new();
        format_into(&mut line, LogFormat::Text, &entry());
        let line = String::from_utf8(line).unwrap();
        assert!(line.starts_with("2026-12-03T07:22:58.123456Z access request_id="), "{line}");
        for field in [
            "method=POST",
            "path=\"/v1/orders\"",
            "status=201",
            "upstream=\"orders\"",
            "client=\"acme\"",
            "bytes_out=42",
            "upstream_us=900",
            "peer=10.0.0.7",
            "user_agent=\"curl/8.5 \\\"quoted\\\"\\nnext\"",
        ] {
            assert!(line.contains(field), "{field} in {line}");
        }
        assert_eq!(line.matches('\n').count(), 1, "{line}");
    }

    #[test]
    fn credentials_in_the_query_are_redacted_and_the_rest_kept() {
        let keys = crate::config::Config::defaults().keys;
        let jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.c2ln";
        let cases = [
            ("page=2&sort=asc", "page=2&sort=asc"),
            ("api_key=kg_acme_secret&page=2", "api_key=REDACTED&page=2"),
            ("page=2&x=kg_acme_secret", "page=2&x=REDACTED"),
            (&format!("access_token={jwt}"), "access_token=REDACTED"),
            (&format!("t={jwt}&a"), "t=REDACTED&a"),
            ("refresh_token=abc&Password=hunter2", "refresh_token=REDACTED&Password=REDACTED"),
            ("api%5Fkey=abc", "api%5Fkey=REDACTED"),
            ("key=", "key="),
            ("v=1.2.3", "v=1.2.3"),
        ];
        for (query, logged) in cases {
            assert_eq!(redact_query(query, &keys), logged, "{query}");
        }
        assert!(matches!(redact_query("page=2", &keys), Cow::Borrowed(_)), "no allocation when clean");
    }
}
