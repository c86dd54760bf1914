//! The admin API's request bodies and query strings, as types.
//!
//! Each body is one struct with `deny_unknown_fields`, deserialised by axum's
//! `Json` and described by utoipa from the same definition, so the document
//! says exactly what the handler accepts: every field listed, nothing else
//! (`additionalProperties: false`), no `allOf` to make it unsatisfiable.
//! Metadata fields mirror the CLI flags: absent leaves a field unchanged,
//! `null` clears it (`scopes` cannot be cleared). Their values are parsed by
//! the CLI's parsers afterwards ([`MetaInput::changes`]), so an error names
//! the field as the caller spelled it.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use jiff::Timestamp;
use serde::{Deserialize, Deserializer};
use utoipa::{IntoParams, ToSchema};

use super::error::AdminError;
use crate::meta::{self, MetaChanges, Quota, Rate};

/// A value given as a string or as a whole number (`"5"` or `5`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TextOrNumber {
    Text(String),
    Number(u64),
}

impl TextOrNumber {
    fn into_text(self) -> String {
        match self {
            Self::Text(text) => text,
            Self::Number(n) => n.to_string(),
        }
    }
}

/// Scopes as an array (`["read", "orders:write"]`) or one string (`"read,orders:write"`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Scopes {
    List(Vec<String>),
    Text(String),
}

/// Present-and-null (`Some(None)`, clear) told apart from absent (`None`, keep).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Declares a request body with the metadata fields, plus its own ones;
/// `take` names those of its own that are metadata too (the expiry).
/// One list of fields for issue, update and the client calls, so their
/// documents and their parsing cannot differ.
macro_rules! meta_body {
    (
        $(#[$attr:meta])*
        $name:ident { $($(#[$fattr:meta])* $field:ident : $ty:ty,)* }
        take: [$($take:ident),*]
    ) => {
        #[derive(Debug, Default, Deserialize, ToSchema)]
        #[serde(deny_unknown_fields)]
        $(#[$attr])*
        pub struct $name {
            $($(#[$fattr])* pub $field: $ty,)*
            /// Scopes the key grants (`read`, `write`, `read-write`, or a route's named scopes).
            #[serde(default)]
            #[schema(nullable = false)]
            pub scopes: Option<Scopes>,
            /// Requests per period, e.g. `"100/s"` or `"6000/min"`; `null` removes the limit.
            #[serde(default, deserialize_with = "nullable")]
            #[schema(value_type = Option<String>, example = "100/s")]
            pub rate: Option<Option<String>>,
            /// Requests allowed at once above the rate (needs a rate); `null` removes it.
            #[serde(default, deserialize_with = "nullable")]
            #[schema(value_type = Option<TextOrNumber>)]
            pub burst: Option<Option<TextOrNumber>>,
            /// Requests per calendar period, e.g. `"100000/month"`; `null` removes it.
            #[serde(default, deserialize_with = "nullable")]
            #[schema(value_type = Option<String>, example = "100000/month")]
            pub quota: Option<Option<String>>,
            /// A free-form label; `null` or `""` removes it.
            #[serde(default, deserialize_with = "nullable")]
            #[schema(value_type = Option<String>)]
            pub label: Option<Option<String>>,
            /// Usage credits granted (a new grant: the count restarts); `null` removes credits.
            #[serde(default, deserialize_with = "nullable")]
            #[schema(value_type = Option<TextOrNumber>)]
            pub uses: Option<Option<TextOrNumber>>,
            /// Credits given back per period, e.g. `"1000/day"`; `null` removes the refill.
            #[serde(default, deserialize_with = "nullable")]
            #[schema(value_type = Option<String>, example = "1000/day")]
            pub refill: Option<Option<String>>,
            /// The CLI's `--meta` query syntax (`"scope=read&rate_limit=100"`), applied
            /// first; explicit fields win over it.
            #[serde(default)]
            #[schema(nullable = false)]
            pub meta: Option<String>,
        }

        impl $name {
            /// The metadata fields, to parse into [`MetaChanges`].
            // The key bodies name every field (the update is then a no-op);
            // the client ones leave out the expiry.
            #[allow(clippy::needless_update)]
            pub fn meta_input(&mut self) -> MetaInput {
                MetaInput {
                    scopes: self.scopes.take(),
                    rate: self.rate.take(),
                    burst: self.burst.take(),
                    quota: self.quota.take(),
                    label: self.label.take(),
                    uses: self.uses.take(),
                    refill: self.refill.take(),
                    meta: self.meta.take(),
                    $($take: self.$take.take(),)*
                    ..MetaInput::default()
                }
            }
        }
    };
}

meta_body! {
    /// `POST /admin/keys`: the client the key is for, and its metadata.
    #[schema(example = json!({"client": "acme", "scopes": ["read"], "rate": "100/s"}))]
    IssueRequest {
        /// The client ID (`A-Z a-z 0-9 -`, 1 to 64 characters), as in the key.
        #[schema(pattern = r"^[A-Za-z0-9-]{1,64}$", example = "acme")]
        client: String,
        /// When the key stops working: a duration from now (`"30d"`), an RFC 3339
        /// time, or `"never"`/`null` for no expiry.
        #[serde(default, deserialize_with = "nullable")]
        #[schema(value_type = Option<String>, example = "30d")]
        expires: Option<Option<String>>,
        /// The same as `expires` (give one of the two).
        #[serde(default, deserialize_with = "nullable")]
        #[schema(value_type = Option<String>)]
        expires_at: Option<Option<String>>,
    }
    take: [expires, expires_at]
}

meta_body! {
    /// `PATCH /admin/keys/{id}`: metadata changes; absent fields stay as they are.
    #[schema(example = json!({"rate": "100/s", "label": null}))]
    KeyChanges {
        /// When the key stops working: a duration from now (`"30d"`), an RFC 3339
        /// time, or `"never"`/`null` for no expiry.
        #[serde(default, deserialize_with = "nullable")]
        #[schema(value_type = Option<String>, example = "30d")]
        expires: Option<Option<String>>,
        /// The same as `expires` (give one of the two).
        #[serde(default, deserialize_with = "nullable")]
        #[schema(value_type = Option<String>)]
        expires_at: Option<Option<String>>,
    }
    take: [expires, expires_at]
}

meta_body! {
    /// `POST /admin/clients`: the client ID and its shared metadata. Expiry
    /// belongs to keys: to end a client, revoke it.
    #[schema(example = json!({"id": "acme", "quota": "100000/month"}))]
    CreateClientRequest {
        /// The client ID (`A-Z a-z 0-9 -`, 1 to 64 characters), as in its keys.
        #[schema(pattern = r"^[A-Za-z0-9-]{1,64}$", example = "acme")]
        id: String,
    }
    take: []
}

meta_body! {
    /// `PATCH /admin/clients/{id}`: metadata changes; absent fields stay as they are.
    ClientChanges {}
    take: []
}

/// `POST /admin/keys/{id}/rotate`; the body is optional, and so is each field.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"grace": "24h", "expires": "30d"}))]
pub struct RotateRequest {
    /// How long the old key keeps working, e.g. `"24h"` (the default).
    #[serde(default)]
    #[schema(nullable = false, example = "24h")]
    pub grace: Option<String>,
    /// The new key's expiry: a duration from now, an RFC 3339 time, or
    /// `"never"`/`null` (the default: none).
    #[serde(default)]
    #[schema(example = "30d")]
    pub expires: Option<String>,
}

/// `GET /admin/keys` query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListKeysQuery {
    /// Only this client's keys; empty or absent: every key.
    #[param(pattern = r"^[A-Za-z0-9-]{0,64}$")]
    pub client: Option<String>,
}

/// `GET /admin/clients` query: none is accepted.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NoQuery {}

/// `GET /admin/usage` query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Only this client (or `_anonymous`, requests without a key); empty or absent: every client.
    #[param(pattern = r"^([A-Za-z0-9-]{0,64}|_anonymous)$")]
    pub client: Option<String>,
    /// Start of the report: a duration back from now (`"1h"`, `"7d"`) or an
    /// RFC 3339 time; default `1h`.
    #[param(example = "1h")]
    pub since: Option<String>,
    /// Bucket size; default `hour`.
    pub by: Option<crate::usage::Granularity>,
}

/// The metadata fields of any body, before parsing.
#[derive(Debug, Default)]
pub struct MetaInput {
    scopes: Option<Scopes>,
    rate: Option<Option<String>>,
    burst: Option<Option<TextOrNumber>>,
    quota: Option<Option<String>>,
    label: Option<Option<String>>,
    uses: Option<Option<TextOrNumber>>,
    refill: Option<Option<String>>,
    meta: Option<String>,
    expires: Option<Option<String>>,
    expires_at: Option<Option<String>>,
}

impl MetaInput {
    /// Metadata changes, as `MetaFlags::changes` makes them for the CLI:
    /// `meta` (the query syntax) first, explicit fields on top.
    pub fn changes(self, now: Timestamp) -> Result<MetaChanges, AdminError> {
        let base = match &self.meta {
            Some(query) => MetaChanges::from_query(query, now).map_err(|e| meta_error("meta", e))?,
            None => MetaChanges::default(),
        };
        let mut explicit = MetaChanges::default();
        if let Some(scopes) = self.scopes {
            let text = match scopes {
                Scopes::List(items) => items.join(","),
                Scopes::Text(text) => text,
            };
            explicit.scopes = Some(meta::parse_scopes(&text).map_err(|e| meta_error("scopes", e))?);
        }
        explicit.rate = parse("rate", self.rate, |t| t.parse::<Rate>())?;
        explicit.burst = parse("burst", text(self.burst), meta::parse_burst)?;
        explicit.quota = parse("quota", self.quota, |t| t.parse::<Quota>())?;
        // `uses` resets the remaining count (a new grant); null removes credits.
        explicit.uses = parse("uses", text(self.uses), meta::parse_uses)?;
        explicit.refill = parse("refill", self.refill, |t| t.parse::<meta::Refill>())?;
        explicit.label = self.label.map(|label| label.filter(|s| !s.is_empty()));
        explicit.expires_at = match (self.expires, self.expires_at) {
            (Some(_), Some(_)) => {
                return Err(super::keys::invalid("expires_at", "give `expires` or `expires_at`, not both"));
            }
            (Some(at), None) => Some(expiry("expires", at, now)?),
            (None, Some(at)) => Some(expiry("expires_at", at, now)?),
            (None, None) => None,
        };
        Ok(base.merge(explicit))
    }
}

fn text(value: Option<Option<TextOrNumber>>) -> Option<Option<String>> {
    value.map(|v| v.map(TextOrNumber::into_text))
}

/// A field that `null` clears, parsed when present.
fn parse<T>(
    field: &str,
    value: Option<Option<String>>,
    parser: impl FnOnce(&str) -> Result<T, meta::MetaError>,
) -> Result<Option<Option<T>>, AdminError> {
    match value {
        None => Ok(None),
        Some(None) => Ok(Some(None)),
        Some(Some(text)) => parser(&text).map(|v| Some(Some(v))).map_err(|e| meta_error(field, e)),
    }
}

/// An expiry field: `null` and `"never"` mean none.
fn expiry(field: &str, value: Option<String>, now: Timestamp) -> Result<Option<Timestamp>, AdminError> {
    match value.as_deref() {
        None | Some("never") => Ok(None),
        Some(text) => meta::parse_expiry(text, now).map(Some).map_err(|e| meta_error(field, e)),
    }
}

/// A metadata parse error, reported against the field the caller used (the
/// parser's own name for `meta`, whose sub-fields it names).
pub fn meta_error(field: &str, error: meta::MetaError) -> AdminError {
    let field = if field == "meta" { format!("meta.{}", error.field) } else { field.to_owned() };
    AdminError::Invalid { field, reason: format!("`{}`: {}", error.value, error.why) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn parse(json: &str) -> Result<MetaChanges, AdminError> {
        let mut body: KeyChanges = serde_json::from_str(json).unwrap();
        body.meta_input().changes(now())
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
    fn null_clears_absent_keeps_and_explicit_fields_win_over_meta() {
        let c = parse(r#"{"meta":"rate_limit=5&label=x","rate":null,"expires":"never"}"#).unwrap();
        assert_eq!(c.rate, Some(None));
        assert_eq!(c.label, Some(Some("x".to_owned())));
        assert_eq!(c.expires_at, Some(None));
        assert_eq!(c.quota, None, "absent: unchanged");
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field(parse(r#"{"rate":"fast"}"#)), "rate");
        assert_eq!(field(parse(r#"{"burst":0}"#)), "burst");
        assert_eq!(field(parse(r#"{"meta":"quota=lots"}"#)), "meta.quota");
        assert_eq!(field(parse(r#"{"expires":"1h","expires_at":"2h"}"#)), "expires_at");
    }

    #[test]
    fn unknown_fields_are_refused_by_the_type() {
        assert!(serde_json::from_str::<KeyChanges>(r#"{"colour":"blue"}"#).is_err());
        assert!(serde_json::from_str::<ClientChanges>(r#"{"expires":"1h"}"#).is_err(), "keys only");
    }
}
