//! A weight matrix `[out, in]` applied as `y = x · Wᵀ`: dense f32, or MLX affine codes read in place.
//!
//! Dense checkpoints (bf16, f16, FP8 blocks) are widened to f32 once at load: candle's CPU BF16 matmul
//! would widen both operands on every call, which is an order of magnitude slower.

use crate::error::{Error, Result};
use crate::quant::affine::AffineMatrix;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

#[derive(Clone)]
pub enum Linear {
    Dense(Tensor),
    Affine(AffineMatrix),
}

impl Linear {
    pub fn dense(w: Vec<f32>, rows: usize, cols: usize) -> Result<Linear> {
        Ok(Linear::Dense(Tensor::from_vec(
            w,
            (rows, cols),
            &Device::Cpu,
        )?))
    }

    pub fn out_dim(&self) -> usize {
        match self {
            Linear::Dense(w) => w.dims()[0],
            Linear::Affine(m) => m.rows,
        }
    }

    pub fn in_dim(&self) -> usize {
        match self {
            Linear::Dense(w) => w.dims()[1],
            Linear::Affine(m) => m.cols,
        }
    }

    /// Bytes read by one application (the resident size of the weights).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Linear::Dense(w) => w.elem_count() * 4,
            Linear::Affine(m) => m.weight_bytes(),
        }
    }

    /// `x: [t, in]` → `[t, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, cols) = x.dims2()?;
        if cols != self.in_dim() {
            return Err(Error::Invalid(format!(
                "linear expects {} input columns, got {cols}",
                self.in_dim()
            )));
        }
        Ok(match self {
            Linear::Dense(w) => x.matmul(&w.t()?)?,
            Linear::Affine(m) => x.apply_op1_no_bwd(m)?,
        })
    }

    /// Row `r` of the matrix (an embedding lookup).
    pub fn row(&self, r: usize) -> Result<Vec<f32>> {
        Ok(match self {
            Linear::Dense(w) => w.get(r)?.to_vec1()?,
            Linear::Affine(m) => {
                let mut out = vec![0f32; m.cols];
                m.dequantize_row(r, &mut out);
                out
            }
        })
    }

    /// The whole matrix as f32, row-major.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(match self {
            Linear::Dense(w) => w.flatten_all()?.to_vec1()?,
            Linear::Affine(m) => m.dequantize(),
        })
    }
}

impl CustomOp1 for AffineMatrix {
    fn name(&self) -> &'static str {
        "affine-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, cols) = layout.shape().dims2()?;
        let x = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("affine-matmul needs a contiguous f32 input"),
        };
        debug_assert_eq!(cols, self.cols);
        let mut y = vec![0f32; t * self.rows];
        self.matmul(x, &mut y);
        Ok((CpuStorage::F32(y), Shape::from((t, self.rows))))
    }
}
