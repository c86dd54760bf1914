//! `/admin/keys`: the CLI's key operations over HTTP, JSON in and out.
//!
//! Every call goes through [`crate::ops`], so the CLI and the admin API share
//! one implementation and one set of rules; records come back in the CLI's
//! `--json` shape ([`RecordView`]). Bodies are typed (`admin::request`); each
//! handler's `#[utoipa::path]` is its entry in the OpenAPI document, beside
//! the code it describes.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{AdminError, ErrorBody};
use super::extract::{Call, Id, Json, Query};
use super::page::{self, Page};
use super::request::{IssueRequest, KeyChanges, ListKeysQuery, RotateRequest, meta_error};
use crate::key::KeyId;
use crate::meta;
use crate::ops::view::{RecordView, remaining_credits};
use crate::ops::{self, RevokeTarget};
use crate::usage::{AuditAction, AuditEntry};

/// The grace period of a rotation when the body gives none (as the CLI).
const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// A revoked key's record; `already_revoked` tells a repeated call.
#[derive(Serialize, ToSchema)]
pub struct RevokedKey<'a> {
    #[serde(flatten)]
    record: RecordView<'a>,
    already_revoked: bool,
}

/// The new key of a rotation (its clear `key` shown once), and the old key's ID.
#[derive(Serialize, ToSchema)]
pub struct RotatedKey<'a> {
    #[serde(flatten)]
    record: RecordView<'a>,
    #[schema(value_type = String)]
    rotated_from: &'a KeyId,
}

/// Issue a key for a client; the clear key is in this answer only.
#[utoipa::path(
    post, path = "/admin/keys", operation_id = "issue_key", tag = "keys",
    request_body = IssueRequest,
    responses(
        (status = 201, description = "The new key, with its clear `key` (shown once)", body = RecordView,
            headers(("location" = String, description = "`/admin/keys/{id}`"))),
        (status = 400, description = "A field is invalid or the body is not JSON", body = ErrorBody),
        (status = 409, description = "The client is revoked", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON", body = ErrorBody),
    )
)]
pub async fn issue(call: Call, Json(mut body): Json<IssueRequest>) -> Result<Response, AdminError> {
    let changes = body.meta_input().changes(call.now)?;
    let issued = ops::issue(call.store(), call.prefix(), &body.client, changes, call.now).await?;
    audit(&call, AuditAction::Issue, &issued.record.id).await;
    let view = RecordView::new(&issued.record, Some(&issued.key), call.now);
    let mut response = secret_json(StatusCode::CREATED, &view);
    if let Ok(location) = HeaderValue::from_str(&format!("/admin/keys/{}", issued.record.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// List keys (every key, or one client's), a page at a time in ID order;
/// never a clear key.
#[utoipa::path(
    get, path = "/admin/keys", operation_id = "list_keys", tag = "keys",
    params(ListKeysQuery),
    responses(
        (status = 200, description = "A page of records", body = Page<RecordView>),
        (status = 400, description = "A query parameter is invalid", body = ErrorBody),
    )
)]
pub async fn list(call: Call, Query(query): Query<ListKeysQuery>) -> Result<Response, AdminError> {
    // `?client=` (empty) is no filter, as if absent.
    let client = query.client.filter(|c| !c.is_empty());
    let limit = page::limit(query.limit)?;
    let after = page::cursor(query.cursor.as_deref(), |id| id.parse::<KeyId>().ok())?;
    let records = ops::list_page(call.store(), client.as_deref(), after.as_ref(), limit).await?;
    let view = Page::new(&records, |r| RecordView::new(r, None, call.now), |r| r.id.as_str());
    Ok(json(StatusCode::OK, &view))
}

/// Show one key, with its remaining credits if it has credits.
#[utoipa::path(
    get, path = "/admin/keys/{id}", operation_id = "show_key", tag = "keys",
    params(("id" = String, Path, description = "The key ID, `CLIENT.KID`", pattern = r"^[A-Za-z0-9-]{1,64}\.[A-Za-z0-9]{8}$")),
    responses(
        (status = 200, description = "The record", body = RecordView),
        (status = 400, description = "The ID is malformed", body = ErrorBody),
        (status = 404, description = "No key has this ID", body = ErrorBody),
    )
)]
pub async fn show(call: Call, Id(id): Id) -> Result<Response, AdminError> {
    let record = ops::show(call.store(), &key_id(&id)?).await?;
    let view = RecordView::new(&record, None, call.now);
    let view = match remaining_credits(call.credits(), &record).await {
        Some(remaining) => view.credits_remaining(remaining),
        None => view,
    };
    Ok(json(StatusCode::OK, &view))
}

/// Change a key's metadata; absent fields stay, `null` clears.
#[utoipa::path(
    patch, path = "/admin/keys/{id}", operation_id = "update_key", tag = "keys",
    params(("id" = String, Path, description = "The key ID, `CLIENT.KID`", pattern = r"^[A-Za-z0-9-]{1,64}\.[A-Za-z0-9]{8}$")),
    request_body = KeyChanges,
    responses(
        (status = 200, description = "The updated record", body = RecordView),
        (status = 400, description = "A field is invalid or the body is not JSON", body = ErrorBody),
        (status = 404, description = "No key has this ID", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON", body = ErrorBody),
    )
)]
pub async fn update(
    call: Call,
    Id(id): Id,
    Json(mut body): Json<KeyChanges>,
) -> Result<Response, AdminError> {
    let id = key_id(&id)?;
    let changes = body.meta_input().changes(call.now)?;
    let record = ops::update(call.store(), &id, changes, call.now).await?;
    audit(&call, AuditAction::Update, &record.id).await;
    Ok(json(StatusCode::OK, &RecordView::new(&record, None, call.now)))
}

/// Revoke a key; idempotent (`already_revoked` tells).
#[utoipa::path(
    post, path = "/admin/keys/{id}/revoke", operation_id = "revoke_key", tag = "keys",
    params(("id" = String, Path, description = "The key ID, `CLIENT.KID`", pattern = r"^[A-Za-z0-9-]{1,64}\.[A-Za-z0-9]{8}$")),
    responses(
        (status = 200, description = "The revoked record", body = RevokedKey),
        (status = 400, description = "The ID is malformed", body = ErrorBody),
        (status = 404, description = "No key has this ID", body = ErrorBody),
    )
)]
pub async fn revoke(call: Call, Id(id): Id) -> Result<Response, AdminError> {
    let target = RevokeTarget::Id(key_id(&id)?);
    let revoked = ops::revoke(call.store(), &target, call.prefix()).await?;
    audit(&call, AuditAction::Revoke, &revoked.record.id).await;
    let view = RevokedKey {
        record: RecordView::new(&revoked.record, None, call.now),
        already_revoked: revoked.already,
    };
    Ok(json(StatusCode::OK, &view))
}

/// Replace a key by a new one with the same metadata. The old key works for
/// exactly the grace from now; the new key counts as the old one and has no
/// expiry unless `expires` gives one. The body is optional.
#[utoipa::path(
    post, path = "/admin/keys/{id}/rotate", operation_id = "rotate_key", tag = "keys",
    params(("id" = String, Path, description = "The key ID, `CLIENT.KID`", pattern = r"^[A-Za-z0-9-]{1,64}\.[A-Za-z0-9]{8}$")),
    request_body(content = Option<RotateRequest>, description = "Optional; `null` is no body"),
    responses(
        (status = 201, description = "The new key, with its clear `key` (shown once)", body = RotatedKey),
        (status = 400, description = "A field is invalid or the body is not JSON", body = ErrorBody),
        (status = 404, description = "No key has this ID", body = ErrorBody),
        (status = 409, description = "The key is revoked or expired, or its client is revoked", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON", body = ErrorBody),
    )
)]
pub async fn rotate(
    call: Call,
    Id(id): Id,
    body: Option<Json<Option<RotateRequest>>>,
) -> Result<Response, AdminError> {
    let id = key_id(&id)?;
    let body = body.and_then(|Json(body)| body).unwrap_or_default();
    let grace = match body.grace {
        None => DEFAULT_GRACE,
        Some(text) => humantime::parse_duration(&text)
            .map_err(|_| invalid("grace", format!("`{text}` is not a duration like 24h, 30m or 7d")))?,
    };
    let expires_at = match body.expires.as_deref() {
        None | Some("never") => None,
        Some(text) => Some(meta::parse_expiry(text, call.now).map_err(|e| meta_error("expires", e))?),
    };
    let issued = ops::rotate(call.store(), &id, grace, expires_at, call.prefix(), call.now).await?;
    audit(&call, AuditAction::Rotate, &id).await;
    let view = RotatedKey {
        record: RecordView::new(&issued.record, Some(&issued.key), call.now),
        rotated_from: &id,
    };
    Ok(secret_json(StatusCode::CREATED, &view))
}

// === Helpers ===

fn key_id(id: &str) -> Result<KeyId, AdminError> {
    id.parse().map_err(|reason| invalid("id", reason))
}

pub(super) fn invalid(field: &str, reason: impl Into<String>) -> AdminError {
    AdminError::Invalid { field: field.to_owned(), reason: reason.into() }
}

// === Responses ===

/// Logs a key operation and, when the store is Redis, appends it to the
/// audit stream (`keygate keys audit` shows it) as `admin:<token name>`.
/// A failed append is logged; the operation itself has already happened.
async fn audit(call: &Call, action: AuditAction, id: &KeyId) {
    tracing::info!(target: "keygate::audit", actor = call.actor, via = "admin-api", op = %action, %id, "key operation");
    let Some(redis) = call.store().redis() else { return };
    let entry = AuditEntry::key(
        format!("admin:{}", call.actor),
        action,
        id,
        call.now,
        "via the admin API".to_owned(),
    );
    if let Err(error) = crate::usage::append_audit(&mut redis.conn.clone(), &redis.prefix, &entry).await {
        tracing::warn!(%error, %id, "key operation done, but its audit entry was not written");
    }
}

/// `value` as the JSON answer with `status`.
pub(super) fn json(status: StatusCode, value: &impl Serialize) -> Response {
    (status, axum::Json(value)).into_response()
}

/// A response holding a clear key: no cache may keep it.
fn secret_json(status: StatusCode, value: &impl Serialize) -> Response {
    let mut response = json(status, value);
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
