//! Cursor pagination of the admin API's lists (`GET /admin/keys`,
//! `GET /admin/clients`): the `limit` rule, the opaque cursor, and the
//! `{"items": [...], "next_cursor": ...}` envelope.
//!
//! A cursor is the base64url (unpadded) of the last ID of the page it
//! follows; the next page starts strictly after that ID. Records are never
//! deleted and IDs never change, so a walk that follows the cursors never
//! repeats a record and never skips one that exists for the whole walk,
//! whatever is issued or revoked in between. Callers must treat the string
//! as opaque: only its round trip is promised.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::AdminError;
use super::keys::invalid;
use crate::store;

/// Records per page when the query gives no `limit`.
pub const DEFAULT_LIMIT: u32 = 100;
/// The largest `limit` accepted.
pub const MAX_LIMIT: u32 = 1000;

/// One page of a list, in ID order.
#[derive(Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; `null`: this is the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// The envelope of a store page: `view` renders each record, `id` gives
    /// the ID the next page starts after.
    pub fn new<'a, R>(
        page: &'a store::Page<R>,
        view: impl Fn(&'a R) -> T,
        id: impl Fn(&'a R) -> &'a str,
    ) -> Self {
        let next_cursor = match page.items.last() {
            Some(last) if page.more => Some(URL_SAFE_NO_PAD.encode(id(last))),
            _ => None,
        };
        Self { items: page.items.iter().map(view).collect(), next_cursor }
    }
}

/// The query's `limit`, checked: absent is [`DEFAULT_LIMIT`], else 1 to
/// [`MAX_LIMIT`]. (Not a number is refused earlier, by the query's type.)
pub fn limit(limit: Option<u32>) -> Result<usize, AdminError> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n as usize),
        n => Err(invalid("limit", format!("{n} is not between 1 and {MAX_LIMIT}"))),
    }
}

/// The ID a `cursor` stands for, checked by `parse` (the list's ID type);
/// absent or empty is the first page.
pub fn cursor<T>(cursor: Option<&str>, parse: impl Fn(&str) -> Option<T>) -> Result<Option<T>, AdminError> {
    let Some(cursor) = cursor.filter(|c| !c.is_empty()) else { return Ok(None) };
    let malformed = || invalid("cursor", "not a cursor this list returned (pass `next_cursor` as it is)");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| malformed())?;
    let text = String::from_utf8(bytes).map_err(|_| malformed())?;
    parse(&text).map(Some).ok_or_else(malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_and_stay_in_range() {
        assert_eq!(limit(None).unwrap(), 100);
        assert_eq!(limit(Some(1)).unwrap(), 1);
        assert_eq!(limit(Some(1000)).unwrap(), 1000);
        for bad in [0, 1001, u32::MAX] {
            assert!(
                matches!(limit(Some(bad)), Err(AdminError::Invalid { ref field, .. }) if field == "limit")
            );
        }
    }

    #[test]
    fn a_cursor_round_trips_and_garbage_is_refused_as_cursor() {
        let page = store::Page { items: vec!["acme", "beta"], more: true };
        let view: Page<String> = Page::new(&page, |s| s.to_string(), |s| s);
        let next = view.next_cursor.unwrap();
        assert_eq!(cursor(Some(&next), |s| Some(s.to_owned())).unwrap().as_deref(), Some("beta"));
        assert_eq!(cursor(None, |s| Some(s.to_owned())).unwrap(), None);
        assert_eq!(cursor(Some(""), |s| Some(s.to_owned())).unwrap(), None);
        for bad in ["!!", "a", "_w"] {
            let refused = cursor(Some(bad), |s| Some(s.to_owned()));
            assert!(
                matches!(refused, Err(AdminError::Invalid { ref field, .. }) if field == "cursor"),
                "{bad}"
            );
        }
        // Well-formed base64 of something that is no ID of this list.
        let refused = cursor(Some(&next), |_| None::<String>);
        assert!(matches!(refused, Err(AdminError::Invalid { ref field, .. }) if field == "cursor"));

        let last = store::Page { items: vec!["acme"], more: false };
        assert_eq!(Page::new(&last, |s| s.to_string(), |s| s).next_cursor, None);
    }
}
