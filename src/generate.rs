//! `kimi-actors generate`: stream a completion to stdout.

use crate::cluster::{self, ClusterArgs};
use crate::load::{self, ModelArgs};
use anyhow::{Context, Result, bail};
use clap::Args;
use engine::cluster::scheduler::{Event, Scheduler, SchedulerArgs, SchedulerMsg, Submit};
use engine::generate::SamplingParams;
use ractor::Actor;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Plain text prompt (the model's BOS token is prepended).
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    prompt: Option<String>,
    /// A chat as JSON: {"messages": [...], "tools": [...]}, rendered with the model's chat template.
    #[arg(long)]
    chat: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
}

pub async fn run(a: GenerateArgs) -> Result<()> {
    let plan = cluster::plan(&a.cluster, &a.model)?;
    let tok = load::tokenizer(&plan.nodes[0].model_dir)?;
    let prompt = crate::inspect::prompt_ids(&tok, a.prompt.as_deref(), a.chat.as_deref())?;
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
    };
    sampling.validate()?;
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let head = cluster::start(&a.cluster, &a.model).await?;
    let args = SchedulerArgs {
        runtime: head.runtime.clone(),
        prefix_budget: 0,
        kv_bytes_per_token: 1,
        stats: Default::default(),
    };
    let (scheduler, _) = Actor::spawn(None, Scheduler, args)
        .await
        .context("starting the scheduler")?;
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = Submit {
        prompt,
        max_tokens: a.max_tokens,
        sampling,
        eos: tok.eos.clone(),
        events,
    };
    scheduler
        .call(|r| SchedulerMsg::Submit(Box::new(req), r), None)
        .await
        .context("submitting the prompt")?;
    let mut text = tok.stream();
    let mut out = std::io::stdout().lock();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(id) => {
                out.write_all(text.push(id)?.as_bytes())?;
                out.flush()?;
            }
            Event::Done(f) => {
                writeln!(out, "{}", text.finish())?;
                eprintln!(
                    "prefill: {} tokens in {:.3} s ({:.1} tok/s); decode: {} tokens in {:.3} s ({:.1} tok/s); stop: {:?}",
                    f.prompt_tokens,
                    f.ttft.as_secs_f64(),
                    f.prefill_tok_s(),
                    f.completion_tokens,
                    f.decode.as_secs_f64(),
                    f.decode_tok_s(),
                    f.stop
                );
                break;
            }
            Event::Error(e) => bail!("generation failed: {e}"),
        }
    }
    scheduler.stop(None);
    Ok(())
}
