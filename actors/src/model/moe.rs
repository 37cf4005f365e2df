//! The MoE block, cut where the actors cut it: the [`Router`] (gate) picks experts per token, an
//! [`ExpertGroup`] applies the experts it holds, the shared expert is a plain [`Mlp`].

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::model::mlp::Mlp;
use crate::quant::kernels::Input;
use crate::quant::pool::Pool;
use crate::weights::{Weights, in_stream};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// One routed (token, expert) pair with its gate weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    pub token: u32,
    pub expert: u32,
    pub weight: f32,
}

pub struct Router {
    gate: Linear,
    bias: Vec<f32>,
    top_k: usize,
    n_group: usize,
    topk_group: usize,
    norm_topk_prob: bool,
    scaling: f32,
}

impl Router {
    pub fn load(w: &Weights, layer: usize) -> Result<Router> {
        let c = &w.config;
        let g = format!("model.layers.{layer}.mlp.gate");
        let bias = w.vector(&format!("{g}.e_score_correction_bias"), c.n_routed_experts)?;
        Ok(Router {
            gate: w.exact_matrix(&g, c.n_routed_experts, c.hidden_size)?,
            bias,
            top_k: c.num_experts_per_tok,
            n_group: c.n_group,
            topk_group: c.topk_group,
            norm_topk_prob: c.norm_topk_prob,
            scaling: c.routed_scaling_factor,
        })
    }

    pub fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes() + self.bias.len() * 4
    }

    /// `x: [T, hidden]` → `top_k` assignments per token, token-major.
    pub fn route(&self, x: &Tensor) -> Result<Vec<Assignment>> {
        let logits: Vec<Vec<f32>> = self.gate.forward(x)?.to_vec2()?;
        let mut out = Vec::with_capacity(logits.len() * self.top_k);
        for (t, row) in logits.iter().enumerate() {
            for (expert, weight) in self.select(row) {
                out.push(Assignment {
                    token: t as u32,
                    expert: expert as u32,
                    weight,
                });
            }
        }
        Ok(out)
    }

    /// DeepSeek-V3 `noaux_tc` routing of one token: sigmoid scores; `+ e_score_correction_bias` only to choose;
    /// with groups, keep the `topk_group` groups with the largest top-2 sums (others' scores set to 0, as mlx-lm
    /// and HF do); top-k; weights from the unbiased scores, normalized if `norm_topk_prob`, times the scaling.
    pub fn select(&self, logits: &[f32]) -> Vec<(usize, f32)> {
        let scores: Vec<f32> = logits.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect();
        let mut choice: Vec<f32> = scores.iter().zip(&self.bias).map(|(s, b)| s + b).collect();
        if self.n_group > 1 {
            let per = choice.len() / self.n_group;
            let mut group_score: Vec<(usize, f32)> = choice
                .chunks(per)
                .map(|g| {
                    let mut top = [f32::NEG_INFINITY; 2];
                    for &v in g {
                        if v > top[0] {
                            top = [v, top[0]];
                        } else if v > top[1] {
                            top[1] = v;
                        }
                    }
                    top[0] + top[1]
                })
                .enumerate()
                .collect();
            group_score.sort_by(|a, b| a.1.total_cmp(&b.1));
            for &(g, _) in &group_score[..self.n_group - self.topk_group] {
                choice[g * per..(g + 1) * per].fill(0.0);
            }
        }
        let mut order: Vec<usize> = (0..choice.len()).collect();
        // Stable sort: ties go to the lower expert id.
        order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]));
        order.truncate(self.top_k);
        let mut picked: Vec<(usize, f32)> = order.into_iter().map(|e| (e, scores[e])).collect();
        if self.top_k > 1 && self.norm_topk_prob {
            let sum: f32 = picked.iter().map(|p| p.1).sum();
            for p in &mut picked {
                p.1 /= sum;
            }
        }
        for p in &mut picked {
            p.1 *= self.scaling;
        }
        picked
    }
}

/// The routed experts of one layer that one node holds (all of them in a single process).
pub struct ExpertGroup {
    pub layer: usize,
    experts: BTreeMap<usize, Mlp>,
}

impl ExpertGroup {
    /// Loads experts `ids` of `layer`, a share on each of the kernels' pool threads, each share in its own
    /// stream of resident memory (in order). Copying the bytes (first touch of the pages included), or
    /// storing them in lanes, is the loader's main work: the bench model, stored in lanes, loaded in
    /// 0.72–0.75 s instead of 1.35–1.37 (two threads, three runs, files in the page cache).
    pub fn load(
        w: &Weights,
        layer: usize,
        ids: impl IntoIterator<Item = usize>,
    ) -> Result<ExpertGroup> {
        let ids: Vec<usize> = ids.into_iter().collect();
        if let Some(e) = ids.iter().find(|&&e| e >= w.config.n_routed_experts) {
            return Err(Error::Invalid(format!(
                "layer {layer}: expert {e} does not exist (n_routed_experts = {})",
                w.config.n_routed_experts
            )));
        }
        let pool = Pool::global();
        let shares: Vec<&[usize]> = ids
            .chunks(ids.len().div_ceil(pool.threads()).max(1))
            .collect();
        let parts = pool.map(shares.len(), &|k| {
            in_stream(k, || -> Result<Vec<(usize, Mlp)>> {
                shares[k]
                    .iter()
                    .map(|&e| Ok((e, Mlp::load_expert(w, layer, e)?)))
                    .collect()
            })
        });
        let mut experts = BTreeMap::new();
        for part in parts {
            experts.extend(part?);
        }
        Ok(ExpertGroup { layer, experts })
    }

    pub fn ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.experts.keys().copied()
    }

    pub fn weight_bytes(&self) -> usize {
        self.experts.values().map(|m| m.weight_bytes()).sum()
    }

    /// Bytes of weights one application to `assignments` reads: each distinct expert once.
    pub fn bytes_for(&self, assignments: &[Assignment]) -> usize {
        let used: std::collections::BTreeSet<u32> = assignments.iter().map(|a| a.expert).collect();
        used.iter()
            .filter_map(|e| self.experts.get(&(*e as usize)))
            .map(|m| m.weight_bytes())
            .sum()
    }

    /// `Σ weight · expert(x[token])` over `assignments`, as `[T, hidden]` (rows without assignments are 0),
    /// plus `shared(x)` when given (the shared expert runs in the same parallel regions).
    /// Tokens are grouped by expert so each expert's weights are read once per call.
    pub fn forward(
        &self,
        x: &Tensor,
        assignments: &[Assignment],
        shared: Option<&Mlp>,
    ) -> Result<Tensor> {
        let (t, hidden) = x.dims2()?;
        let mut by_expert: BTreeMap<u32, Vec<(u32, f32)>> = BTreeMap::new();
        for a in assignments {
            by_expert
                .entry(a.expert)
                .or_default()
                .push((a.token, a.weight));
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let by_expert: Vec<(u32, Vec<(u32, f32)>)> = by_expert.into_iter().collect();
        let mut mlps = Vec::with_capacity(by_expert.len());
        for (expert, rows) in &by_expert {
            mlps.push(self.experts.get(&(*expert as usize)).ok_or_else(|| {
                Error::Invalid(format!(
                    "layer {}: expert {expert} is not held here",
                    self.layer
                ))
            })?);
            if let Some(&(token, _)) = rows.iter().find(|(token, _)| *token as usize >= t) {
                return Err(Error::Invalid(format!(
                    "layer {}: token {token} of {t} routed",
                    self.layer
                )));
            }
        }
        let pool = (t >= PARALLEL_TOKENS).then(Pool::global);
        // Each expert's tokens, picked from `x` (the kernels prepare `x` once for all of them where they
        // read picked rows); none picked for an expert that takes every token in order (each one a decode
        // step routes to).
        let picks: Vec<Option<Vec<u32>>> = by_expert
            .iter()
            .map(|(_, rows)| {
                let all =
                    rows.len() == t && rows.iter().enumerate().all(|(i, r)| r.0 as usize == i);
                (!all).then(|| rows.iter().map(|r| r.0).collect())
            })
            .collect();
        // The shared expert first: its weights are the same every step, so the pool can prefetch them.
        let items: Vec<(&Mlp, Input)> = shared
            .map(|s| (s, Input::all(&xs)))
            .into_iter()
            .chain(mlps.iter().zip(&picks).map(|(m, pick)| {
                let input = Input {
                    x: &xs,
                    pick: pick.as_deref(),
                };
                (*m, input)
            }))
            .collect();
        let mut outputs = Mlp::apply_many(&items)?;
        let mut out: Vec<f32> = match shared {
            Some(_) if !outputs.is_empty() => outputs.remove(0),
            _ => vec![0f32; t * hidden],
        };
        // Each token's weighted expert outputs, in expert order (the same sums however the tokens are split),
        // the tokens in parallel for a prefill.
        let mut per_token: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); t];
        for (e, (_, rows)) in by_expert.iter().enumerate() {
            for (i, &(token, weight)) in rows.iter().enumerate() {
                per_token[token as usize].push((e, i, weight));
            }
        }
        let tokens: Vec<Mutex<&mut [f32]>> = out.chunks_exact_mut(hidden).map(Mutex::new).collect();
        let scatter = |token: usize| {
            let mut dst = tokens[token].lock().unwrap_or_else(|e| e.into_inner());
            for &(e, i, weight) in &per_token[token] {
                for (d, s) in dst
                    .iter_mut()
                    .zip(&outputs[e][i * hidden..(i + 1) * hidden])
                {
                    *d += weight * s;
                }
            }
        };
        match pool {
            Some(p) => p.run(t, &scatter),
            None => (0..t).for_each(scatter),
        }
        drop(tokens);
        Ok(Tensor::from_vec(out, (t, hidden), &Device::Cpu)?)
    }
}

/// Tokens per call from which scattering the experts' outputs to them runs on the kernels' pool (a prefill's).
const PARALLEL_TOKENS: usize = 16;

/// Dense MLP of layers below `first_k_dense_replace`, or the MoE block.
pub enum Ffn {
    Dense(Mlp),
    Moe {
        router: Router,
        experts: ExpertGroup,
        shared: Option<Box<Mlp>>,
    },
}

impl Ffn {
    pub fn load(w: &Weights, layer: usize) -> Result<Ffn> {
        let c: &ModelConfig = &w.config;
        let p = format!("model.layers.{layer}.mlp");
        if !c.is_moe_layer(layer) {
            return Ok(Ffn::Dense(Mlp::load(w, &p, c.intermediate_size)?));
        }
        Ok(Ffn::Moe {
            router: Router::load(w, layer)?,
            experts: ExpertGroup::load(w, layer, 0..c.n_routed_experts)?,
            shared: load_shared(w, layer)?.map(Box::new),
        })
    }

    /// `x: [T, hidden]` (post-attention normed) → the MLP output to add to the residual, and the bytes of
    /// weights read.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, usize)> {
        match self {
            Ffn::Dense(m) => Ok((m.forward(x)?, m.weight_bytes())),
            Ffn::Moe {
                router,
                experts,
                shared,
            } => {
                let assignments = router.route(x)?;
                let out = experts.forward(x, &assignments, shared.as_deref())?;
                let bytes = router.weight_bytes()
                    + experts.bytes_for(&assignments)
                    + shared.as_ref().map_or(0, |s| s.weight_bytes());
                Ok((out, bytes))
            }
        }
    }
}

/// The shared expert(s) of a MoE layer, `moe_intermediate_size · n_shared_experts` wide.
pub fn load_shared(w: &Weights, layer: usize) -> Result<Option<Mlp>> {
    let c = &w.config;
    if c.n_shared_experts == 0 {
        return Ok(None);
    }
    let p = format!("model.layers.{layer}.mlp.shared_experts");
    Ok(Some(Mlp::load(
        w,
        &p,
        c.moe_intermediate_size * c.n_shared_experts,
    )?))
}
