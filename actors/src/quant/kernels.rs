//! Matrix kernels over affine-quantized weights, multi-threaded with rayon. Each task takes a block of weight
//! rows, unpacks each row once and applies it to every token of the batch, so a batch reads the weights once.

use crate::quant::affine::{AffineMatrix, unpack};
use rayon::prelude::*;

/// Weight rows per rayon task: enough work to amortize scheduling, small enough to balance two cores.
const ROWS_PER_TASK: usize = 16;

/// `y[t, rows] = x[t, cols] · Wᵀ`.
pub fn affine_matmul(m: &AffineMatrix, x: &[f32], y: &mut [f32]) {
    let t = x.len() / m.cols;
    debug_assert_eq!(x.len(), t * m.cols);
    debug_assert_eq!(y.len(), t * m.rows);
    let gpr = m.groups_per_row();
    // Σx per (token, group): the bias term of a group is bias · Σx.
    let xsum: Vec<f32> = x.chunks_exact(m.group).map(|c| c.iter().sum()).collect();
    let gbytes = m.group * m.bits as usize / 8;
    let row_bytes = m.row_bytes();
    let mut yt = vec![0f32; m.rows * t];
    yt.par_chunks_mut(ROWS_PER_TASK * t)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut codes = vec![0u8; m.group];
            let mut qf = vec![0f32; m.cols];
            for (ri, out) in chunk.chunks_exact_mut(t).enumerate() {
                let r = ci * ROWS_PER_TASK + ri;
                let row = &m.packed[r * row_bytes..(r + 1) * row_bytes];
                for g in 0..gpr {
                    unpack(&row[g * gbytes..(g + 1) * gbytes], m.bits, &mut codes);
                    for (d, &c) in qf[g * m.group..(g + 1) * m.group].iter_mut().zip(&codes) {
                        *d = c as f32;
                    }
                }
                for (ti, o) in out.iter_mut().enumerate() {
                    let xr = &x[ti * m.cols..(ti + 1) * m.cols];
                    let mut acc = 0f32;
                    for g in 0..gpr {
                        let (s, b) = m.scale_bias(r, g);
                        let lo = g * m.group;
                        let dot = dot(&qf[lo..lo + m.group], &xr[lo..lo + m.group]);
                        acc += s * dot + b * xsum[ti * gpr + g];
                    }
                    *o = acc;
                }
            }
        });
    for ti in 0..t {
        for r in 0..m.rows {
            y[ti * m.rows + r] = yt[r * t + ti];
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent lanes let the compiler vectorize without reassociation flags.
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_dequantized_reference() {
        let (rows, cols, t) = (37, 256, 3);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let x: Vec<f32> = (0..t * cols)
            .map(|i| ((i * 104729 % 997) as f32 / 498.0) - 1.0)
            .collect();
        for bits in crate::config::SUPPORTED_BITS {
            for group in crate::config::SUPPORTED_GROUPS {
                let m = AffineMatrix::quantize(&w, rows, cols, bits, group);
                let d = m.dequantize();
                let mut y = vec![0f32; t * rows];
                m.matmul(&x, &mut y);
                for ti in 0..t {
                    for r in 0..rows {
                        let want: f32 = (0..cols).map(|c| x[ti * cols + c] * d[r * cols + c]).sum();
                        let got = y[ti * rows + r];
                        assert!(
                            (want - got).abs() < 1e-3 * (1.0 + want.abs()),
                            "bits {bits} g {group}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
