//! The admin API's OpenAPI document: generated from the handlers, served at
//! `/admin/openapi.json`, and kept in `docs/admin-openapi.json`.
//!
//! `KEYGATE_BLESS=1 cargo test --test admin_openapi` rewrites the file from
//! the code; without it, a file that differs from what the code generates
//! fails here.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::admin;
use http::Method;
use serde_json::Value;

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn generated() -> Value {
    serde_json::from_str(&keygate::admin::openapi_json()).unwrap()
}

/// `(METHOD, /path/{template})` for every operation in `doc`.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
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

#[test]
fn docs_admin_openapi_json_is_what_the_code_generates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/admin-openapi.json");
    let generated = keygate::admin::openapi_json();
    if std::env::var_os("KEYGATE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap();
    assert!(
        on_disk == generated,
        "docs/admin-openapi.json differs from the document the handlers generate; \
         run `KEYGATE_BLESS=1 cargo test --test admin_openapi` and commit the file"
    );
}

#[test]
fn the_document_is_openapi_3_1_with_bearer_auth_and_json_errors() {
    let doc = generated();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    for (method, path) in operations(&doc) {
        let operation = &doc["paths"][&path][method.to_lowercase()];
        let open = ["/healthz", "/readyz", "/metrics"].contains(&path.as_str());
        let responses = operation["responses"].as_object().unwrap();
        assert_eq!(
            responses.contains_key("401"),
            !open,
            "{method} {path}: 401 documented iff the token is needed"
        );
        for (status, response) in responses {
            let content = response["content"].as_object();
            assert!(content.is_some_and(|c| !c.is_empty()), "{method} {path} {status}: no schema");
            if status.starts_with('4') || status.starts_with('5') {
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(schema, "#/components/schemas/ErrorBody", "{method} {path} {status}");
            }
        }
    }
}

/// Schemathesis found the hand-written `IssueRequest` unsatisfiable (an
/// `allOf` with `additionalProperties: false` refused the README's body).
#[test]
fn request_bodies_list_their_fields_and_accept_the_readmes_examples() {
    let doc = generated();
    let issue = &doc["components"]["schemas"]["IssueRequest"];
    assert_eq!(issue["additionalProperties"], false);
    assert!(issue.get("allOf").is_none());
    assert_eq!(issue["required"], serde_json::json!(["client"]));
    for field in ["client", "scopes", "rate", "quota", "expires", "label"] {
        assert!(issue["properties"].get(field).is_some(), "IssueRequest lacks {field}");
    }
    let client = &doc["components"]["schemas"]["CreateClientRequest"];
    assert!(client["properties"].get("expires").is_none(), "expiry belongs to keys");
    // `/admin/usage` takes its three parameters and answers its report.
    let usage = &doc["paths"]["/admin/usage"]["get"];
    let params: BTreeSet<&str> =
        usage["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(params, BTreeSet::from(["client", "since", "by"]));
    // The stateful path: a new key links to the calls on it, by its `id`.
    let links = &doc["paths"]["/admin/keys"]["post"]["responses"]["201"]["links"];
    for operation in ["show_key", "update_key", "rotate_key", "revoke_key"] {
        assert_eq!(links[operation]["operationId"], operation, "{links}");
        assert_eq!(links[operation]["parameters"]["id"], "$response.body#/id");
    }
    assert_eq!(
        usage["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/UsageReport"
    );
}

#[tokio::test]
async fn the_document_is_served_behind_the_token_and_every_operation_answers() {
    let config = format!("[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n{}", admin::admin_section());
    let (_gateway, admin) = admin::start(&config).await;
    let anonymous = admin.call_as(None, Method::GET, "/admin/openapi.json", None).await;
    assert_eq!(anonymous.status, 401);
    let served = admin.call(Method::GET, "/admin/openapi.json", None).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.headers["content-type"], "application/json");
    assert_eq!(served.json(), generated());

    for (n, (method, template)) in operations(&generated()).into_iter().enumerate() {
        let path = if template.starts_with("/admin/clients/") {
            // A fresh client record for each operation, so one (a revoke)
            // cannot change another's answer.
            let id = format!("doc-{n}");
            let created =
                admin.call(Method::POST, "/admin/clients", Some(&format!(r#"{{"id":"{id}"}}"#))).await;
            assert_eq!(created.status, 201, "{}", created.text());
            template.replace("{id}", &id)
        } else if template.contains("{id}") {
            // A fresh key for each operation, for the same reason.
            let issued = admin.call(Method::POST, "/admin/keys", Some(r#"{"client":"doc"}"#)).await;
            template.replace("{id}", issued.json()["id"].as_str().unwrap())
        } else {
            template.clone()
        };
        let body = match (method.as_str(), template.as_str()) {
            ("POST", "/admin/keys") => Some(r#"{"client":"doc"}"#),
            ("POST", "/admin/clients") => Some(r#"{"id":"doc"}"#),
            ("POST", "/admin/verify") => Some(r#"{"key":"kg_doc_not-a-key"}"#),
            ("PATCH", _) => Some(r#"{"label":"doc"}"#),
            _ => None,
        };
        let answer = admin.call(method.parse().unwrap(), &path, body).await;
        let documented = &generated()["paths"][&template][method.to_lowercase()]["responses"];
        assert!(
            documented.get(answer.status.as_str()).is_some(),
            "{method} {template} answered {}, which is not documented: {}",
            answer.status,
            answer.text()
        );
        // The file store keeps no usage: `/admin/usage` says so (501, documented).
        let expected =
            if template == "/admin/usage" { answer.status == 501 } else { answer.status.is_success() };
        assert!(expected, "{method} {template} answered {}: {}", answer.status, answer.text());
    }
}
