//! `kimi-actors logits` and `kimi-actors tokenize`: JSON on stdout, for checks against reference engines.

use crate::cluster::ClusterArgs;
use crate::load::{self, ModelArgs};
use anyhow::{Context, Result, bail};
use clap::Args;
use engine::tokenizer::Tokenizer;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Comma-separated prompt ids, run as one forward.
    #[arg(long, value_delimiter = ',', required = true)]
    prompt_ids: Vec<u32>,
    /// Comma-separated ids fed one at a time through the KV cache after the prompt.
    #[arg(long, value_delimiter = ',')]
    forced_ids: Vec<u32>,
}

#[derive(Args)]
pub struct TokenizeArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    text: Option<String>,
    /// {"messages": [...], "tools": [...]}; prints the rendering (with the generation prompt) too.
    #[arg(long)]
    chat: Option<PathBuf>,
}

pub async fn logits(a: LogitsArgs) -> Result<()> {
    let head = crate::cluster::start(&a.cluster, &a.model).await?;
    let rt = &head.runtime;
    let seq = 1;
    let prefill = rt.step(&[(seq, a.prompt_ids.clone())], true).await?;
    let mut decode = Vec::with_capacity(a.forced_ids.len());
    for &id in &a.forced_ids {
        decode.extend(rt.step(&[(seq, vec![id])], false).await?);
    }
    rt.release(&[seq]).await;
    println!("{}", json!({"prefill": prefill, "decode": decode}));
    Ok(())
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let dir = a.model.unwrap_or_else(load::default_model_dir);
    let tok = load::tokenizer(&dir)?;
    let out = match (&a.text, &a.chat) {
        (Some(text), _) => json!({"ids": tok.encode(text)?}),
        (None, Some(chat)) => {
            let (messages, tools) = read_chat(chat)?;
            let rendered = tok.render_chat(&messages, tools.as_ref())?;
            json!({"ids": tok.encode(&rendered)?, "rendered": rendered})
        }
        (None, None) => bail!("give --text or --chat"),
    };
    println!("{out}");
    Ok(())
}

/// Reads `{"messages": [...], "tools": [...]}`.
pub fn read_chat(path: &Path) -> Result<(Value, Option<Value>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let messages = match v.get("messages") {
        Some(m @ Value::Array(a)) if !a.is_empty() => m.clone(),
        _ => bail!("{}: `messages` must be a non-empty array", path.display()),
    };
    let tools = v.get("tools").filter(|t| !t.is_null()).cloned();
    Ok((messages, tools))
}

/// The ids to generate from: BOS + the text of `--prompt`, or the rendered `--chat`.
pub fn prompt_ids(tok: &Tokenizer, prompt: Option<&str>, chat: Option<&Path>) -> Result<Vec<u32>> {
    match (prompt, chat) {
        (Some(p), _) => {
            let mut ids: Vec<u32> = tok.bos.into_iter().collect();
            ids.extend(tok.encode(p)?);
            Ok(ids)
        }
        (None, Some(c)) => {
            let (messages, tools) = read_chat(c)?;
            Ok(tok.encode(&tok.render_chat(&messages, tools.as_ref())?)?)
        }
        (None, None) => bail!("give --prompt or --chat"),
    }
}
