//! `/admin/clients`: the CLI's client operations over HTTP, JSON in and out.
//!
//! Every call goes through [`crate::ops::clients`], and records come back
//! in the CLI's `--json` shape ([`ClientView`]). Metadata fields are the
//! key calls' (parsed by the same code): `rate`, `burst`, `quota`, `label`,
//! `uses`, `refill`, `meta`; absent leaves a field unchanged, `null` clears it. Key-only
//! fields (`scopes`, `expires`) are refused naming the field.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::Value;

use super::error::AdminError;
use super::keys::{KeyCall, changes, invalid, json, object};
use crate::ops::clients::{self as ops, ClientView};
use crate::usage::{AuditAction, AuditEntry};

/// `POST /admin/clients`: `{"id": CLIENT, ...metadata}`; 201 with the record.
pub async fn create(call: &KeyCall<'_>, body: &Bytes) -> Result<Response<Full<Bytes>>, AdminError> {
    let mut fields = object(body)?;
    let id = match fields.remove("id") {
        Some(Value::String(id)) => id,
        Some(_) => return Err(invalid("id", "must be a string")),
        None => return Err(invalid("id", "is required (the client ID, as in its keys)")),
    };
    let changes = changes(fields, call.now)?;
    let record = ops::create(call.store, &id, changes, call.now).await?;
    audit(call, AuditAction::ClientCreate, &record.id).await;
    let mut response = json(StatusCode::CREATED, &ClientView::new(&record))?;
    if let Ok(location) = HeaderValue::from_str(&format!("/admin/clients/{}", record.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `GET /admin/clients`: every client record, sorted by ID.
pub async fn list(call: &KeyCall<'_>, query: Option<&str>) -> Result<Response<Full<Bytes>>, AdminError> {
    if let Some(name) = query.unwrap_or("").split('&').find(|p| !p.is_empty()) {
        let name = name.split_once('=').map_or(name, |(name, _)| name);
        return Err(invalid(name, "unknown query parameter; this call takes none"));
    }
    let records = ops::list(call.store).await?;
    let views: Vec<ClientView<'_>> = records.iter().map(ClientView::new).collect();
    json(StatusCode::OK, &views)
}

/// `GET /admin/clients/{id}`: the record, the client's keys and, if it has
/// credits, the count left (`credits.remaining`, from the credit authority).
pub async fn show(call: &KeyCall<'_>, id: &str) -> Result<Response<Full<Bytes>>, AdminError> {
    let detail = ops::show(call.store, id).await?;
    let view = ClientView::with_keys(&detail);
    let view = match crate::ops::view::client_remaining_credits(call.credits, &detail.record).await {
        Some(remaining) => view.credits_remaining(remaining),
        None => view,
    };
    json(StatusCode::OK, &view)
}

/// `PATCH /admin/clients/{id}`: metadata changes; answers the updated record.
pub async fn update(call: &KeyCall<'_>, id: &str, body: &Bytes) -> Result<Response<Full<Bytes>>, AdminError> {
    let changes = changes(object(body)?, call.now)?;
    let record = ops::update(call.store, id, changes, call.now).await?;
    audit(call, AuditAction::ClientUpdate, &record.id).await;
    json(StatusCode::OK, &ClientView::new(&record))
}

/// `POST /admin/clients/{id}/revoke`: every key of the client is refused
/// from now on. Idempotent; `already_revoked` tells.
pub async fn revoke(call: &KeyCall<'_>, id: &str) -> Result<Response<Full<Bytes>>, AdminError> {
    let revoked = ops::revoke(call.store, id, call.now).await?;
    if !revoked.already {
        audit(call, AuditAction::ClientRevoke, &revoked.record.id).await;
    }

    #[derive(serde::Serialize)]
    struct RevokedView<'a> {
        #[serde(flatten)]
        record: ClientView<'a>,
        already_revoked: bool,
    }
    let view = RevokedView { record: ClientView::new(&revoked.record), already_revoked: revoked.already };
    json(StatusCode::OK, &view)
}

/// Logs a client operation and, with a Redis store, appends it to the audit
/// stream as `admin:<token name>`, as key operations are.
async fn audit(call: &KeyCall<'_>, action: AuditAction, client: &str) {
    tracing::info!(target: "keygate::audit", actor = call.actor, via = "admin-api", op = %action, client, "client operation");
    let Some(redis) = call.store.redis() else { return };
    let actor = format!("admin:{}", call.actor);
    let entry = AuditEntry::client(actor, action, client, call.now, "via the admin API".to_owned());
    if let Err(error) = crate::usage::append_audit(&mut redis.conn.clone(), &redis.prefix, &entry).await {
        tracing::warn!(%error, client, "client operation done, but its audit entry was not written");
    }
}
