//! Client records: the customer behind a set of keys, as a record of its own.
//!
//! A key ID is `<client>.<kid>`, so every key names its client. A client may
//! also have a record, holding what is shared by all of its keys: limits, a
//! quota and usage credits (applied on top of each key's own, which can only
//! be tighter), a label, and a status. Revoking the client refuses every one of its keys at
//! once, without touching the key records. A key whose client has no record
//! works as it always did (no client limits).
//!
//! Operators write a client with the same flags and the same `--meta` syntax
//! as a key ([`MetaChanges`]); expiry, which only makes sense on a key, is
//! refused with a clear error by [`ClientMeta::apply`]. A client's `scopes`
//! apply only when the client itself is the credential (a client
//! certificate): a key's scopes are the key's own, never widened or
//! narrowed by its client's.

use std::num::NonZeroU32;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::meta::{
    CreditGrant, KeyStatus, MetaChanges, MetaError, Quota, Rate, credits_after, whole_seconds,
};

/// A client as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// The client ID as it appears in key strings and key IDs,
    /// `[A-Za-z0-9-]{1,64}`; safe to log and to show.
    pub id: String,
    pub meta: ClientMeta,
}

/// Everything a store keeps about a client besides its ID.
///
/// A new field joins here and in [`ClientMeta::apply`]; the destructuring
/// there makes a new [`MetaChanges`] field a compile error until someone
/// decides whether a client takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMeta {
    /// Scopes of the client's certificate callers (`auth = ["cert"]`
    /// routes); none by default, so a certificate opens nothing until the
    /// operator grants it. Keys of the client keep their own scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Sustained request rate shared by all the client's keys; `None`: unlimited.
    pub rate: Option<Rate>,
    /// Requests allowed at once above the shared rate; defaults to its count.
    pub burst: Option<NonZeroU32>,
    /// Requests per window shared by all the client's keys; `None`: no quota.
    pub quota: Option<Quota>,
    /// Free text for operators ("Acme Corp, gold plan").
    pub label: Option<String>,
    /// Usage credits shared by all the client's keys (`--uses 100000`),
    /// spent on top of each key's own; `None`: unmetered. As for a key, the
    /// count left lives with the credit authority (`limit::credits`, under
    /// `Owner::Client`), not here.
    pub credits: Option<CreditGrant>,
    /// `revoked` refuses every key of the client; never set back to active.
    pub status: KeyStatus,
    pub created_at: Timestamp,
    /// When the record was last written (create, update or revoke).
    pub updated_at: Timestamp,
}

impl ClientMeta {
    /// Fresh metadata for a client created now: active, no limits.
    pub fn new(now: Timestamp) -> Self {
        let now = whole_seconds(now);
        Self {
            scopes: Vec::new(),
            rate: None,
            burst: None,
            quota: None,
            label: None,
            credits: None,
            status: KeyStatus::Active,
            created_at: now,
            updated_at: now,
        }
    }

    pub fn is_revoked(&self) -> bool {
        self.status == KeyStatus::Revoked
    }

    /// Applies key-style changes to a client. Expiry belongs to keys:
    /// asking for it on a client is refused, naming the field, and nothing
    /// is applied. Scopes are the client certificate's (see [`Self::scopes`]).
    pub fn apply(&mut self, changes: MetaChanges) -> Result<(), MetaError> {
        let MetaChanges { scopes, rate, burst, quota, expires_at, label, uses, refill } = changes;
        if let Some(at) = expires_at {
            return Err(MetaError::new(
                "expires",
                &at.map_or_else(|| "never".to_owned(), |at| at.to_string()),
                "expiry belongs to keys, not to clients; to end a client, revoke it (clients revoke)",
            ));
        }
        if let Some(v) = scopes {
            self.scopes = v;
        }
        if let Some(v) = rate {
            self.rate = v;
        }
        if let Some(v) = burst {
            self.burst = v;
        }
        if let Some(v) = quota {
            self.quota = v;
        }
        if let Some(v) = label {
            self.label = v;
        }
        // Same semantics as a key's: `uses` is a new grant (the count
        // restarts), `refill` alone keeps the count, `none` clears.
        self.credits = credits_after(self.credits, uses, refill, Timestamp::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-11-24T12:00:00.7Z".parse().unwrap()
    }

    #[test]
    fn meta_query_means_the_same_for_a_client_as_for_a_key() {
        let mut meta = ClientMeta::new(now());
        let changes = MetaChanges::from_query("rate_limit=100&burst=20&quota=10000/day&label=gold", now());
        meta.apply(changes.unwrap()).unwrap();
        assert_eq!(meta.rate.unwrap().to_string(), "100/s");
        assert_eq!(meta.burst.unwrap().get(), 20);
        assert_eq!(meta.quota.unwrap().to_string(), "10000/day");
        assert_eq!(meta.label.as_deref(), Some("gold"));
        assert_eq!(meta.created_at, "2026-11-24T12:00:00Z".parse::<Timestamp>().unwrap(), "whole seconds");

        meta.apply(MetaChanges::from_query("rate=&label=", now()).unwrap()).unwrap();
        assert_eq!((meta.rate, meta.label), (None, None), "an empty value clears");
    }

    #[test]
    fn expiry_is_refused_on_a_client_and_nothing_is_applied() {
        let mut meta = ClientMeta::new(now());
        let changes = MetaChanges::from_query("expires=30d&label=x", now()).unwrap();
        let error = meta.apply(changes).unwrap_err();
        assert_eq!(error.field, "expires");
        assert!(error.why.contains("belong"), "{error}");
        assert_eq!(meta, ClientMeta::new(now()), "nothing applied");
    }

    #[test]
    fn credits_apply_to_a_client_as_to_a_key() {
        let mut meta = ClientMeta::new(now());
        meta.apply(MetaChanges::from_query("uses=100&refill=100/month", now()).unwrap()).unwrap();
        let grant = meta.credits.unwrap();
        assert_eq!((grant.uses, grant.refill.unwrap().to_string()), (100, "100/month".to_owned()));
        meta.apply(MetaChanges::from_query("refill=50/day", now()).unwrap()).unwrap();
        let kept = meta.credits.unwrap();
        assert_eq!((kept.uses, kept.granted_at), (100, grant.granted_at), "refill alone keeps the grant");
        meta.apply(MetaChanges::from_query("uses=", now()).unwrap()).unwrap();
        assert_eq!(meta.credits, None, "an empty value clears");
        // A refused change applies nothing, credits included.
        let error = meta.apply(MetaChanges::from_query("uses=5&expires=1d", now()).unwrap()).unwrap_err();
        assert_eq!((error.field.as_str(), meta.credits), ("expires", None));
    }

    #[test]
    fn a_client_has_no_scopes_until_granted_and_keeps_them_across_other_changes() {
        let mut meta = ClientMeta::new(now());
        assert!(meta.scopes.is_empty(), "least privilege: a certificate opens nothing by default");
        meta.apply(MetaChanges::from_query("scope=read,orders:write", now()).unwrap()).unwrap();
        assert_eq!(meta.scopes, ["read", "orders:write"]);
        meta.apply(MetaChanges::from_query("rate=5/s", now()).unwrap()).unwrap();
        assert_eq!(meta.scopes, ["read", "orders:write"], "unchanged when not named");
    }
}
