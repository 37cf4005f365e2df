//! The DeepSeek-V3 / Kimi-K2 decoder, read top to bottom like mlx-lm's `deepseek_v3.py`:
//! `embed → [attention → MLP or MoE] × layers → norm → lm_head`. Every unit is a separate type so the actors
//! can own them one by one; [`Model`] composes all of them in one process.

pub mod attention;
pub mod cache;
mod exp;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rope;
#[cfg(target_arch = "x86_64")]
mod span;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::Weights;
use attention::{Attention, Segment};
use cache::SequenceCache;
use candle_core::{Device, Tensor};
use linear::Linear;
use moe::Ffn;
use norm::RmsNorm;

pub struct Layer {
    pub attention: Attention,
    pub ffn: Ffn,
}

/// Token embedding, final norm and `lm_head`: what the head node keeps besides its layers.
pub struct Head {
    embed: Linear,
    norm: RmsNorm,
    lm_head: Linear,
    vocab_size: usize,
}

impl Head {
    pub fn load(w: &Weights) -> Result<Head> {
        let c = &w.config;
        let embed = w.matrix("model.embed_tokens", c.vocab_size, c.hidden_size)?;
        let lm_head = if c.tie_word_embeddings && !w.has("lm_head.weight") {
            embed.clone()
        } else {
            w.matrix("lm_head", c.vocab_size, c.hidden_size)?
        };
        Ok(Head {
            embed,
            norm: RmsNorm::load(w, "model.norm.weight", c.hidden_size, c.rms_norm_eps)?,
            lm_head,
            vocab_size: c.vocab_size,
        })
    }

    /// Bytes of the final norm's matrix (`lm_head`), read whole on every step.
    pub fn weight_bytes(&self) -> usize {
        self.lm_head.weight_bytes()
    }

    /// Bytes of one embedding row.
    pub fn embed_row_bytes(&self) -> usize {
        self.embed.weight_bytes() / self.embed.out_dim().max(1)
    }

    /// `tokens` → `[T, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let mut rows = Vec::with_capacity(tokens.len() * self.embed.in_dim());
        for &t in tokens {
            if t as usize >= self.vocab_size {
                return Err(Error::Invalid(format!(
                    "token id {t} is outside the vocabulary (size {})",
                    self.vocab_size
                )));
            }
            rows.extend(self.embed.row(t as usize)?);
        }
        Ok(Tensor::from_vec(
            rows,
            (tokens.len(), self.embed.in_dim()),
            &Device::Cpu,
        )?)
    }

    /// Final norm and `lm_head` on hidden rows `[n, hidden]` → logits `[n, vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(&self.norm.forward(hidden)?)
    }
}

pub struct Model {
    pub config: ModelConfig,
    pub head: Head,
    pub layers: Vec<Layer>,
}

/// One sequence's part of a forward step: its new tokens, its cache, and how many of the last tokens' final
/// hidden states the step returns (the positions whose logits are wanted).
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SequenceCache,
    pub outputs: usize,
}

impl Model {
    /// Loads every unit; `progress(layer)` is called after each layer.
    pub fn load(w: &Weights, mut progress: impl FnMut(usize)) -> Result<Model> {
        let head = Head::load(w)?;
        let mut layers = Vec::with_capacity(w.config.num_hidden_layers);
        for l in 0..w.config.num_hidden_layers {
            layers.push(Layer {
                attention: Attention::load(w, l)?,
                ffn: Ffn::load(w, l)?,
            });
            progress(l);
        }
        Ok(Model {
            config: w.config.clone(),
            head,
            layers,
        })
    }

    pub fn new_cache(&self) -> Result<SequenceCache> {
        SequenceCache::new(self.layers.len(), self.config.kv_width())
    }

    /// Runs the new tokens of every sequence through all layers (appending to their caches) and returns the
    /// final hidden states of each sequence's last [`SeqStep::outputs`] tokens `[K, hidden]`, sequences' rows
    /// in order, with the bytes of layer weights read. The last layer computes only those rows.
    pub fn forward(&self, steps: &mut [SeqStep]) -> Result<(Tensor, usize)> {
        let tokens: Vec<u32> = steps
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let mut x = self.head.embed(&tokens)?;
        let mut bytes = 0;
        for (l, layer) in self.layers.iter().enumerate() {
            let last = l + 1 == self.layers.len();
            let mut start = 0;
            let mut segments: Vec<Segment> = steps
                .iter_mut()
                .map(|s| {
                    let rows = start..start + s.tokens.len();
                    start = rows.end;
                    Segment {
                        outputs: if last { s.outputs } else { rows.len() },
                        rows,
                        cache: &mut s.cache.layers[l],
                    }
                })
                .collect();
            let (h, m) = layer.attention.forward(&x, &mut segments)?;
            let (mlp, b) = layer.ffn.forward(&m)?;
            x = (h + mlp)?;
            bytes += layer.attention.weight_bytes() + b;
        }
        Ok((x, bytes))
    }

    /// Logits of one sequence's tokens appended to `cache`: `[len, vocab]` for every position, or only the last.
    pub fn logits(
        &self,
        tokens: &[u32],
        cache: &mut SequenceCache,
        all_positions: bool,
    ) -> Result<Tensor> {
        Ok(self.step(tokens, cache, all_positions)?.0)
    }

    /// [`Model::logits`] plus the bytes of weights the step read (layers, embedding rows, `lm_head`).
    pub fn step(
        &self,
        tokens: &[u32],
        cache: &mut SequenceCache,
        all_positions: bool,
    ) -> Result<(Tensor, usize)> {
        if tokens.is_empty() {
            return Err(Error::Invalid("a step needs at least one token".into()));
        }
        let outputs = if all_positions { tokens.len() } else { 1 };
        let (hidden, bytes) = self.forward(&mut [SeqStep {
            tokens,
            cache,
            outputs,
        }])?;
        let head_bytes = self.head.weight_bytes() + tokens.len() * self.head.embed_row_bytes();
        Ok((self.head.logits(&hidden)?, bytes + head_bytes))
    }
}
