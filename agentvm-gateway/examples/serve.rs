//! Runs the model gateway on 127.0.0.1 for trying a real agent against it by hand.
//!
//! ```text
//! cargo run -p agentvm-gateway --example serve -- scripted turns.json [PORT]
//! cargo run -p agentvm-gateway --example serve -- replay cassette.jsonl [PORT]
//! cargo run -p agentvm-gateway --example serve -- record cassette.jsonl [PORT]
//! ```
//!
//! `turns.json` is a JSON array of turns, e.g.
//! `[{"turn": "shell", "command": "echo hello > hi.txt"}, {"turn": "text", "text": "done"}]`.
//! Serves until stdin closes, then prints the transcript and any errors as JSON.

use agentvm_gateway::{Gateway, GatewayConfig, Model, Turn, Upstream};
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, file) = match args.as_slice() {
        [mode, file, ..] => (mode.as_str(), file.as_str()),
        _ => return Err("usage: serve scripted|replay|record FILE [PORT]".into()),
    };
    let port: u16 = args.get(2).map_or(Ok(0), |p| p.parse())?;
    let model = match mode {
        "scripted" => Model::scripted(serde_json::from_str::<Vec<Turn>>(
            &std::fs::read_to_string(file)?,
        )?),
        "replay" => Model::replay(file),
        "record" => Model::record(file, Upstream::from_env()),
        other => return Err(format!("unknown mode {other:?}").into()),
    };
    let gateway = Gateway::new(GatewayConfig::new(model))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!(
        "agentvm gateway ({mode}) on http://{}",
        listener.local_addr()?
    );
    let _server = gateway.serve_listener(listener);
    let mut sink = Vec::new();
    tokio::io::stdin().read_to_end(&mut sink).await?;
    println!("{}", serde_json::to_string_pretty(&gateway.transcript())?);
    for error in gateway.take_errors() {
        eprintln!("gateway error: {error}");
    }
    Ok(())
}
