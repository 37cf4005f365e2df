//! `kimi-actors bench`: prefill and decode speed against the machine's read-bandwidth roofline.

use crate::load::{self, ModelArgs};
use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let model = load::model(&a.model)?;
    let r = engine::bench::run(&model, a.prompt_tokens, a.decode_tokens)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!("model                    {}", a.model.dir().display());
    println!(
        "prefill                  {:.1} tok/s ({} tokens)",
        r.prefill_tok_s, r.prompt_tokens
    );
    println!(
        "decode                   {:.2} tok/s ({} tokens)",
        r.decode_tok_s, r.decode_tokens
    );
    println!(
        "weights read per token   {:.1} MB",
        r.weight_bytes_per_token / 1e6
    );
    println!("implied weight traffic   {:.2} GB/s", r.weight_gb_s);
    println!("machine read bandwidth   {:.2} GB/s", r.read_bandwidth_gb_s);
    println!(
        "roofline fraction        {:.1} %",
        100.0 * r.roofline_fraction
    );
    Ok(())
}
