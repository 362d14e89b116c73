//! Helpers for testing a behaviour against a real node: [`TestNode`] starts one in this process on
//! `127.0.0.1:0` with its own data directory, mints tokens, and makes the REST calls a test needs (a REST
//! send goes through `on_message`, `on_stored` and `on_deliver` like a WebSocket send). Connect WebSocket
//! clients of your choice to [`TestNode::ws_url`].
//!
//! ```no_run
//! use switchboard::testing::{Noop, TestNode};
//! use switchboard::Server;
//!
//! # async fn test() -> anyhow::Result<()> {
//! let node = TestNode::start(Server::builder().behaviour(Noop)).await?;
//! let conv = node.group("alice", &["bob"]).await?;
//! let stored = node.send("alice", &conv, "m1", "hello").await?;
//! assert_eq!(stored["seq"], 1);
//! node.stop().await;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::{json, Value};
use switchboard_actors::behaviour::{async_trait, Behaviour};

use crate::auth::Auth;
use crate::builder::ServerBuilder;
use crate::server::Server;

/// A behaviour that implements nothing: every hook is the default no-op (what the benchmarks of the hooks'
/// cost register).
#[derive(Debug, Default, Clone, Copy)]
pub struct Noop;

#[async_trait]
impl Behaviour for Noop {
    fn name(&self) -> &str {
        "noop"
    }
}

/// A REST call refused: its status and error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HTTP {status}: {code}")]
pub struct Refused {
    /// The HTTP status.
    pub status: u16,
    /// The error's `code` (`rejected`, `behaviour_failed`, …).
    pub code: String,
}

/// A node in this process, for tests. Stop it with [`TestNode::stop`] (dropping it leaves the node to the
/// runtime's end).
pub struct TestNode {
    server: Option<Server>,
    addr: SocketAddr,
    dir: PathBuf,
    auth: Auth,
    http: reqwest::Client,
}

impl TestNode {
    /// Start `builder` on `127.0.0.1:0` with a fresh data directory and two HTTP workers (its other
    /// settings are kept).
    pub async fn start(mut builder: ServerBuilder) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-test-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let config = builder.config_or_default();
        config.data_dir = dir.clone();
        config.http_workers = 2;
        let auth = Auth::from_config(config)?;
        let server = builder
            .start(std::net::TcpListener::bind("127.0.0.1:0")?)
            .await?;
        Ok(Self {
            addr: server.local_addr(),
            server: Some(server),
            dir,
            auth,
            http: reqwest::Client::new(),
        })
    }

    /// The node's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The running server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    /// A token for `user` (valid for an hour).
    pub fn token(&self, user: &str) -> String {
        self.auth.mint(user, 3600).expect("HS256 test node")
    }

    /// The WebSocket URL for `user` (token in the query string).
    pub fn ws_url(&self, user: &str) -> String {
        format!("ws://{}/v1/ws?token={}", self.addr, self.token(user))
    }

    async fn call(
        &self,
        method: reqwest::Method,
        user: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Result<Value, Refused>> {
        let mut request = self
            .http
            .request(method, format!("http://{}{path}", self.addr))
            .bearer_auth(self.token(user));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(Ok(body));
        }
        let code = body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Ok(Err(Refused { status, code }))
    }

    /// Create a group named after its creator with `members` (plus `creator`); its id.
    pub async fn group(&self, creator: &str, members: &[&str]) -> anyhow::Result<String> {
        let body = json!({"kind": "group", "name": creator, "members": members});
        self.created(creator, body).await
    }

    /// Create (or find) the DM between `a` and `b`; its id.
    pub async fn dm(&self, a: &str, b: &str) -> anyhow::Result<String> {
        self.created(a, json!({"kind": "dm", "members": [b]})).await
    }

    async fn created(&self, user: &str, body: Value) -> anyhow::Result<String> {
        let created = self
            .call(reqwest::Method::POST, user, "/v1/conversations", Some(body))
            .await??;
        Ok(created["id"].as_str().unwrap_or_default().to_owned())
    }

    /// Send as `user` over REST: the stored message (`{"seq","id","body",…}`), or the refusal.
    pub async fn send(
        &self,
        user: &str,
        conv: &str,
        msg_id: &str,
        body: &str,
    ) -> anyhow::Result<Value> {
        Ok(self.try_send(user, conv, msg_id, body).await??)
    }

    /// [`TestNode::send`], with a refusal as a value to look at.
    pub async fn try_send(
        &self,
        user: &str,
        conv: &str,
        msg_id: &str,
        body: &str,
    ) -> anyhow::Result<Result<Value, Refused>> {
        let path = format!("/v1/conversations/{conv}/messages");
        let body = json!({"msg_id": msg_id, "body": body});
        self.call(reqwest::Method::POST, user, &path, Some(body))
            .await
    }

    /// Add `who` to the group `conv` as `user`: whether added, or the refusal.
    pub async fn add_member(
        &self,
        user: &str,
        conv: &str,
        who: &str,
    ) -> anyhow::Result<Result<bool, Refused>> {
        let path = format!("/v1/conversations/{conv}/members");
        let answer = self
            .call(
                reqwest::Method::POST,
                user,
                &path,
                Some(json!({"user": who})),
            )
            .await?;
        Ok(answer.map(|v| v["added"].as_bool().unwrap_or(false)))
    }

    /// The conversation's stored messages (up to 200, oldest first), as `user` reads them.
    pub async fn history(&self, user: &str, conv: &str) -> anyhow::Result<Vec<Value>> {
        let path = format!("/v1/conversations/{conv}/messages?after=0&limit=200");
        let page = self.call(reqwest::Method::GET, user, &path, None).await??;
        Ok(page["messages"].as_array().cloned().unwrap_or_default())
    }

    /// The node's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("http://{}/metrics", self.addr);
        Ok(self.http.get(url).send().await?.text().await?)
    }

    /// Drain and stop the node, and remove its data directory.
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
