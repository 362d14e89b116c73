//! Test helpers: servers on port 0, real WebSocket clients (tokio-tungstenite) and REST calls (reqwest).
#![allow(dead_code, unreachable_pub)]

pub mod raw;
pub mod receiver;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard::config::Config;
use switchboard::server::Server;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A `cassandra://` URL with a fresh keyspace on the test node: `SWITCHBOARD_TEST_CASSANDRA` (host:port) if
/// set — `scripts/test` sets it after starting the three-node test cluster — else `scripts/cassandra start 3`
/// is run here.
pub fn cassandra_url() -> String {
    let contact = std::env::var("SWITCHBOARD_TEST_CASSANDRA").unwrap_or_else(|_| {
        cassandra(&["start", "3"]);
        "127.0.0.1:9042".into()
    });
    let keyspace = format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    format!("cassandra://{contact}/{keyspace}?timeout_ms=10000")
}

/// Run `scripts/cassandra ARGS…` (start, stop, …) and require success.
pub fn cassandra(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cassandra");
    let ok = std::process::Command::new(script)
        .args(args)
        .status()
        .expect("run scripts/cassandra")
        .success();
    assert!(ok, "scripts/cassandra {args:?} failed");
}

/// How long a test waits for one expected frame.
pub const WAIT: Duration = Duration::from_secs(10);

/// Wait until the server at `addr` (another process, starting) answers `/readyz` with 200; panic after 30 s.
pub async fn wait_ready(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("http://{addr}/readyz")).await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server running in this process on 127.0.0.1:0, with its own data directory.
pub struct TestServer {
    pub server: Option<Server>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, tweak).await
    }

    /// Start on an existing data directory (a restart).
    pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::for_data_dir(dir.path());
        config.http_workers = 2;
        tweak(&mut config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = Server::start(&config, listener).await.unwrap();
        let addr = server.local_addr();
        Self {
            server: Some(server),
            addr,
            dir,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    /// Drain and stop; returns the data directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.server.take().unwrap().shutdown().await;
        self.dir
    }

    pub fn api(&self) -> Api {
        Api::new(self.addr)
    }
}

/// REST client for one server.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    pub async fn token(&self, user: &str) -> String {
        let r = self
            .http
            .post(format!("{}/v1/dev/token", self.base))
            .json(&json!({"user": user}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Any request with a bearer token; returns status and JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn create(&self, token: &str, body: Value) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            "/v1/conversations",
            token,
            Some(body),
        )
        .await
    }

    /// Create a group of `members` (plus the creator) and return its id.
    pub async fn group(&self, token: &str, members: &[String]) -> String {
        let (status, v) = self
            .create(token, json!({"kind":"group","name":"g","members": members}))
            .await;
        assert_eq!(status, 201, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    pub async fn dm(&self, token: &str, other: &str) -> String {
        let (status, v) = self
            .create(token, json!({"kind":"dm","members":[other]}))
            .await;
        assert!(status == 201 || status == 200, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    pub async fn history(&self, token: &str, conv: &str, query: &str) -> (u16, Value) {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/conversations/{conv}/messages{query}"),
            token,
            None,
        )
        .await
    }

    /// Every message of a conversation, paging forward.
    pub async fn all_messages(&self, token: &str, conv: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let (status, page) = self
                .history(token, conv, &format!("?after={after}&limit=200"))
                .await;
            assert_eq!(status, 200, "{page}");
            let msgs = page["messages"].as_array().unwrap().clone();
            if let Some(last) = msgs.last() {
                after = last["seq"].as_u64().unwrap();
            }
            out.extend(msgs);
            if !page["has_more"].as_bool().unwrap() {
                return out;
            }
        }
    }
}

/// A WebSocket client speaking Switchboard's protocol. It passes over `presence` frames (contacts coming
/// and going) unless made to [`Client::hear_presence`]: tests of other things need not expect them.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    presence: bool,
}

pub enum Recv {
    Frame(Value),
    Closed(Option<u16>),
}

impl Client {
    pub async fn connect(addr: SocketAddr, token: &str) -> Self {
        Self::try_connect(addr, token)
            .await
            .expect("websocket connect")
    }

    pub async fn try_connect(
        addr: SocketAddr,
        token: &str,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let url = format!("ws://{addr}/v1/ws?token={token}");
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
        Ok(Self {
            ws,
            presence: false,
        })
    }

    /// A client that sends its token in `Authorization: Bearer`, not in the query string.
    pub async fn connect_with_header(addr: SocketAddr, token: &str) -> Self {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        Self {
            ws,
            presence: false,
        }
    }

    /// A client whose socket has a small receive buffer (for slow-consumer tests).
    pub async fn connect_small_buffer(addr: SocketAddr, token: &str) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let url = format!("ws://{addr}/v1/ws?token={token}");
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            url,
            MaybeTlsStream::Plain(stream),
            Some(config),
        )
        .await
        .unwrap();
        Self {
            ws,
            presence: false,
        }
    }

    /// Hand `presence` frames to the test like any other.
    pub fn hear_presence(mut self) -> Self {
        self.presence = true;
        self
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws
            .send(WsMessage::Text(text.to_owned().into()))
            .await
            .unwrap();
    }

    pub async fn send_msg(&mut self, conv: &str, msg_id: &str, body: &str) {
        self.send(json!({"op":"send","conv":conv,"msg_id":msg_id,"body":body}))
            .await;
    }

    /// The next JSON frame or the close, within `WAIT`.
    pub async fn recv(&mut self) -> Recv {
        self.recv_within(WAIT)
            .await
            .expect("timed out waiting for a frame")
    }

    pub async fn recv_within(&mut self, wait: Duration) -> Option<Recv> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match next {
                None => return Some(Recv::Closed(None)),
                Some(Err(_)) => return Some(Recv::Closed(None)),
                Some(Ok(WsMessage::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["op"] == "presence" && !self.presence {
                        continue;
                    }
                    return Some(Recv::Frame(v));
                }
                Some(Ok(WsMessage::Close(c))) => {
                    return Some(Recv::Closed(c.map(|c| u16::from(c.code))))
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next JSON frame; panics on close.
    pub async fn frame(&mut self) -> Value {
        match self.recv().await {
            Recv::Frame(v) => v,
            Recv::Closed(code) => panic!("connection closed ({code:?}) while waiting for a frame"),
        }
    }

    /// Skip frames until one with this `op`.
    pub async fn expect_op(&mut self, op: &str) -> Value {
        loop {
            let f = self.frame().await;
            if f["op"] == op {
                return f;
            }
        }
    }

    /// Wait for the close and return its code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match self.recv().await {
                Recv::Closed(code) => return code,
                Recv::Frame(_) => continue,
            }
        }
    }

    /// Nothing arrives for `d`.
    pub async fn silent_for(&mut self, d: Duration) -> bool {
        self.recv_within(d).await.is_none()
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

pub fn close_code(c: CloseCode) -> u16 {
    u16::from(c)
}
