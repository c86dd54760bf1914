//! Retrying a failed attempt on another target: which requests may be
//! retried, how many times, and the budget that keeps retries from
//! multiplying an outage.
//!
//! A request is retried only when all of these hold: its method is one the
//! route allows retrying (`GET HEAD OPTIONS PUT DELETE` by default, or the
//! route's `retry_methods`); its attempt failed before any response byte
//! reached the client (connect error or refusal, a reset before the answer,
//! the per-try timeout, or a `retry_statuses` answer, 502/503/504 by
//! default, which is then discarded); its body can be sent again (none, or
//! one of at most `retry_buffer` bytes, read whole before the first attempt);
//! attempts are left (`retries`); and the budget allows it.
//!
//! The budget is a token bucket per upstream: every request adds
//! `retry_budget` of a token (0.2: one retry per five requests), a retry
//! takes one, and the bucket holds at most [`BUDGET_BURST`] tokens. During a
//! full outage the targets therefore see at most `requests x (1 + budget)`
//! attempts plus that burst, however many retries each request may make.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};

use super::body::RequestBody;

/// Tokens the retry budget can hold: the retries allowed at once after a
/// quiet spell (and at low traffic, where a fifth of a few requests would be
/// none).
pub const BUDGET_BURST: u64 = 10;

/// Milli-tokens: the budget's fixed-point unit.
const MILLI: u64 = 1000;

/// The retry fields of an `[upstream.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// Attempts after the first (`retries`; 0 turns retrying off).
    pub retries: u32,
    /// Tokens each request adds to the budget (`retry_budget`, 0 to 1).
    pub budget: f64,
    /// Upstream statuses that are retried like a failed connection.
    pub statuses: Vec<u16>,
    /// Longest body read whole before the first attempt so that it can be
    /// sent again; bigger (or unknown-length) bodies stream and are not retried.
    pub buffer: u64,
    /// The deadline of one attempt (`try_timeout`); the upstream's
    /// `timeout` bounds all of them together.
    pub try_timeout: Option<Duration>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self { retries: 1, budget: 0.2, statuses: vec![502, 503, 504], buffer: 64 * 1024, try_timeout: None }
    }
}

/// A set of methods a route may retry (`retry_methods`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryMethods(u16);

const METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::OPTIONS,
    Method::PUT,
    Method::DELETE,
    Method::TRACE,
    Method::POST,
    Method::PATCH,
    Method::CONNECT,
];

impl Default for RetryMethods {
    /// The idempotent methods of RFC 9110 §9.2.2 that carry requests
    /// (TRACE is left out: the gateway answers nothing with it).
    fn default() -> Self {
        Self::of(&[Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE])
    }
}

impl RetryMethods {
    pub fn of(methods: &[Method]) -> Self {
        let bits = methods
            .iter()
            .filter_map(|m| METHODS.iter().position(|known| known == m))
            .fold(0, |bits, i| bits | (1 << i));
        Self(bits)
    }

    /// A method name as `retry_methods` lists it, or `None`.
    pub fn parse_method(text: &str) -> Option<Method> {
        METHODS.iter().find(|m| m.as_str().eq_ignore_ascii_case(text)).cloned()
    }

    pub fn contains(&self, method: &Method) -> bool {
        METHODS.iter().position(|known| known == method).is_some_and(|i| self.0 & (1 << i) != 0)
    }
}

/// The retry budget of one upstream; see the module doc.
#[derive(Debug)]
pub struct RetryBudget {
    /// Milli-tokens.
    balance: AtomicU64,
    deposit: u64,
}

impl RetryBudget {
    pub fn new(budget: f64) -> Self {
        let deposit = (budget.clamp(0.0, 1.0) * MILLI as f64).round() as u64;
        Self { balance: AtomicU64::new(BUDGET_BURST * MILLI), deposit }
    }

    /// One request arrived. The cap is checked before adding, so the
    /// balance may pass it by one deposit: a bound, not an exact figure.
    pub fn deposit(&self) {
        if self.balance.load(Ordering::Relaxed) < BUDGET_BURST * MILLI {
            self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    /// Takes one token for a retry; false when there is none.
    pub fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |balance| balance.checked_sub(MILLI))
            .is_ok()
    }
}

/// What it takes to send a request again: its head and its (buffered) body.
pub struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Replay {
    pub fn of<B>(request: &Request<B>, body: Bytes) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
            body,
        }
    }

    /// A fresh copy of the request, ready for another attempt.
    pub fn request(&self) -> Request<RequestBody> {
        let mut request = Request::new(RequestBody::buffered(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        *request.version_mut() = Version::HTTP_11;
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_its_burst_then_its_share_of_requests() {
        let budget = RetryBudget::new(0.2);
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        // The burst of 10, then one per 5 requests.
        assert!((200..=211).contains(&retries), "{retries} retries for 1000 requests");
        let none = RetryBudget::new(0.0);
        let allowed = (0..100).filter(|_| none.withdraw()).count();
        assert_eq!(allowed, BUDGET_BURST as usize, "a zero budget still has its burst, once");
    }

    #[test]
    fn idempotent_methods_are_retried_by_default_and_routes_choose_their_own() {
        let default = RetryMethods::default();
        for method in [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE] {
            assert!(default.contains(&method), "{method}");
        }
        for method in [Method::POST, Method::PATCH, Method::CONNECT, Method::from_bytes(b"PURGE").unwrap()] {
            assert!(!default.contains(&method), "{method}");
        }
        let post = RetryMethods::of(&[RetryMethods::parse_method("post").unwrap()]);
        assert!(post.contains(&Method::POST) && !post.contains(&Method::GET));
        assert_eq!(RetryMethods::parse_method("PURGE"), None);
    }
}
