//! SwiGLU MLP `down(silu(gate(x)) · up(x))`: the dense MLP of the first layers, each routed expert, and the
//! shared expert.

use crate::error::Result;
use crate::model::exp::exp;
use crate::model::linear::Linear;
use crate::quant::kernels::Input;
use crate::quant::pool::Pool;
use crate::weights::Weights;
use candle_core::{Device, Tensor};
use std::sync::Mutex;

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
        let rows: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let y = Mlp::apply_many(&[(self, Input::all(&rows))])?.remove(0);
        let t = y.len() / self.down.out_dim();
        Ok(Tensor::from_vec(y, (t, self.down.out_dim()), &Device::Cpu)?)
    }

    /// Several MLPs on their own row-major inputs `[t, hidden]` (the experts a batch routes to: rows picked
    /// from one input), each projection stage of all of them in one parallel region.
    pub fn apply_many(items: &[(&Mlp, Input)]) -> Result<Vec<Vec<f32>>> {
        let mut first: Vec<(&Linear, Input)> = Vec::with_capacity(items.len() * 2);
        for (m, x) in items {
            first.push((&m.gate, *x));
            first.push((&m.up, *x));
        }
        let mut gu = Linear::apply_many(&first)?;
        // silu(gate) · up into the gate's rows, the MLPs in parallel when there is enough of it.
        let pairs: Vec<Mutex<&mut [Vec<f32>]>> = gu.chunks_exact_mut(2).map(Mutex::new).collect();
        let one = |i: usize| {
            let mut pair = pairs[i].lock().unwrap_or_else(|e| e.into_inner());
            if let [g, u] = &mut **pair {
                silu_mul(g, u);
            }
        };
        let values: usize = items
            .iter()
            .map(|(m, x)| x.tokens(m.gate.in_dim()) * m.gate.in_dim())
            .sum();
        if values < PARALLEL_SILU {
            (0..pairs.len()).for_each(one);
        } else {
            Pool::global().run(pairs.len(), &one);
        }
        drop(pairs);
        let second: Vec<(&Linear, Input)> = items
            .iter()
            .zip(gu.chunks_exact(2))
            .map(|((m, _), p)| (&m.down, Input::all(&p[0])))
            .collect();
        Linear::apply_many(&second)
    }
}

/// Input values below which the activation runs on the calling thread (a decode step's experts).
const PARALLEL_SILU: usize = 1 << 16;

/// `g ← silu(g) · u = g / (1 + e^-g) · u`, with [`exp`] so the loop vectorizes.
fn silu_mul(g: &mut [f32], u: &[f32]) {
    for (g, u) in g.iter_mut().zip(u) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(rows: usize, cols: usize, seed: usize) -> Linear {
        let w = (0..rows * cols)
            .map(|i| ((i * 7 + seed * 13) % 23) as f32 / 23.0 - 0.5)
            .collect();
        Linear::dense(w, rows, cols).unwrap()
    }

    #[test]
    fn many_mlps_in_parallel_match_each_alone_and_candle() {
        let (hidden, inter, tokens) = (512, 64, 8);
        let mlps: Vec<Mlp> = (0..20)
            .map(|s| Mlp {
                gate: dense(inter, hidden, 3 * s),
                up: dense(inter, hidden, 3 * s + 1),
                down: dense(hidden, inter, 3 * s + 2),
            })
            .collect();
        let xs: Vec<Vec<f32>> = (0..mlps.len())
            .map(|s| {
                (0..tokens * hidden)
                    .map(|i| ((i + s) % 31) as f32 / 10.0 - 1.5)
                    .collect()
            })
            .collect();
        let items: Vec<(&Mlp, Input)> = mlps
            .iter()
            .zip(&xs)
            .map(|(m, x)| (m, Input::all(x)))
            .collect();
        // Enough values for the activation to run on the pool; one MLP alone runs it on this thread.
        assert!(xs.iter().map(Vec::len).sum::<usize>() >= PARALLEL_SILU);
        let many = Mlp::apply_many(&items).unwrap();
        for ((m, x), y) in items.iter().zip(&many) {
            assert_eq!(&Mlp::apply_many(&[(m, *x)]).unwrap()[0], y);
            let xt = Tensor::from_slice(x.x, (tokens, hidden), &Device::Cpu).unwrap();
            let lin = |l: &Linear, x: &Tensor| Linear::forward_many(&[(l, x)]).unwrap().remove(0);
            let h = (candle_nn::ops::silu(&lin(&m.gate, &xt)).unwrap() * lin(&m.up, &xt)).unwrap();
            let want: Vec<f32> = lin(&m.down, &h).flatten_all().unwrap().to_vec1().unwrap();
            // Our `exp` is within 2 ulp of candle's (the standard one).
            let err = want
                .iter()
                .zip(y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
            assert!(err < 1e-5 * scale, "{err}");
        }
    }
}
