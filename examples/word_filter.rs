//! A node that refuses (or masks) messages with a banned word.
//!
//! ```sh
//! cargo run --example word_filter -- 127.0.0.1:8080 ./data mask darn heck
//! ```
//!
//! Arguments: listen address, data directory, `reject` or `mask`, then the banned words.

#[path = "behaviours/serve.rs"]
mod serve;
#[path = "behaviours/word_filter.rs"]
mod word_filter;

use word_filter::{Mode, WordFilter};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (listen, data, rest) = serve::args();
    let mode = match rest.first().map(String::as_str) {
        Some("reject") => Mode::Reject,
        _ => Mode::Mask,
    };
    let words = rest.iter().skip(1).map(String::as_str);
    serve::serve(&listen, &data, WordFilter::new(words, mode)).await
}
