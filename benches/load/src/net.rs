//! Loopback-only addressing: target validation, source-address allocation, worker split, and the client
//! socket (bind to a source address, then connect, then the WebSocket handshake with small buffers).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::Error;

/// A client WebSocket over a plain TCP stream.
pub(crate) type Ws = WebSocketStream<TcpStream>;

/// Read buffer of every client socket: small, so that 20,000 clients cost ~80 MiB, not 2.5 GiB.
pub(crate) const CLIENT_READ_BUFFER: usize = 4096;

/// Whether an address is in 127.0.0.0/8.
pub(crate) fn is_loopback_v4(ip: Ipv4Addr) -> bool {
    ip.octets()[0] == 127
}

/// Parse a `host:port` target and refuse anything outside 127.0.0.0/8 (`localhost` means 127.0.0.1).
pub(crate) fn parse_loopback_target(s: &str) -> Result<SocketAddrV4, String> {
    parse_loopback(s, false)
}

/// Parse a `host:port` to listen on, loopback only; port 0 picks a free port.
pub(crate) fn parse_loopback_listen(s: &str) -> Result<SocketAddrV4, String> {
    parse_loopback(s, true)
}

fn parse_loopback(s: &str, allow_port_zero: bool) -> Result<SocketAddrV4, String> {
    let s = s.trim();
    let s = s
        .strip_prefix("ws://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s)
        .trim_end_matches('/');
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?}: bad port {port:?}"))?;
    if port == 0 && !allow_port_zero {
        return Err(format!("{s:?}: port 0 is not a target"));
    }
    let ip = if host.eq_ignore_ascii_case("localhost") {
        Ipv4Addr::LOCALHOST
    } else {
        host.parse::<Ipv4Addr>().map_err(|_| {
            format!("{s:?}: the target must be an IPv4 loopback address (127.0.0.0/8) or localhost")
        })?
    };
    if !is_loopback_v4(ip) {
        return Err(format!(
            "{ip} is not a loopback address: this tool only targets 127.0.0.0/8"
        ));
    }
    Ok(SocketAddrV4::new(ip, port))
}

/// A usable source address: loopback, and neither the network nor the broadcast address of 127.0.0.0/8.
pub(crate) fn check_source(ip: Ipv4Addr) -> Result<(), String> {
    if !is_loopback_v4(ip) {
        return Err(format!("source address {ip} is not in 127.0.0.0/8"));
    }
    if ip == Ipv4Addr::new(127, 0, 0, 0) || ip == Ipv4Addr::new(127, 255, 255, 255) {
        return Err(format!("source address {ip} cannot be used"));
    }
    Ok(())
}

/// The source address of client `index`: clients fill `first`, then the next address, and so on, each
/// address taking at most `ports_per_source / ports_per_client` clients (a storm client needs two ports:
/// its old socket sits in TIME_WAIT while the new one connects).
pub(crate) fn source_for(
    index: usize,
    ports_per_client: usize,
    ports_per_source: usize,
    first: Ipv4Addr,
) -> Result<Ipv4Addr, String> {
    let per_addr = ports_per_source / ports_per_client.max(1);
    if per_addr == 0 {
        return Err("ports per source address is smaller than ports per client".into());
    }
    let offset = u32::try_from(index / per_addr).map_err(|_| "too many clients".to_string())?;
    let ip = u32::from(first)
        .checked_add(offset)
        .map(Ipv4Addr::from)
        .ok_or_else(|| "source address overflow".to_string())?;
    check_source(ip)?;
    Ok(ip)
}

/// How many distinct source addresses `clients` clients use.
pub(crate) fn sources_needed(
    clients: usize,
    ports_per_client: usize,
    ports_per_source: usize,
) -> usize {
    let per_addr = (ports_per_source / ports_per_client.max(1)).max(1);
    clients.div_ceil(per_addr)
}

/// Split `n` clients into `workers` contiguous ranges whose sizes differ by at most one.
pub(crate) fn split_even(n: usize, workers: usize) -> Vec<Range<usize>> {
    let workers = workers.max(1);
    let base = n / workers;
    let extra = n % workers;
    let mut start = 0;
    (0..workers)
        .map(|w| {
            let len = base + usize::from(w < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Number of worker processes: at least `requested`, and enough that none holds more than `per_worker`
/// sockets.
pub(crate) fn workers_needed(sockets: usize, per_worker: usize, requested: usize) -> usize {
    sockets.div_ceil(per_worker.max(1)).max(requested).max(1)
}

/// The soft limit on open files from `/proc/self/limits` text (`None` when absent or unlimited).
pub(crate) fn parse_nofile_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Open one client WebSocket to `server` from `source` with small buffers, bounded by `timeout`; with
/// `recv_buffer`, the socket's kernel receive buffer is set to that many bytes (a slow consumer's).
pub(crate) async fn connect_ws(
    server: SocketAddrV4,
    source: Ipv4Addr,
    token: &str,
    timeout: Duration,
    recv_buffer: Option<u32>,
) -> Result<Ws, Error> {
    let attempt = async {
        let socket = TcpSocket::new_v4()?;
        if let Some(bytes) = recv_buffer {
            socket.set_recv_buffer_size(bytes)?;
        }
        socket.bind(SocketAddr::new(source.into(), 0))?;
        let stream = socket.connect(SocketAddr::V4(server)).await?;
        stream.set_nodelay(true)?;
        let url = format!("ws://{server}/v1/ws?token={token}");
        let config = WebSocketConfig::default()
            .read_buffer_size(CLIENT_READ_BUFFER)
            .write_buffer_size(0)
            .max_message_size(Some(1 << 20))
            .max_frame_size(Some(1 << 20));
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
        // A node past its handshake rate upgrades and closes at once with 1013 and a retry hint. Nothing
        // else comes unasked this early in the load generator's scenarios (sends start after the setup).
        if let Ok(Some(Ok(Message::Close(Some(close))))) =
            tokio::time::timeout(ADMISSION_PEEK, ws.next()).await
        {
            if u16::from(close.code) == 1013 {
                return Err(Box::new(TryLater(retry_hint(&close.reason))) as Error);
            }
            return Err(format!("closed at once: {}", u16::from(close.code)).into());
        }
        Ok::<_, Error>(ws)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err("connect timed out".into()),
    }
}

/// How long a new connection waits for a 1013 close before it counts as admitted.
const ADMISSION_PEEK: Duration = Duration::from_millis(10);

/// The node closed the new connection with 1013: try again after this many milliseconds.
#[derive(Debug)]
pub(crate) struct TryLater(pub(crate) u64);

impl std::fmt::Display for TryLater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "1013 try again later ({} ms)", self.0)
    }
}

impl std::error::Error for TryLater {}

/// `retry_after_ms` from a 1013 close reason (`{"retry_after_ms":N}`); a second when it has none.
pub(crate) fn retry_hint(reason: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(reason)
        .ok()
        .and_then(|v| v["retry_after_ms"].as_u64())
        .unwrap_or(1000)
}

/// A short, stable label for a connect error, for the error table.
pub(crate) fn connect_error_label(e: &Error) -> String {
    use tokio_tungstenite::tungstenite::Error as WsError;
    if e.downcast_ref::<TryLater>().is_some() {
        return "connect: 1013 try again later (node admission)".into();
    }
    if let Some(ws) = e.downcast_ref::<WsError>() {
        return match ws {
            WsError::Http(resp) => format!("connect: http {}", resp.status().as_u16()),
            WsError::Io(io) => format!("connect: {:?}", io.kind()),
            other => format!("connect: {}", short(&other.to_string())),
        };
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return match io.raw_os_error() {
            Some(99) => "connect: EADDRNOTAVAIL (out of ports)".into(),
            Some(24) => "connect: EMFILE (out of file descriptors)".into(),
            Some(111) => "connect: ECONNREFUSED".into(),
            _ => format!("connect: {:?}", io.kind()),
        };
    }
    format!("connect: {}", short(&e.to_string()))
}

fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_loopback_targets_only() {
        assert_eq!(
            parse_loopback_target("127.0.0.1:8080").unwrap(),
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080)
        );
        assert_eq!(
            parse_loopback_target("localhost:9").unwrap(),
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9)
        );
        assert_eq!(
            parse_loopback_target("http://127.9.8.7:18080/").unwrap(),
            SocketAddrV4::new(Ipv4Addr::new(127, 9, 8, 7), 18080)
        );
        for bad in [
            "10.0.0.1:8080",
            "128.0.0.1:80",
            "0.0.0.0:8080",
            "example.com:80",
            "[::1]:8080",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:99999",
            "192.168.1.2:8080",
        ] {
            assert!(parse_loopback_target(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(parse_loopback_listen("127.0.0.1:0").unwrap().port(), 0);
        assert!(parse_loopback_listen("0.0.0.0:0").is_err());
    }

    #[test]
    fn source_addresses_fill_one_address_then_the_next() {
        let first = Ipv4Addr::new(127, 0, 0, 2);
        assert_eq!(source_for(0, 1, 20_000, first).unwrap(), first);
        assert_eq!(source_for(19_999, 1, 20_000, first).unwrap(), first);
        assert_eq!(
            source_for(20_000, 1, 20_000, first).unwrap(),
            Ipv4Addr::new(127, 0, 0, 3)
        );
        // Storm clients take two ports each.
        assert_eq!(
            source_for(10_000, 2, 20_000, first).unwrap(),
            Ipv4Addr::new(127, 0, 0, 3)
        );
        assert_eq!(sources_needed(20_000, 1, 20_000), 1);
        assert_eq!(sources_needed(20_001, 1, 20_000), 2);
        assert_eq!(sources_needed(20_000, 2, 20_000), 2);
        // Crosses an octet boundary.
        assert_eq!(
            source_for(2, 1, 1, Ipv4Addr::new(127, 0, 0, 255)).unwrap(),
            Ipv4Addr::new(127, 0, 1, 1)
        );
        // Never leaves 127.0.0.0/8 nor uses its broadcast address.
        assert!(source_for(1, 1, 1, Ipv4Addr::new(127, 255, 255, 254)).is_err());
        assert!(source_for(0, 1, 1, Ipv4Addr::new(10, 0, 0, 1)).is_err());
        assert!(source_for(0, 3, 2, first).is_err());
    }

    #[test]
    fn workers_split_evenly_and_respect_the_socket_cap() {
        assert_eq!(split_even(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(split_even(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
        assert_eq!(split_even(5, 0), vec![0..5]);
        assert_eq!(workers_needed(19_000, 18_000, 1), 2);
        assert_eq!(workers_needed(100, 18_000, 3), 3);
        assert_eq!(workers_needed(0, 18_000, 0), 1);
    }

    #[test]
    fn parses_the_open_files_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95000                95000                processes \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(parse_nofile_limit(limits), Some(20_000));
        assert_eq!(
            parse_nofile_limit("Max open files unlimited unlimited files"),
            None
        );
        assert_eq!(parse_nofile_limit(""), None);
    }
}
