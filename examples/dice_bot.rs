//! A node with a dice bot: add the user `dicebot` to a group (or open a DM with it) and send `/roll 2d6`
//! or `/help`.
//!
//! ```sh
//! cargo run --example dice_bot -- 127.0.0.1:8080 ./data
//! ```

#[path = "behaviours/dice_bot.rs"]
mod dice_bot;
#[path = "behaviours/serve.rs"]
mod serve;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (listen, data, _) = serve::args();
    serve::serve(&listen, &data, dice_bot::DiceBot::new("dicebot")).await
}
