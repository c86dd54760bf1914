//! Does a key's scope cover this route and method?
//!
//! Out of the box: `read` allows GET, HEAD and OPTIONS; `write` allows every
//! other method; `read-write` allows both. A route that names scopes
//! (`scopes = ["orders:write"]`, or per method in `method_scopes`) requires
//! every one of them instead, and the default read/write rule does not apply.

use http::Method;

use crate::config::RouteConfig;

pub const READ: &str = "read";
pub const WRITE: &str = "write";
pub const READ_WRITE: &str = "read-write";

/// `Ok` if `granted` covers what `route` needs for `method`; otherwise the
/// first scope that was needed and missing.
pub fn check<'r>(granted: &[String], route: &'r RouteConfig, method: &Method) -> Result<(), &'r str> {
    let per_method = route.method_scopes.get(method.as_str());
    if route.scopes.is_empty() && per_method.is_none() {
        let needed = if is_read(method) { READ } else { WRITE };
        let covered = granted.iter().any(|s| s == needed || s == READ_WRITE);
        return if covered { Ok(()) } else { Err(needed) };
    }
    match route.scopes.iter().chain(per_method.into_iter().flatten()).find(|needed| !granted.contains(needed))
    {
        Some(missing) => Err(missing),
        None => Ok(()),
    }
}

fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteTarget;
    use std::collections::BTreeMap;

    fn route(scopes: &[&str], per_method: &[(&str, &[&str])]) -> RouteConfig {
        RouteConfig {
            path: "/".into(),
            host: None,
            target: RouteTarget::Echo,
            strip_prefix: false,
            public: false,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            method_scopes: per_method
                .iter()
                .map(|(m, s)| (m.to_string(), s.iter().map(|s| s.to_string()).collect()))
                .collect::<BTreeMap<_, _>>(),
            allow_query_key: false,
            auth: Default::default(),
            cost: std::num::NonZeroU32::MIN,
            body: crate::config::BodyLimits::default(),
            plain: crate::config::PlainHttp::default(),
            retry_methods: Default::default(),
            issuers: None,
        }
    }

    fn granted(scopes: &[&str]) -> Vec<String> {
        scopes.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_rule_reads_and_writes_by_method() {
        let plain = route(&[], &[]);
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert_eq!(check(&granted(&["read"]), &plain, &method), Ok(()));
            assert_eq!(check(&granted(&["write"]), &plain, &method), Err("read"));
        }
        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert_eq!(check(&granted(&["write"]), &plain, &method), Ok(()));
            assert_eq!(check(&granted(&["read"]), &plain, &method), Err("write"));
            assert_eq!(check(&granted(&["read-write"]), &plain, &method), Ok(()));
        }
        assert_eq!(check(&granted(&["orders:read"]), &plain, &Method::GET), Err("read"));
    }

    #[test]
    fn named_scopes_replace_the_default_rule_and_all_are_needed() {
        let orders = route(&["orders"], &[("POST", &["orders:write"])]);
        assert_eq!(check(&granted(&["orders"]), &orders, &Method::GET), Ok(()));
        assert_eq!(check(&granted(&["read-write"]), &orders, &Method::GET), Err("orders"));
        assert_eq!(check(&granted(&["orders"]), &orders, &Method::POST), Err("orders:write"));
        assert_eq!(check(&granted(&["orders", "orders:write"]), &orders, &Method::POST), Ok(()));
    }

    #[test]
    fn per_method_scopes_alone_leave_other_methods_on_the_default_rule() {
        let r = route(&[], &[("DELETE", &["admin"])]);
        assert_eq!(check(&granted(&["read"]), &r, &Method::GET), Ok(()));
        assert_eq!(check(&granted(&["write"]), &r, &Method::DELETE), Err("admin"));
        assert_eq!(check(&granted(&["admin"]), &r, &Method::DELETE), Ok(()));
    }
}
