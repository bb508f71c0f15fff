//! Run the simulator standalone (the same thing `tollgate sim` does):
//!
//! ```text
//! cargo run --release -p tollgate-sim --example sim -- --listen 127.0.0.1:8000 \
//!     [--model NAME] [--latency-ms N] [--ms-per-token N] [--threads N]
//! ```

use std::sync::Arc;

use tollgate_sim::{serve, SimConfig, Simulator};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen = "127.0.0.1:8000".to_owned();
    let mut threads = 1usize;
    let mut cfg = SimConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = value,
            "--model" => cfg.model = value,
            "--latency-ms" => cfg.latency_ms = value.parse()?,
            "--ms-per-token" => cfg.ms_per_token = value.parse()?,
            "--threads" => threads = value.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        eprintln!("tollgate-sim listening on {}", listener.local_addr()?);
        serve(listener, Arc::new(Simulator::new(cfg))).await
    })?;
    Ok(())
}
