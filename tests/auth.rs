//! JWTs at the WebSocket handshake and on REST, on real sockets: every kind of bad token is refused with 401
//! before the upgrade, and a socket lives no longer than its token (closed with 1008 when it expires).

mod common;

use std::path::Path;
use std::time::Duration;

use common::raw::{read_head, upgrade_request};
use common::{Api, Client, TestServer};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use switchboard::config::JwtAlgorithm;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const SECRET: &str = "a test secret that is long enough";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The status line of the answer to a WebSocket upgrade with `token`.
async fn upgrade_status(server: &TestServer, token: &str) -> String {
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(upgrade_request("/v1/ws", token).as_bytes())
        .await
        .unwrap();
    let (head, _) = read_head(&mut tcp).await;
    head.lines().next().unwrap().to_owned()
}

/// Each token must be refused at the upgrade (401, before any socket) and on REST (401 `unauthorized`).
async fn all_refused(server: &TestServer, tokens: &[(&str, String)]) {
    let api = Api::new(server.addr);
    for (what, token) in tokens {
        let status = upgrade_status(server, token).await;
        assert!(status.starts_with("HTTP/1.1 401"), "{what}: {status}");
        let (status, body) = api
            .call(reqwest::Method::GET, "/v1/conversations", token, None)
            .await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hs256_node_refuses_every_bad_token_at_the_handshake() {
    let server = TestServer::start_with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_issuer = Some("https://auth.example.com/".into());
        c.jwt_audience = Some("switchboard".into());
    })
    .await;
    let now = now();
    let claims = |extra: Value| {
        let mut c = json!({"sub":"alice","exp":now+600,"iss":"https://auth.example.com/","aud":"switchboard"});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let good = hs256(&claims(json!({})), SECRET.as_bytes());
    assert!(upgrade_status(&server, &good)
        .await
        .starts_with("HTTP/1.1 101"));

    let parts: Vec<&str> = good.split('.').collect();
    let mut sig = parts[2].as_bytes().to_vec();
    sig[3] = if sig[3] == b'x' { b'y' } else { b'x' };
    let tampered_sig = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        String::from_utf8(sig).unwrap()
    );
    let tampered_claims = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims(json!({"sub":"mallory"})).to_string().as_bytes()),
        parts[2]
    );
    let alg_none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    let rsa = std::fs::read(fixture("rsa-private.pem")).unwrap();
    let rs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims(json!({})),
        &EncodingKey::from_rsa_pem(&rsa).unwrap(),
    )
    .unwrap();
    let mut no_iss = claims(json!({}));
    no_iss.as_object_mut().unwrap().remove("iss");
    let mut no_exp = claims(json!({}));
    no_exp.as_object_mut().unwrap().remove("exp");
    all_refused(
        &server,
        &[
            ("tampered signature", tampered_sig),
            ("tampered claims", tampered_claims),
            ("signature stripped", format!("{}.{}.", parts[0], parts[1])),
            (
                "another secret",
                hs256(&claims(json!({})), b"another secret"),
            ),
            (
                "expired",
                hs256(&claims(json!({"exp": now - 120})), SECRET.as_bytes()),
            ),
            (
                "not valid yet",
                hs256(&claims(json!({"nbf": now + 300})), SECRET.as_bytes()),
            ),
            (
                "wrong iss",
                hs256(
                    &claims(json!({"iss":"https://evil.example.com/"})),
                    SECRET.as_bytes(),
                ),
            ),
            (
                "wrong aud",
                hs256(&claims(json!({"aud":"another-service"})), SECRET.as_bytes()),
            ),
            ("no iss", hs256(&no_iss, SECRET.as_bytes())),
            ("no exp", hs256(&no_exp, SECRET.as_bytes())),
            ("alg none", alg_none),
            ("RS256 on an HS256 node", rs256),
            ("garbage", "not.a.jwt".into()),
        ],
    )
    .await;
}

/// The classic confusion: an HS256 token whose "secret" is the node's RSA public key is refused, because
/// the algorithm is pinned to RS256 by configuration, not taken from the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rs256_node_refuses_hs256_tokens_keyed_with_its_public_key() {
    let server = TestServer::start_with(|c| {
        c.jwt_algorithm = JwtAlgorithm::Rs256;
        c.jwt_public_key = Some(fixture("rsa-public.pem"));
        c.dev_login = false;
    })
    .await;
    let claims = json!({"sub":"alice","exp":now()+600});
    let rsa = std::fs::read(fixture("rsa-private.pem")).unwrap();
    let good = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&rsa).unwrap(),
    )
    .unwrap();
    assert!(upgrade_status(&server, &good)
        .await
        .starts_with("HTTP/1.1 101"));
    let public = std::fs::read(fixture("rsa-public.pem")).unwrap();
    let mut der_header = Header::new(Algorithm::HS384);
    der_header.typ = None;
    all_refused(
        &server,
        &[
            (
                "HS256 keyed with the public key PEM",
                hs256(&claims, &public),
            ),
            (
                "HS384 keyed with the public key PEM",
                jsonwebtoken::encode(&der_header, &claims, &EncodingKey::from_secret(&public))
                    .unwrap(),
            ),
        ],
    )
    .await;
}

/// A socket is closed with 1008 when its token expires, however busy it is; REST refuses the token from
/// then on; a connection with a longer-lived token stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_mid_session_closes_the_socket_with_1008() {
    let server = TestServer::start_with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_leeway_secs = 0;
    })
    .await;
    let short = hs256(&json!({"sub":"alice","exp":now()+2}), SECRET.as_bytes());
    let long = hs256(&json!({"sub":"alice","exp":now()+600}), SECRET.as_bytes());
    let mut expiring = Client::connect(server.addr, &short).await;
    let mut lasting = Client::connect(server.addr, &long).await;
    let started = tokio::time::Instant::now();
    // Traffic does not extend a token's life.
    let code = loop {
        expiring.send(json!({"op":"ping"})).await;
        match expiring.recv().await {
            common::Recv::Frame(f) => assert_eq!(f["op"], "pong"),
            common::Recv::Closed(code) => break code,
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the socket outlived its token"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(code, Some(1008));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the token expired: {:?}",
        started.elapsed()
    );
    let (status, _) = Api::new(server.addr)
        .call(reqwest::Method::GET, "/v1/conversations", &short, None)
        .await;
    assert_eq!(status, 401);
    lasting.send(json!({"op":"ping"})).await;
    assert_eq!(lasting.frame().await["op"], "pong");
}
