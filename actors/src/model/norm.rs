//! RMSNorm: `x · rsqrt(mean(x²) + eps) · weight`, row by row.

use crate::error::Result;
use crate::weights::Weights;
use candle_core::{Device, Tensor};

#[derive(Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f32) -> Result<RmsNorm> {
        let v = w.vector(name, dim)?;
        Ok(RmsNorm {
            weight: Tensor::from_vec(v, dim, &Device::Cpu)?,
            eps,
        })
    }

    /// `x: [t, dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}
