//! Access tokens as a route credential: a JWT (checked by `jwt.rs`)
//! becomes the [`Caller`] of the key it was issued for, with the token's
//! scopes; a JWT of an external issuer (checked by `issuer.rs`) becomes
//! the caller of the client it names, by the client's record (see
//! [`super::Verifier::verify_jwt`], which tells the two apart).
//!
//! The key is found by the ID in the token's `kid` claim, once per
//! `cache_ttl` (the `token_keys` cache), not per request; the store's
//! invalidations drop it like a cached key, so a revoked key's tokens are
//! refused on every gateway as soon as its keys are, not only at `exp`.
//! Refused tokens count against the source's failed-authentication budget
//! like refused keys, and a source over it gets 429 before any signature
//! check (unless the token is one the cache already verified).

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use jiff::Timestamp;

use super::issuer::{IssuerError, Issuers};
use super::jwt::{AccessClaims, TokenError, TokenVerifier};
use super::{Caller, check_usable};
use crate::config::RouteConfig;
use crate::error::GatewayError;
use crate::key::KeyId;
use crate::store::Found;

impl super::Verifier {
    /// Verifies an access token from `source`: the source's failure
    /// budget, the token (cache, header, signature, claims), then its key
    /// (cache, then store) and the key's and client's state.
    pub async fn verify_token(
        &self,
        tokens: &TokenVerifier,
        presented: &str,
        source: IpAddr,
    ) -> Result<Arc<Caller>, GatewayError> {
        // As for keys: a token the cache knows is not made up, so a
        // neighbour's flood behind the same address does not lock it out.
        let rejected = |error: &GatewayError| matches!(error, GatewayError::TokenRejected(_));
        let verifying = self.verify_token_unbudgeted(tokens, presented);
        self.within_failure_budget(source, || tokens.is_cached(presented), rejected, verifying).await
    }

    /// Verifies a bearer JWT on `route` from `source`: keygate's own
    /// access token (`tokens`) or an external issuer's (`issuers`), those
    /// the route trusts (`issuers = [...]`). Which one is told by the
    /// token: keygate's own when its cache knows it or its `iss` is
    /// `[tokens] issuer`, else an external issuer's by its `iss`. Either
    /// way under the source's failed-authentication budget.
    pub async fn verify_jwt(
        &self,
        tokens: Option<&TokenVerifier>,
        issuers: Option<&Issuers>,
        route: &RouteConfig,
        presented: &str,
        source: IpAddr,
    ) -> Result<Arc<Caller>, GatewayError> {
        let own = tokens.filter(|tokens| route.trusts_issuer(tokens.issuer()));
        let Some(issuers) = issuers else {
            return match own {
                Some(tokens) => self.verify_token(tokens, presented, source).await,
                // Tokens are off, or keygate's own are not trusted here:
                // refused (and counted) like any token that fails.
                None => {
                    let refused =
                        async { Err(GatewayError::TokenRejected("issuer not trusted on this route")) };
                    let rejected = |error: &GatewayError| matches!(error, GatewayError::TokenRejected(_));
                    self.within_failure_budget(source, || false, rejected, refused).await
                }
            };
        };
        let is_own = |token: &str| {
            own.is_some_and(|tokens| {
                tokens.is_cached(token)
                    || super::issuer::peek_issuer(token).as_deref() == Some(tokens.issuer())
            })
        };
        if let Some(tokens) = own
            && is_own(presented)
        {
            return self.verify_token(tokens, presented, source).await;
        }
        let rejected = |error: &GatewayError| matches!(error, GatewayError::TokenRejected(_));
        let verifying = self.verify_issued(issuers, route, presented);
        self.within_failure_budget(source, || issuers.is_cached(presented), rejected, verifying).await
    }

    /// An external token (see `issuer.rs`), then its client's record
    /// (through the client cache): it must exist and be active.
    async fn verify_issued(
        &self,
        issuers: &Issuers,
        route: &RouteConfig,
        presented: &str,
    ) -> Result<Arc<Caller>, GatewayError> {
        let now = Timestamp::now();
        let now_secs = u64::try_from(now.as_second()).unwrap_or(0);
        let verified = issuers.verify(presented, |iss| route.trusts_issuer(iss), now_secs).await;
        let claims = verified.map_err(|e| match e {
            // Not the token's fault: its issuer's keys never loaded.
            IssuerError::KeysUnavailable => {
                let issuer = super::issuer::peek_issuer(presented).unwrap_or_default();
                let retry_after = issuers
                    .issuer(&issuer)
                    .map_or(std::time::Duration::from_secs(30), |known| known.config().refetch_interval);
                GatewayError::JwksUnavailable { issuer, retry_after }
            }
            e => GatewayError::TokenRejected(e.reason()),
        })?;
        let Some(client) = self.client_caller(&claims.client, std::time::Instant::now()).await? else {
            return Err(GatewayError::TokenRejected("no such client"));
        };
        check_usable(&client, || now).map_err(|r| GatewayError::TokenRejected(r.reason()))?;
        let Some(record) = client.client.clone() else {
            // A client caller always has its record (`Caller::for_client`).
            return Err(GatewayError::TokenRejected("no such client"));
        };
        Ok(Arc::new(Caller::for_issued(record, &claims)))
    }

    async fn verify_token_unbudgeted(
        &self,
        tokens: &TokenVerifier,
        presented: &str,
    ) -> Result<Arc<Caller>, GatewayError> {
        let now = tokens.clock().timestamp();
        let now_secs = u64::try_from(now.as_second()).unwrap_or(0);
        let claims = tokens.verify(presented, now_secs).map_err(|e| match e {
            // Not the token's fault, and not counted against its source.
            TokenError::KeysNotLoaded => GatewayError::StoreUnavailable(e.reason().to_owned()),
            e => GatewayError::TokenRejected(e.reason()),
        })?;
        let caller = self.token_key(&claims).await?;
        check_usable(&caller, || now).map_err(|r| GatewayError::TokenRejected(r.reason()))?;
        Ok(narrowed(caller, &claims))
    }

    /// The caller of the token's source key, cached by key ID.
    async fn token_key(&self, claims: &AccessClaims) -> Result<Arc<Caller>, GatewayError> {
        if let Some(caller) = self.token_keys.get(&claims.kid) {
            return Ok(caller);
        }
        let id = KeyId::from_str(&claims.kid).map_err(|_| GatewayError::TokenRejected("bad key id"))?;
        // The token's subject is its key's client: checked, since the
        // limits and usage of that client are what it spends.
        if id.client() != claims.sub {
            return Err(GatewayError::TokenRejected("subject is not the key's client"));
        }
        let unavailable = |e: crate::store::StoreError| GatewayError::StoreUnavailable(e.to_string());
        let changes = self.changes.load(std::sync::atomic::Ordering::Acquire);
        let Some(key) = self.store.get(&id).await.map_err(unavailable)? else {
            return Err(GatewayError::TokenRejected("key gone"));
        };
        let client = self.store.get_client(key.client()).await.map_err(unavailable)?;
        let caller = Arc::new(Caller::new(Found { key, client }));
        // As for keys: a lookup that overlapped a change may have read the
        // record before it, so it serves this request but is not cached.
        if self.changes.load(std::sync::atomic::Ordering::Acquire) == changes {
            self.token_keys.insert(claims.kid.clone(), Arc::clone(&caller));
        }
        Ok(caller)
    }

    /// Drops the cached token keys `matches` picks.
    pub(super) fn forget_token_key(&self, matches: impl Fn(&Caller) -> bool + Send + Sync + 'static) {
        // Fails only without `support_invalidation_closures`, which `new` sets.
        if self.token_keys.invalidate_entries_if(move |_, caller| matches(caller)).is_err() {
            self.token_keys.invalidate_all();
        }
    }
}

/// The key's caller with the token's scopes, which are the key's or fewer
/// (the token endpoint narrowed them); the key's own caller when equal, so
/// the common case (a token with the key's scopes, reused) allocates
/// nothing: this runs on every request that bears a token.
fn narrowed(caller: Arc<Caller>, claims: &AccessClaims) -> Arc<Caller> {
    if caller.scopes().iter().map(String::as_str).eq(claims.scopes()) {
        return caller;
    }
    // Never wider than the key now, whatever the token says: a scope
    // removed from the key since the token was issued is gone.
    let scopes: Vec<String> =
        claims.scopes().filter(|s| caller.scopes().iter().any(|k| k == s)).map(str::to_owned).collect();
    let Some(key) = caller.key() else { return caller };
    let mut key = key.clone();
    key.meta.scopes = scopes;
    let client = caller.client.as_deref().cloned();
    Arc::new(Caller::new(Found { key, client }))
}
