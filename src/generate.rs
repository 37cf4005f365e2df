//! `kimi-actors generate`: stream a completion to stdout.

use crate::load::{self, ModelArgs};
use anyhow::{Context, Result, bail};
use clap::Args;
use engine::generate::{Sampler, SamplingParams, generate};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
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

pub fn run(a: GenerateArgs) -> Result<()> {
    let dir = a.model.dir();
    let tok = load::tokenizer(&dir)?;
    let prompt = crate::inspect::prompt_ids(&tok, a.prompt.as_deref(), a.chat.as_deref())?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
    };
    params.validate()?;
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let model = load::model(&a.model)?;
    let mut cache = model.new_cache()?;
    let mut sampler = Sampler::new(params);
    let mut text = tok.stream();
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let g = generate(
        &prompt,
        a.max_tokens,
        &tok.eos,
        &mut sampler,
        |ids| {
            Ok(model
                .logits(ids, &mut cache, false)?
                .flatten_all()?
                .to_vec1()?)
        },
        |id| {
            let piece = match text.push(id) {
                Ok(p) => p,
                Err(e) => {
                    write_err = Some(anyhow::Error::from(e));
                    return ControlFlow::Break(());
                }
            };
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                write_err = Some(e.into());
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        },
    )
    .context("generating")?;
    if let Some(e) = write_err {
        return Err(e.context("writing the output"));
    }
    writeln!(out, "{}", text.finish())?;
    eprintln!(
        "prefill: {} tokens in {:.3} s ({:.1} tok/s); decode: {} tokens in {:.3} s ({:.1} tok/s); stop: {:?}",
        g.prompt_tokens,
        g.prefill.as_secs_f64(),
        g.prefill_tok_s(),
        g.tokens.len(),
        g.decode.as_secs_f64(),
        g.decode_tok_s(),
        g.stop
    );
    Ok(())
}
