//! Rotary embedding on the `qk_rope_head_dim` part of queries and keys, interleaved pairs (`x[2i], x[2i+1]`,
//! mlx's "traditional" layout), with YaRN frequency interpolation when the config asks for it.

use crate::config::{ModelConfig, yarn_mscale};
use crate::error::Result;
use candle_core::{Device, Tensor};

#[derive(Clone)]
pub struct Rope {
    /// One inverse frequency per rotated pair.
    inv_freq: Vec<f32>,
    /// YaRN's `mscale / mscale_all_dim` correction of the rotated values (1 for DeepSeek-V3 and Kimi-K2).
    mscale: f32,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Rope {
        let dims = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        // Wavelength factors base^(2i/d) of plain RoPE.
        let extra: Vec<f64> = (0..dims / 2)
            .map(|i| base.powf(2.0 * i as f64 / dims as f64))
            .collect();
        let Some(y) = &cfg.rope_scaling else {
            return Rope {
                inv_freq: extra.iter().map(|f| (1.0 / f) as f32).collect(),
                mscale: 1.0,
            };
        };
        // YaRN: keep high frequencies (extrapolate), divide low ones by `factor` (interpolate), blend between.
        let correction_dim = |rotations: f64| {
            dims as f64
                * (y.original_max_position_embeddings as f64
                    / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                / (2.0 * base.ln())
        };
        let low = correction_dim(y.beta_fast).floor().max(0.0);
        let mut high = correction_dim(y.beta_slow).ceil().min(dims as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        let inv_freq = extra
            .iter()
            .enumerate()
            .map(|(i, &e)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let keep = 1.0 - ramp; // 1: extrapolation, 0: interpolation
                let inter = y.factor * e;
                (keep / e + (1.0 - keep) / inter) as f32
            })
            .collect();
        Rope {
            inv_freq,
            mscale: (yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim))
                as f32,
        }
    }

    /// Rotates `x: [b, heads, t, dims]` for positions `offset..offset + t`.
    pub fn forward(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dims()[2];
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in offset..offset + t {
            for &f in &self.inv_freq {
                let theta = p as f32 * f;
                cos.push(theta.cos());
                sin.push(theta.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), &Device::Cpu)?;
        let sin = Tensor::from_vec(sin, (t, half), &Device::Cpu)?;
        let x = if self.mscale != 1.0 {
            (x * self.mscale as f64)?
        } else {
            x.clone()
        };
        Ok(candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)?)
    }
}
