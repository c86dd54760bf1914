//! Route matching: which route a canonical path (see [`crate::path`]) and
//! host select, and the path sent upstream.

use std::sync::Arc;

use crate::config::RouteConfig;

/// The routes of one config, ready for matching.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<RouteConfig>>,
}

/// A matched route and the path to send upstream (after `strip_prefix`): a
/// slice of the path matched, not a copy.
#[derive(Debug)]
pub struct RouteMatch<'p> {
    pub route: Arc<RouteConfig>,
    pub upstream_path: &'p str,
}

impl RouteTable {
    pub fn new(routes: &[RouteConfig]) -> Self {
        let mut routes: Vec<Arc<RouteConfig>> = routes.iter().cloned().map(Arc::new).collect();
        // Longest prefix first; at equal length a host-specific route wins.
        routes.sort_by(|a, b| b.path.len().cmp(&a.path.len()).then(b.host.is_some().cmp(&a.host.is_some())));
        Self { routes }
    }

    /// The route for a normalised path on `host` (lowercase, no port), if any.
    pub fn find<'p>(&self, host: Option<&str>, path: &'p str) -> Option<RouteMatch<'p>> {
        let route = self.routes.iter().find(|r| {
            r.host.as_deref().is_none_or(|h| host.is_some_and(|host| host.eq_ignore_ascii_case(h)))
                && prefix_matches(&r.path, path)
        })?;
        let upstream_path = if route.strip_prefix && route.path != "/" {
            let rest = &path[route.path.len()..];
            if rest.is_empty() { "/" } else { rest }
        } else {
            path
        };
        Some(RouteMatch { route: Arc::clone(route), upstream_path })
    }
}

/// `/api` matches `/api`, `/api/` and `/api/x`, never `/apix`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteTarget;
    use std::collections::BTreeMap;

    fn route(path: &str, host: Option<&str>, strip: bool, name: &str) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            host: host.map(Into::into),
            target: RouteTarget::Upstream(name.into()),
            strip_prefix: strip,
            public: false,
            scopes: vec![],
            method_scopes: BTreeMap::new(),
            allow_query_key: false,
            auth: Default::default(),
            cost: std::num::NonZeroU32::MIN,
            body: crate::config::BodyLimits::default(),
            plain: crate::config::PlainHttp::default(),
            retry_methods: Default::default(),
            issuers: None,
        }
    }

    fn target(table: &RouteTable, host: Option<&str>, path: &str) -> Option<(String, String)> {
        table.find(host, path).map(|m| match &m.route.target {
            RouteTarget::Upstream(name) => (name.clone(), m.upstream_path.to_owned()),
            RouteTarget::Echo => ("echo".into(), m.upstream_path.to_owned()),
        })
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let table = RouteTable::new(&[
            route("/", None, false, "root"),
            route("/api", None, false, "api"),
            route("/api/v2", None, true, "v2"),
        ]);
        assert_eq!(target(&table, None, "/api/x"), Some(("api".into(), "/api/x".into())));
        assert_eq!(target(&table, None, "/apix"), Some(("root".into(), "/apix".into())));
        assert_eq!(target(&table, None, "/api/v2/users"), Some(("v2".into(), "/users".into())));
        assert_eq!(target(&table, None, "/api/v2"), Some(("v2".into(), "/".into())));
    }

    #[test]
    fn host_specific_routes_win_and_others_do_not_leak() {
        let table = RouteTable::new(&[
            route("/api", Some("a.example"), false, "a"),
            route("/api", None, false, "any"),
        ]);
        assert_eq!(target(&table, Some("A.example"), "/api").unwrap().0, "a");
        assert_eq!(target(&table, Some("b.example"), "/api").unwrap().0, "any");
        let only_host = RouteTable::new(&[route("/", Some("a.example"), false, "a")]);
        assert_eq!(target(&only_host, Some("b.example"), "/x"), None);
        assert_eq!(target(&only_host, None, "/x"), None);
    }
}
