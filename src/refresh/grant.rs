//! The refresh grant's rules (RFC 6749 §6, RFC 9700 §4.14.2): when a
//! refresh token is honoured, what its successor may carry, and what a
//! replayed one costs its family.
//!
//! In order, for `grant_type=refresh_token`:
//! 1. the token's shape (no store is asked about anything else), then its
//!    record: unknown or expired is `invalid_grant`; used already is theft,
//!    and revokes the family before `invalid_grant`; these failures spend
//!    the source's failed-authentication budget like a bad key;
//! 2. its key, read from the store now (`auth/refresh.rs`): gone, replaced,
//!    rotated, revoked, expired or of a revoked client ends the family;
//! 3. the scope: the token's, less what the key no longer holds, narrowed
//!    further by `scope=` if asked (never widened: `invalid_scope`, and the
//!    token stays usable);
//! 4. the key's rate limit, as for `client_credentials`;
//! 5. the rotation, atomic in the store: of two concurrent uses one wins,
//!    and the other is a replay (the family is revoked).
//!
//! Steps 1 to 4 change nothing when they refuse, bar the revocations.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{RefreshRecord, RefreshState, RefreshStore, RefreshToken, Rotation};
use crate::auth::Caller;
use crate::auth::jwt::narrow_scopes;
use crate::error::{GatewayError, OAuthError, Refusal};
use crate::gateway::Gateway;
use crate::store::{KeyRecord, StoreError};

const INVALID_GRANT: GatewayError = GatewayError::TokenRequest(OAuthError::InvalidGrant);

/// A refresh that went through: the key's caller, the scopes of the new
/// pair, and the successor token.
#[derive(Debug)]
pub struct Refreshed {
    pub caller: Arc<Caller>,
    pub scopes: Vec<String>,
    pub token: RefreshToken,
}

fn unavailable(e: StoreError) -> GatewayError {
    match e {
        StoreError::Corrupt { .. } => GatewayError::CorruptRecord(e.to_string()),
        other => GatewayError::StoreUnavailable(other.to_string()),
    }
}

fn random_failed() -> GatewayError {
    GatewayError::Internal("the OS random source is unavailable".to_owned())
}

/// Starts a family: the first refresh token of a `client_credentials`
/// grant of `key` with `scopes`, valid for `ttl` from `now`.
pub async fn start_family(
    store: &dyn RefreshStore,
    key: &KeyRecord,
    scopes: &[String],
    ttl: Duration,
    now: u64,
) -> Result<RefreshToken, GatewayError> {
    let token = RefreshToken::generate(key.client()).map_err(|_| random_failed())?;
    let record = RefreshRecord {
        key_id: key.id.clone(),
        key_hash: key.secret_hash,
        scope: scopes.join(" "),
        family: super::new_family().map_err(|_| random_failed())?,
        state: RefreshState::Active,
        expires_at: now.saturating_add(ttl.as_secs()),
    };
    store.insert(&token.hash(), &record).await.map_err(unavailable)?;
    Ok(token)
}

/// Honours `presented` (steps 1 to 5 of the module doc) for a request
/// from `source`, asking for `requested` scopes (`None`: the token's).
pub async fn refresh(
    gateway: &Gateway,
    store: &dyn RefreshStore,
    presented: &str,
    requested: Option<&str>,
    source: IpAddr,
    ttl: Duration,
    now: u64,
) -> Result<Refreshed, Refusal> {
    // 1 and 2, within the source's failure budget (nothing cached to
    // vouch for a refresh token: every one is checked).
    let is_refused = |e: &GatewayError| matches!(e, GatewayError::TokenRequest(OAuthError::InvalidGrant));
    let checking = check(gateway, store, presented, now);
    let (token, record, caller) =
        gateway.verifier.within_failure_budget(source, || false, is_refused, checking).await?;

    // 3. Scope: never wider than the key holds now, nor than the token.
    let Some(key) = caller.key() else { return Err(INVALID_GRANT.into()) };
    let held: Vec<String> = record
        .scope
        .split(' ')
        .filter(|s| !s.is_empty() && narrow_scopes(caller.scopes(), Some(s)).is_ok())
        .map(str::to_owned)
        .collect();
    let scopes =
        narrow_scopes(&held, requested).map_err(|_| GatewayError::TokenRequest(OAuthError::InvalidScope))?;

    // 4. The key's rate limit, before anything is spent.
    let limits = &gateway.live.load().config.limits;
    gateway.limits.admit(&[crate::limit::Subject::key(key)], std::num::NonZeroU32::MIN, limits).await?;

    // 5. Rotation.
    let successor = RefreshToken::generate(key.client()).map_err(|_| random_failed())?;
    let next = RefreshRecord {
        scope: scopes.join(" "),
        state: RefreshState::Active,
        expires_at: now.saturating_add(ttl.as_secs()),
        ..record.clone()
    };
    let client = token.client();
    match store.rotate(client, &token.hash(), &successor.hash(), &next, now).await.map_err(unavailable)? {
        Rotation::Rotated => Ok(Refreshed { caller, scopes, token: successor }),
        Rotation::Reused => {
            replayed(&record);
            Err(INVALID_GRANT.into())
        }
        Rotation::Gone => Err(INVALID_GRANT.into()),
    }
}

/// Steps 1 and 2: the token's record, and its key's caller.
async fn check(
    gateway: &Gateway,
    store: &dyn RefreshStore,
    presented: &str,
    now: u64,
) -> Result<(RefreshToken, RefreshRecord, Arc<Caller>), GatewayError> {
    let token = RefreshToken::parse(presented).ok_or(INVALID_GRANT)?;
    let record =
        store.get(token.client(), &token.hash(), now).await.map_err(unavailable)?.ok_or(INVALID_GRANT)?;
    match record.state {
        RefreshState::Active => {}
        RefreshState::Used => {
            store.revoke_family(token.client(), &record.family).await.map_err(unavailable)?;
            replayed(&record);
            return Err(INVALID_GRANT);
        }
        RefreshState::Revoked => return Err(INVALID_GRANT),
    }
    match gateway.verifier.refresh_key(&record).await? {
        Ok(caller) => Ok((token, record, caller)),
        Err(why) => {
            store.revoke_family(token.client(), &record.family).await.map_err(unavailable)?;
            tracing::info!(key = %record.key_id, family = %record.family, why, "refresh family ended with its key");
            Err(INVALID_GRANT)
        }
    }
}

/// The log line of a replay: the family and key, never a token.
fn replayed(record: &RefreshRecord) {
    tracing::warn!(
        key = %record.key_id,
        family = %record.family,
        "a used refresh token was presented again: its family is revoked"
    );
}
