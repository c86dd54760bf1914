//! Refresh tokens' source keys: the key a refresh token's family was
//! granted to, read from the store at every refresh and checked.
//!
//! Never from a cache: a refresh is rare (once per access token lifetime),
//! and revoking or rotating a key must end its refresh tokens at once, on
//! every gateway, including one whose cache has not heard of it yet. The
//! file store is caught up first if another process wrote since it last
//! read its folder (a `keygate keys revoke` a moment ago).

use std::sync::Arc;

use jiff::Timestamp;

use super::{Caller, check_usable};
use crate::error::GatewayError;
use crate::refresh::RefreshRecord;
use crate::store::{Found, StoreVersion};

impl super::Verifier {
    /// The caller of `record`'s key, or why the key no longer stands behind
    /// its refresh tokens (the outer error: the store could not be asked).
    pub async fn refresh_key(
        &self,
        record: &RefreshRecord,
    ) -> Result<Result<Arc<Caller>, &'static str>, GatewayError> {
        let unavailable = |e: crate::store::StoreError| GatewayError::StoreUnavailable(e.to_string());
        if self.store.version() == StoreVersion::Behind {
            self.store.catch_up().await.map_err(unavailable)?;
        }
        let Some(key) = self.store.get(&record.key_id).await.map_err(unavailable)? else {
            return Ok(Err("key gone"));
        };
        if key.secret_hash != record.key_hash {
            return Ok(Err("key replaced"));
        }
        // A rotated key keeps working for its grace period, but its
        // refresh tokens end with the rotation: they would otherwise
        // outlive it by a whole `refresh_ttl`.
        if key.meta.rotated_at.is_some() {
            return Ok(Err("key rotated"));
        }
        let client = self.store.get_client(key.client()).await.map_err(unavailable)?;
        let caller = Arc::new(Caller::new(Found { key, client }));
        Ok(check_usable(&caller, Timestamp::now).map(|()| caller).map_err(|r| r.reason()))
    }
}
