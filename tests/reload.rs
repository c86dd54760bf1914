//! Hot reload: `POST /admin/reload` and SIGHUP swap in a valid new config,
//! refuse an invalid one (the old stays live), and drop neither in-flight
//! requests nor open connections.

mod common;

use bytes::Bytes;
use common::admin::{self, TOKEN, admin_section};
use common::binary::Served;
use common::gateway::{get, send};
use common::upstream::Upstream;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Public echo routes at each of `paths`, plus the admin section.
fn echo_routes(paths: &[&str]) -> String {
    let mut text = String::new();
    for path in paths {
        text.push_str(&format!(
            "[[route]]\npath = \"{path}\"\nupstream = \"builtin:echo\"\npublic = true\n\n"
        ));
    }
    text + &admin_section()
}

#[tokio::test]
async fn a_valid_config_posted_for_reload_serves_its_new_route() {
    let (gateway, admin) = admin::start(&echo_routes(&["/old"])).await;
    assert_eq!(get(&gateway.url("/new/x")).await.status, 404);

    admin.write_config(&echo_routes(&["/old", "/new"]));
    let answer = admin.call(Method::POST, "/admin/reload", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["routes"], 2);
    assert_eq!(answer.json()["restart_needed"], serde_json::json!([]));
    let echoed = get(&gateway.url("/new/x")).await;
    assert_eq!((echoed.status, echoed.json()["path"].clone()), (StatusCode::OK, "/new/x".into()));
}

#[tokio::test]
async fn an_invalid_config_is_refused_with_its_problems_and_the_old_one_stays() {
    let (gateway, admin) = admin::start(&echo_routes(&["/old"])).await;
    let broken = echo_routes(&["/old"]) + "\n[[route]]\npath = \"/new\"\nupstream = \"missing\"\n";
    admin.write_config(&broken);
    let answer = admin.call(Method::POST, "/admin/reload", None).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["error"], "invalid_config");
    assert_eq!(body["problems"][0]["field"], "route[1].upstream");
    assert!(body["problems"][0]["line"].as_u64().is_some(), "{body}");
    assert!(!answer.text().contains(TOKEN), "the token never appears in an answer");

    assert_eq!(get(&gateway.url("/old/x")).await.status, 200, "the old config still serves");
    assert_eq!(get(&gateway.url("/new/x")).await.status, 404);

    admin.write_config("this is [not toml");
    let answer = admin.call(Method::POST, "/admin/reload", None).await;
    assert_eq!(
        (answer.status, answer.json()["error"].clone()),
        (StatusCode::BAD_REQUEST, "invalid_config".into())
    );
    assert_eq!(get(&gateway.url("/old/x")).await.status, 200);
}

#[tokio::test]
async fn settings_read_at_start_are_reported_as_needing_a_restart() {
    let (gateway, admin) = admin::start(&echo_routes(&["/old"])).await;
    admin.write_config(&format!("[server]\nlisten = \"127.0.0.1:1\"\n{}", echo_routes(&["/old", "/new"])));
    let answer = admin.call(Method::POST, "/admin/reload", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["restart_needed"], serde_json::json!(["server.listen"]));
    assert_eq!(get(&gateway.url("/new/x")).await.status, 200, "the rest applies");
}

#[tokio::test]
async fn a_reload_changes_the_admin_token() {
    let (_gateway, admin) = admin::start(&echo_routes(&["/old"])).await;
    let other = "another-admin-token-0123456789";
    admin.write_config(&echo_routes(&["/old"]).replace(TOKEN, other));
    assert_eq!(admin.call(Method::POST, "/admin/reload", None).await.status, 200);
    assert_eq!(admin.call(Method::GET, "/admin/keys", None).await.status, 401);
    assert_eq!(admin.call_as(Some(other), Method::GET, "/admin/keys", None).await.status, 200);
}

#[tokio::test]
async fn a_slow_request_in_flight_completes_after_a_reload_removes_its_route() {
    let (upstream, arrived, release) = Upstream::gated().await;
    let with_slow = format!(
        "[[route]]\npath = \"/slow\"\nupstream = \"api\"\npublic = true\n\n[upstream.api]\ntargets = [\"{}\"]\n\n{}",
        upstream.url(),
        echo_routes(&["/other"])
    );
    let (gateway, admin) = admin::start(&with_slow).await;
    let url = gateway.url("/slow/x");
    let in_flight = tokio::spawn(async move { get(&url).await });
    arrived.notified().await;

    // The new config has neither the route nor its upstream.
    admin.write_config(&echo_routes(&["/other"]));
    assert_eq!(admin.call(Method::POST, "/admin/reload", None).await.status, 200);
    assert_eq!(get(&gateway.url("/slow/y")).await.status, 404, "new requests see the new config");

    release.add_permits(1);
    let answer = in_flight.await.unwrap();
    assert_eq!((answer.status, answer.text()), (StatusCode::OK, "finished".to_owned()));
}

#[tokio::test]
async fn an_open_keep_alive_connection_keeps_working_and_sees_the_new_routes() {
    let (gateway, admin) = admin::start(&echo_routes(&["/old"])).await;
    let stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    let host = gateway.addr.to_string();
    let mut on_this_connection = async |path: &str| -> StatusCode {
        let request = Request::get(path).header("host", &host).body(Full::<Bytes>::default()).unwrap();
        let response = sender.send_request(request).await.expect("the connection is still open");
        let status = response.status();
        response.into_body().collect().await.unwrap();
        status
    };
    assert_eq!(on_this_connection("/old/x").await, 200);

    admin.write_config(&echo_routes(&["/new"]));
    assert_eq!(admin.call(Method::POST, "/admin/reload", None).await.status, 200);

    assert_eq!(on_this_connection("/new/x").await, 200, "same connection, new route");
    assert_eq!(on_this_connection("/old/x").await, 404, "same connection, old route gone");
    assert!(!connection.is_finished(), "one connection served every request");
}

// === SIGHUP on the real binary ===

fn binary_config(paths: &[&str]) -> String {
    let mut text = "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"KG_TEST_ADMIN_TOKEN\"\n\n".to_owned();
    for path in paths {
        text.push_str(&format!(
            "[[route]]\npath = \"{path}\"\nupstream = \"builtin:echo\"\npublic = true\n\n"
        ));
    }
    text
}

#[tokio::test]
async fn sighup_reloads_the_real_binary_and_refuses_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, binary_config(&["/old"])).unwrap();
    let mut served = Served::start(&path, &[("KG_TEST_ADMIN_TOKEN", TOKEN)]);
    let public = served.address("keygate listening");
    let admin = served.address("admin API listening");
    let url = |path: &str| format!("http://{public}{path}");

    assert_eq!(get(&url("/new/x")).await.status, 404);
    let ready = get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let keys = Request::get(format!("http://{admin}/admin/keys"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&common::gateway::http1_client(), keys).await.status, 200, "token from token_env");

    std::fs::write(&path, binary_config(&["/old", "/new"])).unwrap();
    served.signal("HUP");
    served.wait_for_line("config reloaded");
    assert_eq!(get(&url("/new/x")).await.status, 200);

    std::fs::write(&path, binary_config(&["/old"]) + "[[route]]\npath = \"/x\"\nupstream = \"missing\"\n")
        .unwrap();
    served.signal("HUP");
    let refused = served.wait_for_line("config reload refused");
    assert!(refused.contains("upstream"), "{refused}");
    assert_eq!(get(&url("/new/x")).await.status, 200, "the previous config stays live");

    served.signal("TERM");
    let (status, _log) = tokio::task::spawn_blocking(move || served.wait_exit()).await.unwrap();
    assert_eq!(status.code(), Some(0), "admin listener and SIGHUP task stop with the server");
}
