//! `/admin/clients`: the CLI's client operations over HTTP, JSON in and out.
//!
//! Every call goes through [`crate::ops::clients`], and records come back
//! in the CLI's `--json` shape ([`ClientView`]). Metadata fields are the
//! key calls' (one definition in `admin::request`, parsed by the same code):
//! `scopes`, `rate`, `burst`, `quota`, `label`, `uses`, `refill`;
//! absent leaves a field unchanged, `null` clears it. The key-only expiry is
//! not among them, so it is refused as an unknown field, named.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{AdminError, ErrorBody};
use super::extract::{Call, Id, Json, Query};
use super::keys::json;
use super::page::{self, Page};
use super::request::{ClientChanges, CreateClientRequest, ListClientsQuery};
use crate::ops::clients::{self as ops, ClientView};
use crate::usage::{AuditAction, AuditEntry};

/// A revoked client's record; `already_revoked` tells a repeated call.
#[derive(Serialize, ToSchema)]
pub struct RevokedClient<'a> {
    #[serde(flatten)]
    record: ClientView<'a>,
    already_revoked: bool,
}

/// Create a client record.
#[utoipa::path(
    post, path = "/admin/clients", operation_id = "create_client", tag = "clients",
    request_body = CreateClientRequest,
    responses(
        (status = 201, description = "The new record", body = ClientView,
            headers(("location" = String, description = "`/admin/clients/{id}`"))),
        (status = 400, description = "A field is invalid or the body is not JSON", body = ErrorBody),
        (status = 409, description = "The client already has a record", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON", body = ErrorBody),
    )
)]
pub async fn create(call: Call, Json(mut body): Json<CreateClientRequest>) -> Result<Response, AdminError> {
    let changes = body.meta_input().changes(call.now)?;
    let record = ops::create(call.store(), &body.id, changes, call.now).await?;
    audit(&call, AuditAction::ClientCreate, &record.id).await;
    let mut response = json(StatusCode::CREATED, &ClientView::new(&record));
    if let Ok(location) = HeaderValue::from_str(&format!("/admin/clients/{}", record.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Client records, a page at a time in ID order.
#[utoipa::path(
    get, path = "/admin/clients", operation_id = "list_clients", tag = "clients",
    params(ListClientsQuery),
    responses(
        (status = 200, description = "A page of records", body = Page<ClientView>),
        (status = 400, description = "A query parameter is invalid", body = ErrorBody),
    )
)]
pub async fn list(call: Call, Query(query): Query<ListClientsQuery>) -> Result<Response, AdminError> {
    let limit = page::limit(query.limit)?;
    let valid = |id: &str| crate::key::validate_client_id(id).is_ok().then(|| id.to_owned());
    let after = page::cursor(query.cursor.as_deref(), valid)?;
    let records = ops::list_page(call.store(), after.as_deref(), limit).await?;
    let view = Page::new(&records, ClientView::new, |r| r.id.as_str());
    Ok(json(StatusCode::OK, &view))
}

/// The record, the client's keys and, if it has credits, the count left
/// (`credits.remaining`, from the credit authority).
#[utoipa::path(
    get, path = "/admin/clients/{id}", operation_id = "show_client", tag = "clients",
    params(("id" = String, Path, description = "The client ID", pattern = "^[A-Za-z0-9-]{1,64}$")),
    responses(
        (status = 200, description = "The record with its keys", body = ClientView),
        (status = 400, description = "The ID is malformed", body = ErrorBody),
        (status = 404, description = "No client record has this ID", body = ErrorBody),
    )
)]
pub async fn show(call: Call, Id(id): Id) -> Result<Response, AdminError> {
    let detail = ops::show(call.store(), &id).await?;
    let view = ClientView::with_keys(&detail);
    let view = match crate::ops::view::client_remaining_credits(call.credits(), &detail.record).await {
        Some(remaining) => view.credits_remaining(remaining),
        None => view,
    };
    Ok(json(StatusCode::OK, &view))
}

/// Change a client's metadata; absent fields stay, `null` clears.
#[utoipa::path(
    patch, path = "/admin/clients/{id}", operation_id = "update_client", tag = "clients",
    params(("id" = String, Path, description = "The client ID", pattern = "^[A-Za-z0-9-]{1,64}$")),
    request_body = ClientChanges,
    responses(
        (status = 200, description = "The updated record", body = ClientView),
        (status = 400, description = "A field is invalid or the body is not JSON", body = ErrorBody),
        (status = 404, description = "No client record has this ID", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON", body = ErrorBody),
    )
)]
pub async fn update(
    call: Call,
    Id(id): Id,
    Json(mut body): Json<ClientChanges>,
) -> Result<Response, AdminError> {
    let changes = body.meta_input().changes(call.now)?;
    let record = ops::update(call.store(), &id, changes, call.now).await?;
    audit(&call, AuditAction::ClientUpdate, &record.id).await;
    Ok(json(StatusCode::OK, &ClientView::new(&record)))
}

/// Revoke a client: every key of it is refused from now on. Idempotent
/// (`already_revoked` tells).
#[utoipa::path(
    post, path = "/admin/clients/{id}/revoke", operation_id = "revoke_client", tag = "clients",
    params(("id" = String, Path, description = "The client ID", pattern = "^[A-Za-z0-9-]{1,64}$")),
    responses(
        (status = 200, description = "The revoked record", body = RevokedClient),
        (status = 400, description = "The ID is malformed", body = ErrorBody),
        (status = 404, description = "No client record has this ID", body = ErrorBody),
    )
)]
pub async fn revoke(call: Call, Id(id): Id) -> Result<Response, AdminError> {
    let revoked = ops::revoke(call.store(), &id, call.now).await?;
    if !revoked.already {
        audit(&call, AuditAction::ClientRevoke, &revoked.record.id).await;
    }
    let view = RevokedClient { record: ClientView::new(&revoked.record), already_revoked: revoked.already };
    Ok(json(StatusCode::OK, &view))
}

/// Logs a client operation and, with a Redis store, appends it to the audit
/// stream as `admin:<token name>`, as key operations are.
async fn audit(call: &Call, action: AuditAction, client: &str) {
    tracing::info!(target: "keygate::audit", actor = call.actor, via = "admin-api", op = %action, client, "client operation");
    let Some(redis) = call.store().redis() else { return };
    let actor = format!("admin:{}", call.actor);
    let entry = AuditEntry::client(actor, action, client, call.now, "via the admin API".to_owned());
    if let Err(error) = crate::usage::append_audit(&mut redis.conn.clone(), &redis.prefix, &entry).await {
        tracing::warn!(%error, client, "client operation done, but its audit entry was not written");
    }
}
