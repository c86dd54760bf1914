//! The properties the fuzz targets check, in one file that both the targets
//! (`fuzz/fuzz_targets/*.rs`, nightly, libFuzzer) and the corpus regression
//! test (`tests/fuzz_corpus.rs`, stable, in `cargo test`) include with
//! `#[path]`. One copy means an input the fuzzer once crashed on is replayed
//! against exactly the check it broke, without a crate shared by the two.
//!
//! Each check takes the raw fuzz input and panics when a property fails;
//! input it cannot use (not UTF-8 where text is needed) is skipped, not
//! failed. The input formats are plain text so seeds can be written by hand.

use std::borrow::Cow;
use std::path::Path;

use http::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use keygate::config::{Config, KeysConfig, RouteConfig, RouteTarget};
use keygate::key::{self, DEFAULT_PREFIX, SECRET_LEN};

// === key::parse ===

/// Whatever parses has a valid client ID, a base62 secret of the fixed
/// length, and re-assembles to exactly the input.
pub fn key_parse(data: &[u8]) {
    let Ok(input) = std::str::from_utf8(data) else { return };
    for prefix in [DEFAULT_PREFIX, "acme_live_", ""] {
        if let Ok(parsed) = key::parse(input, prefix) {
            assert!(key::validate_client_id(parsed.client).is_ok());
            assert_eq!(parsed.secret.len(), SECRET_LEN);
            assert!(parsed.secret.bytes().all(|b| b.is_ascii_alphanumeric()));
            let rebuilt = format!("{prefix}{}_{}", parsed.client, parsed.secret);
            assert!(input.starts_with(&rebuilt));
            assert_eq!(input.len(), rebuilt.len() + key::CHECKSUM_LEN);
        }
    }
}

// === path::normalize_path ===

/// A canonical path is a fixed point, absolute, and has none of the forms
/// backends resolve differently: `//`, `/./`, `/../`, `\`. The input is the
/// path as text; hyper hands the gateway ASCII only, but the function takes
/// any `&str`, so any is tried.
pub fn normalize_path(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Ok(normal) = keygate::path::normalize_path(raw) else { return };
    assert!(normal.starts_with('/'), "{normal:?} is not absolute");
    for form in ["//", "/./", "/../", "\\"] {
        assert!(!normal.contains(form), "{normal:?} (from {raw:?}) contains {form:?}");
    }
    for end in ["/.", "/.."] {
        assert!(!normal.ends_with(end), "{normal:?} (from {raw:?}) ends with {end:?}");
    }
    let again = keygate::path::normalize_path(&normal);
    assert_eq!(again.as_deref(), Ok(normal.as_str()), "not idempotent for {raw:?}");
}

// === config::Config::from_toml ===

/// Loading any text never panics, and a config that loads keeps its routes
/// when they are written back out and loaded again: validation is a fixed
/// point, so `keygate check` and the running gateway agree on every route.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::from_toml(text, Path::new("/tmp")) else { return };
    let rendered = render_routes(&config);
    let again = match Config::from_toml(&rendered, Path::new("/tmp")) {
        Ok(again) => again,
        Err(e) => panic!("routes written back do not load: {e:?}\n{rendered}"),
    };
    assert_eq!(
        format!("{:?}", again.routes),
        format!("{:?}", config.routes),
        "routes changed on a round trip through\n{rendered}"
    );
}

/// The routes of a validated config, and the upstreams they name, as TOML.
fn render_routes(config: &Config) -> String {
    use toml::{Table, Value};
    let strings = |items: &[String]| Value::Array(items.iter().cloned().map(Value::String).collect());
    let mut upstreams = Table::new();
    for (name, upstream) in &config.upstreams {
        let targets = upstream.targets.iter().map(|t| Value::String(t.to_string())).collect();
        upstreams.insert(
            name.clone(),
            Value::Table(Table::from_iter([("targets".into(), Value::Array(targets))])),
        );
    }
    let mut routes = Vec::new();
    for route in &config.routes {
        let mut t = Table::new();
        t.insert("path".into(), Value::String(route.path.clone()));
        let upstream = match &route.target {
            RouteTarget::Upstream(name) => name.clone(),
            RouteTarget::Echo => keygate::config::ECHO_TARGET.to_owned(),
        };
        t.insert("upstream".into(), Value::String(upstream));
        if let Some(host) = &route.host {
            t.insert("host".into(), Value::String(host.clone()));
        }
        t.insert("strip_prefix".into(), Value::Boolean(route.strip_prefix));
        t.insert("public".into(), Value::Boolean(route.public));
        t.insert("scopes".into(), strings(&route.scopes));
        let methods = route.method_scopes.iter().map(|(m, s)| (m.clone(), strings(s))).collect();
        t.insert("method_scopes".into(), Value::Table(methods));
        t.insert("allow_query_key".into(), Value::Boolean(route.allow_query_key));
        t.insert("cost".into(), Value::Integer(i64::from(route.cost.get())));
        routes.push(Value::Table(t));
    }
    let mut doc = Table::new();
    doc.insert("upstream".into(), Value::Table(upstreams));
    doc.insert("route".into(), Value::Array(routes));
    toml::to_string(&doc).unwrap_or_else(|e| panic!("cannot write routes as TOML: {e}"))
}

// === credential::find and credential::strip ===

/// A request's key carriers, read from fuzz input in a hand-writable form:
///
/// ```text
/// qpk                      <- first line: flags (q: find may read the query,
///                             p: public route, k: route allows a query key)
/// ?api_key=x&y=1           <- a line starting with `?`: the query (first one wins)
/// authorization:Bearer kg_ <- any other line: `name:value`, bytes as given
/// ```
///
/// Lines that are not a valid header name or value are dropped, as hyper
/// would have refused them.
pub struct Carriers {
    pub headers: HeaderMap,
    pub query: Option<String>,
    pub allow_query: bool,
    pub public: bool,
    pub allow_query_key: bool,
}

impl Carriers {
    pub fn read(data: &[u8]) -> Carriers {
        let mut lines = data.split(|&b| b == b'\n');
        let flags = lines.next().unwrap_or_default();
        let mut carriers = Carriers {
            headers: HeaderMap::new(),
            query: None,
            allow_query: flags.contains(&b'q'),
            public: flags.contains(&b'p'),
            allow_query_key: flags.contains(&b'k'),
        };
        for line in lines {
            if let Some(query) = line.strip_prefix(b"?") {
                carriers.query.get_or_insert_with(|| String::from_utf8_lossy(query).into_owned());
                continue;
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
            let (name, value) = (&line[..colon], &line[colon + 1..]);
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                carriers.headers.append(name, value);
            }
        }
        carriers
    }
}

fn keys_config() -> KeysConfig {
    Config::defaults().keys
}

/// `a=1&b=2` as (decoded name, decoded value), the way a key is read from the query.
fn decoded_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .map(|(name, value)| (decode(name), decode(value)))
        .collect()
}

/// Whatever `find` returns was given: a trimmed part of an `Authorization`
/// or key-header value, or (only where the query may carry a key) the
/// decoded value of a query parameter of the configured name.
pub fn credential_find(data: &[u8]) {
    let c = Carriers::read(data);
    let keys = keys_config();
    let keygate::credential::Presented::Key(found) =
        keygate::credential::find(&c.headers, c.query.as_deref(), &keys, c.allow_query)
    else {
        return;
    };
    let found: Cow<'_, str> = found;
    let in_header = c
        .headers
        .get_all(AUTHORIZATION)
        .iter()
        .chain(c.headers.get_all(&keys.header).iter())
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(found.as_ref()) && found.trim() == found.as_ref());
    let in_query = c.allow_query
        && c.query.as_deref().is_some_and(|q| {
            decoded_pairs(q).iter().any(|(name, value)| *name == keys.query_param && *value == found)
        });
    assert!(in_header || in_query, "found {found:?}, which no carrier holds");
}

/// After `strip`, no carrier holds one of our keys: no key header at all,
/// no bearer token with our prefix (an upstream's own token passes), no
/// query key where the route reads one there (elsewhere none with our
/// prefix), and `find` on what goes upstream finds no key of ours. Headers
/// that are no carrier pass untouched.
pub fn credential_strip(data: &[u8]) {
    let c = Carriers::read(data);
    let keys = keys_config();
    let route = RouteConfig {
        public: c.public,
        allow_query_key: c.allow_query_key,
        ..Config::defaults().routes[0].clone()
    };
    let mut headers = c.headers.clone();
    let mut path_and_query = match &c.query {
        Some(q) => format!("/p?{q}"),
        None => "/p".to_owned(),
    };
    keygate::credential::strip(&mut headers, &mut path_and_query, &route, &keys);

    assert!(path_and_query.starts_with("/p"), "the path changed: {path_and_query:?}");
    let query = path_and_query.split_once('?').map(|(_, q)| q);
    assert!(headers.get(&keys.header).is_none(), "a {} header is left", keys.header);
    for value in headers.get_all(AUTHORIZATION).iter().filter_map(|v| v.to_str().ok()) {
        let value = value.trim();
        let Some(at) = value.find(|c: char| c.is_ascii_whitespace()) else { continue };
        let (scheme, token) = value.split_at(at);
        if scheme.eq_ignore_ascii_case("bearer") {
            assert!(!token.trim().starts_with(&keys.prefix), "a bearer key is left in Authorization");
        }
    }
    if let Some(query) = query {
        assert!(
            decoded_pairs(query).iter().all(|(name, value)| *name != keys.query_param
                || !(route.allow_query_key || value.starts_with(&keys.prefix))),
            "a {} query parameter is left: {query:?}",
            keys.query_param
        );
    }
    match keygate::credential::find(&headers, query, &keys, route.allow_query_key) {
        keygate::credential::Presented::Key(left) => {
            assert!(!left.starts_with(&keys.prefix), "a key is still found after stripping: {left:?}")
        }
        keygate::credential::Presented::Ambiguous => panic!("two keys are still found after stripping"),
        keygate::credential::Presented::Missing => {}
    }
    for (name, value) in &c.headers {
        if name != AUTHORIZATION && *name != keys.header {
            assert!(headers.get_all(name).iter().any(|v| v == value), "{name} was removed");
        }
    }
}
