//! The JSON views of key and client records: what `--json` prints and the
//! admin API answers, so both surfaces show one shape. Views never hold a
//! secret hash; a key view holds the clear key only right after
//! `issue`/`rotate`. They derive `ToSchema` so that the admin API's OpenAPI
//! document describes the very structs it serialises (foreign field types
//! are described by what they serialise as: a string, a number).

use std::num::NonZeroU32;

use jiff::Timestamp;
use serde::Serialize;
use utoipa::ToSchema;

use crate::client::ClientRecord;
use crate::key::{KeyId, SecretString};
use crate::limit::credits::{Credits, Owner};
use crate::meta::{self, KeyStatus, Quota, Rate};
use crate::store::KeyRecord;

/// A record as printed by `--json` and answered by the admin API. Never holds
/// the secret hash; holds the key only right after `issue`/`rotate`. Absent
/// optional fields print as `null` so scripts see a fixed set of fields.
#[derive(Serialize, ToSchema)]
pub struct RecordView<'a> {
    /// The clear key: only in the answers of issue and rotate, shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, nullable = false)]
    key: Option<&'a str>,
    /// `CLIENT.KID`.
    #[schema(value_type = String, example = "acme.3kT9xQ2m")]
    id: &'a KeyId,
    #[schema(value_type = String)]
    client: &'a str,
    #[schema(value_type = Vec<String>)]
    scopes: &'a [String],
    #[schema(value_type = Option<String>, example = "100/s")]
    rate: Option<Rate>,
    #[schema(value_type = Option<u32>, minimum = 1)]
    burst: Option<NonZeroU32>,
    #[schema(value_type = Option<String>, example = "100000/month")]
    quota: Option<Quota>,
    #[schema(value_type = Option<String>, format = DateTime)]
    expires_at: Option<Timestamp>,
    #[schema(value_type = Option<String>)]
    label: Option<&'a str>,
    status: KeyStatus,
    /// `active`, `rotating` (old key in its grace period), `expired` or `revoked`.
    #[schema(value_type = String, pattern = "^(active|rotating|expired|revoked)$")]
    state: &'static str,
    #[schema(value_type = String, format = DateTime)]
    created_at: Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    rotated_at: Option<Timestamp>,
    /// The key ID whose quota, rate and credit counters this key spends
    /// (itself unless it came from a rotation).
    #[schema(value_type = String)]
    counts_as: &'a KeyId,
    /// Approximate time of the last request with this key (Redis store only).
    #[schema(value_type = Option<String>, format = DateTime)]
    last_used: Option<Timestamp>,
    /// Usage credits, `null` for a key without.
    credits: Option<CreditsView>,
}

/// A key's credits: what was granted, the refill, and (in `show`) what is
/// left, read from the credit authority (`null` if it could not be asked).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreditsView {
    uses: u64,
    #[schema(value_type = Option<String>, example = "1000/day")]
    refill: Option<meta::Refill>,
    #[schema(value_type = String, format = DateTime)]
    granted_at: Timestamp,
    /// The count left (`show` only); `null` when the authority could not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    remaining: Option<Option<u64>>,
}

impl CreditsView {
    /// The grant as recorded, without the count left.
    pub fn new(grant: meta::CreditGrant) -> Self {
        Self { uses: grant.uses, refill: grant.refill, granted_at: grant.granted_at, remaining: None }
    }

    /// Adds the credits left (`None`: the authority could not say).
    pub fn with_remaining(mut self, remaining: Option<u64>) -> Self {
        self.remaining = Some(remaining);
        self
    }
}

impl<'a> RecordView<'a> {
    pub fn new(record: &'a KeyRecord, key: Option<&'a SecretString>, now: Timestamp) -> Self {
        let meta = &record.meta;
        Self {
            key: key.map(SecretString::expose),
            id: &record.id,
            client: record.client(),
            scopes: &meta.scopes,
            rate: meta.rate,
            burst: meta.burst,
            quota: meta.quota,
            expires_at: meta.expires_at,
            label: meta.label.as_deref(),
            status: meta.status,
            state: state(record, now),
            created_at: meta.created_at,
            rotated_at: meta.rotated_at,
            counts_as: record.counts_as(),
            last_used: None,
            credits: meta.credits.map(CreditsView::new),
        }
    }

    /// Adds when the key was last used (read from usage by the caller).
    pub fn last_used(mut self, at: Option<Timestamp>) -> Self {
        self.last_used = at;
        self
    }

    /// Adds the credits left (`None`: the authority could not say).
    pub fn credits_remaining(mut self, remaining: Option<u64>) -> Self {
        self.credits = self.credits.map(|view| view.with_remaining(remaining));
        self
    }
}

/// The credits `record` has left, if it has credits: `Some(None)` when the
/// authority cannot be asked (the reason goes to the log).
pub async fn remaining_credits(credits: &Credits, record: &KeyRecord) -> Option<Option<u64>> {
    let grant = record.meta.credits?;
    match credits.remaining(Owner::Key(record.counts_as().as_str()), &grant).await {
        Ok(remaining) => Some(Some(remaining)),
        Err(error) => {
            tracing::warn!(key = %record.id, %error, "cannot read the key's remaining credits");
            Some(None)
        }
    }
}

/// The one-word state shown for a key at `now`.
pub fn state(record: &KeyRecord, now: Timestamp) -> &'static str {
    let meta = &record.meta;
    if meta.status == KeyStatus::Revoked {
        "revoked"
    } else if !meta.is_usable_at(now) {
        "expired"
    } else if meta.rotated_at.is_some() {
        "rotating"
    } else {
        "active"
    }
}

/// The credits `record` has left, if it has credits: `Some(None)` when the
/// authority cannot be asked (the reason goes to the log), as for keys.
pub async fn client_remaining_credits(credits: &Credits, record: &ClientRecord) -> Option<Option<u64>> {
    let grant = record.meta.credits?;
    match credits.remaining(Owner::Client(&record.id), &grant).await {
        Ok(remaining) => Some(Some(remaining)),
        Err(error) => {
            tracing::warn!(client = %record.id, %error, "cannot read the client's remaining credits");
            Some(None)
        }
    }
}
