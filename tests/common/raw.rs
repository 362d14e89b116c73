//! A WebSocket client over a raw TCP socket, for what client libraries never send: frames are built byte by
//! byte (unmasked, reserved bits, any opcode or length header), and the server's answers are read as they
//! come, close frames included.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// A client frame: FIN set as asked, masked unless `mask` is `None`.
pub fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked client frame, as every client must send.
pub fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(fin, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
}

/// The header of a masked frame announcing `len` bytes (with its masking key), and no payload.
pub fn header_only(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode, 0x80 | 127];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[1, 2, 3, 4]);
    out
}

/// An upgrade request for `path` with `?token=`.
pub fn upgrade_request(path: &str, token: &str) -> String {
    format!(
        "GET {path}?token={token} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// Read until the end of the HTTP response head; returns the head and whatever followed it.
pub async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8(buf).unwrap(), rest);
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("an HTTP answer in time")
            .unwrap();
        assert!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The first whole server frame in `buf`, if it is all there: (opcode, header length, payload length).
pub fn whole_frame(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let (len, header) = match *buf.get(1)? & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    (buf.len() >= header + len).then_some((buf[0] & 0x0f, header, len))
}

/// An upgraded raw connection, with the bytes read past the handshake.
pub struct RawClient {
    pub tcp: TcpStream,
    pub buf: Vec<u8>,
}

impl RawClient {
    /// Upgrade at `/v1/ws` with `token`, sending `first` in the same write as the request.
    pub async fn upgrade(addr: SocketAddr, token: &str, first: &[u8]) -> Self {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut request = upgrade_request("/v1/ws", token).into_bytes();
        request.extend_from_slice(first);
        tcp.write_all(&request).await.unwrap();
        let (head, buf) = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "RFC 6455's sample key gets its sample answer: {head}"
        );
        Self { tcp, buf }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// The next server frame (unmasked), reading more as needed: (opcode, payload).
    pub async fn read_frame(&mut self) -> (u8, Vec<u8>) {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some((opcode, header, len)) = whole_frame(&self.buf) {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                let payload = self.buf[header..header + len].to_vec();
                self.buf.drain(..header + len);
                return (opcode, payload);
            }
            let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
                .await
                .expect("a frame in time")
                .unwrap();
            assert!(n > 0, "closed without a close frame");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame, which must be a text frame: its JSON.
    pub async fn read_json(&mut self) -> serde_json::Value {
        let (opcode, payload) = self.read_frame().await;
        assert_eq!(opcode, TEXT, "a text frame, got opcode {opcode}");
        serde_json::from_slice(&payload).unwrap()
    }

    /// The next frame must be a close frame: its code. Then the server must end the TCP connection.
    pub async fn closed_with(&mut self) -> u16 {
        let (opcode, payload) = self.read_frame().await;
        assert_eq!(
            opcode,
            CLOSE,
            "a close frame, got opcode {opcode} ({:?})",
            String::from_utf8_lossy(&payload)
        );
        assert!(payload.len() >= 2, "the close frame carries a code");
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        assert!(
            std::str::from_utf8(&payload[2..]).is_ok(),
            "the reason is UTF-8"
        );
        self.ends().await;
        code
    }

    /// The server ends the TCP connection, with nothing more written.
    pub async fn ends(&mut self) {
        assert!(self.buf.is_empty(), "nothing after the close frame");
        let mut rest = [0u8; 64];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut rest))
            .await
            .expect("the server closes the socket")
            .unwrap_or(0);
        assert_eq!(n, 0, "nothing after the close frame");
    }
}
