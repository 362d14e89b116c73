//! Who may open a WebSocket, how many and how fast: the checks the upgrade makes before the `101`, beside
//! the token (`docs/security.md`).
//!
//! - **Origin**: when `allowed_origins` is set, a request carrying `Origin` (every browser sends it on a
//!   WebSocket) must match one exactly: 403 `forbidden_origin`. A request without it is not a browser page,
//!   which is what the check protects against (cross-site WebSocket hijacking), and passes.
//! - **Handshakes per IP per second**: a token bucket per client address (governor's keyed limiter),
//!   checked first, before the token's signature costs anything: 429 `rate_limited` with
//!   `retry_after_ms` and `Retry-After`.
//! - **Handshakes per second on the node**: one token bucket for every address together, checked after the
//!   token (a handshake with a bad token does not use up the node's admissions). Past it the handshake is answered with the
//!   upgrade and at once a close **1013** (try again later) whose reason is `{"retry_after_ms":N}`: a
//!   browser sees a close code and its reason, never an HTTP status. N is when the bucket has room again
//!   plus jitter over about the time the node needs to admit those refused lately (at least a second), so
//!   the refused clients of a storm come back spread out, not together to be refused again.
//! - **Open connections per user and per IP**: counted here, at the edge; an [`Admitted`] held by the
//!   connection's task gives its place back when the task ends. Past either: 429 `too_many_connections`.
//!
//! Each check costs nothing when its limit is off, and none runs on the path of a message.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use actix_http::header::HeaderMap;
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use switchboard_actors::connection::forget_quiet_keys;
use switchboard_actors::protocol::{ErrorCode, ProtocolError};
use tracing::debug;

use crate::config;

/// The upgrade's admission limits, shared by every worker.
pub struct Admission {
    config: config::Admission,
    handshakes: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    node_handshakes: Option<DefaultDirectRateLimiter>,
    /// Handshakes refused by the node's rate lately: (when last counted, count decaying with a 1 s time
    /// constant).
    backlog: Mutex<(std::time::Instant, f64)>,
    open: Mutex<Open>,
}

/// Open connections per user and per address (only those whose limit is on are counted).
#[derive(Default)]
struct Open {
    per_user: HashMap<String, usize>,
    per_ip: HashMap<IpAddr, usize>,
}

/// A connection's place under the limits, given back when it is dropped.
pub struct Admitted {
    admission: Arc<Admission>,
    user: Option<String>,
    ip: Option<IpAddr>,
}

impl Admission {
    /// Limits as configured. Must be called on a Tokio runtime when handshakes are limited (a task forgets
    /// addresses that have been quiet, so the limiter's memory follows the addresses seen recently).
    pub fn new(config: config::Admission) -> Arc<Self> {
        let handshakes = config
            .handshakes_per_ip
            .map(|n| Arc::new(RateLimiter::keyed(Quota::per_second(n))));
        if let Some(limiter) = &handshakes {
            forget_quiet_keys(limiter);
        }
        let node_handshakes = config
            .handshakes_per_node
            .map(|n| RateLimiter::direct(Quota::per_second(n)));
        Arc::new(Self {
            handshakes,
            node_handshakes,
            backlog: Mutex::new((std::time::Instant::now(), 0.0)),
            config,
            open: Mutex::default(),
        })
    }

    /// The client's address: the TCP peer's, or, when the peer is a trusted proxy, the rightmost address
    /// of `X-Forwarded-For` that is not a trusted proxy (each proxy appends the address it got the request
    /// from; what is left of a client's own address is whatever the client wrote, so it is not believed).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = &self.config.trusted_proxies;
        if !trusted.contains(&peer) {
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all(actix_http::header::X_FORWARDED_FOR)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        // From the right, past our own proxies; an entry that is not an address ends the walk at the last
        // proxy seen.
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            client = ip;
            if !trusted.contains(&ip) {
                break;
            }
        }
        client
    }

    /// The checks that need no token: the handshake rate of `ip`, then the `Origin`.
    pub fn before_token(&self, ip: IpAddr, headers: &HeaderMap) -> Result<(), ProtocolError> {
        if let Some(limiter) = &self.handshakes {
            if let Err(not_until) = limiter.check_key(&ip) {
                let wait = not_until.wait_time_from(limiter.clock().now());
                metrics::counter!("switchboard_refused_total", "reason" => "handshake_rate")
                    .increment(1);
                let mut e = ProtocolError::new(
                    ErrorCode::RateLimited,
                    "too many WebSocket handshakes from this address; retry after retry_after_ms",
                );
                e.retry_after_ms = Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1));
                return Err(e);
            }
        }
        if let Some(allowed) = &self.config.origins {
            let origin = headers.get(actix_http::header::ORIGIN);
            if origin.is_some_and(|o| !allowed.iter().any(|a| a.as_bytes() == o.as_bytes())) {
                metrics::counter!("switchboard_refused_total", "reason" => "origin").increment(1);
                debug!("websocket refused: origin not allowed");
                return Err(ProtocolError::new(
                    ErrorCode::ForbiddenOrigin,
                    "this origin may not open a WebSocket here",
                ));
            }
        }
        Ok(())
    }

    /// Take one handshake from the node's bucket, or say in how many milliseconds to try again (when it has
    /// room, plus jitter of up to a second).
    pub fn node_handshake(&self) -> Result<(), u64> {
        let Some(limiter) = &self.node_handshakes else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            metrics::counter!("switchboard_refused_total", "reason" => "node_handshake_rate")
                .increment(1);
            let wait = not_until.wait_time_from(limiter.clock().now());
            u64::try_from(wait.as_millis())
                .unwrap_or(u64::MAX)
                .saturating_add(1 + rand::random::<u64>() % self.retry_spread_ms())
        })
    }

    /// Over how long to spread the refused clients' retries: about as long as the node needs to admit
    /// those refused lately (a count decaying with a 1 s time constant, over the rate), at least a second.
    /// A storm's first wave is then told to come back evenly over the time it takes to let it in, rather
    /// than all within the next second to be refused again.
    fn retry_spread_ms(&self) -> u64 {
        let rate = self
            .config
            .handshakes_per_node
            .map_or(1.0, |r| f64::from(r.get()));
        let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let (since, count) = *backlog;
        let count = count * (-(now - since).as_secs_f64()).exp() + 1.0;
        *backlog = (now, count);
        ((count / rate * 1000.0) as u64).max(1000)
    }

    /// Take a place for one more connection of `user` from `ip`, if neither is at its limit.
    pub fn admit(self: &Arc<Self>, user: &str, ip: IpAddr) -> Result<Admitted, ProtocolError> {
        let (per_user, per_ip) = (self.config.per_user, self.config.per_ip);
        let mut admitted = Admitted {
            admission: self.clone(),
            user: None,
            ip: None,
        };
        if per_user.is_none() && per_ip.is_none() {
            return Ok(admitted);
        }
        let mut open = self.lock();
        let full = |n: Option<&usize>, limit: usize| n.is_some_and(|&n| n >= limit);
        let refused = if per_user.is_some_and(|l| full(open.per_user.get(user), l.get())) {
            Some("too many open connections for this user")
        } else if per_ip.is_some_and(|l| full(open.per_ip.get(&ip), l.get())) {
            Some("too many open connections from this address")
        } else {
            None
        };
        if let Some(message) = refused {
            metrics::counter!("switchboard_refused_total", "reason" => "connections").increment(1);
            return Err(ProtocolError::new(ErrorCode::TooManyConnections, message));
        }
        if per_user.is_some() {
            *open.per_user.entry(user.to_owned()).or_default() += 1;
            admitted.user = Some(user.to_owned());
        }
        if per_ip.is_some() {
            *open.per_ip.entry(ip).or_default() += 1;
            admitted.ip = Some(ip);
        }
        Ok(admitted)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // Plain counters: a panic elsewhere while holding the lock leaves them usable.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.user.is_none() && self.ip.is_none() {
            return;
        }
        let mut open = self.admission.lock();
        if let Some(user) = &self.user {
            release(&mut open.per_user, user);
        }
        if let Some(ip) = &self.ip {
            release(&mut open.per_ip, ip);
        }
    }
}

/// Give one place back; the entry goes with its last connection.
fn release<K: std::hash::Hash + Eq + ?Sized, Q: std::hash::Hash + Eq + std::borrow::Borrow<K>>(
    counts: &mut HashMap<Q, usize>,
    key: &K,
) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroUsize};

    use super::*;

    fn admission(config: config::Admission) -> Arc<Admission> {
        Admission::new(config)
    }

    #[tokio::test]
    async fn places_are_counted_per_user_and_per_address_and_given_back() {
        let a = admission(config::Admission {
            per_user: NonZeroUsize::new(2),
            per_ip: NonZeroUsize::new(3),
            ..Default::default()
        });
        let (ip1, ip2): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = a.admit("alice", ip1).unwrap();
        let _second = a.admit("alice", ip2).unwrap();
        let refused = a.admit("alice", ip2).err().unwrap();
        assert_eq!(refused.code, ErrorCode::TooManyConnections);
        let _bob = a.admit("bob", ip1).unwrap();
        let _carol = a.admit("carol", ip1).unwrap();
        assert!(a.admit("dave", ip1).is_err(), "three from ip1 already");
        drop(first);
        assert!(
            a.admit("dave", ip1).is_ok(),
            "alice's first place was given back"
        );
        assert!(a.lock().per_user.get("alice") == Some(&1));
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                actix_http::header::X_FORWARDED_FOR,
                actix_http::header::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_client_address_comes_from_x_forwarded_for_only_through_trusted_proxies() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = admission(config::Admission {
            trusted_proxies: vec![ip("10.0.0.1"), ip("10.0.0.2")],
            ..Default::default()
        });
        // Not from a proxy: the header is whatever the client wrote, and ignored.
        let h = forwarded(&["1.1.1.1"]);
        assert_eq!(a.client_ip(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        // Through two proxies: the rightmost address that is not one of ours; what the client put in
        // front of it (a forged "1.1.1.1") is not believed.
        let h = forwarded(&["1.1.1.1, 198.51.100.7", "10.0.0.2"]);
        assert_eq!(a.client_ip(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        // No header, or garbage at the right: the proxy itself.
        assert_eq!(
            a.client_ip(ip("10.0.0.1"), &HeaderMap::new()),
            ip("10.0.0.1")
        );
        let h = forwarded(&["198.51.100.7, unknown"]);
        assert_eq!(a.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        // Nobody trusted: always the peer.
        let none = admission(config::Admission::default());
        let h = forwarded(&["198.51.100.7"]);
        assert_eq!(none.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[tokio::test]
    async fn nothing_is_counted_without_limits() {
        let a = admission(config::Admission::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..100).map(|_| a.admit("alice", ip).unwrap()).collect();
        assert!(a.lock().per_user.is_empty() && a.lock().per_ip.is_empty());
        drop(held);
    }

    #[tokio::test]
    async fn handshakes_past_the_rate_are_refused_with_a_retry_hint() {
        let a = admission(config::Admission {
            handshakes_per_ip: NonZeroU32::new(5),
            ..Default::default()
        });
        let (ip1, ip2): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let headers = HeaderMap::new();
        for _ in 0..5 {
            a.before_token(ip1, &headers).unwrap();
        }
        let e = a.before_token(ip1, &headers).unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        let ms = e.retry_after_ms.unwrap();
        assert!((1..=200).contains(&ms), "one handshake every 200 ms: {ms}");
        a.before_token(ip2, &headers).unwrap();
    }

    #[tokio::test]
    async fn origins_must_match_exactly_when_sent() {
        let a = admission(config::Admission {
            origins: Some(vec!["https://chat.example.com".into()]),
            ..Default::default()
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let with = |origin: &str| {
            let mut h = HeaderMap::new();
            h.insert(actix_http::header::ORIGIN, origin.parse().unwrap());
            h
        };
        a.before_token(ip, &with("https://chat.example.com"))
            .unwrap();
        a.before_token(ip, &HeaderMap::new()).unwrap();
        for bad in [
            "https://chat.example.com.evil.com",
            "http://chat.example.com",
            "https://CHAT.example.com",
            "https://chat.example.com:443",
            "null",
        ] {
            let e = a.before_token(ip, &with(bad)).unwrap_err();
            assert_eq!(e.code, ErrorCode::ForbiddenOrigin, "{bad}");
        }
    }
}
