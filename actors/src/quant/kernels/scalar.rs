//! Scalar reference kernels: what every vector path must reproduce.

use super::{Dots, Q8, RESIDUAL, chunk4};

pub struct Scalar;

impl Dots for Scalar {
    fn dot4_f32(row: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        dot4_f32(row, x, scales, group)
    }
    fn dot4_i8(row: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        dot4_i8(row, xq, scales, dx, group)
    }
    fn dot_f32(codes: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        dot_f32(codes, x, scales, group)
    }
    fn dot_i8(codes: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        dot_i8(codes, xq, scales, dx, group)
    }
    fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
        dot_bf16(row, x)
    }
}

/// bf16 row × f32 activations, in eight lanes.
pub fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (w, xs) in row.chunks_exact(16).zip(x.chunks_exact(8)) {
        for i in 0..8 {
            lanes[i] +=
                f32::from_bits((u16::from_le_bytes([w[2 * i], w[2 * i + 1]]) as u32) << 16) * xs[i];
        }
    }
    let done = row.len() / 16 * 8;
    let tail: f32 = row[done * 2..]
        .chunks_exact(2)
        .zip(&x[done..])
        .map(|(w, v)| f32::from_bits((u16::from_le_bytes([w[0], w[1]]) as u32) << 16) * v)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// `Σ_g scale_g · Σ_{j∈g} codes_j · x_j` over byte codes.
pub fn dot_f32(codes: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    let mut acc = 0f32;
    for ((c, xs), s) in codes
        .chunks_exact(group)
        .zip(x.chunks_exact(group))
        .zip(scales)
    {
        let mut lanes = [0f32; 8];
        for (cc, xx) in c.chunks_exact(8).zip(xs.chunks_exact(8)) {
            for i in 0..8 {
                lanes[i] += cc[i] as f32 * xx[i];
            }
        }
        acc += s * lanes.iter().sum::<f32>();
    }
    acc
}

/// `Σ_g scale_g · dx_g · Σ_{j∈g} codes_j · (256·q_j + r_j)` over byte codes, with exact integer group sums.
pub fn dot_i8(codes: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
    let mut acc = 0f32;
    for (g, (c, (s, d))) in codes
        .chunks_exact(group)
        .zip(scales.iter().zip(dx))
        .enumerate()
    {
        let (q, r) = (
            &xq.q[g * group..(g + 1) * group],
            &xq.r[g * group..(g + 1) * group],
        );
        let dot: i32 = c
            .iter()
            .zip(q.iter().zip(r))
            .map(|(&a, (&q, &r))| a as i32 * (RESIDUAL * q as i32 + r as i32))
            .sum();
        acc += s * d * dot as f32;
    }
    acc
}

/// Calls `f(code, j)` for the codes of a 4-bit row in permuted order: per chunk, low nibbles then high.
#[inline]
fn nibbles(packed: &[u8], group: usize, mut f: impl FnMut(u8, usize)) {
    let c = chunk4(group);
    for (k, bytes) in packed.chunks_exact(c / 2).enumerate() {
        for (i, b) in bytes.iter().enumerate() {
            f(b & 0x0f, k * c + i);
            f(b >> 4, k * c + c / 2 + i);
        }
    }
}

/// [`dot_f32`] over a packed 4-bit row (activations permuted to match).
pub fn dot4_f32(packed: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    let mut sums = vec![0f32; scales.len()];
    nibbles(packed, group, |q, j| sums[j / group] += q as f32 * x[j]);
    sums.iter().zip(scales).map(|(d, s)| d * s).sum()
}

/// [`dot_i8`] over a packed 4-bit row (activations permuted to match).
pub fn dot4_i8(packed: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
    let mut sums = vec![0i32; scales.len()];
    nibbles(packed, group, |c, j| {
        sums[j / group] += c as i32 * (RESIDUAL * xq.q[j] as i32 + xq.r[j] as i32)
    });
    sums.iter()
        .zip(scales)
        .zip(dx)
        .map(|((d, s), x)| *d as f32 * s * x)
        .sum()
}
