//! A weight matrix `[out, in]` applied as `y = x · Wᵀ`, in the form that is fast on CPU for its format:
//!
//! - **bf16** (bf16 checkpoints, mapped in place; FP8 blocks, dequantized to their bf16-exact values) and
//!   **MLX affine** codes are read by the engine's kernels. candle 0.11's CPU BF16 matmul would widen both
//!   operands to f32 on every call instead.
//! - **f32** (f16/f32 checkpoints, and matrices rebuilt at load such as `kv_b_proj`'s halves) goes through
//!   candle's matmul.

use crate::error::{Error, Result};
use crate::quant::affine::AffineMatrix;
use crate::quant::bf16::Bf16Matrix;
use crate::quant::kernels::{Input, Isa, Weight, matmul_new};
use candle_core::{Device, Tensor, TensorId};

#[derive(Clone)]
pub enum Linear {
    Dense(Tensor),
    Bf16(Bf16Matrix),
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
            Linear::Bf16(m) => m.rows,
            Linear::Affine(m) => m.rows,
        }
    }

    pub fn in_dim(&self) -> usize {
        match self {
            Linear::Dense(w) => w.dims()[1],
            Linear::Bf16(m) => m.cols,
            Linear::Affine(m) => m.cols,
        }
    }

    /// Bytes read by one application (the resident size of the weights).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Linear::Dense(w) => w.elem_count() * 4,
            Linear::Bf16(m) => m.weight_bytes(),
            Linear::Affine(m) => m.weight_bytes(),
        }
    }

    fn kernel_weight(&self) -> Option<Weight<'_>> {
        match self {
            Linear::Dense(_) => None,
            Linear::Bf16(m) => Some(Weight::Bf16(m)),
            Linear::Affine(m) => Some(Weight::Affine(m)),
        }
    }

    /// `x: [t, in]` → `[t, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = Linear::forward_many(&[(self, x)])?;
        out.pop()
            .ok_or_else(|| Error::Invalid("linear produced no output".into()))
    }

    /// Applies several matrices to their inputs at once; those the engine's kernels read share one parallel
    /// region. `items[i] = (W, x)` with `x: [t_i, in_i]` → `[t_i, out_i]`.
    /// Several matrices on their own inputs `[t, in]` (tensors that are the same are read once), the kernels'
    /// matrices in one parallel region.
    pub fn forward_many(items: &[(&Linear, &Tensor)]) -> Result<Vec<Tensor>> {
        let mut inputs: Vec<(TensorId, Vec<f32>)> = Vec::new();
        let mut slot = Vec::with_capacity(items.len());
        for (_, x) in items {
            slot.push(match inputs.iter().position(|(id, _)| *id == x.id()) {
                Some(i) => i,
                None => {
                    inputs.push((x.id(), x.flatten_all()?.to_vec1::<f32>()?));
                    inputs.len() - 1
                }
            });
        }
        let rows: Vec<(&Linear, Input)> = items
            .iter()
            .zip(&slot)
            .map(|((l, _), &i)| (*l, Input::all(&inputs[i].1)))
            .collect();
        Linear::apply_many(&rows)?
            .into_iter()
            .zip(items)
            .map(|(y, (l, _))| {
                let t = y.len() / l.out_dim();
                Ok(Tensor::from_vec(y, (t, l.out_dim()), &Device::Cpu)?)
            })
            .collect()
    }

    /// [`Linear::forward_many`] on row-major rows: `x: [t, in]` (or rows of it, picked) → `[t, out]`.
    pub fn apply_many(items: &[(&Linear, Input)]) -> Result<Vec<Vec<f32>>> {
        for (l, x) in items {
            let rows = x.x.len() / l.in_dim().max(1);
            if !x.x.len().is_multiple_of(l.in_dim()) {
                return Err(Error::Invalid(format!(
                    "linear expects rows of {} columns, got {} values",
                    l.in_dim(),
                    x.x.len()
                )));
            }
            if let Some(&t) = x.pick.and_then(|p| p.iter().find(|&&t| t as usize >= rows)) {
                return Err(Error::Invalid(format!(
                    "linear picks row {t} of an input of {rows}"
                )));
            }
        }
        let calls: Vec<(Weight, Input)> = items
            .iter()
            .filter_map(|(l, x)| l.kernel_weight().map(|w| (w, *x)))
            .collect();
        let mut kernel_ys = matmul_new(Isa::detect(), &calls).into_iter();
        items
            .iter()
            .map(|(l, x)| match l {
                Linear::Dense(w) => {
                    let x = x.gather(l.in_dim());
                    let x =
                        Tensor::from_slice(&x, (x.len() / l.in_dim(), l.in_dim()), &Device::Cpu)?;
                    Ok(x.matmul(&w.t()?)?.flatten_all()?.to_vec1()?)
                }
                _ => kernel_ys
                    .next()
                    .ok_or_else(|| Error::Invalid("a kernel call gave no output".into())),
            })
            .collect()
    }

    pub fn row(&self, r: usize) -> Result<Vec<f32>> {
        Ok(match self {
            Linear::Dense(w) => w.get(r)?.to_vec1()?,
            Linear::Bf16(m) => m.row(r),
            Linear::Affine(m) => {
                let mut out = vec![0f32; m.cols];
                m.dequantize_row(r, &mut out);
                out
            }
        })
    }

    /// The matrix as f32 into `out` (`out_dim · in_dim` values, row-major).
    pub fn to_f32_into(&self, out: &mut [f32]) -> Result<()> {
        match self {
            Linear::Affine(m) => m.dequantize_into(out),
            _ => out.copy_from_slice(&self.to_f32()?),
        }
        Ok(())
    }

    /// The whole matrix as f32, row-major.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(match self {
            Linear::Dense(w) => w.flatten_all()?.to_vec1()?,
            Linear::Bf16(m) => m.to_f32(),
            Linear::Affine(m) => m.dequantize(),
        })
    }
}
