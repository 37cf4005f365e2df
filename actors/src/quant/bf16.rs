//! Dense bf16 matrices `[rows, cols]` kept as bf16 (mapped in place from bf16 checkpoints, or made from FP8
//! blocks, whose dequantized values are bf16-exact) and widened to f32 inside the kernels: half the bytes
//! of an f32 copy and the same values.

use crate::weights::Buf;

#[derive(Clone)]
pub struct Bf16Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Little-endian bf16, row-major.
    pub data: Buf,
}

impl Bf16Matrix {
    /// From f32 values that are bf16-exact (rounds to nearest otherwise).
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Bf16Matrix {
        let data: Vec<u8> = w
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        Bf16Matrix {
            rows,
            cols,
            data: Buf::owned(data),
        }
    }

    pub fn row_bytes(&self) -> usize {
        self.cols * 2
    }

    pub fn weight_bytes(&self) -> usize {
        self.data.len()
    }

    pub fn row(&self, r: usize) -> Vec<f32> {
        self.data[r * self.row_bytes()..(r + 1) * self.row_bytes()]
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    }

    pub fn to_f32(&self) -> Vec<f32> {
        (0..self.rows).flat_map(|r| self.row(r)).collect()
    }
}
