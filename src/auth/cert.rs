//! Client certificates as credentials: verifying a caller by the
//! certificate the TLS listener verified.
//!
//! The certificate names a client ([`crate::client_cert`]); that client's
//! record, cached by client ID beside the key cache, must exist and be
//! active. The cache follows the key cache's rules (see the parent module):
//! `cache_ttl`, "no record" for `negative_ttl`, the stale window while the
//! store is down, [`Invalidation::Client`](crate::store::Invalidation)
//! dropping an entry at once, and an entry of another epoch or store
//! version re-checked in front of the request.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use governor::clock::{Clock, DefaultClock};
use jiff::Timestamp;

use super::{Caller, Rejection, Verifier, check_usable};
use crate::client_cert::{self, IdFrom};
use crate::error::GatewayError;
use crate::store::StoreError;

/// A client record as the certificate cache holds it.
#[derive(Debug)]
pub(super) struct CachedClient {
    /// `None`: the store has no record of this client (kept `negative_ttl`).
    caller: Option<Arc<Caller>>,
    fetched_at: Instant,
    /// As for keys: another epoch or store version is re-checked first.
    epoch: u64,
    store_version: Option<u64>,
}

impl Verifier {
    /// Verifies a caller by the client certificate the TLS listener
    /// verified: the client it names (`id_from`) must have a record, and
    /// the record must be active. Every refusal answers as an unknown key
    /// does (401, one body); the reason is logged, never the certificate.
    pub async fn verify_certificate(
        &self,
        cert: &rustls::pki_types::CertificateDer<'_>,
        id_from: IdFrom,
        arrived: Instant,
    ) -> Result<Arc<Caller>, GatewayError> {
        let client = client_cert::client_id(cert, id_from).map_err(|error| {
            tracing::warn!(%error, %id_from, "client certificate refused: it names no client");
            crate::metrics::auth_failure();
            GatewayError::KeyRejected("certificate names no client")
        })?;
        let caller = self.client_caller(&client, arrived).await?;
        let refused = match &caller {
            None => Some(Rejection::Unknown),
            Some(caller) => check_usable(caller, Timestamp::now).err(),
        };
        match (caller, refused) {
            (Some(caller), None) => Ok(caller),
            (_, Some(rejection)) => {
                tracing::info!(client, reason = rejection.reason(), "client certificate refused");
                crate::metrics::auth_failure();
                Err(rejection.into())
            }
            // `refused` is `Some` whenever `caller` is `None` (just above).
            (None, None) => Err(Rejection::Unknown.into()),
        }
    }

    /// A client's record as a certificate caller, through the client cache
    /// (`None`: the store has no record of it).
    pub(super) async fn client_caller(
        &self,
        id: &str,
        arrived: Instant,
    ) -> Result<Option<Arc<Caller>>, GatewayError> {
        let store_version = self.store_version().await?;
        let epoch = self.epoch.load(Ordering::Acquire);
        let cached = self.clients.get(id);
        if let Some(cached) = &cached {
            let ttl = if cached.caller.is_some() { self.cache_ttl } else { self.negative_ttl };
            if cached.epoch == epoch
                && cached.store_version == store_version
                && arrived.saturating_duration_since(cached.fetched_at) < ttl
            {
                crate::metrics::cache_hit();
                return Ok(cached.caller.clone());
            }
        }
        crate::metrics::cache_miss();
        // As for keys: only clients not cached at all count against the cap.
        if cached.is_none()
            && let Some(lookups) = &self.lookups
            && let Err(not_until) = lookups.check()
        {
            crate::metrics::store_lookup_throttled();
            let retry_after = not_until.wait_time_from(DefaultClock::default().now());
            return Err(GatewayError::LookupsThrottled { retry_after });
        }
        // A client invalidation while the store is asked may postdate the
        // answer: use it for this request, but do not cache it.
        let changes = self.changes.load(Ordering::Acquire);
        let asked = Instant::now();
        let answer = Box::pin(self.store.get_client(id)).await;
        crate::metrics::redis_latency(asked.elapsed());
        match answer {
            Ok(record) => {
                let caller = record.map(|record| Arc::new(Caller::for_client(record)));
                if self.changes.load(Ordering::Acquire) == changes {
                    let entry = CachedClient {
                        caller: caller.clone(),
                        fetched_at: Instant::now(),
                        epoch,
                        store_version,
                    };
                    self.clients.insert(id.to_owned(), Arc::new(entry));
                }
                Ok(caller)
            }
            Err(error @ StoreError::Corrupt { .. }) => {
                self.clients.invalidate(id);
                Err(GatewayError::CorruptRecord(error.to_string()))
            }
            Err(error) => {
                crate::metrics::redis_error();
                match cached {
                    // The store is down, but it vouched for this client recently enough.
                    Some(cached)
                        if cached.caller.is_some()
                            && cached.fetched_at.elapsed() < self.cache_ttl + self.stale_window =>
                    {
                        tracing::warn!(%error, client = id, "key store unavailable; serving cached client");
                        Ok(cached.caller.clone())
                    }
                    _ => Err(GatewayError::StoreUnavailable(error.to_string())),
                }
            }
        }
    }
}
