//! A node that appends every stored message to an audit file, one JSON line each.
//!
//! ```sh
//! cargo run --example audit -- 127.0.0.1:8080 ./data ./audit.jsonl
//! ```

#[path = "behaviours/audit.rs"]
mod audit;
#[path = "behaviours/serve.rs"]
mod serve;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (listen, data, rest) = serve::args();
    let file = rest.first().map_or("./audit.jsonl", String::as_str);
    serve::serve(&listen, &data, audit::Audit::new(file)).await
}
