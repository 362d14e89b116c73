//! The browser client (`GET /`) and the operator's page (`GET /admin`), served from files under `web/` that
//! are compiled into the binary (decision 0020): no front-end build, nothing read from disk at run time.
//!
//! The two pages are served `no-cache` with an `ETag`, so a browser revalidates them at every load (a `304`
//! when nothing changed). Their scripts and styles live under `/app/<version>/`, where `<version>` is a digest
//! of every embedded file: a page names the assets of its own build, which are served `immutable` for a
//! year. A page of another build (during a rolling upgrade) still gets this build's files, uncached.
//! Every answer carries a content security policy that allows this origin only, and no inline script.

use std::sync::OnceLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $content_type:literal) => {
        Asset {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/", $name)),
        }
    };
}

/// The scripts and styles, served under `/app/<version>/<name>`.
const ASSETS: &[Asset] = &[
    asset!("switchboard.js", "text/javascript; charset=utf-8"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("admin.js", "text/javascript; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
];

/// The pages, filled in by [`Pages`].
const INDEX: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/index.html"));
const ADMIN: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/admin.html"));

/// Same origin only; `connect-src 'self'` covers the page's own `ws:`/`wss:` origin (CSP level 3).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// A digest of every embedded file: it changes whenever any of them does.
fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        let mut h = crc32fast::Hasher::new();
        for a in ASSETS {
            h.update(a.name.as_bytes());
            h.update(a.body);
        }
        h.update(INDEX.as_bytes());
        h.update(ADMIN.as_bytes());
        format!("{:08x}", h.finalize())
    })
}

/// The two pages of this process, filled in once per worker: `{{ASSETS}}` becomes `/app/<version>` and
/// `{{DEV_LOGIN}}` says whether `POST /v1/dev/token` exists (`on`/`off`), so the page offers dev login without
/// probing for it.
struct Pages {
    index: String,
    admin: String,
    etag: String,
}

impl Pages {
    fn new(dev_login: bool) -> Self {
        let login = if dev_login { "on" } else { "off" };
        let fill = |t: &str| {
            t.replace("{{ASSETS}}", &format!("/app/{}", version()))
                .replace("{{DEV_LOGIN}}", login)
        };
        Self {
            index: fill(INDEX),
            admin: fill(ADMIN),
            etag: format!("\"{}-{login}\"", version()),
        }
    }
}

/// Register `/`, `/admin` and `/app/{version}/{file}`.
pub fn routes(cfg: &mut web::ServiceConfig, dev_login: bool) {
    cfg.app_data(web::Data::new(Pages::new(dev_login)))
        .route("/", web::get().to(index))
        .route("/admin", web::get().to(admin))
        .route("/app/{version}/{file}", web::get().to(asset));
}

async fn index(req: HttpRequest, pages: web::Data<Pages>) -> HttpResponse {
    html(&req, &pages.etag, pages.index.clone())
}

async fn admin(req: HttpRequest, pages: web::Data<Pages>) -> HttpResponse {
    html(&req, &pages.etag, pages.admin.clone())
}

/// A page: revalidated at every load, `304` when the browser holds this build's copy.
fn html(req: &HttpRequest, etag: &str, body: String) -> HttpResponse {
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut res = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    res.insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::ETAG, etag));
    secured(&mut res);
    if fresh {
        return res.finish();
    }
    res.content_type("text/html; charset=utf-8").body(body)
}

async fn asset(path: web::Path<(String, String)>) -> HttpResponse {
    let (wanted, file) = path.into_inner();
    let Some(a) = ASSETS.iter().find(|a| a.name == file) else {
        return HttpResponse::NotFound().finish();
    };
    let cache = if wanted == version() {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut res = HttpResponse::Ok();
    res.insert_header((header::CACHE_CONTROL, cache));
    secured(&mut res);
    res.content_type(a.content_type).body(a.body)
}

fn secured(res: &mut actix_web::HttpResponseBuilder) {
    res.insert_header((
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    ))
    .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
    .insert_header((header::REFERRER_POLICY, "no-referrer"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_name_their_build_s_assets_and_every_asset_exists() {
        for template in [INDEX, ADMIN] {
            let pages = Pages::new(true);
            let page = if template == INDEX {
                &pages.index
            } else {
                &pages.admin
            };
            assert!(!page.contains("{{"), "an unfilled placeholder");
            for link in page.split(&format!("/app/{}/", version())).skip(1) {
                let name = &link[..link.find('"').expect("a quoted link")];
                assert!(
                    ASSETS.iter().any(|a| a.name == name),
                    "{name} is not embedded"
                );
            }
        }
    }

    #[test]
    fn the_modules_import_only_embedded_files() {
        for a in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            let text = std::str::from_utf8(a.body).unwrap();
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let target = line.rsplit("'./").next().unwrap().trim_end_matches("';");
                assert!(
                    ASSETS.iter().any(|b| b.name == target),
                    "{} imports {target}, which is not embedded",
                    a.name
                );
            }
        }
    }
}
