//! `docs/admin-openapi.json` against the real admin routes: every documented
//! operation exists on a running admin listener, and every route the admin
//! router serves is documented.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::admin;
use http::Method;

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// `(METHOD, /path/{template})` for every operation in the document.
fn documented() -> BTreeSet<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/admin-openapi.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "an OpenAPI 3 document");
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (key, _) in item.as_object().unwrap() {
            if METHODS.contains(&key.as_str()) {
                operations.insert((key.to_uppercase(), path.clone()));
            }
        }
    }
    operations
}

fn served() -> BTreeSet<(String, String)> {
    keygate::admin::ROUTES.iter().map(|r| (r.method.to_owned(), r.path.to_owned())).collect()
}

#[test]
fn every_served_route_is_documented_and_every_documented_route_is_served() {
    let (documented, served) = (documented(), served());
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(undocumented.is_empty(), "served but not in docs/admin-openapi.json: {undocumented:?}");
    let phantom: Vec<_> = documented.difference(&served).collect();
    assert!(phantom.is_empty(), "documented but not served: {phantom:?}");
}

#[tokio::test]
async fn every_documented_operation_answers_on_a_running_admin_listener() {
    let config = format!("[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n{}", admin::admin_section());
    let (_gateway, admin) = admin::start(&config).await;
    for (n, (method, template)) in documented().into_iter().enumerate() {
        let path = if template.starts_with("/admin/clients/") {
            // A fresh client record for each operation, for the same reason.
            let id = format!("doc-{n}");
            let created =
                admin.call(Method::POST, "/admin/clients", Some(&format!(r#"{{"id":"{id}"}}"#))).await;
            assert_eq!(created.status, 201, "{}", created.text());
            template.replace("{id}", &id)
        } else if template.contains("{id}") {
            // A fresh key for each operation, so one (a revoke) cannot change another's answer.
            let issued = admin.call(Method::POST, "/admin/keys", Some(r#"{"client":"doc"}"#)).await;
            template.replace("{id}", issued.json()["id"].as_str().unwrap())
        } else {
            template.clone()
        };
        let body = match (method.as_str(), template.as_str()) {
            ("POST", "/admin/keys") => Some(r#"{"client":"doc"}"#),
            ("POST", "/admin/clients") => Some(r#"{"id":"doc"}"#),
            _ => None,
        };
        let answer = admin.call(method.parse().unwrap(), &path, body).await;
        assert!(
            ![404, 405].contains(&answer.status.as_u16()),
            "{method} {template} answered {}: {}",
            answer.status,
            answer.text()
        );
    }
}
