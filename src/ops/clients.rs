//! Client operations shared by the `keygate clients` CLI and the admin API,
//! and the JSON view both print.
//!
//! Same rules as the key operations beside them: validate, read and write
//! records, return a typed result or an [`OpsError`]; nothing here prints or
//! knows about HTTP. A client's changes are written like a key's
//! ([`MetaChanges`], from flags or `--meta`); key-only fields are refused.

use std::num::NonZeroU32;

use jiff::Timestamp;
use serde::Serialize;

use super::OpsError;
use super::view::CreditsView;
use crate::client::{ClientMeta, ClientRecord};
use crate::key::{self, KeyId};
use crate::meta::{KeyStatus, MetaChanges, Quota, Rate, whole_seconds};
use crate::store::{KeyRecord, KeyStore, Page};

/// A client's record and its keys, as `clients show` presents them.
#[derive(Debug, Clone)]
pub struct ClientDetail {
    pub record: ClientRecord,
    /// The client's keys, sorted by ID.
    pub keys: Vec<KeyRecord>,
}

/// The result of a client revoke.
#[derive(Debug, Clone)]
pub struct RevokedClient {
    pub record: ClientRecord,
    /// The client was already revoked (the call still succeeded).
    pub already: bool,
}

// === Operations ===

/// Creates a record for `id` with `changes` applied. The client may already
/// have keys (they get the client's limits from now on); it must not have a
/// record yet.
pub async fn create(
    store: &dyn KeyStore,
    id: &str,
    changes: MetaChanges,
    now: Timestamp,
) -> Result<ClientRecord, OpsError> {
    validate_id(id)?;
    super::check_credit_changes(&changes)?;
    let mut meta = ClientMeta::new(now);
    meta.apply(changes)?;
    check_meta(&meta)?;
    let record = ClientRecord { id: id.to_owned(), meta };
    store.insert_client(&record).await?;
    Ok(record)
}

/// Every client record, sorted by ID.
pub async fn list(store: &dyn KeyStore) -> Result<Vec<ClientRecord>, OpsError> {
    Ok(store.list_clients().await?)
}

/// One page of [`list`]: at most `limit` records whose ID sorts after
/// `after` (see [`KeyStore::list_clients_page`]).
pub async fn list_page(
    store: &dyn KeyStore,
    after: Option<&str>,
    limit: usize,
) -> Result<Page<ClientRecord>, OpsError> {
    Ok(store.list_clients_page(after, limit).await?)
}

/// The client's record and its keys.
pub async fn show(store: &dyn KeyStore, id: &str) -> Result<ClientDetail, OpsError> {
    let record = get(store, id).await?;
    let keys = store.list(Some(id)).await?;
    Ok(ClientDetail { record, keys })
}

/// Applies `changes` to a client's record.
pub async fn update(
    store: &dyn KeyStore,
    id: &str,
    changes: MetaChanges,
    now: Timestamp,
) -> Result<ClientRecord, OpsError> {
    super::check_credit_changes(&changes)?;
    let mut record = get(store, id).await?;
    record.meta.apply(changes)?;
    check_meta(&record.meta)?;
    record.meta.updated_at = whole_seconds(now);
    store.update_client(&record).await?;
    Ok(record)
}

/// Revokes a client: every one of its keys is refused from now on, on every
/// gateway, and no key can be issued for it. The key records are left as
/// they are (the client's status is what refuses them).
///
/// Idempotent, as a key revoke is: revoking again rewrites the record and
/// so re-announces the invalidation.
pub async fn revoke(store: &dyn KeyStore, id: &str, now: Timestamp) -> Result<RevokedClient, OpsError> {
    let mut record = get(store, id).await?;
    let already = record.meta.is_revoked();
    if !already {
        record.meta.status = KeyStatus::Revoked;
        record.meta.updated_at = whole_seconds(now);
    }
    store.update_client(&record).await?;
    Ok(RevokedClient { record, already })
}

/// Refuses a new key (issue, rotate) for a revoked client. A client
/// without a record is fine: it works as clients always did.
pub(super) async fn check_may_have_new_keys(store: &dyn KeyStore, id: &str) -> Result<(), OpsError> {
    match store.get_client(id).await? {
        Some(record) if record.meta.is_revoked() => Err(OpsError::ClientRevoked(id.to_owned())),
        _ => Ok(()),
    }
}

async fn get(store: &dyn KeyStore, id: &str) -> Result<ClientRecord, OpsError> {
    validate_id(id)?;
    store.get_client(id).await?.ok_or_else(|| OpsError::ClientNotFound(id.to_owned()))
}

fn validate_id(id: &str) -> Result<(), OpsError> {
    key::validate_client_id(id).map_err(|e| OpsError::invalid("client", e.to_string()))
}

/// Rules on the resulting metadata as a whole (as for keys).
fn check_meta(meta: &ClientMeta) -> Result<(), OpsError> {
    if meta.burst.is_some() && meta.rate.is_none() {
        return Err(OpsError::invalid("burst", "a burst needs a rate (set --rate too)"));
    }
    Ok(())
}

// === Output ===

/// A client as printed by `clients ... --json` and answered by the admin
/// API. Absent optional fields print as `null`, so scripts see a fixed set
/// of fields; `keys` is there only where the keys were asked for (`show`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClientView<'a> {
    #[schema(value_type = String)]
    pub id: &'a str,
    /// Scopes of the client's certificate callers; `[]`: none.
    #[schema(value_type = Vec<String>)]
    pub scopes: &'a [String],
    #[schema(value_type = Option<String>, example = "100/s")]
    pub rate: Option<Rate>,
    #[schema(value_type = Option<u32>, minimum = 1)]
    pub burst: Option<NonZeroU32>,
    #[schema(value_type = Option<String>, example = "100000/month")]
    pub quota: Option<Quota>,
    #[schema(value_type = Option<String>)]
    pub label: Option<&'a str>,
    /// Usage credits shared by the client's keys, `null` without; in
    /// `show`, with what is left ([`ClientView::credits_remaining`]).
    pub credits: Option<CreditsView>,
    pub status: KeyStatus,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Timestamp,
    /// The client's keys (`show` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub keys: Option<Vec<ClientKeyView<'a>>>,
}

/// One key in a client's view: enough to pick it out, never its hash.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClientKeyView<'a> {
    #[schema(value_type = String)]
    pub id: &'a KeyId,
    /// The key's own status; a revoked client refuses its keys whatever this says.
    pub status: KeyStatus,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    #[schema(value_type = Option<String>)]
    pub label: Option<&'a str>,
}

impl<'a> ClientView<'a> {
    pub fn new(record: &'a ClientRecord) -> Self {
        let meta = &record.meta;
        Self {
            id: &record.id,
            scopes: &meta.scopes,
            rate: meta.rate,
            burst: meta.burst,
            quota: meta.quota,
            label: meta.label.as_deref(),
            credits: meta.credits.map(CreditsView::new),
            status: meta.status,
            created_at: meta.created_at,
            updated_at: meta.updated_at,
            keys: None,
        }
    }

    /// Adds the credits left (`None`: the authority could not say); no
    /// change for a client without credits.
    pub fn credits_remaining(mut self, remaining: Option<u64>) -> Self {
        self.credits = self.credits.map(|view| view.with_remaining(remaining));
        self
    }

    /// The view with the client's keys listed.
    pub fn with_keys(detail: &'a ClientDetail) -> Self {
        let keys = detail
            .keys
            .iter()
            .map(|k| ClientKeyView {
                id: &k.id,
                status: k.meta.status,
                expires_at: k.meta.expires_at,
                label: k.meta.label.as_deref(),
            })
            .collect();
        Self { keys: Some(keys), ..Self::new(&detail.record) }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_store::MemStore;
    use super::*;
    use crate::key::DEFAULT_PREFIX as P;
    use crate::store::Invalidation;

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn changes(query: &str) -> MetaChanges {
        MetaChanges::from_query(query, now()).unwrap()
    }

    #[tokio::test]
    async fn create_show_update_and_list() {
        let store = MemStore::new();
        let created = create(&store, "acme", changes("quota=1000/day&label=gold"), now()).await.unwrap();
        assert_eq!(created.meta.quota.unwrap().to_string(), "1000/day");
        assert_eq!(store.get_client("acme").await.unwrap(), Some(created.clone()));

        let key = super::super::issue(&store, P, "acme", MetaChanges::default(), now()).await.unwrap();
        let detail = show(&store, "acme").await.unwrap();
        assert_eq!(detail.keys, vec![key.record.clone()]);

        let later = now() + jiff::SignedDuration::from_hours(1);
        let updated = update(&store, "acme", changes("rate=10/s&label="), later).await.unwrap();
        assert_eq!(updated.meta.rate.unwrap().to_string(), "10/s");
        assert_eq!(updated.meta.label, None);
        assert_eq!(updated.meta.quota, created.meta.quota, "untouched");
        assert_eq!((updated.meta.created_at, updated.meta.updated_at), (now(), later));

        create(&store, "beta", MetaChanges::default(), now()).await.unwrap();
        let ids: Vec<String> = list(&store).await.unwrap().into_iter().map(|c| c.id).collect();
        assert_eq!(ids, ["acme", "beta"]);
    }

    #[tokio::test]
    async fn bad_input_is_refused_naming_the_field_and_nothing_is_written() {
        let store = MemStore::new();
        let field = |r: Result<ClientRecord, OpsError>| match r {
            Err(OpsError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert_eq!(field(create(&store, "a.b", MetaChanges::default(), now()).await), "client");
        assert_eq!(field(create(&store, "_anonymous", MetaChanges::default(), now()).await), "client");
        assert_eq!(field(create(&store, "c", changes("expires=30d"), now()).await), "expires");
        assert_eq!(field(create(&store, "c", changes("burst=5"), now()).await), "burst");
        assert!(store.list_clients().await.unwrap().is_empty());

        create(&store, "c", MetaChanges::default(), now()).await.unwrap();
        let err = create(&store, "c", MetaChanges::default(), now()).await.unwrap_err();
        assert!(matches!(err, OpsError::ClientExists(ref id) if id == "c"), "{err:?}");
        for err in [
            update(&store, "nobody", changes("label=x"), now()).await.unwrap_err(),
            revoke(&store, "nobody", now()).await.unwrap_err(),
            show(&store, "nobody").await.map(drop).unwrap_err(),
        ] {
            assert_eq!(err.to_string(), "no client record for nobody", "{err:?}");
        }
    }

    #[tokio::test]
    async fn revoke_announces_is_idempotent_and_stops_new_keys() {
        let store = MemStore::new();
        let old = super::super::issue(&store, P, "acme", MetaChanges::default(), now()).await.unwrap();
        create(&store, "acme", MetaChanges::default(), now()).await.unwrap();
        let mut events = store.subscribe();
        let first = revoke(&store, "acme", now()).await.unwrap();
        assert!(!first.already && first.record.meta.is_revoked());
        assert_eq!(events.try_recv().unwrap(), Invalidation::Client("acme".into()));
        assert!(revoke(&store, "acme", now()).await.unwrap().already);

        let err = super::super::issue(&store, P, "acme", MetaChanges::default(), now()).await.unwrap_err();
        assert!(matches!(err, OpsError::ClientRevoked(ref id) if id == "acme"), "{err:?}");
        let grace = std::time::Duration::from_secs(60);
        let err = super::super::rotate(&store, &old.record.id, grace, None, P, now()).await.unwrap_err();
        assert!(matches!(err, OpsError::ClientRevoked(_)), "{err:?}");
        super::super::issue(&store, P, "other", MetaChanges::default(), now()).await.unwrap();
    }

    #[tokio::test]
    async fn the_view_lists_keys_only_when_asked_and_never_a_hash() {
        let store = MemStore::new();
        create(&store, "acme", changes("quota=5/day"), now()).await.unwrap();
        let key = super::super::issue(&store, P, "acme", MetaChanges::default(), now()).await.unwrap();
        let detail = show(&store, "acme").await.unwrap();
        let plain = serde_json::to_value(ClientView::new(&detail.record)).unwrap();
        assert!(plain.get("keys").is_none());
        assert_eq!(plain["quota"], "5/day");
        assert_eq!(plain["rate"], serde_json::Value::Null);
        let full = serde_json::to_value(ClientView::with_keys(&detail)).unwrap();
        assert_eq!(full["keys"][0]["id"], key.record.id.as_str());
        assert_eq!(full["keys"][0]["status"], "active");
        assert!(!full.to_string().contains(&key.record.secret_hash.to_hex()));
    }

    #[tokio::test]
    async fn credits_are_granted_refilled_and_cleared_as_on_a_key() {
        let store = MemStore::new();
        let created = create(&store, "acme", changes("uses=1000"), now()).await.unwrap();
        let grant = created.meta.credits.unwrap();
        assert_eq!((grant.uses, grant.refill), (1000, None));
        assert_eq!(store.get_client("acme").await.unwrap(), Some(created.clone()), "stored");

        // `refill` alone keeps the grant (and so the count left).
        let refilled = update(&store, "acme", changes("refill=500/day"), now()).await.unwrap();
        let kept = refilled.meta.credits.unwrap();
        assert_eq!((kept.uses, kept.granted_at), (1000, grant.granted_at));
        assert_eq!(kept.refill.unwrap().to_string(), "500/day");

        // `uses` again is a new grant: a newer stamp, the refill kept.
        let regranted = update(&store, "acme", changes("uses=1000"), now()).await.unwrap();
        let new = regranted.meta.credits.unwrap();
        assert!(new.granted_at > grant.granted_at, "{new:?}");
        assert_eq!(new.refill, kept.refill);

        let view = serde_json::to_value(ClientView::new(&regranted).credits_remaining(Some(7))).unwrap();
        assert_eq!(
            (view["credits"]["uses"].clone(), view["credits"]["remaining"].clone()),
            (1000.into(), 7.into())
        );

        let cleared = update(&store, "acme", changes("uses="), now()).await.unwrap();
        assert_eq!(cleared.meta.credits, None);
        let view = serde_json::to_value(ClientView::new(&cleared).credits_remaining(Some(7))).unwrap();
        assert_eq!(view["credits"], serde_json::Value::Null);

        let err = update(&store, "acme", changes("uses=&refill=5/day"), now()).await.unwrap_err();
        assert!(matches!(err, OpsError::Invalid { ref field, .. } if field == "refill"), "{err:?}");
        let err = create(&store, "beta", changes("uses=&refill=5/day"), now()).await.unwrap_err();
        assert!(matches!(err, OpsError::Invalid { ref field, .. } if field == "refill"), "{err:?}");
        assert_eq!(store.get_client("beta").await.unwrap(), None, "nothing written");
    }
}
