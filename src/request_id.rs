//! Request IDs: the one a client (or a proxy in front) sent, when it is
//! sane, or one made here.
//!
//! The ID travels upstream in the configured header (`[server]
//! request_id_header`, default `x-request-id`), comes back on every
//! response (unless the upstream answered with a value of its own), and is
//! in the access log line and in every error body the gateway writes, so
//! one string finds a request everywhere.
//!
//! An incoming ID is kept whoever sent it, as nginx, Envoy and Kong do by
//! default: it is not a credential and grants nothing, and keeping it is
//! what lets a client's own ID find its request in the gateway's log. It is
//! kept only when it is one header of [`MAX_LEN`] bytes at most, all
//! visible ASCII (no space, no control character): anything else is
//! replaced by a generated ID, so a log line cannot be forged or swollen
//! through it.
//!
//! A generated ID is 32 lowercase hex digits: 64 random bits drawn once per
//! process from the OS, then a 64-bit counter. Making one costs an atomic
//! add and no syscall; two gateways (or two runs of one) share a prefix
//! with probability 2^-64 per pair. The shape is that of a W3C trace ID.

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue};

/// The longest incoming ID kept (a UUID is 36, a W3C `traceparent` 55).
pub const MAX_LEN: usize = 128;

/// The header's default name.
pub const DEFAULT_HEADER: &str = "x-request-id";

/// The request's ID: the single sane value of `name` in `headers`, or a
/// new one.
pub fn for_request(headers: &HeaderMap, name: &HeaderName) -> HeaderValue {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) if is_sane(value.as_bytes()) => value.clone(),
        _ => generate(),
    }
}

tokio::task_local! {
    /// The ID of the request whose answer is being made, for error bodies
    /// built where no request is at hand (the admin API's [`IntoResponse`]
    /// errors, which axum turns into answers with nothing but the error).
    ///
    /// [`IntoResponse`]: axum::response::IntoResponse
    static CURRENT: HeaderValue;
}

/// Runs `answer` as the answer to the request `id`: [`current`] names it.
pub async fn scope<F: Future>(id: HeaderValue, answer: F) -> F::Output {
    CURRENT.scope(id, answer).await
}

/// The ID of the request being answered, inside [`scope`].
pub fn current() -> Option<String> {
    CURRENT.try_with(|id| id.to_str().ok().map(str::to_owned)).ok().flatten()
}

/// 1 to [`MAX_LEN`] bytes of visible ASCII (`!` to `~`).
pub fn is_sane(value: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&value.len()) && value.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A new ID, unique within the process and, with overwhelming probability,
/// across processes.
pub fn generate() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        // The OS's randomness once per process; should it fail, fastrand's
        // seed (itself from the OS's hasher keys and the time) is still
        // distinct per process.
        let mut bytes = [0u8; 8];
        match getrandom::fill(&mut bytes) {
            Ok(()) => u64::from_ne_bytes(bytes),
            Err(_) => fastrand::u64(..),
        }
    });
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = [0u8; 32];
    hex_into(&mut id[..16], prefix);
    hex_into(&mut id[16..], count);
    // Hex digits are valid header bytes: this cannot fail.
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

fn hex_into(out: &mut [u8], mut value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in out.iter_mut().rev() {
        *byte = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(DEFAULT_HEADER, HeaderValue::from_bytes(value.as_bytes()).unwrap());
        }
        headers
    }

    #[test]
    fn a_sane_incoming_id_is_kept() {
        let name = HeaderName::from_static(DEFAULT_HEADER);
        for kept in ["abc", "4bf92f35-77b3-4da6-a3ce-929d0e0e4736", "a.b_c:d/e+f=g~!"] {
            assert_eq!(for_request(&headers(&[kept]), &name), kept);
        }
        let longest: &'static str = "x".repeat(MAX_LEN).leak();
        assert_eq!(for_request(&headers(&[longest]), &name), longest);
    }

    #[test]
    fn a_missing_or_insane_id_is_replaced_by_a_generated_one() {
        let name = HeaderName::from_static(DEFAULT_HEADER);
        let too_long: &'static str = "x".repeat(MAX_LEN + 1).leak();
        for sent in [&[][..], &["has space"], &["tab\tinside"], &[too_long], &[""], &["a", "b"], &["é"]] {
            let id = for_request(&headers(sent), &name);
            assert_eq!(id.len(), 32, "{sent:?} -> {id:?}");
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit), "{id:?}");
        }
    }

    #[test]
    fn generated_ids_share_the_process_prefix_and_never_repeat() {
        let ids: Vec<HeaderValue> = (0..1000).map(|_| generate()).collect();
        let unique: std::collections::HashSet<&[u8]> = ids.iter().map(HeaderValue::as_bytes).collect();
        assert_eq!(unique.len(), ids.len());
        assert!(ids.iter().all(|id| id.as_bytes()[..16] == ids[0].as_bytes()[..16]));
        assert_ne!(&ids[0].as_bytes()[..16], b"0000000000000000", "the prefix is random");
    }
}
