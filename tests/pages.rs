//! The pages the node serves over plain HTTP (no browser): types, cache headers, revalidation, the dev-login
//! flag in the page, and the admin status route's token rule. `tests/browser.rs` drives the same pages in
//! Chromium.

mod common;

use common::TestServer;
use reqwest::header;
use serde_json::Value;

async fn get(url: &str) -> reqwest::Response {
    reqwest::get(url).await.unwrap()
}

fn head(r: &reqwest::Response, name: header::HeaderName) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_assets_carry_their_types_and_cache_rules() {
    let server = TestServer::start().await;
    let base = format!("http://{}", server.addr);

    let page = get(&format!("{base}/")).await;
    assert_eq!(page.status(), 200);
    assert_eq!(
        head(&page, header::CONTENT_TYPE),
        "text/html; charset=utf-8"
    );
    assert_eq!(head(&page, header::CACHE_CONTROL), "no-cache");
    assert_eq!(head(&page, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
    assert!(head(&page, header::CONTENT_SECURITY_POLICY).contains("script-src 'self'"));
    let etag = head(&page, header::ETAG);
    let html = page.text().await.unwrap();
    // Dev login is on for a loopback listener: the page offers it without probing.
    assert!(html.contains(r#"<meta name="switchboard-dev-login" content="on">"#));
    let prefix = html
        .split("src=\"")
        .nth(1)
        .and_then(|s| s.split_once("/app.js"))
        .map(|(prefix, _)| prefix)
        .expect("a versioned app.js");

    let revalidated = reqwest::Client::new()
        .get(format!("{base}/"))
        .header(header::IF_NONE_MATCH, &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), 304);

    for (file, ty) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("switchboard.js", "text/javascript; charset=utf-8"),
        ("admin.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
    ] {
        let r = get(&format!("{base}{prefix}/{file}")).await;
        assert_eq!(r.status(), 200, "{file}");
        assert_eq!(head(&r, header::CONTENT_TYPE), ty, "{file}");
        assert_eq!(
            head(&r, header::CACHE_CONTROL),
            "public, max-age=31536000, immutable",
            "{file}"
        );
    }
    // A page of another build gets this build's file, but must not keep it.
    let stale = get(&format!("{base}/app/00000000/app.js")).await;
    assert_eq!(stale.status(), 200);
    assert_eq!(head(&stale, header::CACHE_CONTROL), "no-cache");
    assert_eq!(get(&format!("{base}{prefix}/nope.js")).await.status(), 404);
    assert_eq!(
        get(&format!("{base}{prefix}/../Cargo.toml")).await.status(),
        404
    );

    let admin = get(&format!("{base}/admin")).await;
    assert_eq!(admin.status(), 200);
    assert!(admin.text().await.unwrap().contains("admin.js"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dev_login_the_page_says_so() {
    let server = TestServer::start_with(|c| c.dev_login = false).await;
    let html = get(&format!("http://{}/", server.addr))
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains(r#"<meta name="switchboard-dev-login" content="off">"#));
}

async fn status(base: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{base}/v1/admin/status"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_status_needs_the_configured_token() {
    // No admin token configured: refused even from loopback (unlike a drain).
    let open = TestServer::start().await;
    let (code, body) = status(&format!("http://{}", open.addr), Some("anything")).await;
    assert_eq!(code, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("admin_token"));

    let server = TestServer::start_with(|c| c.admin_token = Some("s3cret".into())).await;
    let base = format!("http://{}", server.addr);
    assert_eq!(status(&base, None).await.0, 401);
    assert_eq!(status(&base, Some("s3cre")).await.0, 401);

    let api = server.api();
    let alice = api.token("alice").await;
    let mut ws = common::Client::connect(server.addr, &alice).await;
    let conv = api.group(&alice, &["bob".to_owned()]).await;
    // A send starts the conversation's actor on this node.
    ws.send_msg(&conv, "m1", "hi").await;
    ws.expect_op("ack").await;

    let (code, body) = status(&base, Some("s3cret")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["state"], "up");
    assert_eq!(body["connections"], 1);
    assert_eq!(body["online_users"], 1);
    assert_eq!(body["users"], serde_json::json!(["alice"]));
    assert_eq!(body["hosted_conversations"], 1);
    assert_eq!(body["conversations"], serde_json::json!([conv]));
    assert_eq!(body["node"], server.server().node().0);
}
