//! `kimi-actors bench`: prefill and decode speed against the machine's read-bandwidth roofline.

use crate::cluster::ClusterArgs;
use crate::load::{self, ModelArgs};
use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// With a placement, measure through its actors and links (per-node traffic, compute vs waiting);
    /// without, the engine alone against the memory roofline.
    #[command(flatten)]
    cluster: ClusterArgs,
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Run this many streams at once through the scheduler (continuous batching).
    #[arg(long)]
    concurrency: Option<usize>,
}

pub async fn run(a: BenchArgs) -> Result<()> {
    if let Some(n) = a.concurrency {
        return run_concurrent(a, n).await;
    }
    if a.cluster.placement.is_some() {
        return run_cluster(a).await;
    }
    let model = load::model(&a.model)?;
    let r = engine::bench::run(&model, a.prompt_tokens, a.decode_tokens)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!("model                    {}", a.model.dir().display());
    println!(
        "prefill                  {:.1} tok/s ({} tokens, median of 3 passes)",
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

async fn run_cluster(a: BenchArgs) -> Result<()> {
    let head = crate::cluster::start(&a.cluster, &a.model).await?;
    let r = engine::bench::run_cluster(&head.runtime, a.prompt_tokens, a.decode_tokens).await?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "placement                {}",
        head.runtime.plan.source.display()
    );
    println!(
        "prefill                  {:.1} tok/s ({} tokens)",
        r.prefill_tok_s, r.prompt_tokens
    );
    println!(
        "decode                   {:.2} tok/s ({} tokens)",
        r.decode_tok_s, r.decode_tokens
    );
    println!("per decoded token        messages  KB sent+received  compute ms  waiting on link ms");
    for n in &r.nodes {
        println!(
            "  {:<22} {:>8.1}  {:>16.1}  {:>10.2}  {:>18.2}",
            n.node,
            n.messages,
            n.bytes / 1e3,
            n.compute_ms,
            n.wait_ms
        );
    }
    Ok(())
}

async fn run_concurrent(a: BenchArgs, n: usize) -> Result<()> {
    let head = crate::cluster::start(&a.cluster, &a.model).await?;
    let r =
        engine::bench::run_concurrent(head.runtime.clone(), n, a.prompt_tokens, a.decode_tokens)
            .await?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!("streams                  {}", r.concurrency);
    println!("total                    {:.2} tok/s", r.total_tok_s);
    println!(
        "per stream               {:.2} tok/s (mean), first token after {:.0} ms (mean)",
        r.per_stream_tok_s, r.mean_ttft_ms
    );
    Ok(())
}
