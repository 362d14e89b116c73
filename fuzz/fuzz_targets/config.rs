//! The config file: its text parsed into `Settings` (`Settings::from_toml`, what `--config` reads), then
//! resolved into a `Config` over the defaults (`Settings::resolve`).
//!
//! Checked, besides "no panic": a config that resolves keeps the invariants the server relies on when it
//! starts and runs (limits positive, the body limit under the frame limit, 1 to 512 HTTP workers, durations
//! positive where zero makes no sense and small enough to add to the clock, a valid node name, exact
//! origins, a cluster only on a shared store, a key for public-key JWTs), and the same settings resolve to
//! the same config whether they come from the file or from flags and the environment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::config::{JwtAlgorithm, Settings, StoreKind};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut file) = Settings::from_toml(text) else {
        return;
    };
    // Without one, each resolve draws a random node name.
    file.node_name.get_or_insert_with(|| "n1".into());
    let from_file = Settings::default().resolve(file.clone());
    let from_flags = file.resolve(Settings::default());
    assert_eq!(
        format!("{from_file:?}"),
        format!("{from_flags:?}"),
        "a setting means the same in the file and as a flag"
    );
    let Ok(c) = from_file else {
        return;
    };
    assert!(c.max_body_bytes > 0 && c.max_body_bytes < c.max_frame_bytes);
    assert!(c.outbound_queue > 0 && c.max_unacked > 0);
    // actix-server asserts 1 to 512 workers when the server starts.
    assert!(
        (1..=512).contains(&c.http_workers),
        "http_workers {}",
        c.http_workers
    );
    let now = std::time::Instant::now();
    for d in [
        c.heartbeat_timeout,
        c.conversation_idle,
        c.restart_window,
        c.drain_timeout,
        c.drain_window,
        c.presence_grace,
    ] {
        // The server adds these to the clock (a connection's heartbeat deadline is `now + heartbeat`).
        assert!(now.checked_add(d).is_some(), "{d:?} overflows the clock");
    }
    for d in [
        c.heartbeat_timeout,
        c.conversation_idle,
        c.restart_window,
        c.drain_timeout,
    ] {
        assert!(!d.is_zero());
    }
    assert!(!c.hooks.message_budget.is_zero() && !c.hooks.timeout.is_zero());
    assert!(
        !c.node_name.is_empty()
            && c.node_name.len() <= 64
            && c.node_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    );
    for origin in c.admission.origins.iter().flatten() {
        let (scheme, host) = origin.split_once("://").expect("scheme://host");
        assert!(!scheme.is_empty() && !host.is_empty() && !host.contains('/'));
    }
    if let Some(cluster) = &c.cluster {
        assert!(matches!(c.store, StoreKind::Cassandra(_)));
        assert!(!cluster.registry_ttl.is_zero() && !cluster.registry_heartbeat.is_zero());
    }
    if c.jwt_algorithm != JwtAlgorithm::Hs256 {
        assert!(c.jwt_public_key.is_some());
    }
    for url in [&c.hooks.url, &c.push.webhook].into_iter().flatten() {
        assert!(url.starts_with("http://") || url.starts_with("https://"));
    }
});
