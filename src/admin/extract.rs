//! The admin handlers' extractors: axum's, with their rejections turned
//! into [`AdminError`] (see `error.rs`), and the call context.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequest, Request};
use http::request::Parts;
use jiff::Timestamp;
use serde::de::DeserializeOwned;

use super::Admin;
use super::error::AdminError;
use crate::limit::credits::Credits;
use crate::store::KeyStore;

/// A JSON body of type `T` (`Content-Type: application/json` required).
/// As `Option<Json<T>>`, no body at all (no content type) is `None`.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = AdminError;

    async fn from_request(request: Request, state: &S) -> Result<Self, AdminError> {
        let axum::Json(value) = <axum::Json<T> as FromRequest<S>>::from_request(request, state).await?;
        Ok(Self(value))
    }
}

impl<S: Send + Sync, T: DeserializeOwned> OptionalFromRequest<S> for Json<T> {
    type Rejection = AdminError;

    async fn from_request(request: Request, state: &S) -> Result<Option<Self>, AdminError> {
        let value = <axum::Json<T> as OptionalFromRequest<S>>::from_request(request, state).await?;
        Ok(value.map(|axum::Json(value)| Self(value)))
    }
}

/// A query string of type `T`.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AdminError> {
        let axum::extract::Query(value) = axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// The `{id}` path segment, percent-decoded.
pub struct Id(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AdminError> {
        let axum::extract::Path(id) = axum::extract::Path::<String>::from_request_parts(parts, state).await?;
        Ok(Self(id))
    }
}

/// Who acts, set by the token check for the handlers after it.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// What a key or client call needs from the running gateway.
pub struct Call {
    admin: Arc<Admin>,
    /// Who acts, for the audit log: the admin token's `token_name`.
    pub actor: String,
    pub now: Timestamp,
}

impl Call {
    pub fn store(&self) -> &dyn KeyStore {
        &*self.admin.gateway.store
    }

    /// The key prefix the verifier checks (the one the gateway started with).
    pub fn prefix(&self) -> &str {
        &self.admin.prefix
    }

    /// The running gateway: its verifier, limits and usage recorder
    /// (`POST /admin/verify` checks keys as the proxy does).
    pub fn gateway(&self) -> &crate::gateway::Gateway {
        &self.admin.gateway
    }

    /// Where the keys' remaining credits are read (the gateway's authority).
    pub fn credits(&self) -> &Credits {
        self.admin.gateway.limits.credits()
    }
}

impl FromRequestParts<Arc<Admin>> for Call {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, admin: &Arc<Admin>) -> Result<Self, AdminError> {
        // The token check runs before every `/admin/` handler; a handler
        // reached without it is a routing mistake, refused rather than served.
        let Actor(actor) =
            parts.extensions.get::<Actor>().cloned().ok_or_else(|| {
                AdminError::Internal("an admin handler ran without the token check".to_owned())
            })?;
        Ok(Self { admin: Arc::clone(admin), actor, now: Timestamp::now() })
    }
}
