//! SwiGLU MLP `down(silu(gate(x)) · up(x))`: the dense MLP of the first layers, each routed expert, and the
//! shared expert.

use crate::error::Result;
use crate::model::linear::Linear;
use crate::weights::Weights;
use candle_core::Tensor;

#[derive(Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    /// `{prefix}.{gate,up,down}_proj` with `inter` intermediate units.
    pub fn load(w: &Weights, prefix: &str, inter: usize) -> Result<Mlp> {
        let hidden = w.config.hidden_size;
        Ok(Mlp {
            gate: w.matrix(&format!("{prefix}.gate_proj"), inter, hidden)?,
            up: w.matrix(&format!("{prefix}.up_proj"), inter, hidden)?,
            down: w.matrix(&format!("{prefix}.down_proj"), hidden, inter)?,
        })
    }

    /// Routed expert `e` of `layer`: HF's per-expert `mlp.experts.{e}.*` or slice `e` of MLX's stacked
    /// `mlp.switch_mlp.*` `[experts, out, in]`.
    pub fn load_expert(w: &Weights, layer: usize, e: usize) -> Result<Mlp> {
        let c = &w.config;
        let per_expert = format!("model.layers.{layer}.mlp.experts.{e}");
        if w.has(&format!("{per_expert}.gate_proj.weight")) {
            return Mlp::load(w, &per_expert, c.moe_intermediate_size);
        }
        let s = format!("model.layers.{layer}.mlp.switch_mlp");
        let (n, h, i) = (c.n_routed_experts, c.hidden_size, c.moe_intermediate_size);
        Ok(Mlp {
            gate: w.stacked(&format!("{s}.gate_proj"), e, n, i, h)?,
            up: w.stacked(&format!("{s}.up_proj"), e, n, i, h)?,
            down: w.stacked(&format!("{s}.down_proj"), e, n, h, i)?,
        })
    }

    pub fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes() + self.up.weight_bytes() + self.down.weight_bytes()
    }

    /// `x: [t, hidden]` → `[t, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = Mlp::forward_many(&[(self, x)])?;
        Ok(out.remove(0))
    }

    /// Several MLPs on their own inputs (the experts a batch routes to), each projection stage of all of
    /// them in one parallel region.
    pub fn forward_many(items: &[(&Mlp, &Tensor)]) -> Result<Vec<Tensor>> {
        let mut first: Vec<(&Linear, &Tensor)> = Vec::with_capacity(items.len() * 2);
        for (m, x) in items {
            first.push((&m.gate, *x));
            first.push((&m.up, *x));
        }
        let gu = Linear::forward_many(&first)?;
        let hidden: Vec<Tensor> = gu
            .chunks_exact(2)
            .map(|p| Ok((candle_nn::ops::silu(&p[0])? * &p[1])?))
            .collect::<Result<_>>()?;
        let second: Vec<(&Linear, &Tensor)> = items
            .iter()
            .zip(&hidden)
            .map(|((m, _), h)| (&m.down, h))
            .collect();
        Linear::forward_many(&second)
    }
}
