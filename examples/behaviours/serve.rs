//! What every example's `main` does: serve a node with its behaviour on the address and data directory
//! given as the first two arguments (`127.0.0.1:8080` and `./data` by default) until Ctrl-C.

use switchboard::behaviour::Behaviour;
use switchboard::{Config, Server};

/// The listen address, the data directory, and the example's own arguments after them.
pub(crate) fn args() -> (String, String, Vec<String>) {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let data = args.next().unwrap_or_else(|| "./data".into());
    (listen, data, args.collect())
}

/// Serve `behaviour` on `listen` with data in `data` until Ctrl-C, then drain.
pub(crate) async fn serve(
    listen: &str,
    data: &str,
    behaviour: impl Behaviour,
) -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    Server::builder()
        .config(Config::for_data_dir(data))
        .behaviour(behaviour)
        .run(std::net::TcpListener::bind(listen)?, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
