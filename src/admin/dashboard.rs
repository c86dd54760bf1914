//! `/dashboard`: the usage dashboard, a page built into the binary.
//!
//! The page, its script and its style sheet are files under
//! `src/admin/dashboard/`, included at compile time: nothing is fetched from
//! elsewhere, and the script reads only the admin API on the same origin, so
//! everything the page shows a script with the token can read too.
//!
//! The three files hold no data, so they are served without the token (they
//! are among the admin listener's open paths); the page asks for the token
//! in a login form, keeps it in `sessionStorage` and sends it as `Authorization:
//! Bearer` on every call. Every answer here carries a strict
//! `Content-Security-Policy` (no inline script, no other origin, no framing,
//! no form submission) and is never cached or sent as a referrer.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, header};

/// The page: markup only, the script and styles are separate files (CSP
/// forbids inline script).
const INDEX_HTML: &str = include_str!("dashboard/index.html");
/// Everything the page does: login, calls to the admin API, SVG charts.
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// The paths of the page and its assets, served without the token.
pub const PATHS: [&str; 3] = ["/dashboard", "/dashboard/app.js", "/dashboard/app.css"];

/// `default-src 'self'` and nothing looser: the script is a file of ours and
/// only calls this origin. `form-action 'none'`: the login form is handled by
/// the script, so a browser without it can never submit the token in a URL.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// The dashboard page (no data: it logs in and reads the admin API).
#[utoipa::path(
    get, path = "/dashboard", operation_id = "dashboard", tag = "dashboard", security(()),
    responses((status = 200, description = "The dashboard page", content((String = "text/html; charset=utf-8"))))
)]
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// The dashboard's script.
#[utoipa::path(
    get, path = "/dashboard/app.js", operation_id = "dashboard_script", tag = "dashboard", security(()),
    responses((status = 200, description = "The dashboard's script",
        content((String = "text/javascript; charset=utf-8"))))
)]
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// The dashboard's style sheet.
#[utoipa::path(
    get, path = "/dashboard/app.css", operation_id = "dashboard_style", tag = "dashboard", security(()),
    responses((status = 200, description = "The dashboard's style sheet",
        content((String = "text/css; charset=utf-8"))))
)]
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (HeaderName::from_static("cross-origin-opener-policy"), "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files_and_has_no_inline_script() {
        for path in ["/dashboard/app.js", "/dashboard/app.css"] {
            assert!(INDEX_HTML.contains(&format!("\"{path}\"")), "{path} is referenced");
        }
        // Every <script> has a src (CSP would refuse an inline one anyway).
        for script in INDEX_HTML.split("<script").skip(1) {
            assert!(script.trim_start().starts_with("src="), "inline script: <script{script}");
        }
        for text in [INDEX_HTML, APP_JS, APP_CSS] {
            // The SVG namespace is a name, not an address the page fetches.
            let text = text.replace("\"http://www.w3.org/2000/svg\"", "");
            assert!(!text.contains("http://") && !text.contains("https://"), "no other origin");
            assert!(!text.contains("localStorage."), "the token is kept in sessionStorage only");
        }
    }
}
