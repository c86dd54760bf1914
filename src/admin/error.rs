//! The admin API's answers when a call fails: one exhaustive table.
//!
//! Same body shape as the gateway's own answers, `{"error": CODE, "message":
//! TEXT}`, plus `field` when one input is at fault and `problems` for a
//! refused config. As in [`crate::error`], 5xx causes are logged once and
//! never sent; no message carries a secret (the token is never echoed).
//!
//! axum's own rejections (a body that is not JSON or lacks the JSON content
//! type, a field of the wrong type, an unknown or missing field, a bad query
//! string or path) come here too, through the `From` impls below, so no
//! caller ever sees axum's plain-text defaults.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::response::IntoResponse;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::config::ConfigError;
use crate::ops::OpsError;
use crate::store::StoreError;

/// Why an admin call was not served.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no admin token presented")]
    MissingToken,
    #[error("wrong admin token")]
    WrongToken,
    /// A reload removed `[admin]`; the listener stays up (it needs a restart
    /// to close) but refuses every call that needs the token.
    #[error("the admin API is off in the running config")]
    Disabled,
    #[error("no admin route")]
    NoRoute,
    /// The path exists with other methods; `allow` lists them.
    #[error("method not allowed")]
    MethodNotAllowed { allow: String },
    #[error("request body over {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    /// A body sent without `Content-Type: application/json`.
    #[error("request body is not declared as JSON")]
    NotJson,
    /// One input is wrong; `field` names it as the request spelled it.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0}")]
    KeyNotFound(String),
    #[error("{0}")]
    KeyNotUsable(String),
    /// `POST /admin/clients` for a client that has a record.
    #[error("{0}")]
    ClientExists(String),
    /// A new key (issue, rotate) for a revoked client.
    #[error("{0}")]
    ClientRevoked(String),
    #[error("config refused")]
    InvalidConfig(ConfigError),
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<OpsError> for AdminError {
    fn from(error: OpsError) -> Self {
        match error {
            OpsError::NotFound(_) | OpsError::UnknownKey | OpsError::ClientNotFound(_) => {
                Self::KeyNotFound(error.to_string())
            }
            OpsError::ClientExists(_) => Self::ClientExists(error.to_string()),
            OpsError::ClientRevoked(_) => Self::ClientRevoked(error.to_string()),
            OpsError::NotUsable { .. } => Self::KeyNotUsable(error.to_string()),
            OpsError::Invalid { field, reason } => Self::Invalid { field, reason },
            OpsError::Store(store) => store.into(),
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(cause) => Self::StoreUnavailable(cause),
            StoreError::NotFound(id) => Self::KeyNotFound(format!("no key with id {id}")),
            StoreError::ClientNotFound(_) => Self::KeyNotFound(error.to_string()),
            StoreError::ClientExists(_) => Self::ClientExists(error.to_string()),
            StoreError::Corrupt { .. } | StoreError::AlreadyExists(_) => Self::Internal(error.to_string()),
        }
    }
}

impl AdminError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::MissingToken => (StatusCode::UNAUTHORIZED, "missing_token"),
            Self::WrongToken => (StatusCode::UNAUTHORIZED, "invalid_token"),
            Self::Disabled => (StatusCode::UNAUTHORIZED, "admin_disabled"),
            Self::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            Self::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Self::BadJson(_) => (StatusCode::BAD_REQUEST, "bad_json"),
            Self::NotJson => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Self::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid_field"),
            Self::KeyNotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::KeyNotUsable(_) => (StatusCode::CONFLICT, "key_not_usable"),
            Self::ClientExists(_) => (StatusCode::CONFLICT, "client_exists"),
            Self::ClientRevoked(_) => (StatusCode::CONFLICT, "client_revoked"),
            Self::InvalidConfig(_) => (StatusCode::BAD_REQUEST, "invalid_config"),
            Self::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            Self::StoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            Self::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The message sent: client errors say what is wrong; server errors say
    /// only what kind of failure it was.
    fn message(&self) -> String {
        match self {
            Self::MissingToken => "send the admin token as `Authorization: Bearer <token>`".to_owned(),
            Self::WrongToken => "the admin token is not valid".to_owned(),
            Self::Disabled => "the admin API is off in the running config".to_owned(),
            Self::NoRoute => "no such admin endpoint; see docs/admin-openapi.json".to_owned(),
            Self::MethodNotAllowed { allow } => format!("this endpoint answers {allow}"),
            Self::BodyTooLarge { limit } => format!("the request body exceeds {limit} bytes"),
            Self::BadJson(why) => format!("the request body is not a valid JSON object: {why}"),
            Self::NotJson => "send the body as JSON, with `Content-Type: application/json`".to_owned(),
            Self::Invalid { field, reason } => format!("invalid {field}: {reason}"),
            Self::KeyNotFound(message)
            | Self::KeyNotUsable(message)
            | Self::ClientExists(message)
            | Self::ClientRevoked(message) => message.clone(),
            Self::InvalidConfig(_) => "the config file was refused; the running config stays".to_owned(),
            Self::NotReady(_) => "the key store is unreachable".to_owned(),
            Self::StoreUnavailable(_) => "the key store is unavailable; retry later".to_owned(),
            Self::NotImplemented(what) => (*what).to_owned(),
            Self::Internal(_) => "internal error".to_owned(),
        }
    }

    /// The status this error answers (for the OpenAPI document's tests too).
    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    pub fn into_http(self) -> axum::response::Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), cause = %self, "admin call failed");
        } else {
            tracing::debug!(status = status.as_u16(), reason = %self, "admin call refused");
        }
        let mut body = Map::new();
        body.insert("error".into(), code.into());
        body.insert("message".into(), self.message().into());
        // The call's ID, as on the public listener's answers (set around
        // every call by `admin::request_id`).
        if let Some(id) = crate::request_id::current() {
            body.insert("request_id".into(), id.into());
        }
        match &self {
            Self::Invalid { field, .. } => {
                body.insert("field".into(), field.clone().into());
            }
            Self::InvalidConfig(error) => {
                body.insert("problems".into(), problems(error));
            }
            _ => {}
        }
        let mut response =
            crate::error::json_response(status, Value::Object(body).to_string()).map(axum::body::Body::new);
        let headers = response.headers_mut();
        match &self {
            Self::MissingToken | Self::WrongToken | Self::Disabled => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate-admin\""),
                );
            }
            Self::MethodNotAllowed { allow } => {
                if let Ok(value) = HeaderValue::from_str(allow) {
                    headers.insert(header::ALLOW, value);
                }
            }
            _ => {}
        }
        response
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> axum::response::Response {
        self.into_http()
    }
}

// === axum's rejections ===

impl From<JsonRejection> for AdminError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => Self::NotJson,
            JsonRejection::JsonDataError(error) => {
                match find::<serde_path_to_error::Error<serde_json::Error>>(&error) {
                    Some(error) => data_error(&error.path().to_string(), &error.inner().to_string()),
                    None => Self::BadJson(error.body_text()),
                }
            }
            JsonRejection::JsonSyntaxError(error) => match find::<serde_json::Error>(&error) {
                Some(inner) => Self::BadJson(inner.to_string()),
                None => Self::BadJson(error.body_text()),
            },
            JsonRejection::BytesRejection(error) => {
                if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    Self::BodyTooLarge { limit: super::MAX_BODY }
                } else {
                    Self::BadJson(format!("reading the body failed: {}", error.body_text()))
                }
            }
            // `JsonRejection` is non-exhaustive; a variant added by a later
            // axum is still a client's body we could not read.
            other => Self::BadJson(other.body_text()),
        }
    }
}

impl From<QueryRejection> for AdminError {
    fn from(rejection: QueryRejection) -> Self {
        match find::<serde_path_to_error::Error<serde::de::value::Error>>(&rejection) {
            Some(error) => data_error(&error.path().to_string(), &error.inner().to_string()),
            None => Self::Invalid { field: "query".to_owned(), reason: rejection.body_text() },
        }
    }
}

impl From<PathRejection> for AdminError {
    fn from(rejection: PathRejection) -> Self {
        Self::Invalid { field: "id".to_owned(), reason: rejection.body_text() }
    }
}

/// A value that did not fit its type: the field is the error's path, or for
/// a missing or unknown field (reported at the object itself) the name
/// serde quotes in its message.
fn data_error(path: &str, message: &str) -> AdminError {
    let quoted = || message.split('`').nth(1).map(str::to_owned);
    let field = match path {
        "." | "" if message.starts_with("missing field") || message.starts_with("unknown field") => quoted(),
        "." | "" => None,
        // `scopes[0]` is a fault in `scopes`.
        path => Some(path.split(['[', '.']).next().unwrap_or(path).to_owned()),
    };
    // serde's own wording, without its list of expected fields for an unknown one.
    let reason = match message.split_once(", expected") {
        Some((head, _)) if message.starts_with("unknown field") => head.to_owned(),
        _ => message.to_owned(),
    };
    match field {
        Some(field) => AdminError::Invalid { field, reason },
        None => AdminError::BadJson(reason),
    }
}

/// The first error of type `T` in `error`'s source chain.
fn find<'a, T: std::error::Error + 'static>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// The body of every admin error, as documented in the OpenAPI document.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable code, e.g. `invalid_field`, `not_found`, `invalid_token`.
    pub error: String,
    /// What went wrong, for a person; never a secret.
    pub message: String,
    /// The call's ID, also in the `x-request-id` answer header (or the
    /// configured `[server] request_id_header`): the client's when it sent
    /// a sane one, else one made for the call.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub request_id: Option<String>,
    /// The input at fault, as the request spelled it (`invalid_field` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub field: Option<String>,
    /// A refused config's problems (`invalid_config` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub problems: Option<Vec<Problem>>,
}

/// One problem of a refused config: `field` and `line` for a validation
/// problem, `message` alone for a read or syntax error.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
}

/// A refused config as a list: `{field, line, message}` for each validation
/// problem, or one `{message}` for a read or syntax error.
fn problems(error: &ConfigError) -> Value {
    match error {
        ConfigError::Invalid { problems, .. } => problems
            .iter()
            .map(|p| json!({ "field": p.field, "line": p.line, "message": p.message }))
            .collect(),
        ConfigError::Read { .. } | ConfigError::Syntax { .. } => json!([{ "message": error.to_string() }]),
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::key::KeyId;

    async fn answer(error: AdminError) -> (StatusCode, http::HeaderMap, Value) {
        let (parts, body) = error.into_http().into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn ops_errors_map_to_statuses() {
        let id: KeyId = "acme.abc".parse().unwrap();
        for (error, status, code) in [
            (OpsError::NotFound(id.clone()), 404, "not_found"),
            (OpsError::UnknownKey, 404, "not_found"),
            (OpsError::NotUsable { id: id.clone(), why: "revoked" }, 409, "key_not_usable"),
            (OpsError::Invalid { field: "rate".into(), reason: "bad".into() }, 400, "invalid_field"),
            (OpsError::ClientNotFound("acme".into()), 404, "not_found"),
            (OpsError::ClientExists("acme".into()), 409, "client_exists"),
            (OpsError::ClientRevoked("acme".into()), 409, "client_revoked"),
            (
                OpsError::Store(StoreError::Unavailable("redis at 10.0.0.9 down".into())),
                503,
                "store_unavailable",
            ),
            (OpsError::Store(StoreError::Corrupt { what: "x".into(), why: "y".into() }), 500, "internal"),
        ] {
            let (got, _, body) = answer(error.into()).await;
            assert_eq!((got.as_u16(), body["error"].as_str().unwrap()), (status, code));
            assert!(!body.to_string().contains("10.0.0.9"), "no internals: {body}");
        }
    }

    #[tokio::test]
    async fn invalid_fields_are_named_and_auth_failures_challenge() {
        let (_, _, body) = answer(AdminError::Invalid { field: "quota".into(), reason: "no".into() }).await;
        assert_eq!(body["field"], "quota");
        let (status, headers, _) = answer(AdminError::WrongToken).await;
        assert_eq!(status, 401);
        assert!(headers.contains_key(header::WWW_AUTHENTICATE));
        let (status, headers, _) = answer(AdminError::MethodNotAllowed { allow: "GET, POST".into() }).await;
        assert_eq!((status.as_u16(), &headers[header::ALLOW]), (405, &HeaderValue::from_static("GET, POST")));
    }
}
