//! The web dashboard (issue #14): three static files built into the binary, served at `/ui/`
//! with no data in them. The page calls the public REST API with the key its user logs in with,
//! so it sees exactly what that key may see (the admin token: the fleet and every project's
//! queue; a project key: its own runners and runs). No CDN, no external request: it works
//! offline, and its Content-Security-Policy allows only this origin.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/app.css");

/// Only this origin: no inline script or style attribute, no frame, no other host.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes (public: the files hold no data; every call they make is
/// authenticated), and `/` leading to it.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/ui/") }))
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            // Built into the binary: a new build may change them, so always revalidate.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for (name, text) in [
            ("index.html", INDEX),
            ("app.js", SCRIPT),
            ("app.css", STYLE),
        ] {
            for far in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(far), "{name} names {far}");
            }
        }
        assert!(INDEX.contains(r#"<script src="/ui/app.js" defer></script>"#));
        assert!(
            !INDEX.contains("<script>"),
            "no inline script (the CSP forbids it)"
        );
        assert!(
            !SCRIPT.contains("innerHTML"),
            "text goes in as text, never as markup"
        );
    }
}
