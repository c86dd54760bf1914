//! The admin API's request bodies and query strings, as types.
//!
//! Each body is one struct with `deny_unknown_fields`, deserialised by axum's
//! `Json` and described by utoipa from the same definition, so the document
//! says exactly what the handler accepts: every field listed, nothing else
//! (`additionalProperties: false`), no `allOf` to make it unsatisfiable.
//! Metadata fields mirror the CLI flags (not `--meta`, see
//! [`MetaInput::changes`]): absent leaves a field unchanged, `null` clears it
//! (`scopes` cannot be cleared). Their values are parsed by
//! the CLI's parsers afterwards ([`MetaInput::changes`]), so an error names
//! the field as the caller spelled it.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use jiff::Timestamp;
use serde::{Deserialize, Deserializer};
use utoipa::{IntoParams, ToSchema};

use super::error::AdminError;
use crate::key::SecretString;
use crate::meta::{self, MetaChanges, Quota, Rate};

// The `pattern`s in this file (and on the `id` path parameters) describe
// what the CLI's parsers accept, or a subset where their grammar is wider
// (e.g. `30s` periods, RFC 3339 expiry times), so that a value the document
// allows is a value the call accepts: rates `COUNT/(s|min|h|day)`, quotas
// and refills `COUNT/(day|month)`, expiries a duration from now or `never`.

/// One scope: letters, digits and `: . _ -`, at most 128.
const SCOPE: &str = "[A-Za-z0-9:._-]{1,128}";

/// Scopes as an array (`["read", "orders:write"]`) or one string (`"read,orders:write"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Scopes {
    List(Vec<String>),
    Text(String),
}

/// [`Scopes`]' schema: utoipa's derive cannot put a pattern on the items.
fn scopes_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
    let one = || ObjectBuilder::new().schema_type(Type::String).pattern(Some(format!("^{SCOPE}$")));
    let one_of = OneOfBuilder::new()
        .item(ArrayBuilder::new().items(one()).min_items(Some(1)))
        .item(ObjectBuilder::new().schema_type(Type::String).pattern(Some(format!("^{SCOPE}(,{SCOPE})*$"))))
        .description(Some("Scopes the key grants (`read`, `write`, `read-write`, or a route's named scopes)"))
        .build();
    Schema::OneOf(one_of)
}

/// Present-and-null (`Some(None)`, clear) told apart from absent (`None`, keep).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A field that may be absent but not `null` (`scopes` cannot be cleared).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A whole number, `null` clearing it: JSON Schema's `integer` counts `5.0`
/// as one, so the body may too.
fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    use serde::de::Error;
    let Some(number) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(Some(None)) };
    let whole = number.as_u64().or_else(|| {
        // Exact for what the fields take (at most 10^15, below 2^53).
        number.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15).map(|f| f as u64)
    });
    whole
        .map(|n| Some(Some(n)))
        .ok_or_else(|| D::Error::custom(format!("`{number}` is not a whole number of 0 or more")))
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
            #[serde(default, deserialize_with = "present")]
            #[schema(schema_with = scopes_schema)]
            pub scopes: Option<Scopes>,
            /// Requests per period, e.g. `"100/s"` or `"6000/min"`; `null` removes the limit.
            #[serde(default, deserialize_with = "nullable")]
            #[schema(value_type = Option<String>, example = "100/s", pattern = "^[1-9][0-9]{0,8}/(s|min|h|day)$")]
            pub rate: Option<Option<String>>,
            /// Requests allowed at once above the rate (needs a rate); `null` removes it.
            #[serde(default, deserialize_with = "whole")]
            #[schema(value_type = Option<u64>, minimum = 1, maximum = 4_294_967_295_u64)]
            pub burst: Option<Option<u64>>,
            /// Requests per calendar period, e.g. `"100000/month"`; `null` removes it.
            #[serde(default, deserialize_with = "nullable")]
            #[schema(value_type = Option<String>, example = "100000/month", pattern = "^[1-9][0-9]{0,11}/(day|month)$")]
            pub quota: Option<Option<String>>,
            /// A free-form label; `null` or `""` removes it.
            #[serde(default, deserialize_with = "nullable")]
            #[schema(value_type = Option<String>)]
            pub label: Option<Option<String>>,
            /// Usage credits granted (a new grant: the count restarts); `null` removes credits.
            #[serde(default, deserialize_with = "whole")]
            #[schema(value_type = Option<u64>, maximum = 1_000_000_000_000_000_u64)]
            pub uses: Option<Option<u64>>,
            /// Credits given back per period, e.g. `"1000/day"`; `null` removes the refill.
            #[serde(default, deserialize_with = "nullable")]
            #[schema(value_type = Option<String>, example = "1000/day", pattern = "^[1-9][0-9]{0,11}/(day|month)$")]
            pub refill: Option<Option<String>>,
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
        #[schema(pattern = "^[A-Za-z0-9-]{1,64}$", example = "acme")]
        client: String,
        /// When the key stops working: a duration from now (`"30d"`), an RFC 3339
        /// time, or `"never"`/`null` for no expiry.
        #[serde(default, deserialize_with = "nullable")]
        #[schema(value_type = Option<String>, example = "30d", pattern = "^([1-9][0-9]{0,3}(m|h|d)|never)$")]
        expires: Option<Option<String>>,
        /// The same as `expires` (give one of the two).
        #[serde(default, deserialize_with = "nullable")]
        #[schema(value_type = Option<String>, pattern = "^([1-9][0-9]{0,3}(m|h|d)|never)$")]
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
        #[schema(value_type = Option<String>, example = "30d", pattern = "^([1-9][0-9]{0,3}(m|h|d)|never)$")]
        expires: Option<Option<String>>,
        /// The same as `expires` (give one of the two).
        #[serde(default, deserialize_with = "nullable")]
        #[schema(value_type = Option<String>, pattern = "^([1-9][0-9]{0,3}(m|h|d)|never)$")]
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
        #[schema(pattern = "^[A-Za-z0-9-]{1,64}$", example = "acme")]
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
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false, example = "24h", pattern = "^[1-9][0-9]{0,3}(m|h|d)$")]
    pub grace: Option<String>,
    /// The new key's expiry: a duration from now, an RFC 3339 time, or
    /// `"never"`/`null` (the default: none).
    #[serde(default)]
    #[schema(example = "30d", pattern = "^([1-9][0-9]{0,3}(m|h|d)|never)$")]
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
    /// Records per page, 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`; empty or absent: the first page.
    #[param(pattern = "^[A-Za-z0-9_-]*$")]
    pub cursor: Option<String>,
}

/// `GET /admin/clients` query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListClientsQuery {
    /// Records per page, 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`; empty or absent: the first page.
    #[param(pattern = "^[A-Za-z0-9_-]*$")]
    pub cursor: Option<String>,
}

/// `POST /admin/verify` body: a key to check, and optionally the request
/// it stands for.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The API key string as the end user presented it. Never logged nor
    /// answered.
    #[serde(deserialize_with = "secret")]
    #[schema(value_type = String, min_length = 1, max_length = 512)]
    pub key: SecretString,
    /// A configured route, by its `path` (e.g. `"/api"`): its scopes are
    /// checked and its `cost` is the default cost.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false, example = "/api")]
    pub route: Option<String>,
    /// The method the scopes are checked for; default `GET`.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false, example = "GET", pattern = "^[A-Z]{1,16}$")]
    pub method: Option<String>,
    /// A request path: finds the route (as the proxy would) when `route` is
    /// absent, and must fall under it when both are given.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false, example = "/api/orders", pattern = "^/")]
    pub path: Option<String>,
    /// Units to spend; default the route's cost, or 1 without a route.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false, minimum = 1, maximum = 1_000_000)]
    pub cost: Option<u32>,
    /// Spend rate limit, quota and credits (and record usage) as a proxied
    /// request would; default `false`, a dry check that spends nothing.
    #[serde(default)]
    pub spend: bool,
}

/// The key string of a verify body, kept out of `Debug`.
fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    String::deserialize(d).map(SecretString::new)
}

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
    #[param(example = "1h", pattern = "^[1-9][0-9]?(m|h)$")]
    pub since: Option<String>,
    /// Bucket size; default `hour`.
    pub by: Option<crate::usage::Granularity>,
}

/// Adds to the document's body schemas the rules between their fields that
/// [`MetaInput::changes`] and the ops enforce and utoipa's derive cannot
/// state: each body is refused when it fits one of the listed shapes. Rules
/// that depend on the stored record (a PATCH giving `burst` to a key without
/// a rate) cannot be stated in a schema at all.
pub fn cross_field_rules(schemas: &mut serde_json::Map<String, serde_json::Value>) {
    use serde_json::json;
    let both_expiries = json!({ "required": ["expires", "expires_at"] });
    let refill_without_credits = json!({
        "required": ["uses", "refill"],
        "properties": { "uses": { "type": "null" }, "refill": { "type": "string" } },
    });
    let burst_without_rate = json!({
        "required": ["burst"],
        "properties": { "burst": { "type": "integer" } },
        "not": { "required": ["rate"], "properties": { "rate": { "type": "string" } } },
    });
    for (schema, refused) in [
        ("IssueRequest", vec![&both_expiries, &refill_without_credits, &burst_without_rate]),
        ("KeyChanges", vec![&both_expiries, &refill_without_credits]),
        ("CreateClientRequest", vec![&refill_without_credits, &burst_without_rate]),
        ("ClientChanges", vec![&refill_without_credits]),
    ] {
        if let Some(serde_json::Value::Object(schema)) = schemas.get_mut(schema) {
            schema.insert("not".to_owned(), json!({ "anyOf": refused }));
        }
    }
}

/// The metadata fields of any body, before parsing.
#[derive(Debug, Default)]
pub struct MetaInput {
    scopes: Option<Scopes>,
    rate: Option<Option<String>>,
    burst: Option<Option<u64>>,
    quota: Option<Option<String>>,
    label: Option<Option<String>>,
    uses: Option<Option<u64>>,
    refill: Option<Option<String>>,
    expires: Option<Option<String>>,
    expires_at: Option<Option<String>>,
}

impl MetaInput {
    /// Metadata changes, as `MetaFlags::changes` makes them from the CLI's
    /// flags. The CLI's `--meta` query syntax has no field here: it is a
    /// second grammar inside a string, which no schema can describe, for
    /// what the typed fields already say.
    pub fn changes(self, now: Timestamp) -> Result<MetaChanges, AdminError> {
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
        Ok(explicit)
    }
}

/// A number field, for the parser the CLI gives its flag's text to.
fn text<N: ToString>(value: Option<Option<N>>) -> Option<Option<String>> {
    value.map(|v| v.map(|n| n.to_string()))
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

/// A metadata parse error, reported against the field the caller used.
pub fn meta_error(field: &str, error: meta::MetaError) -> AdminError {
    AdminError::Invalid { field: field.to_owned(), reason: format!("`{}`: {}", error.value, error.why) }
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
    fn null_clears_and_absent_keeps() {
        let c = parse(r#"{"rate":null,"label":"","expires":"never","burst":5.0}"#).unwrap();
        assert_eq!(c.rate, Some(None));
        assert_eq!(c.label, Some(None), "an empty label removes it");
        assert_eq!(c.expires_at, Some(None));
        assert_eq!(c.burst.unwrap().unwrap().get(), 5, "5.0 is a whole number");
        assert_eq!(c.quota, None, "absent: unchanged");
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field(parse(r#"{"rate":"fast"}"#)), "rate");
        assert_eq!(field(parse(r#"{"burst":0}"#)), "burst");
        assert_eq!(field(parse(r#"{"expires":"1h","expires_at":"2h"}"#)), "expires_at");
    }

    #[test]
    fn unknown_fields_are_refused_by_the_type() {
        assert!(serde_json::from_str::<KeyChanges>(r#"{"colour":"blue"}"#).is_err());
        assert!(
            serde_json::from_str::<KeyChanges>(r#"{"meta":"rate_limit=5"}"#).is_err(),
            "no --meta syntax"
        );
        assert!(
            serde_json::from_str::<KeyChanges>(r#"{"scopes":null}"#).is_err(),
            "scopes cannot be cleared"
        );
        assert!(serde_json::from_str::<KeyChanges>(r#"{"burst":1.5}"#).is_err());
        assert!(serde_json::from_str::<ClientChanges>(r#"{"expires":"1h"}"#).is_err(), "keys only");
    }
}
