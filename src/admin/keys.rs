//! `/admin/keys`: the CLI's key operations over HTTP, JSON in and out.
//!
//! Every call goes through [`crate::ops`], so the CLI and the admin API share
//! one implementation and one set of rules; records come back in the CLI's
//! `--json` shape ([`RecordView`]). Request fields are read one by one from
//! the JSON object, so an error names the field as the caller spelled it.
//! Metadata fields mirror the CLI flags: absent leaves a field unchanged,
//! `null` clears it (`scopes` cannot be cleared).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::AdminError;
use crate::key::KeyId;
use crate::meta::{self, MetaChanges, Quota, Rate};
use crate::ops::view::{RecordView, remaining_credits};
use crate::ops::{self, RevokeTarget};
use crate::store::KeyStore;
use crate::usage::{AuditAction, AuditEntry};

/// The grace period of a rotation when the body gives none (as the CLI).
const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Metadata fields `issue` and `update` accept.
const META_FIELDS: &[&str] =
    &["scopes", "rate", "burst", "quota", "expires", "expires_at", "label", "uses", "refill", "meta"];

/// What a key call needs from the running gateway.
pub struct KeyCall<'a> {
    pub store: &'a dyn KeyStore,
    /// The key prefix the verifier checks (the one the gateway started with).
    pub prefix: &'a str,
    /// Who acts, for the audit log: the admin token's `token_name`.
    pub actor: &'a str,
    pub now: Timestamp,
    /// Where the keys' remaining credits are read (the gateway's authority).
    pub credits: &'a crate::limit::credits::Credits,
}

/// `POST /admin/keys`: `{"client": ID, ...metadata}`; 201 with the key, shown once.
pub async fn issue(call: &KeyCall<'_>, body: &Bytes) -> Result<Response<Full<Bytes>>, AdminError> {
    let mut fields = object(body)?;
    let client = match fields.remove("client") {
        Some(Value::String(client)) => client,
        Some(_) => return Err(invalid("client", "must be a string")),
        None => return Err(invalid("client", "is required")),
    };
    let changes = changes(fields, call.now)?;
    let issued = ops::issue(call.store, call.prefix, &client, changes, call.now).await?;
    audit(call, AuditAction::Issue, &issued.record.id).await;
    let view = RecordView::new(&issued.record, Some(&issued.key), call.now);
    let mut response = secret_json(StatusCode::CREATED, &view)?;
    if let Ok(location) = HeaderValue::from_str(&format!("/admin/keys/{}", issued.record.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `GET /admin/keys[?client=ID]`: an array of records, sorted by ID.
pub async fn list(call: &KeyCall<'_>, query: Option<&str>) -> Result<Response<Full<Bytes>>, AdminError> {
    let mut client = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "client" => {
                let value = percent_encoding::percent_decode_str(value)
                    .decode_utf8()
                    .map_err(|_| invalid("client", "is not valid UTF-8"))?;
                client = Some(value.into_owned());
            }
            other => return Err(invalid(other, "unknown query parameter; known: client")),
        }
    }
    let records = ops::list(call.store, client.as_deref()).await?;
    let views: Vec<RecordView<'_>> = records.iter().map(|r| RecordView::new(r, None, call.now)).collect();
    json(StatusCode::OK, &views)
}

/// `GET /admin/keys/{id}`.
pub async fn show(call: &KeyCall<'_>, id: &str) -> Result<Response<Full<Bytes>>, AdminError> {
    let record = ops::show(call.store, &key_id(id)?).await?;
    let view = RecordView::new(&record, None, call.now);
    let view = match remaining_credits(call.credits, &record).await {
        Some(remaining) => view.credits_remaining(remaining),
        None => view,
    };
    json(StatusCode::OK, &view)
}

/// `PATCH /admin/keys/{id}`: metadata changes; answers the updated record.
pub async fn update(call: &KeyCall<'_>, id: &str, body: &Bytes) -> Result<Response<Full<Bytes>>, AdminError> {
    let id = key_id(id)?;
    let changes = changes(object(body)?, call.now)?;
    let record = ops::update(call.store, &id, changes, call.now).await?;
    audit(call, AuditAction::Update, &record.id).await;
    json(StatusCode::OK, &RecordView::new(&record, None, call.now))
}

/// `POST /admin/keys/{id}/revoke`: idempotent; `already_revoked` tells.
pub async fn revoke(call: &KeyCall<'_>, id: &str) -> Result<Response<Full<Bytes>>, AdminError> {
    let target = RevokeTarget::Id(key_id(id)?);
    let revoked = ops::revoke(call.store, &target, call.prefix).await?;
    audit(call, AuditAction::Revoke, &revoked.record.id).await;

    #[derive(Serialize)]
    struct RevokedView<'a> {
        #[serde(flatten)]
        record: RecordView<'a>,
        already_revoked: bool,
    }
    let view = RevokedView {
        record: RecordView::new(&revoked.record, None, call.now),
        already_revoked: revoked.already,
    };
    json(StatusCode::OK, &view)
}

/// `POST /admin/keys/{id}/rotate`, body `{"grace": "24h", "expires": "30d"}`
/// (both optional): 201 with the new key, shown once. The old key works for
/// exactly the grace from now; the new key counts as the old one and has no
/// expiry unless `expires` gives one.
pub async fn rotate(call: &KeyCall<'_>, id: &str, body: &Bytes) -> Result<Response<Full<Bytes>>, AdminError> {
    let id = key_id(id)?;
    let mut grace = DEFAULT_GRACE;
    let mut expires_at = None;
    if !body.iter().all(u8::is_ascii_whitespace) {
        for (name, value) in object(body)? {
            match (name.as_str(), value) {
                ("grace", Value::String(text)) => {
                    grace = humantime::parse_duration(&text).map_err(|_| {
                        invalid("grace", format!("`{text}` is not a duration like 24h, 30m or 7d"))
                    })?;
                }
                ("grace", _) => return Err(invalid("grace", "must be a string like \"24h\"")),
                ("expires", Value::Null) => expires_at = None,
                ("expires", Value::String(text)) if text == "never" => expires_at = None,
                ("expires", Value::String(text)) => {
                    expires_at =
                        Some(meta::parse_expiry(&text, call.now).map_err(|e| meta_error("expires", e))?);
                }
                ("expires", _) => {
                    return Err(invalid("expires", "must be a string like \"30d\" or an RFC 3339 time"));
                }
                (other, _) => return Err(invalid(other, "unknown field; known: grace, expires")),
            }
        }
    }
    let issued = ops::rotate(call.store, &id, grace, expires_at, call.prefix, call.now).await?;
    audit(call, AuditAction::Rotate, &id).await;

    #[derive(Serialize)]
    struct RotatedView<'a> {
        #[serde(flatten)]
        record: RecordView<'a>,
        rotated_from: &'a KeyId,
    }
    let view = RotatedView {
        record: RecordView::new(&issued.record, Some(&issued.key), call.now),
        rotated_from: &id,
    };
    secret_json(StatusCode::CREATED, &view)
}

// === Request parsing ===

/// The body as a JSON object; an empty body is an empty object.
pub(super) fn object(body: &Bytes) -> Result<Map<String, Value>, AdminError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(AdminError::BadJson("expected an object".to_owned())),
        Err(e) => Err(AdminError::BadJson(e.to_string())),
    }
}

/// Metadata changes from the request's fields, as `MetaFlags::changes` does
/// for the CLI: `meta` (the query syntax) first, explicit fields on top.
pub(super) fn changes(fields: Map<String, Value>, now: Timestamp) -> Result<MetaChanges, AdminError> {
    let mut base = MetaChanges::default();
    let mut explicit = MetaChanges::default();
    for (name, value) in fields {
        match name.as_str() {
            "scopes" => {
                let text = match &value {
                    Value::String(s) => s.clone(),
                    Value::Array(items) => items
                        .iter()
                        .map(|item| item.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| invalid("scopes", "must be an array of strings"))?
                        .join(","),
                    _ => return Err(invalid("scopes", "must be an array of strings or \"a,b\"")),
                };
                explicit.scopes = Some(meta::parse_scopes(&text).map_err(|e| meta_error("scopes", e))?);
            }
            "rate" => explicit.rate = Some(clearable(&name, &value, |t| t.parse::<Rate>())?),
            "burst" => {
                explicit.burst = Some(clearable::<NonZeroU32>(&name, &value, meta::parse_burst)?);
            }
            "quota" => explicit.quota = Some(clearable(&name, &value, |t| t.parse::<Quota>())?),
            // `uses` resets the remaining count (a new grant); null removes credits.
            "uses" => explicit.uses = Some(clearable(&name, &value, meta::parse_uses)?),
            "refill" => {
                explicit.refill = Some(clearable(&name, &value, |t| t.parse::<meta::Refill>())?);
            }
            "expires" | "expires_at" => {
                if explicit.expires_at.is_some() {
                    return Err(invalid(&name, "give `expires` or `expires_at`, not both"));
                }
                let at = match &value {
                    Value::String(s) if s == "never" => None,
                    _ => clearable(&name, &value, |t| meta::parse_expiry(t, now))?,
                };
                explicit.expires_at = Some(at);
            }
            "label" => {
                explicit.label = Some(match value {
                    Value::Null => None,
                    Value::String(s) => (!s.is_empty()).then_some(s),
                    _ => return Err(invalid("label", "must be a string or null")),
                });
            }
            "meta" => {
                let Value::String(query) = &value else {
                    return Err(invalid("meta", "must be a string like \"scope=read&rate_limit=100\""));
                };
                base = MetaChanges::from_query(query, now).map_err(|e| meta_error("meta", e))?;
            }
            other => {
                return Err(invalid(
                    other,
                    format!("unknown field; known: client, {}", META_FIELDS.join(", ")),
                ));
            }
        }
    }
    Ok(base.merge(explicit))
}

/// A text (or number) field that `null` clears.
fn clearable<T>(
    field: &str,
    value: &Value,
    parse: impl FnOnce(&str) -> Result<T, meta::MetaError>,
) -> Result<Option<T>, AdminError> {
    let text = match value {
        Value::Null => return Ok(None),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(invalid(field, "must be a string, a number or null")),
    };
    parse(&text).map(Some).map_err(|e| meta_error(field, e))
}

fn key_id(id: &str) -> Result<KeyId, AdminError> {
    id.parse().map_err(|reason| invalid("id", reason))
}

pub(super) fn invalid(field: &str, reason: impl Into<String>) -> AdminError {
    AdminError::Invalid { field: field.to_owned(), reason: reason.into() }
}

/// A metadata parse error, reported against the field the caller used (the
/// parser's own name for `meta`, whose sub-fields it names).
fn meta_error(field: &str, error: meta::MetaError) -> AdminError {
    let field = if field == "meta" { format!("meta.{}", error.field) } else { field.to_owned() };
    AdminError::Invalid { field, reason: format!("`{}`: {}", error.value, error.why) }
}

// === Responses ===

/// Logs a key operation and, when the store is Redis, appends it to the
/// audit stream (`keygate keys audit` shows it) as `admin:<token name>`.
/// A failed append is logged; the operation itself has already happened.
async fn audit(call: &KeyCall<'_>, action: AuditAction, id: &KeyId) {
    tracing::info!(target: "keygate::audit", actor = call.actor, via = "admin-api", op = %action, %id, "key operation");
    let Some(redis) = call.store.redis() else { return };
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

pub(super) fn json(status: StatusCode, value: &impl Serialize) -> Result<Response<Full<Bytes>>, AdminError> {
    let body =
        serde_json::to_string(value).map_err(|e| AdminError::Internal(format!("encoding JSON: {e}")))?;
    Ok(crate::error::json_response(status, body))
}

/// A response holding a clear key: no cache may keep it.
fn secret_json(status: StatusCode, value: &impl Serialize) -> Result<Response<Full<Bytes>>, AdminError> {
    let mut response = json(status, value)?;
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn parse(json: &str) -> Result<MetaChanges, AdminError> {
        changes(object(&Bytes::from(json.to_owned()))?, now())
    }

    fn field(result: Result<MetaChanges, AdminError>) -> String {
        match result {
            Err(AdminError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn fields_mirror_the_cli_flags() {
        let c = parse(r#"{"scopes":["read","orders:write"],"rate":"10/s","burst":5,"quota":"100/day","expires":"1h","label":"ci"}"#)
            .unwrap();
        assert_eq!(c.scopes.unwrap(), ["read", "orders:write"]);
        assert_eq!(c.rate.unwrap().unwrap().to_string(), "10/s");
        assert_eq!(c.burst.unwrap().unwrap().get(), 5);
        assert_eq!(c.quota.unwrap().unwrap().to_string(), "100/day");
        assert_eq!(c.expires_at.unwrap().unwrap(), "2026-11-24T13:00:00Z".parse::<Timestamp>().unwrap());
        assert_eq!(c.label.unwrap().as_deref(), Some("ci"));
    }

    #[test]
    fn null_clears_and_explicit_fields_win_over_meta() {
        let c = parse(r#"{"meta":"rate_limit=5&label=x","rate":null,"expires":"never"}"#).unwrap();
        assert_eq!(c.rate, Some(None));
        assert_eq!(c.label, Some(Some("x".to_owned())));
        assert_eq!(c.expires_at, Some(None));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field(parse(r#"{"rate":"fast"}"#)), "rate");
        assert_eq!(field(parse(r#"{"burst":0}"#)), "burst");
        assert_eq!(field(parse(r#"{"scopes":[1]}"#)), "scopes");
        assert_eq!(field(parse(r#"{"colour":"blue"}"#)), "colour");
        assert_eq!(field(parse(r#"{"meta":"quota=lots"}"#)), "meta.quota");
        assert!(matches!(parse("[1]"), Err(AdminError::BadJson(_))));
        assert!(matches!(parse("{"), Err(AdminError::BadJson(_))));
    }
}
