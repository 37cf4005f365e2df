//! RMSNorm: `x · rsqrt(mean(x²) + eps) · weight`, row by row, on the calling thread. candle's `rms_norm`
//! hands its rows to rayon's pool, whose worker the calling thread then waits for: ~33 times a step on the
//! bench model, each a wake-up across threads for a few microseconds of work.

use crate::error::{Error, Result};
use crate::weights::Weights;
use candle_core::{Device, Tensor};

#[derive(Clone)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: w.vector(name, dim)?,
            eps,
        })
    }

    /// `x: [.., dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dim = self.weight.len();
        if x.dims().last() != Some(&dim) {
            return Err(Error::Invalid(format!(
                "RMSNorm of width {dim} applied to a tensor of shape {:?}",
                x.dims()
            )));
        }
        let mut v: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for row in v.chunks_exact_mut(dim) {
            self.row(row);
        }
        Ok(Tensor::from_vec(v, x.shape(), &Device::Cpu)?)
    }

    /// One row in place; the squares summed in eight lanes, so the loop vectorizes.
    fn row(&self, x: &mut [f32]) {
        let mut lanes = [0f32; 8];
        let chunks = x.chunks_exact(8);
        let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        for c in chunks {
            for i in 0..8 {
                lanes[i] += c[i] * c[i];
            }
        }
        let sum = lanes.iter().sum::<f32>() + tail;
        let inv = 1.0 / (sum / x.len() as f32 + self.eps).sqrt();
        for (v, w) in x.iter_mut().zip(&self.weight) {
            *v = *v * inv * w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candle_rms_norm() -> Result<()> {
        let (rows, dim) = (5, 37);
        let x: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 11) % 17) as f32 / 4.0 - 2.0)
            .collect();
        let weight: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 5) as f32 / 7.0).collect();
        let norm = RmsNorm {
            weight: weight.clone(),
            eps: 1e-6,
        };
        let xt = Tensor::from_vec(x, (rows, dim), &Device::Cpu)?;
        let got: Vec<f32> = norm.forward(&xt)?.flatten_all()?.to_vec1()?;
        let w = Tensor::from_vec(weight, dim, &Device::Cpu)?;
        let want: Vec<f32> = candle_nn::ops::rms_norm(&xt, &w, 1e-6)?
            .flatten_all()?
            .to_vec1()?;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
        }
        let wrong = Tensor::zeros((2, dim + 1), candle_core::DType::F32, &Device::Cpu)?;
        assert!(norm.forward(&wrong).is_err());
        Ok(())
    }
}
